import math

import numpy as np
import pytest
import torch

from fastdiff import datasets as D

N = 20000


def _mixture_moments(w, mu, cov):
    m = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    return m, second - torch.outer(m, m)


# ----------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", sorted(D.DATASETS))
def test_shape_dtype_determinism(name):
    x = D.get(name, 64, seed=1)
    d = 1 if name == "gmm_1d" else 2
    assert x.shape == (64, d) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, D.get(name, 64, seed=1))
    x64 = D.get(name, 64, seed=1, dtype=torch.float64)
    assert x64.dtype == torch.float64 and torch.allclose(x64.float(), x)
    if name != "circle":                                   # circle is deterministic, seed ignored
        assert not torch.equal(x, D.get(name, 64, seed=2))


def test_no_global_rng():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    D.blob9(100, seed=5)
    assert torch.equal(torch.rand(3), a)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset.*blob9.*swiss_roll"):
        D.get("moons", 10)
    with pytest.raises(ValueError, match="n must be positive"):
        D.swiss_roll(0)
    with pytest.raises(TypeError, match="n must be an int"):
        D.gmm_1d(2.5)
    with pytest.raises(TypeError, match="dtype"):
        D.blob9(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="noise"):
        D.swiss_roll(10, noise=-1.0)
    with pytest.raises(ValueError, match="radius"):
        D.circle(8, radius=0.0)


# ----------------------------------------------------------------------------------------- Gaussian laws
@pytest.mark.parametrize("name", sorted(D.PARAMS))
def test_moments_match_params(name):
    w, mu, cov = D.PARAMS[name]()
    assert w.dtype == mu.dtype == cov.dtype == torch.float64
    K, d = mu.shape
    assert w.shape == (K,) and cov.shape == (K, d, d) and abs(float(w.sum()) - 1) < 1e-12
    m, C = _mixture_moments(w, mu, cov)
    x = D.get(name, N, seed=3, dtype=torch.float64)
    xc = x - m
    se_m = (torch.diagonal(C) / N).sqrt()
    assert ((x.mean(0) - m).abs() <= 5 * se_m + 1e-12).all()
    prod = xc[:, :, None] * xc[:, None, :]                 # E prod = C; SE from the sample
    se_c = prod.std(0) / math.sqrt(N)
    assert ((prod.mean(0) - C).abs() <= 5 * se_c + 1e-12).all()


def test_gmm_1d_distribution():
    from scipy import stats
    w, mu, cov = D.gmm_1d_params()
    assert torch.equal(w, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    assert mu.flatten().tolist() == [-3.0, 0.0, 3.0] and cov.flatten().tolist() == [0.25] * 3
    x = D.gmm_1d(N, seed=4, dtype=torch.float64).numpy()[:, 0]

    def cdf(t):
        return sum(float(wk) * stats.norm.cdf(t, float(mk), 0.5) for wk, mk in zip(w, mu[:, 0], strict=True))
    assert stats.kstest(x, cdf).pvalue > 1e-3


def test_blob9_components():
    x = D.blob9(N, seed=5, dtype=torch.float64)
    _, mu, _ = D.blob9_params()
    assert sorted(map(tuple, mu.tolist())) == [(a, b) for a in (-2, 0, 2) for b in (-2, 0, 2)]
    k = torch.cdist(x, mu).argmin(1)                      # centres 2 apart, std 0.3: misassignment ~ 1e-3
    frac = torch.bincount(k, minlength=9).double() / N
    assert ((frac - 1 / 9).abs() < 5 * math.sqrt(1 / 9 * 8 / 9 / N) + 2e-3).all()
    r = (x - mu[k]).norm(dim=1)                           # radial |z| 0.3: E r² = 2 · 0.09
    assert abs(float((r ** 2).mean()) - 0.18) < 0.01


# ----------------------------------------------------------------------------------------- geometry
def test_swiss_roll_on_curve():
    x = D.swiss_roll(N, seed=6, dtype=torch.float64)
    t = 10 * x.norm(dim=1)                                 # |(t cos t, t sin t)| = t
    assert t.min() >= 1.5 * math.pi - 1e-9 and t.max() <= 4.5 * math.pi + 1e-9
    assert torch.allclose(10 * x, torch.stack([t * t.cos(), t * t.sin()], 1), atol=1e-9)
    u = (t / (1.5 * math.pi) - 1) / 2                      # u ~ U(0, 1)
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
    y = D.swiss_roll(N, seed=6, dtype=torch.float64, noise=0.1)
    assert abs(float((y - x).std()) - 0.1) < 0.005         # same seed: same t, then the noise


def test_spiral_on_curve():
    x = D.spiral(N, seed=7, dtype=torch.float64)
    s = 2 / (3.5 * math.pi)
    th = x.norm(dim=1) / s
    assert th.min() >= 0.5 * math.pi - 1e-9 and th.max() <= 3.5 * math.pi + 1e-9
    assert torch.allclose(x, s * torch.stack([th * th.cos(), th * th.sin()], 1), atol=1e-12)
    assert x.abs().max() <= 2 + 1e-12
    x32 = D.spiral(N, seed=7)
    assert torch.allclose(x32.double(), x, atol=1e-6)


def test_line():
    x = D.line(N, seed=8)
    assert torch.equal(x[:, 0], x[:, 1])
    w, mu, cov = D.line_params()
    assert torch.linalg.matrix_rank(cov[0]) == 1 and torch.equal(cov[0], torch.ones(2, 2, dtype=torch.float64))


def test_circle():
    x = D.circle(8, radius=2.0, dtype=torch.float64)
    k = torch.arange(8, dtype=torch.float64)
    ref = 2 * torch.stack([torch.cos(2 * math.pi * k / 8), torch.sin(2 * math.pi * k / 8)], 1)
    assert torch.allclose(x, ref, atol=1e-15)
    assert torch.equal(D.circle(), D.circle(seed=99)) and D.circle().shape == (8, 2)


def test_two_rings():
    x = D.two_rings(N, seed=9, dtype=torch.float64)
    r = x.norm(dim=1)
    inner = r < 1.5
    assert abs(float(inner.double().mean()) - 0.5) < 5 * math.sqrt(0.25 / N)
    for sel, R in ((inner, 1.0), (~inner, 2.0)):
        assert abs(float(r[sel].mean()) - R) < 0.005 and abs(float(r[sel].std()) - 0.08) < 0.005
    ang = torch.atan2(x[:, 1], x[:, 0])                    # uniform angle: E cos = E sin = 0
    assert abs(float(ang.cos().mean())) < 0.03 and abs(float(ang.sin().mean())) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checkerboard(dtype):
    x = D.checkerboard(N, seed=10, dtype=dtype)
    assert (x >= -2).all() and (x < 2).all()
    f = torch.floor(x).long()
    assert ((f[:, 0] + f[:, 1]) % 2 == 0).all()            # every sample on a dark square
    cell = (f[:, 0] + 2) * 4 + (f[:, 1] + 2)
    counts = torch.bincount(cell, minlength=16).double() / N
    dark = [i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    assert len(dark) == 8 and counts[dark].sum() == 1
    assert ((counts[dark] - 1 / 8).abs() < 5 * math.sqrt(1 / 8 * 7 / 8 / N)).all()
    u = x - torch.floor(x)                                 # uniform within the square
    assert (u.mean(0) - 0.5).abs().max() < 5 * math.sqrt(1 / 12 / N)


# ----------------------------------------------------------------------------------------- load
def test_load_roundtrip(tmp_path):
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.save(tmp_path / "a.npy", x.numpy())
    torch.save(x, tmp_path / "b.pt")
    torch.save({"points": x}, tmp_path / "c.pth")
    rows = "\n".join(",".join(repr(v) for v in r) for r in x.tolist())
    (tmp_path / "d.csv").write_text(rows + "\n")
    (tmp_path / "e.csv").write_text("x,y,z\n" + rows + "\n\n")
    for f in ("a.npy", "b.pt", "c.pth", "d.csv", "e.csv"):
        y = D.load(tmp_path / f, dtype=torch.float64)
        assert torch.equal(y, x), f
        assert D.load(str(tmp_path / f)).dtype == torch.float32
    np.save(tmp_path / "v.npy", np.arange(5))              # 1-D ints -> [5, 1]
    assert torch.equal(D.load(tmp_path / "v.npy"), torch.arange(5.0).unsqueeze(1))
    (tmp_path / "v.csv").write_text("value\n1.5\n2.5\n")
    assert torch.equal(D.load(tmp_path / "v.csv"), torch.tensor([[1.5], [2.5]]))


def test_load_errors(tmp_path):
    def err(name, match):
        with pytest.raises(ValueError, match=match) as e:
            D.load(tmp_path / name)
        assert name in str(e.value)

    (tmp_path / "a.txt").write_text("1,2\n")
    err("a.txt", "unknown file suffix")
    np.save(tmp_path / "empty.npy", np.zeros((0, 2)))
    err("empty.npy", "empty")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    err("cube.npy", "1-D or 2-D")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]]))
    err("nan.npy", "NaN or inf")
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    err("str.npy", "numeric")
    torch.save({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, tmp_path / "two.pt")
    err("two.pt", "exactly one tensor")
    torch.save(torch.zeros(3, 2, dtype=torch.bool), tmp_path / "bool.pt")
    err("bool.pt", "real numeric")
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n3,oops\n")
    err("bad.csv", "line 3")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    err("ragged.csv", "columns")
    (tmp_path / "hdr.csv").write_text("x,y\n")
    err("hdr.csv", "empty")
    (tmp_path / "inf.csv").write_text("1,inf\n")
    err("inf.csv", "NaN or inf")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        D.load(tmp_path / "missing.npy")


def test_load_csv_with_a_utf8_bom_keeps_its_first_point(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the first row is data, not a header to drop silently."""
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf1,2\n3,4\n5,6\n")
    assert D.load(tmp_path / "bom.csv", dtype=torch.float64).tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    (tmp_path / "bomhdr.csv").write_bytes(b"\xef\xbb\xbfx,y\n3,4\n")
    assert D.load(tmp_path / "bomhdr.csv").tolist() == [[3.0, 4.0]]
    # a first row with some numbers is a broken data row, not a header: said so, never dropped
    (tmp_path / "mixed.csv").write_text("1,oops\n3,4\n")
    with pytest.raises(ValueError, match=r"mixed\.csv: line 1 is not comma-separated numbers"):
        D.load(tmp_path / "mixed.csv")


def test_load_csv_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "utf16.csv").write_bytes(b"\xff\xfe1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"utf16\.csv: not a UTF-8 text CSV"):
        D.load(tmp_path / "utf16.csv")


@pytest.mark.parametrize("seed", [-1, 2**64, -(2**63)])
def test_seeds_outside_the_generator_range_are_refused(seed):
    # -1 would alias 2**64 - 1 (torch wraps it), 2**64 overflowed with an unrelated message
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got " + str(seed)):
        D.swiss_roll(3, seed=seed)
    with pytest.raises(ValueError, match="seed must be in"):
        D.get("blob9", 3, seed=seed)
    assert D.swiss_roll(3, seed=2**64 - 1).shape == (3, 2)     # the range's ends are fine
    assert D.swiss_roll(3, seed=0).shape == (3, 2)

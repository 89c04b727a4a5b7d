"""The noise contract (DESIGN.md): Philox4x32-10 known answers, exact uniforms, normality, independence,
and batch invariance."""
import math

import pytest
import torch

from fastdiff import noise


def test_philox_known_answers():
    # Random123's published known-answer vectors for philox4x32_10.
    out = noise.philox4x32_10((0, 0, 0, 0), (0, 0))
    assert [int(w) for w in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    out = noise.philox4x32_10((m, m, m, m), (m, m))
    assert [int(w) for w in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    out = noise.philox4x32_10(pi, (0xA4093822, 0x299F31D0))
    assert [int(w) for w in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_uniforms_are_exact_and_strictly_inside():
    u = noise.uniform(7, torch.arange(4096), 3, 8)
    assert u.dtype == torch.float32 and u.shape == (4096, 8)
    assert float(u.min()) > 0 and float(u.max()) < 1
    k = u.double() * 2**23 - 0.5                      # must be an integer in [0, 2^23): no rounding happened
    assert torch.equal(k, k.round()) and float(k.min()) >= 0 and float(k.max()) < 2**23
    assert float(u.max()) > 0.99 and float(u.min()) < 0.01   # the whole range is used


def test_extreme_words_give_extreme_but_interior_uniforms():
    # r = 0 and r = 2^32 − 1 map to 2^-24 and 1 − 2^-24, both exact float32 numbers
    lo = ((torch.tensor([0]) >> 9).float() + 0.5) * 2.0**-23
    hi = ((torch.tensor([2**32 - 1]) >> 9).float() + 0.5) * 2.0**-23
    assert float(lo) == 2.0**-24 and float(hi) == 1 - 2.0**-24


def test_uniforms_match_philox_words_by_hand():
    seed, i, step = (5 << 32) | 123, (3 << 32) | 9, 11
    u = noise.uniform(seed, torch.tensor([i]), step, 8)
    for q in range(2):
        words = noise.philox4x32_10((q, step, i & 0xFFFFFFFF, i >> 32), (seed & 0xFFFFFFFF, seed >> 32))
        expect = [((int(w) >> 9) + 0.5) / 2**23 for w in words]
        assert u[0, 4 * q:4 * q + 4].tolist() == expect


def test_box_muller_by_hand():
    u = noise.uniform(1, torch.tensor([2]), 3, 4)[0].double()
    z = noise.normal(1, torch.tensor([2]), 3, 4, dtype=torch.float64)[0]
    r01, r23 = math.sqrt(-2 * math.log(u[0])), math.sqrt(-2 * math.log(u[2]))
    expect = [r01 * math.cos(2 * math.pi * u[1]), r01 * math.sin(2 * math.pi * u[1]),
              r23 * math.cos(2 * math.pi * u[3]), r23 * math.sin(2 * math.pi * u[3])]
    assert torch.allclose(z, torch.tensor(expect, dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_normal_moments():
    z = noise.normal(0, torch.arange(200_000), 0, 3, dtype=torch.float64).flatten()
    n = z.numel()
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((z**3).mean())) < 5 * math.sqrt(15) * se          # skewness 0
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96) * se      # kurtosis 3
    # Kolmogorov–Smirnov against Φ: the 1% critical value is 1.63/√n.
    zs = z.sort().values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((cdf - emp).abs().max()) < 1.63 / math.sqrt(n) + 1 / n


@pytest.mark.parametrize("axis", ["component", "step", "sample", "seed"])
def test_independence_across_every_counter(axis):
    n = 50_000
    idx = torch.arange(n)
    a = noise.normal(3, idx, 5, 8, dtype=torch.float64)
    if axis == "component":
        x, y = a[:, 0], a[:, 1]
        x2, y2 = a[:, 3], a[:, 4]                      # across the 4-word boundary
        assert abs(float((x2 * y2).mean())) < 5 / math.sqrt(n)
    elif axis == "step":
        x, y = a[:, 0], noise.normal(3, idx, 6, 8, dtype=torch.float64)[:, 0]
    elif axis == "sample":
        x, y = a[:-1, 0], a[1:, 0]
    else:
        x, y = a[:, 0], noise.normal(4, idx, 5, 8, dtype=torch.float64)[:, 0]
    assert abs(float((x * y).mean())) < 5 / math.sqrt(n)
    assert abs(float((x * x * y * y).mean()) - 1) < 5 * math.sqrt(8) / math.sqrt(n)   # E[x²y²] = 1 if independent


def test_noise_depends_only_on_global_index():
    full = noise.normal(9, torch.arange(1000), 2, 5)
    part = noise.normal(9, torch.arange(300, 400), 2, 5)
    assert torch.equal(full[300:400], part)
    assert torch.equal(noise.normal(9, range(300, 400), 2, 5), part)
    # components do not depend on how many are asked for
    assert torch.equal(noise.normal(9, torch.arange(10), 2, 3), noise.normal(9, torch.arange(10), 2, 7)[:, :3])
    # 64-bit sample indices and seeds use the high counter / key words
    big = torch.tensor([2**32 + 1, 1])
    z = noise.normal(2**40 + 3, big, 0, 2)
    assert not torch.equal(z[0], z[1])


def test_prior_step_is_distinct_from_sampler_steps():
    a = noise.normal(0, torch.arange(100), noise.PRIOR_STEP, 2)
    b = noise.normal(0, torch.arange(100), 0, 2)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**64), dict(step=-1), dict(step=2**32), dict(dim=0)])
def test_bad_arguments(bad):
    args = dict(seed=0, sample_index=torch.arange(3), step=0, dim=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        noise.normal(**args)


def test_bad_sample_index():
    with pytest.raises(ValueError, match="sample_index"):
        noise.normal(0, torch.tensor([-1, 2]), 0, 2)
    with pytest.raises(ValueError, match="sample_index"):
        noise.normal(0, torch.tensor([0.5]), 0, 2)


def test_philox_keeps_plain_int_words_on_the_tensor_words_device():
    # A plain-int word (the step) beside device tensors must not stay a CPU tensor: once expanded it is no
    # longer a 0-d scalar and the rounds would mix devices (what noise.normal(device="cuda") hit). The meta
    # device shows the mix without a GPU.
    q = torch.arange(3, dtype=torch.int64, device="meta")
    words = noise.philox4x32_10((q, 5, q, q), (7, 0))
    assert all(w.device.type == "meta" and w.shape == (3,) for w in words)
    cpu = noise.philox4x32_10((torch.arange(3), 5, torch.arange(3), torch.arange(3)), (7, 0))
    ref = noise.philox4x32_10((torch.arange(3), torch.full((3,), 5), torch.arange(3), torch.arange(3)), (7, 0))
    assert all(torch.equal(a, b) for a, b in zip(cpu, ref, strict=True))


def test_counters_are_integers_never_truncated():
    for kw, name in (({"step": 2.5}, "step"), ({"seed": 1.7}, "seed"), ({"seed": "5"}, "seed"),
                     ({"dim": 4.9}, "dim"), ({"seed": True}, "seed")):
        args = {"seed": 0, "sample_index": range(3), "step": 0, "dim": 4, **kw}
        with pytest.raises(TypeError, match=f"{name} must be an integer"):
            noise.normal(**args)
    assert noise.normal(0, [], 0, 4).shape == (0, 4)
    with pytest.raises(ValueError, match="sample_index"):
        noise.normal(0, 2**63, 0, 4)
    with pytest.raises(ValueError, match="sample_index"):
        noise.normal(0, [2**63], 0, 4)
    import numpy as np
    assert torch.equal(noise.normal(np.uint64(2**64 - 1), np.int64(5), np.int32(7), np.int8(3)),
                       noise.normal(2**64 - 1, 5, 7, 3))

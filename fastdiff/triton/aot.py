"""Ahead-of-time compile of every Triton kernel in every configuration fastdiff ships, for sm_90 (H100/H200),
without a GPU: `python -m fastdiff.triton.aot [--arch 90] [--jobs N] [--out DIR] [--only SUBSTR] [--covering]`.

Type errors, unsupported ops and resource overflows (shared memory, registers) show up here rather than
on a user's GPU. Must run without TRITON_INTERPRET (the kernels would be decorated for the interpreter):
main() and every compile worker remove it before the kernel modules are imported; importing this module
has no side effect, so the test suite can list the configurations in-process. Exit status 0 when every
configuration produced PTX and a cubin; a table of (kernel, configuration, PTX/cubin sizes, shared
memory, and registers/stack from cuobjdump when available) is printed.

The configurations are exactly those the launchers can pick: every padded width DP of the small-d
kernels and the large-d kernels with both screening precisions, each for float32/float16/bfloat16 data,
and the affine step for every tile width, with and without noise and with device-side noise counters,
for each D dtype; plus, for float32, the variants Triton picks when integer
sizes and strides are multiples of 16.

`--covering` compiles the subset CI runs (covering()): per kernel, its heaviest configuration and, for every
value of every axis, the configuration nearest to it with that value; a fifth of the full grid's compile time.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

from . import _common as C

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# pointcloud_sample's HIST: the past D's a step table uses (0: one-step tables; 1: B1; 2: B1 and B2), and STAGES:
# whether it has churned or two-stage rows
SAMPLE_HISTORIES = (0, 1, 2)
SAMPLE_STAGES = (False, True)


# per-call values, declared do_not_specialize in the kernels
_NEVER_SPECIALISED = ("seed_lo", "seed_hi", "step", "off_lo", "off_hi")


# The affine step's launcher choices (HAS_NOISE, CTR_PTR, HAS_D1, HAS_D2): numbers as kernel arguments (eager
# loop), device counters (graph capture), and the multistep history of the model loop (D1, or D1 and D2).
AFFINE_VARIANTS = ((True, False, False, False), (False, False, False, False), (True, True, False, False),
                   (True, False, True, False), (False, False, True, False), (True, False, True, True),
                   (False, False, True, True))


def _small_cfg(DP):
    cfg = C.small_config(DP)
    return {"BM": cfg["BM"], "BN": cfg["BN"], "DP": cfg["DP"]}, cfg["num_warps"]


def _large_cfg(tf32):
    cfg = C.large_config(C.SMALL_D_MAX + 1)
    return ({"SCREEN_TF32": tf32, "BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"], "BKE": cfg["BKE"]},
            cfg["num_warps"])


def configurations():
    """[(module, kernel name, signature of runtime args, constexprs, num_warps, label)]."""
    out = []
    i32, f32, i64 = "i32", "fp32", "i64"
    for dt in DTYPES:
        for DP in C.SMALL_DPS:
            cex, nw = _small_cfg(DP)
            out.append(("posterior", "_posterior_small_kernel", {
                "x_ptr": "*fp32", "data_ptr": f"*{dt}", "lw_ptr": "*fp32", "par_ptr": "*fp32", "D_ptr": "*fp32",
                "L_ptr": "*fp32", "M": i32, "N": i32, "d": i32, "stride_x": i32, "stride_y": i32, "stride_D": i32,
                "par_stride": i32}, cex, nw, f"data={dt} DP={DP}"))
            out.append(("pointcloud_step", "_pointcloud_step_small_kernel", {
                "x_ptr": "*fp32", "data_ptr": f"*{dt}", "lw_ptr": "*fp32", "par_ptr": "*fp32", "out_ptr": "*fp32",
                "A": f32, "B": f32, "Cn": f32, "M": i32, "N": i32, "d": i32, "stride_x": i32, "stride_y": i32,
                "stride_o": i32, "par_stride": i32, "seed_lo": i64, "seed_hi": i64, "step": i64, "off_lo": i64,
                "off_hi": i64, "has_noise": i32}, cex, nw, f"data={dt} DP={DP}"))
            for hist in SAMPLE_HISTORIES:
                for stages in SAMPLE_STAGES:
                    out.append(("pointcloud_sample", "_pointcloud_sample_small_kernel", {
                        "x_ptr": "*fp32", "data_ptr": f"*{dt}", "lw_ptr": "*fp32", "tab_ptr": "*fp32",
                        "hist_ptr": "*fp32", "stage_ptr": "*fp32", "traj_ptr": "*fp32", "M": i32, "N": i32, "d": i32,
                        "K": i32, "stride_x": i32, "stride_y": i32, "traj_stride": i64, "seed_lo": i64,
                        "seed_hi": i64, "off_lo": i64, "off_hi": i64, "save_traj": i32},
                        {**cex, "HIST": hist, "STAGES": stages}, nw, f"data={dt} DP={DP} HIST={hist} STAGES={stages}"))
        for tf32 in (True, False):
            cex, nw = _large_cfg(tf32)
            screen = "tf32" if tf32 else "ieee"
            out.append(("posterior", "_posterior_large_kernel", {
                "x_ptr": "*fp32", "data_ptr": f"*{dt}", "lw_ptr": "*fp32", "par_ptr": "*fp32", "acc_ptr": "*fp64",
                "D_ptr": "*fp32", "L_ptr": "*fp32", "M": i32, "N": i32, "d": i32, "stride_x": i32, "stride_y": i32,
                "stride_acc": i32, "stride_D": i32, "par_stride": i32, "kappa": f32, "delta2": f32, "tau2": f32},
                cex, nw, f"data={dt} screen={screen}"))
            out.append(("posterior", "_posterior_large_split_kernel", {
                "x_ptr": "*fp32", "data_ptr": f"*{dt}", "lw_ptr": "*fp32", "par_ptr": "*fp32", "acc_ptr": "*fp64",
                "ms_ptr": "*fp64", "M": i32, "N": i32, "d": i32, "n_chunk": i32, "stride_x": i32, "stride_y": i32,
                "par_stride": i32, "kappa": f32, "delta2": f32, "tau2": f32}, cex, nw, f"data={dt} screen={screen}"))
            out.append(("pointcloud_step", "_pointcloud_step_large_kernel", {
                "x_ptr": "*fp32", "data_ptr": f"*{dt}", "lw_ptr": "*fp32", "par_ptr": "*fp32",
                "acc_ptr": "*fp64", "out_ptr": "*fp32", "A": f32, "B": f32, "Cn": f32, "M": i32, "N": i32, "d": i32,
                "stride_x": i32, "stride_y": i32, "stride_acc": i32, "stride_o": i32, "par_stride": i32,
                "kappa": f32, "delta2": f32, "tau2": f32, "seed_lo": i64, "seed_hi": i64, "step": i64,
                "off_lo": i64, "off_hi": i64, "has_noise": i32}, cex, nw, f"data={dt} screen={screen}"))
            for hist in SAMPLE_HISTORIES:
                for stages in SAMPLE_STAGES:
                    out.append(("pointcloud_sample", "_pointcloud_sample_large_kernel", {
                        "data_ptr": f"*{dt}", "lw_ptr": "*fp32", "tab_ptr": "*fp32", "hist_ptr": "*fp32",
                        "stage_ptr": "*fp32", "x_ptr": "*fp32", "acc_ptr": "*fp64", "dbuf_ptr": "*fp32",
                        "sbuf_ptr": "*fp32", "traj_ptr": "*fp32", "M": i32, "N": i32, "d": i32, "K": i32,
                        "stride_y": i32, "traj_stride": i64, "slot_stride": i64, "kappa": f32, "delta2": f32,
                        "tau2": f32, "seed_lo": i64, "seed_hi": i64, "off_lo": i64, "off_hi": i64, "save_traj": i32},
                        {**cex, "HIST": hist, "STAGES": stages}, nw,
                        f"data={dt} screen={screen} HIST={hist} STAGES={stages}"))
        for BK in C.AFFINE_BKS:
            cfg = C.affine_config(BK)
            # the multistep history: none, D1 (dpmpp_2m's model loop) or D1 and D2 (dpmpp_3m_sde's)
            for noise, ctr, h1, h2 in AFFINE_VARIANTS:
                out.append(("affine_step", "_affine_step_kernel", {
                    "x_ptr": "*fp32", "D_ptr": f"*{dt}", "out_ptr": "*fp32", "a": f32, "b": f32, "c": f32,
                    "ctr_ptr": "*i64", "M": i32, "d": i32, "stride_x": i32, "stride_D": i32, "stride_o": i32,
                    "seed_lo": i64, "seed_hi": i64, "step": i64, "off_lo": i64, "off_hi": i64,
                    "D1_ptr": "*fp32", "b1": f32, "stride_1": i32, "D2_ptr": "*fp32", "b2": f32, "stride_2": i32},
                    {"HAS_NOISE": noise, "CTR_PTR": ctr, "HAS_D1": h1, "HAS_D2": h2, "BM": cfg["BM"],
                     "BK": cfg["BK"]},
                    cfg["num_warps"], f"D={dt} BK={BK} noise={noise} ctr={ctr} history={int(h1) + int(h2)}"))
    # At run time Triton specialises integer arguments divisible by 16 (sizes and strides of 16, 64,
    # 3072, ...), which switches on vectorised loads: compile one such variant of every float32
    # configuration too (the integer arguments marked tt.divisibility = 16).
    out += [(mod, name, sig, cex, nw, label + " div16") for mod, name, sig, cex, nw, label in out
            if "data=fp32" in label or "D=fp32" in label]
    return out


# The heaviest value of each axis of a configuration's label: the most code (every history slot, the stages, the
# noise), float32 data (the div16 variants are float32's) and IEEE screening (no tf32 shortcut). The tile axes (DP,
# BK) take their largest value: the widest tiles are where registers and shared memory run out.
HEAVIEST = {"data": "fp32", "D": "fp32", "HIST": "2", "STAGES": "True", "history": "2", "noise": "True",
            "ctr": "False", "screen": "ieee", "div16": "False"}
TILE_AXES = ("DP", "BK")


def axes(label):
    """A label's axes: {"data": "fp16", "DP": "32", ..., "div16": "True"|"False"}."""
    words = label.split()
    out = dict(w.split("=", 1) for w in words if "=" in w)
    out["div16"] = str("div16" in words)
    return out


def covering(items=None):
    """The CI subset of configurations(): per kernel, the configuration with every axis at its heaviest value
    (HEAVIEST, the largest tile) and, for every (axis, value) pair no chosen configuration has yet, the one that
    has it and differs from the heaviest in the fewest axes (first in configurations() order on ties). So every
    value of every axis compiles at least once, each next to the heaviest code and tiles, where type errors and
    resource overflows show; what it leaves out are combinations of two or more lighter values, which the full
    grid (no --covering) compiles."""
    items = configurations() if items is None else items
    chosen = []
    for name in dict.fromkeys(it[1] for it in items):
        mine = [it for it in items if it[1] == name]
        ax = [axes(it[5]) for it in mine]
        top = {}
        for a in ax:
            for k, v in a.items():
                if k in TILE_AXES:
                    top[k] = str(max(int(v), int(top.get(k, v))))
                elif k in HEAVIEST:
                    top[k] = HEAVIEST[k]
        dist = [sum(a.get(k) != v for k, v in top.items()) for a in ax]
        picked = [min(range(len(mine)), key=dist.__getitem__)]
        for i in range(len(mine)):
            for k, v in ax[i].items():
                if any(ax[j].get(k) == v for j in picked):
                    continue
                picked.append(min((j for j in range(len(mine)) if ax[j].get(k) == v), key=dist.__getitem__))
        chosen += [mine[j] for j in sorted(picked)]
    return chosen


def _resources(cubin_path):
    """'REG:… STACK:… SHARED:…' from cuobjdump --dump-resource-usage, or '' when unavailable."""
    try:
        from triton.backends.nvidia import compiler as nv
        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        res = subprocess.run([tool, "--dump-resource-usage", cubin_path], capture_output=True, text=True, timeout=60)
        for line in res.stdout.splitlines():
            if "REG:" in line:
                return " ".join(line.split()[1:5]) if line.strip().startswith("Resource") else line.strip()
    except Exception:  # diagnostics only
        return ""
    return ""


def compile_one(item, arch=90, out_dir=None):
    """Compile one configuration; returns a result dict (never raises)."""
    import importlib

    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget

    module, name, sig, cex, nw, label = item
    t0 = time.time()
    try:
        fn = getattr(importlib.import_module(f"fastdiff.triton.{module}"), name)
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(f"{name} is a {type(fn).__name__}: TRITON_INTERPRET was set when it was decorated")
        signature = dict(sig)
        signature.update({k: "constexpr" for k in cex})
        div16 = label.endswith(" div16")
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
                 if v.startswith("*") or (div16 and v in ("i32", "i64") and k not in _NEVER_SPECIALISED)}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(cex), attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": nw})
        ptx, cubin = ck.asm.get("ptx", ""), ck.asm.get("cubin", b"")
        if not ptx or not cubin:
            raise RuntimeError("no PTX or no cubin produced")
        res = ""
        tag = f"{name}-{label}".replace(" ", "_").replace("=", "")
        path = None
        if out_dir:
            path = os.path.join(out_dir, tag + ".cubin")
            with open(os.path.join(out_dir, tag + ".ptx"), "w") as f:
                f.write(ptx)
        else:
            fd_, path = tempfile.mkstemp(suffix=".cubin")
            os.close(fd_)
        with open(path, "wb") as f:
            f.write(cubin)
        res = _resources(path)
        if not out_dir:
            os.unlink(path)
        return {"kernel": name, "config": label, "ok": True, "ptx": len(ptx), "cubin": len(cubin),
                "shared": getattr(ck.metadata, "shared", None), "resources": res, "seconds": time.time() - t0}
    except Exception as e:  # reported per configuration
        return {"kernel": name, "config": label, "ok": False, "error": f"{type(e).__name__}: {e}",
                "seconds": time.time() - t0}


def _worker(args):
    return compile_one(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdiff.triton.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for sm_90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--out", default=None, help="directory to write the .ptx and .cubin files into")
    ap.add_argument("--only", default=None, help="compile only kernels whose name contains this")
    ap.add_argument("--covering", action="store_true",
                    help="only the covering subset CI compiles: every value of every axis next to the heaviest "
                         "configuration (see covering())")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    items = [it for it in (covering() if args.covering else configurations())
             if args.only is None or args.only in it[1]]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    work = [(it, args.arch, args.out) for it in items]
    if args.jobs > 1:
        import multiprocessing as mp
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_worker, work))
    else:
        results = [_worker(w) for w in work]
    failed = [r for r in results if not r["ok"]]
    for r in results:
        if r["ok"]:
            print(f"ok   {r['kernel']:<34} {r['config']:<26} ptx {r['ptx']:>7} B  cubin {r['cubin']:>7} B  "
                  f"shared {r['shared']!s:>6} B  {r['resources']}  {r['seconds']:.1f}s")
        else:
            print(f"FAIL {r['kernel']:<34} {r['config']:<26} {r['error']}")
    kernels = len({r["kernel"] for r in results})
    print(f"sm_{args.arch}: {len(results) - len(failed)}/{len(results)} configurations of {kernels} kernels compiled "
          f"in {time.time() - t0:.1f}s ({args.jobs} jobs{', covering subset' if args.covering else ''})")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())

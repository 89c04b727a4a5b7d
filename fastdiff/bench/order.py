"""The measured backend order: per benchmarked case, the fastdiff backends from fastest to slowest, for
choosing backend="auto"'s order (fastdiff/_backend.py AUTO_ORDER) from measurements."""
from __future__ import annotations


def _kernel_op(r) -> str:
    if r["suite"] in ("posterior", "scaling"):
        return "posterior"
    if r["suite"] == "step":
        return "affine_step"
    if r["suite"] == "sample":
        return "pointcloud_sample" if str(r["op"]).startswith("pointcloud") else "affine_step (model loop)"
    return str(r["op"])


def auto_order(rows) -> dict:
    """Per (suite, op, case): the fastdiff backends measured there, fastest first, with their times; and a
    summary per kernel op of how often each backend was fastest (overall, and of cuda vs triton)."""
    groups: dict = {}
    for r in rows:
        p = r.get("provider") or ""
        if not r.get("median_s") or not (p.startswith("fastdiff[") and p.endswith("]")):
            continue
        groups.setdefault((r["suite"], r["op"], r["case"]), []).append(r)
    entries, summary = [], {}
    for (suite, op, case), rs in groups.items():
        if len(rs) < 2:
            continue
        times = {r["backend"]: r["median_s"] for r in rs}
        ranking = sorted(times, key=times.get)
        r0 = rs[0]
        kop = _kernel_op(r0)
        e = {"kernel_op": kop, "suite": suite, "op": op, "case": case, "shape": r0.get("shape"), "d": r0.get("d"),
             "M": r0.get("M"), "N": r0.get("N"), "n": r0.get("n_elems"), "steps": r0.get("steps"),
             "times_s": times, "ranking": ranking, "fastest": ranking[0]}
        if "cuda" in times and "triton" in times:
            fast = "cuda" if times["cuda"] <= times["triton"] else "triton"
            slow = "triton" if fast == "cuda" else "cuda"
            e["cuda_vs_triton"] = {"faster": fast, "ratio": times[slow] / times[fast]}
        entries.append(e)
        s = summary.setdefault(kop, {"cases": 0, "fastest": {}, "cuda_vs_triton": {}, "by_d": {}})
        s["cases"] += 1
        s["fastest"][ranking[0]] = s["fastest"].get(ranking[0], 0) + 1
        if "cuda_vs_triton" in e:
            f = e["cuda_vs_triton"]["faster"]
            s["cuda_vs_triton"][f] = s["cuda_vs_triton"].get(f, 0) + 1
            bd = s["by_d"].setdefault(str(e["d"]), {})
            bd[f] = bd.get(f, 0) + 1
    for s in summary.values():
        s["order"] = sorted(s["fastest"], key=lambda b: -s["fastest"][b])
    return {"entries": entries, "summary": summary,
            "how": "per (suite, op, case): fastdiff backends by median time, fastest first; summary: per kernel op, "
                   "how many cases each backend was fastest in, and of cuda vs triton (overall and by d)"}

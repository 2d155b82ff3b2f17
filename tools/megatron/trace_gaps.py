"""Where a profiled training step leaves the GPU idle: from a torch.profiler chrome trace (gpu_check.py bench
--profile DIR writes DIR/<model>_<precision>.trace.json.gz), the GPU's busy time (union of kernel / memcpy
intervals), its idle time inside the step, the largest idle gaps with the CPU ops running across them, and the
idle time by phase of the step (each micro-batch's forward and backward, the optimizer).

    python tools/megatron/trace_gaps.py FILE.trace.json.gz [--top 15]
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter


def load(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        return json.load(f)["traceEvents"]


def gaps(events, top=15, min_us=20.0):
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation")]
    if not gpu:
        return {"error": "no GPU events"}
    busy, idle, cur_s, cur_e, holes = 0.0, 0.0, gpu[0][0], gpu[0][1], []
    prev_name = gpu[0][2]
    for s, e, n in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= min_us:
                holes.append((s - cur_e, cur_e, s, prev_name, n))
            idle += s - cur_e
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        prev_name = n if e >= cur_e else prev_name
    busy += cur_e - cur_s
    span = gpu[-1][1] - gpu[0][0]
    holes.sort(reverse=True)
    out = {"span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3, "gpu_idle_ms": idle / 1e3,
           "idle_in_gaps_ge_%dus_ms" % min_us: sum(h[0] for h in holes) / 1e3, "n_gaps": len(holes), "top": []}
    for d, s, e, before, after in holes[:top]:
        across = Counter(c["name"] for c in cpu if c["ts"] < e and c["ts"] + c.get("dur", 0) > s
                         and c.get("dur", 0) < 1e6)
        out["top"].append({"gap_us": round(d, 1), "after_kernel": before[:80], "before_kernel": after[:80],
                           "cpu_ops": [f"{k[:60]} x{v}" for k, v in across.most_common(8)]})
    # idle by the kernel that ends the gap (what the GPU was waiting to run)
    by_next = Counter()
    for d, _s, _e, _before, after in holes:
        by_next[after[:70]] += d
    out["idle_before_kernel_ms"] = {k: round(v / 1e3, 3) for k, v in by_next.most_common(15)}
    return out


def _phase(name: str):
    """Which part of a training step a kernel marks: cuDNN / flash attention forward 'F', its backward 'B',
    the optimizer's multi-tensor kernels 'O'; other kernels belong to the phase they run in."""
    if "fprop" in name or "flash_fwd" in name:
        return "F"
    if "bprop" in name or "flash_bwd" in name:
        return "B"
    if "multi_tensor" in name:
        return "O"
    return None


def idle_by_phase(events) -> list:
    """The step's GPU idle time split by phase, in order: [{"phase": "1F", "span_ms", "idle_ms", "kernels"}, ...]
    (1F = the first micro-batch's forward, 2B its backward, ..., the last O the optimizer; "0" before the first
    marker). A phase starts at its first marking kernel; a gap counts in the phase of the kernel that ends it."""
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    out, seq, end = [], [], None
    for s, e, n in gpu:
        p = _phase(n)
        if p and (not seq or seq[-1] != p):
            seq.append(p)
        label = f"{len(seq)}{seq[-1]}" if seq else "0"
        if not out or out[-1]["phase"] != label:
            out.append({"phase": label, "start": s, "end": e, "idle": 0.0, "kernels": 0})
        cur = out[-1]
        if end is not None and s > end:
            cur["idle"] += s - end
        cur["end"] = max(cur["end"], e)
        cur["kernels"] += 1
        end = e if end is None else max(end, e)
    return [{"phase": c["phase"], "span_ms": round((c["end"] - c["start"]) / 1e3, 3),
             "idle_ms": round(c["idle"] / 1e3, 3), "kernels": c["kernels"]} for c in out]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--min-us", type=float, default=20.0)
    a = p.parse_args()
    ev = load(a.trace)
    print(json.dumps({**gaps(ev, a.top, a.min_us), "by_phase": idle_by_phase(ev)}, indent=1))


if __name__ == "__main__":
    main()

"""Where a CUDA-graph capture of the megatron engine's step fails: runs the tiny GPU-test run with
engine.cuda_graph and prints the Python traceback of the first failing op inside the H-BitLinear autograd
Function (the autograd engine re-raises backward errors without it).

    python tools/megatron/graph_probe.py [precision]
"""
import sys
import traceback

from bitnet_dist.kernels import hbit_autograd as ha


def _wrap(fn, name):
    def inner(*a, **k):
        try:
            return fn(*a, **k)
        except Exception:
            print(f"[graph_probe] {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            raise
    return staticmethod(inner)


ha.HBitLinearFunction.forward = _wrap(ha.HBitLinearFunction.forward, "forward")
ha.HBitLinearFunction.backward = _wrap(ha.HBitLinearFunction.backward, "backward")

import tiny_run  # noqa: E402 - this folder's helper (the script's folder is on sys.path)
import torch  # noqa: E402

# a failing backward node is reported with the traceback of its forward call (no NaN checks: they sync)
torch.autograd.set_detect_anomaly(True, check_nan=False)

prec = sys.argv[1] if len(sys.argv) > 1 else "v2_a8"
if len(sys.argv) > 2 and sys.argv[2] == "repeat":  # run-to-run: eager twice, graph three times, one process
    torch.autograd.set_detect_anomaly(False)
    for mode in (False, False, True, True, True):
        rows, n = tiny_run.graph_curve(mode, prec, 5)
        print("[graph_probe]", "graph" if mode else "eager", n, " ".join(f"{a:.9f}/{b:.6f}" for a, b in rows), flush=True)
else:
    rows, n = tiny_run.graph_curve(True, prec, 5)
    print("[graph_probe] ok", rows, n)

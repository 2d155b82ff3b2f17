"""Lab (session 13, 2026-11-25): the warp-shuffle forward's Hadamard with the four lane stages replaced by register
stages between two 16 x 16 transposes of each 256-block (``_common.fwht_transposed``; Triton moves the data
through shared memory) against the default (four shuffles + sign FMAs per element). Fused-forward shapes of the
benchmark, both arms alternating over rounds in one process, GPU time from CUDA-graph replays, % of a
16384 x 8192 copy; codes compared between the arms; registers / spills / SASS instruction count per kernel.
``python tools/kernels/xpose_lab.py --out FILE.jsonl`` (CUDA)."""
import argparse
import json
import statistics

import torch

import bitnet_dist.kernels.norm_hadamard_quant as nhq
from bitnet_dist.bench import timed_gpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    cx = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)
    cy = torch.empty_like(cx)
    copy_tbs = 4 * cx.numel() / (timed_gpu(lambda: cy.copy_(cx), 5, a.reps) * 1e9)
    del cx, cy
    f = open(a.out, "w")
    f.write(json.dumps({"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tbs}) + "\n")
    print(f"[xp] copy {copy_tbs:.2f} TB/s", flush=True)
    for T in (8192, 16384):
        for D in (2048, 4096, 8192, 16384):
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
            for bits in (8, 4):
                def fn():
                    return nhq.norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=256, eps=1e-5,
                                                   fp8_codes=bits == 4)
                outs, times = {}, {}
                for r in range(a.rounds):
                    for arm in (False, True):
                        nhq.SHFL_XPOSE = arm
                        if r == 0:
                            outs[arm] = [t.clone() for t in fn()]
                        times.setdefault(arm, []).append(timed_gpu(fn, 3, a.reps, strict=True))
                nhq.SHFL_XPOSE = False
                same = all(torch.equal(u.view(torch.uint8) if u.dtype == torch.float8_e4m3fn else u,
                                       v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v)
                           for u, v in zip(outs[False], outs[True]))
                nbytes = 2 * T * D + T * D + 8 * T + 2 * D
                row = {"T": T, "D": D, "bits": bits, "same_codes": same}
                for arm, name in ((False, "shuffle"), (True, "xpose")):
                    ms = statistics.median(times[arm])
                    row[name + "_ms"] = times[arm]
                    row[name + "_pct_copy"] = 100 * nbytes / (ms * 1e9) / copy_tbs
                f.write(json.dumps(row) + "\n")
                print(f"[xp] {T} x {D} A{bits} shuffle {row['shuffle_pct_copy']:.1f}% xpose {row['xpose_pct_copy']:.1f}%"
                      f" same={same}", flush=True)
            del x, g
            torch.cuda.empty_cache()
    for key, k in nhq._FWD_SHFL.cache.items():
        kw = dict(key[1])
        if kw.get("HB") != 256:
            continue
        info = {"kernel": {n: kw.get(n) for n in ("BITS", "C", "BM", "XPOSE", "num_warps", "maxnreg")},
                "n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None)}
        try:
            sass = k.asm["sass"]
            info["sass_instructions"] = sum(1 for ln in sass.splitlines() if ln.strip().startswith("/*") and "*/" in ln
                                            and ln.strip()[2:6].strip().isalnum())
            info["shfl"] = sass.count("SHFL")
            info["lds_sts"] = sass.count("LDS") + sass.count("STS")
            info["bar"] = sass.count("BAR")
        except Exception as e:  # noqa: BLE001
            info["sass_error"] = repr(e)[:120]
        f.write(json.dumps(info) + "\n")
        print("[xp] kernel", info, flush=True)
    f.close()


if __name__ == "__main__":
    main()

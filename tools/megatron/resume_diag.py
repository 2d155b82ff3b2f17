"""Where does a megatron-engine resume diverge? Trains 3 steps, saves, loads into an engine built from other
weights, and compares model params, fp32 main params, Adam moments and step counts (one GPU, NCCL). First
measures the run-to-run spread of the same training without a checkpoint (two fresh engines)."""
import tempfile
from pathlib import Path

from tiny_run import cfg_for, make, step_batches  # this folder's helper (the script's folder is on sys.path)


def snapshot(e):
    out = {"model": [p.detach().float().clone() for m in e.model_chunks() for p in m.parameters()]}
    main, m1, m2, steps = [], [], [], set()
    for opt in getattr(e.optimizer, "chained_optimizers", [e.optimizer]):
        inner = opt.optimizer
        for g in inner.param_groups:
            for p in g["params"]:
                main.append(p.detach().float().clone())
                st = inner.state.get(p, {})
                if "exp_avg" in st:
                    m1.append(st["exp_avg"].clone()); m2.append(st["exp_avg_sq"].clone())
                    steps.add(float(st["step"]) if "step" in st else None)
            steps.add(("group", g.get("step")))
    out.update(main=main, m1=m1, m2=m2, steps=sorted(map(str, steps)))
    return out


def diff(a, b):
    if len(a) != len(b):
        return f"len {len(a)} vs {len(b)}"
    return max((x - y).abs().max().item() for x, y in zip(a, b)) if a else 0.0


def repeat_spread():
    """Run-to-run spread without any checkpoint: two fresh engines, same seed and batches, 6 steps each."""
    from megatron.core import parallel_state as ps

    runs = []
    for _ in range(2):
        e = make(cfg_for())
        runs.append([e.train_step(step_batches(s), 3e-3, 0.1).loss for s in range(6)])
        del e
        ps.destroy_model_parallel()
    rel = [abs(a - b) / abs(b) for a, b in zip(*runs)]
    print(f"[repeat] run1={runs[0]} run2={runs[1]} max_rel={max(rel):.3g} per_step_rel={[f'{r:.2g}' for r in rel]}",
          flush=True)


def main():
    repeat_spread()
    for distopt in (True, False):
        cfg = cfg_for(distributed_optimizer=distopt)
        e = make(cfg)
        for s in range(3):
            e.train_step(step_batches(s), 3e-3, 0.1)
        d = Path(tempfile.mkdtemp())
        e.save(d, {"step": 3})
        A = snapshot(e)
        cont = [e.train_step(step_batches(s), 3e-3, 0.1).loss for s in range(3, 6)]
        del e
        e2 = make(cfg_for(seed=99, distributed_optimizer=distopt))
        e2.load(d)
        B = snapshot(e2)
        res = [e2.train_step(step_batches(s), 3e-3, 0.1).loss for s in range(3, 6)]
        print(f"[resume] distopt={distopt} model={diff(A['model'], B['model'])} main={diff(A['main'], B['main'])} "
              f"exp_avg={diff(A['m1'], B['m1'])} exp_avg_sq={diff(A['m2'], B['m2'])} steps {A['steps']} vs {B['steps']} "
              f"cont={cont} resumed={res}", flush=True)
        from megatron.core import parallel_state as ps
        del e2
        ps.destroy_model_parallel()


if __name__ == "__main__":  # dist_checkpointing starts helper processes that re-import this file
    main()

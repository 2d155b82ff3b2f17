"""The reproduction study's renderer: numbers in docs/results.md come from the metrics files."""
import json

import pytest
import yaml

import bitnet_dist.results as results


def fake_run(root, precision, seed, final_ppl, block=128, switch=None, finished=True, last_step=20):
    d = root / f"{precision}_{block}_{seed}"
    d.mkdir(parents=True)
    cfg = {"experiment": "repro" if block == 128 else "repro_blocks",
           "model": {"name": "25M", "hidden_size": 512, "ffn_hidden_size": 2048, "num_layers": 6,
                     "num_attention_heads": 8, "hadamard_block": block},
           "precision": {"name": precision}, "trainer": {"seed": seed, "max_steps": 20, "global_batch_size": 4,
                                                         "seq_length": 8},
           "optim": {}, "data": {"name": "brown"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = [{"step": 0, "event": "start"}]
    for s in range(1, 21):
        recs.append({"step": s, "loss": 5.0 - s * 0.1, "tokens_per_s": 1000.0 + s})
    if switch:
        recs.append({"step": switch, "event": "act_bits_switch", "from_bits": 8, "to_bits": 4})
    recs.append({"step": 10, "val_loss": 4.0, "val_ppl": final_ppl + 5})
    recs.append({"step": last_step, "val_loss": 3.0, "val_ppl": final_ppl,
                 "stats/wo/kurtosis_pre": 9.0, "stats/wo/kurtosis_post": 3.1, "stats/wo/outlier_ratio_pre": 0.01,
                 "stats/wo/outlier_ratio_post": 0.0, "stats/wo/qerr_int4": 0.2, "stats/wo/qerr_int8": 0.01})
    if finished:
        recs.append({"step": 20, "event": "finished"})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "DATA", tmp_path / "docs/results/data")
    monkeypatch.setattr(results, "DOC", tmp_path / "docs/results.md")
    monkeypatch.setattr(results, "FIG", tmp_path / "docs/results")
    monkeypatch.setattr(results, "ROOT", tmp_path)
    return tmp_path


def test_collect_and_render(paths):
    runs = paths / "runs"
    ppl = {"bf16": (20.0, 22.0), "b158": (23.0, 23.4), "v2_a8": (23.2, 23.6), "v2_a8_to_a4": (24.0, 24.2),
           "v2_a4": (25.0, 25.6), "v2_a4_no_hadamard": (60.0, 80.0)}
    for v, (a, b) in ppl.items():
        fake_run(runs, v, 1, a, switch=19 if v == "v2_a8_to_a4" else None)
        fake_run(runs, v, 2, b, switch=19 if v == "v2_a8_to_a4" else None)
    fake_run(runs, "v2_a4", 1, 26.0, block=0)
    assert len(results.collect([str(runs)])) == 13
    text = results.render()
    assert "| `bf16` | 2 (1,2) | 21.00 ± 1.00 |" in text and "| finished |" in text
    assert "| `v2_a4_no_hadamard` | 2 (1,2) | 70.00 ± 10.00 |" in text
    assert "`v2_a4` < `v2_a4_no_hadamard`: 25.30 vs 70.00" in text and "-> holds" in text
    assert "| full dimension (0) | 1 | 26.00 ± 0.00 |" in text
    assert "| `v2_a8` | wo | 9.0 | 3.1 |" in text
    assert (paths / "docs/results/curves.png").stat().st_size > 1000
    # The hand-written discussion survives a re-render.
    doc = paths / "docs/results.md"
    doc.write_text(doc.read_text().replace("(to be written from the numbers above)", "MY NOTES"))
    assert "MY NOTES" in results.render()


def test_unfinished_runs(paths):
    runs = paths / "runs"
    fake_run(runs, "bf16", 1, 20.0, finished=False)  # trained to max_steps, stopped at the final checkpoint
    fake_run(runs, "b158", 1, 30.0, finished=False, last_step=10)  # cut off mid-run: left out
    results.collect([str(runs)])
    text = results.render()
    assert "| `bf16` | 1 (1) | 20.00 ± 0.00 |" in text and "trained; stopped after the final eval" in text
    assert "| `b158` |" not in text and "Not measured (no run reached its end): `b158`" in text

"""The reproduction study's renderer: numbers in docs/results.md come from the committed data files."""
import json
from pathlib import Path

import pytest
import yaml

import bitnet_dist.results as results

NO_HADAMARD = {"bf16", "b158", "v2_a4_no_hadamard"}


def fake_run(root, precision, seed, final_ppl, block=128, switch=None, finished=True, last_step=20, hist=False,
             loss_shift=0.0):
    d = root / f"{precision}_{block}_{seed}"
    d.mkdir(parents=True)
    cfg = {"experiment": "repro" if block == 128 else "repro_blocks",
           "model": {"name": "25M", "hidden_size": 512, "ffn_hidden_size": 2048, "num_layers": 6,
                     "num_attention_heads": 8, "hadamard_block": block},
           "precision": {"name": precision, "hadamard": precision not in NO_HADAMARD, "kernels": "torch"},
           "trainer": {"seed": seed, "max_steps": 20, "global_batch_size": 4, "seq_length": 8},
           "optim": {}, "data": {"name": "brown"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = [{"step": 0, "event": "start"}]
    for s in range(1, 21):
        recs.append({"step": s, "loss": 5.0 - s * 0.1 + (loss_shift if s >= 15 else 0.0), "tokens_per_s": 1000.0 + s})
    if switch:
        recs.append({"step": switch, "val_ppl_before_switch": final_ppl + 1, "act_bits": 8})
        recs.append({"step": switch, "event": "act_bits_switch", "from_bits": 8, "to_bits": 4})
        recs.append({"step": switch, "val_ppl_after_switch": final_ppl + 2, "act_bits": 4})
    recs.append({"step": 10, "val_loss": 4.0, "val_ppl": final_ppl + 5})
    stats = {"stats/wo/kurtosis_pre": 9.0, "stats/wo/kurtosis_post": 3.1, "stats/wo/outlier_ratio_pre": 0.01,
             "stats/wo/outlier_ratio_post": 0.0, "stats/wo/qerr_int4": 0.2, "stats/wo/qerr_int8": 0.01,
             "stats/wdown/kurtosis_pre": 50.0, "stats/wdown/kurtosis_post": 4.0 if block else 3.0,
             "stats/wdown/outlier_ratio_pre": 0.006, "stats/wdown/outlier_ratio_post": 0.0001,
             "stats/wdown/qerr_int4": 0.18, "stats/wdown/qerr_int8": 0.011}
    if hist:
        edges = [-2.0, -1.0, 0.0, 1.0, 2.0]
        for k in ("wo", "wdown"):
            stats.update({f"stats/{k}/hist_pre": [0.1, 0.4, 0.4, 0.1], f"stats/{k}/hist_post": [0.15, 0.35, 0.35, 0.15],
                          f"stats/{k}/hist_edges": edges})
    recs.append({"step": last_step, "val_loss": 3.0, "val_ppl": final_ppl, **stats})
    if finished:
        recs.append({"step": 20, "event": "finished"})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return d


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "DATA", tmp_path / "docs/results/data")
    monkeypatch.setattr(results, "DOC", tmp_path / "docs/results.md")
    monkeypatch.setattr(results, "FIG", tmp_path / "docs/results")
    monkeypatch.setattr(results, "ROOT", tmp_path)
    return tmp_path


PPL = {"bf16": (20.0, 22.0), "b158": (23.0, 23.4), "v2_a8": (23.2, 23.6), "v2_a8_to_a4": (23.3, 24.5),
       "v2_a4": (25.0, 25.6), "v2_a4_no_hadamard": (60.0, 80.0)}


def full_study(runs):
    for v, (a, b) in PPL.items():
        fake_run(runs, v, 1, a, switch=19 if v == "v2_a8_to_a4" else None, hist=v == "v2_a4")
        fake_run(runs, v, 2, b, switch=19 if v == "v2_a8_to_a4" else None)
    fake_run(runs, "v2_a4", 1, 26.0, block=0)
    fake_run(runs, "v2_a4", 2, 27.0, block=32)


def test_collect_and_render(paths):
    runs = paths / "runs"
    full_study(runs)
    assert len(results.collect([str(runs)])) == 14
    text = results.render()
    assert "| `bf16` | 2 (1,2) | 21.00 ± 1.00 | 20.00, 22.00 |" in text and "| finished |" in text
    assert "| `v2_a4_no_hadamard` | 2 (1,2) | 70.00 ± 10.00 | 60.00, 80.00 |" in text
    repo = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
    n_jobs = yaml.safe_load((repo / "conf/experiment/repro.yaml").read_text())["hydra"]["launcher"]["n_jobs"]
    assert "tokens/s, GPU shared (median)" in text and f"while {n_jobs} runs of the sweep shared one GPU" in text
    assert "Not measured" not in text
    # The ordering: the means against the seed spread, and the per-seed differences.
    assert "`v2_a4` << `v2_a4_no_hadamard`: 25.30 vs 70.00" in text
    assert "per seed: seed 1 +35.00, seed 2 +54.40) -> **holds**" in text
    assert "`v2_a8` < `v2_a8_to_a4` (small gap; the paper's v2 a4): 23.40 vs 23.90" in text
    assert "**not resolved (within the seed spread; in the expected direction in every seed pair)**" in text
    # The 8->4 switch, evaluated right before and after.
    assert "| 1 | 19 of 20 | 24.30 | 25.30 | 23.30 | 23.20 | +0.10 (+0.43 %) |" in text
    # Statistics: '-' after the transform for variants without it; the histogram plot.
    assert "| `v2_a8` | wo | 20 | 9.0 | 3.1 |" in text
    assert "| `b158` | wdown | 20 | 50.0 | - | 0.0060 | - | 0.180 | 0.011 |" in text
    assert "![activation histograms](results/hist.png)" in text and "`v2_a4_hb128_s1`" in text
    assert (paths / "docs/results/hist.png").stat().st_size > 1000
    # Block sizes: 128 comes from the repro experiment's v2_a4; the TP degrees each block allows.
    assert "| 32 | `repro_blocks` | 1 | 27.00 ± 0.00 | 27.00 | 4.0 |" in text and "| 1, 2, 4, 8 |" in text
    assert "| 128 | `repro` | 2 | 25.30 ± 0.30 | 25.00, 25.60 |" in text and "| 1, 2, 4 |" in text
    assert "| full dimension (0: 512 / 2048) | `repro_blocks` | 1 | 26.00 ± 0.00 | 26.00 | 3.0 |" in text
    for png in ("curves.png", "blocks.png"):
        assert (paths / "docs/results" / png).stat().st_size > 1000
    assert "bash tools/repro/gpu_run.sh" in text
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
    assert "| `bf16` | 1 (1) | 20.00 ± 0.00 | 20.00 |" in text and "trained; stopped after the final eval" in text
    assert "| `b158` |" not in text and "Not measured (no run reached its end): `b158`" in text


def test_bench_table(paths):
    results.DATA.mkdir(parents=True)
    common = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-24", "torch": "2.11.0", "model": "25M",
              "kernels": "torch", "seq": 256, "mbs": 32, "gbs": 32, "command": "tools/megatron/gpu_check.py bench --x"}
    rows = [{**common, "precision": "v2_a4", "step_s": 0.08, "tokens_per_s": 100000.0, "peak_mem_gib": 3.4},
            {**common, "precision": "bf16", "step_s": 0.025, "tokens_per_s": 300000.0, "peak_mem_gib": 2.6},
            {**common, "precision": "v2_a8", "step_s": 0.07, "tokens_per_s": 110000.0, "peak_mem_gib": 3.4}]
    (results.DATA / results.BENCH).write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = results.render()
    assert "## Standalone throughput" in text and "NVIDIA H100 80GB HBM3, 2026-11-24" in text
    assert "python tools/megatron/gpu_check.py bench --x" in text
    lines = text.splitlines()
    i = lines.index("| `bf16` | 300,000 | 25.0 | 1.00x | 2.60 |")
    assert lines[i + 1] == "| `v2_a8` | 110,000 | 70.0 | 0.37x | 3.40 |"  # in the variants' order
    assert lines[i + 2] == "| `v2_a4` | 100,000 | 80.0 | 0.33x | 3.40 |"
    assert "`v2_a8_to_a4` is not measured separately" in text


def test_reproducibility_section(paths):
    runs = paths / "runs"
    fake_run(runs, "bf16", 1, 20.0)
    fake_run(runs, "bf16", 2, 22.0, loss_shift=1e-4)
    fake_run(runs, "b158", 1, 30.0)
    fake_run(runs, "b158", 2, 30.2)
    results.collect([str(runs)])

    def earlier(name, ppl, cfg_name=None, shift=0.0):
        cfg = json.loads((results.DATA / "repro" / f"{cfg_name or name}.config.json").read_text())
        return {"experiment": "repro", "run": name, "precision": cfg["precision"]["name"], "seed": cfg["trainer"]["seed"],
                "hadamard_block": 128, "val_ppl": {"10": ppl + 5, "20": ppl},
                "loss": {str(s): 5.0 - s * 0.1 for s in range(1, 21)}, "config_sha256": results.config_sha256(cfg)}

    doc = {"note": "from the first attempt", "runs": [
        earlier("bf16_hb128_s1", 20.0),  # the same: bit-identical
        earlier("bf16_hb128_s2", 22.5),  # losses differ from step 15 on; 0.5 off, spread 1.0
        earlier("b158_hb128_s1", 31.0, cfg_name="bf16_hb128_s1"),  # 1.0 off, spread 0.1; other config
        {**earlier("b158_hb128_s2", 30.2), "run": "b158_hb128_s9"},  # no such run now: left out
    ]}
    (results.DATA / results.EARLIER).write_text(json.dumps(doc))
    text = results.render()
    assert "## Reproducibility" in text and "from the first attempt" in text
    assert "| `repro/bf16_hb128_s1` | yes | 20.0000 | 20.0000 | +0.0000 (+0.0000 %) | 1.00 | yes | bit-identical at all 20 logged steps |" in text
    assert "| `repro/bf16_hb128_s2` | yes | 22.5000 | 22.0000 | -0.5000 (-2.2222 %) | 1.00 | yes | identical through step 14, differs from step 15 on" in text
    assert "| `repro/b158_hb128_s1` | **no** | 31.0000 | 30.0000 | -1.0000 (-3.2258 %) | 0.10 | no |" in text
    assert "b158_hb128_s9" not in text
    assert "2 of 3 reruns land within the seed spread; the largest difference is 3.2258 % of the perplexity." in text


def test_tp_degrees():
    m = {"hidden_size": 512, "ffn_hidden_size": 2048, "num_attention_heads": 8}
    assert results._tp_degrees(0, m) == "1"
    assert results._tp_degrees(512, m) == "1"
    assert results._tp_degrees(128, m) == "1, 2, 4"
    assert results._tp_degrees(32, m) == "1, 2, 4, 8"  # 16 would fit the block but not the 8 heads


def test_committed_page_matches_committed_data(tmp_path, monkeypatch):
    """docs/results.md (all but the hand-written discussion) is what render() makes of docs/results/data."""
    committed = results.DOC.read_text()
    assert (results.DATA / "repro").is_dir(), "docs/results/data/repro is committed with the study"
    monkeypatch.setattr(results, "DOC", tmp_path / "results.md")
    monkeypatch.setattr(results, "FIG", tmp_path / "results")
    text = results.render()
    assert text.split(results.BEGIN)[0] == committed.split(results.BEGIN)[0]

"""tools/gpu_suite.sh on CPU: its help, its refusal of an unknown step, and the fp8 step (the FP8-backward loss
study) run in the background as on the GPU machine, at a tiny size: the study's summary and the suite's
summary lines are written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "tools" / "gpu_suite.sh"


def _env(out: Path, **kw) -> dict:
    # the suite calls `python`: the interpreter running the tests
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OUT": str(out), "WANDB_MODE": "disabled", **kw}


def test_help_and_unknown_step(tmp_path):
    h = subprocess.run(["bash", str(SUITE), "--help"], capture_output=True, text=True, env=_env(tmp_path))
    assert h.returncode == 0 and "STEP: install, tests, bench, e2e, fp8" in h.stdout and "FP8_BACKGROUND" in h.stdout
    bad = subprocess.run(["bash", str(SUITE), "tests", "fp9"], capture_output=True, text=True, env=_env(tmp_path))
    assert bad.returncode == 2 and "unknown step 'fp9'" in bad.stderr
    assert not (tmp_path / "summary.txt").exists()  # refused before any step ran


@pytest.mark.slow
def test_fp8_step_in_the_background_writes_the_study(tmp_path):
    out = tmp_path / "suite"
    args = "--model tiny --steps 10 --seeds 1 --train-args optim.warmup_steps=1 trainer.micro_batch_size=2 " \
           "trainer.global_batch_size=2"
    p = subprocess.run(["bash", str(SUITE), "fp8"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env=_env(out, FP8_ARGS=args, FP8_BACKGROUND="1"))
    assert p.returncode == 0, (p.stdout, p.stderr, (out / "fp8.log").read_text()[-3000:])
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == "fp8: started in the background" and summary[1].startswith("fp8 (background): ok")
    res = json.loads((out / "fp8" / "fp8_loss.json").read_text())
    (seed,) = res["seeds"]
    assert seed["precision"] == "v2_a4" and seed["seed"] == 1 and seed["first_loss_equal"]
    assert "--model tiny --steps 10" in (out / "fp8" / "fp8_loss.md").read_text()


def test_tests_step_runs_the_selection_it_is_given(tmp_path):
    """TESTS_ARGS picks what the tests step runs (on CPU the GPU tests of the file skip with their reason)."""
    out = tmp_path / "suite"
    p = subprocess.run(["bash", str(SUITE), "tests"], capture_output=True, text=True, timeout=600,
                       env=_env(out, TESTS_ARGS="tests/layers_model/test_fusions.py -rs"))
    assert p.returncode == 0, (p.stdout, p.stderr)
    log = (out / "gpu_tests.log").read_text()
    assert "test_fusions.py" in log and "SKIPPED" in log and "CUDA" in log  # the skips name their reason
    assert (out / "summary.txt").read_text().startswith("tests: ok")

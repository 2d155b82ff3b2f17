"""Failure behaviour (docs/failures.md): each test feeds the input a user would and checks what happens.

End-to-end cases run the train app the way a user does (``python -m bitnet_dist.train experiment=smoke ...``
in a subprocess, a temporary run_dir, a few steps) on the DeepSpeed engine on CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["experiment=smoke", "logging.wandb=disabled", "trainer.progress_bar=false", "trainer.report=false",
         "trainer.stats_interval=0"]


def train_cli(run_dir: Path, *overrides: str, timeout: int = 300, env: dict | None = None,
              wrapper: str | None = None) -> subprocess.CompletedProcess:
    """``python -m bitnet_dist.train experiment=smoke run_dir=RUN_DIR OVERRIDES`` (or a wrapper script
    that patches something first and then runs the app's main)."""
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("BITNET_STOP_FILE", None)
    cmd = ([sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "bitnet_dist.train"])
    cmd += [*SMOKE, f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path, key: str = "loss") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


# -- item 6: overrides outside the schema ----------------------------------------------------------------------
@pytest.mark.parametrize("override", ["+trainer.max_step=30", "trainer.max_step=30", "+foo=1",
                                      "+model.hiden_size=64"])
def test_unknown_key_is_an_error_with_or_without_plus(tmp_path, override):
    r = train_cli(tmp_path / "run", override)
    assert r.returncode != 0, r.stdout
    key = override.lstrip("+").split("=")[0]
    assert key in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_key_names_the_nearest_setting():
    from hydra import compose, initialize_config_dir

    from bitnet_dist.config import check_known_keys, register_configs
    from bitnet_dist.errors import ConfigError
    from bitnet_dist.train import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ok = compose("train", overrides=["experiment=smoke", "+engine.ds_config_overrides.zero_optimization.stage=0"])
        check_known_keys(ok)  # free-form dicts are not checked
        bad = compose("train", overrides=["experiment=smoke", "+trainer.max_step=30"])
    with pytest.raises(ConfigError) as e:
        check_known_keys(bad)
    assert e.value.key == "trainer.max_step" and e.value.value == 30
    assert "trainer.max_steps" in str(e.value)

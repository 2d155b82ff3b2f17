"""What a CLI start prints: megatron-core's Transformer Engine / apex fallback warnings are filtered (and only
those), and training progress is a bar on a terminal, one line per trainer.log_interval elsewhere."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bitnet_dist import telemetry
from bitnet_dist.config import TrainConfig
from bitnet_dist.telemetry import Telemetry

_IMPORT_MEGATRON = ("import warnings; warnings.simplefilter('default'); {pre}"
                    "import megatron.core.optimizer, megatron.core.models.backends; "
                    "from megatron.core.transformer.transformer_config import TransformerConfig; "
                    "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1); "
                    "warnings.warn_explicit('Apex is not installed. (from elsewhere)', UserWarning, 'other.py', 1, "
                    "module='othermod')")


def _stderr_of(pre: str) -> str:
    out = subprocess.run([sys.executable, "-c", _IMPORT_MEGATRON.format(pre=pre)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stderr


@pytest.mark.slow
def test_backend_warnings_filtered_by_message_and_module():
    plain = _stderr_of("")
    assert "Transformer Engine and Apex are not installed" in plain  # what megatron-core prints without the filter
    assert "Apex is not installed. Falling back to Torch Norm" in plain
    scope_warns = "full scope is deprecated" in plain  # megatron-core 0.16's own default cuda_graph_scope
    filtered = _stderr_of("from bitnet_dist.compat import filter_backend_warnings; filter_backend_warnings(); ")
    assert "Transformer Engine and Apex are not installed" not in filtered
    assert "Falling back to Torch Norm" not in filtered
    assert not scope_warns or "full scope is deprecated" not in filtered
    assert "(from elsewhere)" in filtered  # the same words from another module still show: no blanket ignore


@pytest.mark.slow
def test_cli_start_prints_no_backend_warnings(tmp_path):
    """At the CLI: the train module's own imports bring in megatron-core, so the filter must be in place before
    them. A run that stops at its config check (after every import) prints the error and no backend warning."""
    out = subprocess.run([sys.executable, "-m", "bitnet_dist.train", "experiment=smoke",
                          "trainer.micro_batch_size=3", "trainer.global_batch_size=4", f"run_dir={tmp_path / 'r'}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and "trainer.global_batch_size" in out.stderr, out.stderr[-2000:]
    assert "not installed" not in out.stderr and "UserWarning" not in out.stderr, out.stderr[-2000:]


def _telemetry(tmp_path, log_interval=5):
    cfg = TrainConfig()
    cfg.logging.wandb = "disabled"
    cfg.trainer.log_interval = log_interval
    cfg.trainer.progress_bar = True
    return Telemetry(cfg, tmp_path, enabled=True)


def test_progress_off_a_terminal_is_one_line_per_log_interval(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(telemetry, "_is_terminal", lambda stream: False)
    tel = _telemetry(tmp_path, log_interval=5)
    for step in range(1, 13):
        tel.progress(step, 12, loss=2.5, tok_s=1234.0)
    tel.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines == ["[bitnet-train] step 5/12 loss=2.5 tok_s=1,234", "[bitnet-train] step 10/12 loss=2.5 tok_s=1,234",
                     "[bitnet-train] step 12/12 loss=2.5 tok_s=1,234"], lines
    assert "it/s" not in err and "step/s" not in err and "|" not in err  # no bar


def test_progress_on_a_terminal_is_a_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(telemetry, "_is_terminal", lambda stream: True)
    tel = _telemetry(tmp_path, log_interval=5)
    for step in range(1, 13):
        tel.progress(step, 12, loss=2.5)
    tel.close()
    out, err = capsys.readouterr()
    assert "[bitnet-train] step" not in out
    assert "12/12" in err and "loss=2.5" in err  # tqdm's bar (on stderr), with the shown values


def test_progress_bar_switched_off(tmp_path, capsys):
    tel = _telemetry(tmp_path)
    tel.cfg.trainer.progress_bar = False
    for step in range(1, 11):
        tel.progress(step, 10, loss=1.0)
    tel.close()
    assert capsys.readouterr() == ("", "")


def test_is_terminal_of_streams():
    class Tty:
        def isatty(self):
            return True

    class Closed:
        def isatty(self):
            raise ValueError("I/O operation on closed file")

    assert telemetry._is_terminal(Tty()) and not telemetry._is_terminal(Closed())
    assert not telemetry._is_terminal(object())

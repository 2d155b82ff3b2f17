"""The wheel is a complete product: built from the repository, installed (not editable) into a fresh
virtual environment, its console scripts train the smoke experiment and preprocess a JSONL file from a
folder outside the repository.

The fresh environment gets the running interpreter's site-packages as a ``.pth`` line, so torch,
megatron-core, DeepSpeed and Hydra are not downloaded again. Site directories named in a ``.pth`` line
are added to ``sys.path`` without processing their own ``.pth`` files, so the editable install of the
development environment is not visible there: the test asserts that ``bitnet_dist`` (with its kernels
and configs) resolves inside the fresh environment's site-packages.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env, timeout=600):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # build from a copy of the sources the wheel is made of, so a stale build/ folder of a checkout cannot leak in
    src = tmp / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, src / name)
    for name in ("bitnet_dist", "kernels", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
          src], cwd=tmp, env=env)
    wheels = sorted((tmp / "dist").glob("bitnet_dist-*.whl"))
    assert len(wheels) == 1, wheels

    venv.EnvBuilder(with_pip=False).create(tmp / "venv")
    py = tmp / "venv" / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                     env=env).stdout.strip())
    # third-party dependencies from the running environment (not its editable bitnet_dist: see above)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_bitnet_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheels[0]],
         cwd=tmp, env=env)
    work = tmp / "elsewhere"
    work.mkdir()
    return {"py": py, "bin": py.parent, "site": site, "work": work, "env": env}


def test_installed_package_resolves_inside_the_fresh_environment(installed):
    code = ("import json, bitnet_dist, bitnet_dist.kernels, bitnet_dist.conf; from importlib import resources; "
            "print(json.dumps([bitnet_dist.__file__, bitnet_dist.kernels.__file__, "
            "str(resources.files('bitnet_dist.conf') / 'train.yaml'), "
            "sorted(p.name for p in (resources.files('bitnet_dist.conf') / 'experiment').iterdir())]))")
    pkg, kern, train_yaml, experiments = json.loads(
        _run([installed["py"], "-c", code], cwd=installed["work"], env=installed["env"]).stdout)
    site = installed["site"].resolve()
    for f in (pkg, kern, train_yaml):
        assert Path(f).resolve().is_relative_to(site), f"{f} is not inside {site}"
    assert Path(train_yaml).is_file()
    assert "smoke.yaml" in experiments
    assert not Path(pkg).resolve().is_relative_to(REPO)


def test_bitnet_train_smoke_from_outside_the_repository(installed):
    run_dir = installed["work"] / "run"
    _run([installed["bin"] / "bitnet-train", "experiment=smoke", "trainer.max_steps=4", "trainer.log_interval=1",
          "trainer.eval_interval=2", "trainer.save_interval=2", "trainer.stats_interval=0",
          "optim.warmup_steps=1", "logging.wandb=disabled", f"run_dir={run_dir}"],
         cwd=installed["work"], env=installed["env"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(x == x and x > 0 for x in losses), rows
    assert any("val_loss" in r for r in rows)
    assert (run_dir / "checkpoints").is_dir() or any(run_dir.glob("**/step_*"))


def test_bitnet_train_rejects_an_unknown_experiment_with_the_shipped_choices(installed):
    out = subprocess.run([str(installed["bin"] / "bitnet-train"), "experiment=nope"], cwd=installed["work"],
                         env=installed["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "smoke" in out.stderr and "quickstart" in out.stderr, out.stderr


def test_bitnet_preprocess_from_outside_the_repository(installed):
    work = installed["work"]
    docs = [{"text": f"document number {i}: the quick brown fox jumps over the lazy dog."} for i in range(20)]
    (work / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    _run([installed["bin"] / "bitnet-preprocess", "--input", "tiny.jsonl", "--tokenizer", "gpt2",
          "--output-prefix", "out/tiny", "--workers", "1"], cwd=work, env=installed["env"])
    assert (work / "out" / "tiny.bin").stat().st_size > 0
    assert (work / "out" / "tiny.idx").stat().st_size > 0

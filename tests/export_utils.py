"""Helpers of the export / generate / eval tests: small checkpoints of either engine written on the CPU."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from bitnet_dist.export import ensure_transformers

ensure_transformers()

VOCAB = 300  # ByteTokenizer size of the synthetic-data runs: 256 bytes + unused ids + EOD; pads to 384 rows


def run_config(precision: str = "v2_a8", *, model: str = "tiny", tie: bool = False, engine: str = "megatron",
               tp: int = 1, pp: int = 1, seed: int = 1234, zero_stage: int = 0, **model_overrides):
    from bitnet_dist.config import TrainConfig
    from bitnet_dist.presets import model_preset, precision_preset

    cfg = TrainConfig()
    cfg.model = model_preset(model, tie_embeddings=tie, **model_overrides)
    cfg.precision = precision_preset(precision)
    cfg.data.name, cfg.data.tokenizer, cfg.data.vocab_size = "synthetic", "bpe", VOCAB
    cfg.engine.name = engine
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage = tp, pp, zero_stage
    cfg.trainer.dtype, cfg.trainer.seed = "fp32", seed
    cfg.trainer.seq_length, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 32, 2, 2 * tp * pp
    return cfg


def write_run(run_dir: Path, cfg, step: int = 10) -> Path:
    """RUN_DIR/config.yaml as the train app writes it; returns the path of checkpoint ``step``."""
    from omegaconf import OmegaConf

    from bitnet_dist.checkpoint import CheckpointManager

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return CheckpointManager(run_dir).path(step)


def megatron_checkpoint(rank, world, cfg, run_dir, step=10, act_bits=None):
    """(Run in run_ranks.) A megatron dist checkpoint of ``cfg``'s seed-initialized, perturbed model."""
    from bitnet_dist.checkpoint import CheckpointManager
    from bitnet_dist.engines.megatron_engine import MegatronEngine

    cfg = copy.deepcopy(cfg)
    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    for chunk in eng.model_chunks():
        _perturb_global(chunk, cfg)
    if rank == 0:
        write_run(run_dir, cfg, step)
    state = {"step": step, "act_bits": act_bits or cfg.precision.act_bits, "max_steps": 100, "seed": cfg.trainer.seed}
    path = CheckpointManager(run_dir).save(step, lambda tmp: eng.save(tmp, state))
    return str(path)


@torch.no_grad()
def _perturb_global(chunk, cfg):
    """Norm gains away from 1 (drawn from their global names, TP slices of one draw) and the fused weights'
    segments at different scales (k rows x 1.5 in every query group, the up half of fc1 x 2), so that a swapped
    norm or a mixed-up segment changes the logits; layout-independent, like the initialization."""
    from megatron.core import parallel_state as ps

    from bitnet_dist.model import _generator, _global_name

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    m = cfg.model
    d = m.hidden_size // m.num_attention_heads
    per = m.num_attention_heads // (m.num_query_groups or m.num_attention_heads)
    for name, p in chunk.named_parameters():
        if name.endswith("linear_fc1.weight"):  # this rank's [gate shard; up shard]
            p[p.shape[0] // 2:] *= 2.0
        if name.endswith("linear_qkv.weight"):  # whole query groups per rank: [q (per * d), k (d), v (d)]
            g = p.view(-1, (per + 2) * d, p.shape[1])
            g[:, per * d:(per + 1) * d] *= 1.5
        if p.dim() != 1:
            continue
        gname = _global_name(name, chunk)
        full = list(p.shape)
        sharded = getattr(p, "tensor_model_parallel", False)
        if sharded:
            full[0] *= tp
        v = 1.0 + 0.3 * torch.randn(full, generator=_generator(99, gname))
        if sharded:
            v = torch.chunk(v, tp)[rank]
        p.copy_(v)


def tokens(b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def project_logits(run, toks: torch.Tensor) -> torch.Tensor:
    """The project's own TP=1 GPTModel (fp32, CPU) on ``toks``: logits over the tokenizer's ids."""
    from bitnet_dist.export.reader import load_project_model

    model = load_project_model(run)
    s = toks.shape[1]
    return model(toks, torch.arange(s).expand_as(toks), None)[..., :run.vocab_size].float()


@torch.no_grad()
def hf_logits(path, toks: torch.Tensor, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=True, **kw)
    return model(toks).logits.float()


def _swap(model, a: str, b: str) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        ta, tb = sd[a].clone(), sd[b].clone()
        sd[a].copy_(tb)
        sd[b].copy_(ta)


def export_worker(rank, world, cfg, run_dir, out, act_bits=None, latent=False, dtype=None, controls=(), device="cpu"):
    """Checkpoint (megatron, TP=1) -> export -> {project vs transformers logits, config.json, module kinds};
    ``controls``: deliberate mapping mistakes applied to the loaded export, each one's max |diff| reported."""
    import json

    from transformers import AutoModelForCausalLM

    from bitnet_dist.export.hf import export
    from bitnet_dist.export.reader import load_run

    ckpt = megatron_checkpoint(rank, world, cfg, run_dir, act_bits=act_bits)
    run = load_run(ckpt)
    path = export(ckpt, out, run=run, latent=latent, dtype=dtype)
    toks = tokens()
    ref = project_logits(run, toks)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=True).to(device)
    with torch.no_grad():
        got = model(toks.to(device)).logits.float().cpu()
    res = {"max_diff": (ref - got).abs().max().item(), "argmax_equal": bool((ref.argmax(-1) == got.argmax(-1)).all()),
           "class": type(model).__name__, "device": str(next(model.parameters()).device), "config": json.loads((path / "config.json").read_text()),
           "files": sorted(p.name for p in path.iterdir()), "ref_scale": ref.abs().max().item(),
           "q_proj": type(model.model.layers[0].self_attn.q_proj).__name__,
           "online": getattr(model.model.layers[0].self_attn.q_proj, "online_quant", None),
           "q_weight_values": sorted(set(model.model.layers[0].self_attn.q_proj.weight.detach().flatten().tolist()))[:5]}
    L = "model.layers.0."
    mistakes = {
        # the four norms mapped one place off
        "norms_swapped": lambda m: _swap(m, L + "input_layernorm.weight", L + "post_attention_layernorm.weight"),
        "sub_norms_swapped": lambda m: _swap(m, L + "self_attn.attn_sub_norm.weight", L + "input_layernorm.weight"),
        # gate and up exchanged (segments of fc1 mixed up)
        "gate_up_swapped": lambda m: (_swap(m, L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
                                      _swap(m, L + "mlp.gate_proj.weight_scale", L + "mlp.up_proj.weight_scale")),
        # one scale for the fused fc1 instead of one per segment
        "one_fc1_scale": lambda m: m.state_dict()[L + "mlp.up_proj.weight_scale"].copy_(
            m.state_dict()[L + "mlp.gate_proj.weight_scale"]),
        # k and v of the fused QKV exchanged
        "k_v_swapped": lambda m: (_swap(m, L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
                                  _swap(m, L + "self_attn.k_proj.weight_scale", L + "self_attn.v_proj.weight_scale")),
    }
    res["controls"] = {}
    for name in controls:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=True)
        with torch.no_grad():
            mistakes[name](m)
            res["controls"][name] = (m(toks).logits.float() - ref).abs().max().item()
    return res


def deepspeed_tp_train(rank, world, cfg, run_dir, steps=3):
    """(Run on TP ranks.) Train ``steps`` DeepSpeed steps at TP=world on random tokens, save the checkpoint;
    return (rank 0) the gathered full weights and the TP model's gathered logits on ``tokens()``."""
    import torch.distributed as dist
    from mp_workers import gather_full

    from bitnet_dist.checkpoint import CheckpointManager
    from bitnet_dist.engines import make_engine

    eng = make_engine(cfg)
    eng.init_parallel()
    eng.build(VOCAB)
    g = torch.Generator().manual_seed(5)
    for _step in range(steps):
        t = torch.randint(0, 256, (cfg.trainer.global_batch_size, 33), generator=g)
        per = t.shape[0] // eng.dp_size
        t = t[eng.dp_rank * per:(eng.dp_rank + 1) * per]  # this DP rank's share
        mb = cfg.trainer.micro_batch_size
        batches = [dict(tokens=t[i:i + mb, :-1], labels=t[i:i + mb, 1:], loss_mask=torch.ones(mb, 32))
                   for i in range(0, t.shape[0], mb)]
        eng.train_step(batches, lr=3e-3, weight_decay=0.1)
    if rank == 0:
        write_run(run_dir, cfg, steps)
    state = {"step": steps, "act_bits": cfg.precision.act_bits, "max_steps": 100, "seed": cfg.trainer.seed}
    CheckpointManager(run_dir).save(steps, lambda tmp: eng.save(tmp, state))
    model = eng.model_chunks()[0]
    model.eval()
    toks = tokens()
    with torch.no_grad():
        local = model(toks, torch.arange(toks.shape[1]).expand_as(toks), None)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    logits = torch.cat(parts, dim=-1)[..., :VOCAB]
    # numpy through the result queue: shared-memory tensors vanish with the child process
    if cfg.parallel.zero_stage == 3:  # parameters partitioned over DP: the logits are the check
        return (None, logits.numpy().copy()) if rank == 0 else None
    full = {n: gather_full(p, p.detach(), world).numpy().copy() for n, p in model.named_parameters()}
    return (full, logits.numpy().copy()) if rank == 0 else None


def megatron_from_weights(rank, world, cfg, run_dir, weights, step=3):
    """(One rank.) The given full weights saved as a TP=1 megatron checkpoint (the same weights at TP=1)."""
    from bitnet_dist.checkpoint import CheckpointManager
    from bitnet_dist.engines.megatron_engine import MegatronEngine

    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    weights = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = eng.model_chunks()[0].load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    write_run(run_dir, cfg, step)
    state = {"step": step, "act_bits": cfg.precision.act_bits, "max_steps": 100, "seed": cfg.trainer.seed}
    return str(CheckpointManager(run_dir).save(step, lambda tmp: eng.save(tmp, state)))


def export_and_logits(rank, world, ckpt, out):
    """(One rank.) Export ``ckpt`` and return (the exported tensors, transformers' logits on ``tokens()``)."""
    from safetensors.torch import load_file

    from bitnet_dist.export.hf import export

    path = export(ckpt, out)
    tensors = {k: v.numpy().copy() for k, v in load_file(str(path / "model.safetensors")).items()}
    return tensors, hf_logits(path, tokens()).numpy().copy()


def gpu_generate_worker(rank, world, cfg, run_dir):
    """On CUDA: greedy (ours, KV cache) vs transformers' generate on the same GPU model; a sampled continuation."""
    from bitnet_dist.export.generate import Sampling, generate, load

    ckpt = megatron_checkpoint(rank, world, cfg, run_dir)
    model, tok = load(ckpt, device="cuda")
    prompt = list(range(40, 52))
    ours = generate(model, prompt, Sampling(max_new_tokens=30), eos_id=None)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=30,
                             eos_token_id=None, pad_token_id=tok.eos_token_id,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"))
    sampled = generate(model, prompt, Sampling(max_new_tokens=30, temperature=0.8, top_k=50, top_p=0.95, seed=0,
                                               stop_at_eos=False), eos_id=tok.eos_token_id)
    return {"ours": ours, "hf": out[0, len(prompt):].tolist(), "sampled": sampled,
            "device": str(next(model.parameters()).device)}


def generate_worker(rank, world, ckpt, export_dir, n):
    """Greedy continuations of one prompt: ours (KV cache), transformers' generate, the project model without
    a cache (argmax after a full forward per token)."""
    from bitnet_dist.export.generate import Sampling, generate, load
    from bitnet_dist.export.reader import load_project_model, load_run

    model, tok = load(export_dir)
    prompt = tok.encode("The jury said", add_special_tokens=False)
    ours = generate(model, prompt, Sampling(max_new_tokens=n), eos_id=tok.eos_token_id)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    hf = out[0, len(prompt):].tolist()
    if tok.eos_token_id in hf:
        hf = hf[:hf.index(tok.eos_token_id) + 1]
    run = load_run(ckpt)
    project = load_project_model(run)
    ids, plain = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = project(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, -1, :run.vocab_size]
            nxt = int(logits.argmax())
            plain.append(nxt)
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return {"ours": ours, "hf": hf, "project_no_cache": plain, "eos": tok.eos_token_id}


def sampling_worker(rank, world, export_dir):
    from bitnet_dist.export.generate import Sampling, complete, generate, load

    model, tok = load(export_dir)
    prompt = tok.encode("The jury said", add_special_tokens=False)

    def sample(seed, **kw):
        s = Sampling(max_new_tokens=32, temperature=kw.pop("temperature", 0.8), seed=seed, stop_at_eos=False, **kw)
        return generate(model, prompt, s, eos_id=tok.eos_token_id)

    return {"a": sample(0, top_k=50, top_p=0.95), "a_again": sample(0, top_k=50, top_p=0.95),
            "b": sample(1, top_k=50, top_p=0.95), "top_k1": sample(3, top_k=1),
            "greedy": sample(None, temperature=0.0),
            "text": complete(model, tok, "The jury said", Sampling(max_new_tokens=24, temperature=0.8, seed=0))[1]}


def host_model_worker(rank, world, ckpt):
    """The project's TP=1 model kept on the CPU where ``torch.cuda.current_device()`` names another device (as on a
    CUDA machine; simulated with the meta device): {logits equal to the plain CPU run's, the unwrapped model's error}."""
    from bitnet_dist.export.reader import HostModel, load_project_model, load_run

    run = load_run(ckpt)
    model = load_project_model(run)
    assert isinstance(model, HostModel)
    toks = tokens(2, 24)
    pos = torch.arange(24).expand_as(toks)
    rope = type(model.model.rotary_pos_emb)
    with torch.no_grad():
        ref = model(toks, pos, None)
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: "meta"
        try:
            rope.forward.cache_clear()  # megatron caches the angle table per length: compute it afresh
            got = model(toks, pos, None)
            rope.forward.cache_clear()
            try:  # megatron's RoPE moves its angle table to current_device(): the CUDA machine's failure
                model.model(toks, pos, None)
                bare = None
            except (RuntimeError, NotImplementedError) as e:
                bare = f"{type(e).__name__}: {e}"
        finally:
            torch.cuda.current_device = current
    return {"equal": bool(torch.equal(ref, got)), "bare_error": bare, "device": str(got.device)}


def eval_worker(rank, world, ckpt, export_dir, data, tmp):
    """bitnet-eval on the checkpoint (project model) and the export (transformers); lm-eval's rolling
    log-likelihood of the export on a local task built from ``data``; an indexed dataset of the same texts."""
    import dataclasses
    import json
    import os
    from pathlib import Path

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bitnet_dist.data.indexed import write_indexed
    from bitnet_dist.export.evaluate import perplexity, scorer_for

    L = 256  # the window of both sides (the small model's own is 1024): longer documents take several windows
    project = scorer_for(ckpt)
    res = {"project": dataclasses.asdict(perplexity(project, data, L)),
           "export": dataclasses.asdict(perplexity(scorer_for(export_dir), data, L))}
    texts = [json.loads(line)["text"] for line in Path(data).read_text().splitlines()]
    prefix = Path(tmp) / "indexed" / "docs"
    prefix.parent.mkdir()
    write_indexed(texts, project.run.tokenizer, prefix)
    res["indexed"] = dataclasses.asdict(perplexity(project, prefix, L))

    import lm_eval
    from lm_eval.tasks import TaskManager

    task_dir = Path(tmp) / "tasks"
    task_dir.mkdir()
    (task_dir / "bitnet_local.yaml").write_text(
        "task: bitnet_local_ppl\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\n"
        "doc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},trust_remote_code=True,dtype=float32,max_length={L}",
                                  tasks=["bitnet_local_ppl"], task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True, batch_size=1, device="cpu")
    samples = out["samples"]["bitnet_local_ppl"]
    lls = []
    for s in samples:
        r = s["resps"][0][0]
        lls.append(float(r[0] if isinstance(r, (list, tuple)) else r))
    res["lm_eval_loglikelihood"] = sum(lls)
    res["lm_eval_docs"] = len(samples)
    res["lm_eval_metrics"] = {k: v for k, v in out["results"]["bitnet_local_ppl"].items() if isinstance(v, float)}
    return res


def fake_run(precision: str, tie: bool = False, model: str = "tiny"):
    """A LoadedRun around a randomly drawn TP=1 state dict of megatron's names (no process group needed)."""
    from bitnet_dist.data.tokenizer import ByteTokenizer
    from bitnet_dist.export.reader import LoadedRun
    from bitnet_dist.presets import padded_vocab_size

    cfg = run_config(precision, model=model, tie=tie)
    m = cfg.model
    h, f, heads = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    groups = m.num_query_groups or heads
    d = h // heads
    V = padded_vocab_size(VOCAB)
    g = torch.Generator().manual_seed(0)
    sd = {"embedding.word_embeddings.weight": torch.randn(V, h, generator=g),
          "decoder.final_layernorm.weight": torch.randn(h, generator=g)}
    if not tie:
        sd["output_layer.weight"] = torch.randn(V, h, generator=g)
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        sd[p + "self_attention.linear_qkv.weight"] = torch.randn((heads + 2 * groups) * d, h, generator=g)
        sd[p + "self_attention.linear_proj.weight"] = torch.randn(h, h, generator=g)
        sd[p + "mlp.linear_fc1.weight"] = torch.randn(2 * f, h, generator=g)
        sd[p + "mlp.linear_fc2.weight"] = torch.randn(h, f, generator=g)
        if precision == "bf16":
            sd[p + "input_layernorm.weight"] = torch.randn(h, generator=g)
            sd[p + "pre_mlp_layernorm.weight"] = torch.randn(h, generator=g)
        else:
            for name, n in (("self_attention.linear_qkv", h), ("self_attention.linear_proj", h),
                            ("mlp.linear_fc1", h), ("mlp.linear_fc2", f)):
                sd[p + name + ".norm_weight"] = torch.randn(n, generator=g)
    return LoadedRun(cfg=cfg, run_dir=None, checkpoint=None, engine="megatron",
                     trainer_state={"act_bits": cfg.precision.act_bits}, tokenizer=ByteTokenizer(VOCAB),
                     state_dict=sd, dtype=torch.float32)


def hf_tensors(run, **kw):
    from bitnet_dist.export.hf import hf_state_dict

    return hf_state_dict(run, **kw)


def logits_of_exports(rank, world, paths):
    return [hf_logits(p, tokens()).numpy().copy() for p in paths]

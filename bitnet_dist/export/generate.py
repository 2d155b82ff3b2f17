"""bitnet-generate: prompt -> continuation from a checkpoint, a run directory or an export, with a KV cache.

    bitnet-generate MODEL --prompt "The jury said" [--max-new-tokens 64] [--temperature 0.8 --top-k 50
                    --top-p 0.95 --seed 0] [--device cpu|cuda] [--config RUN_DIR/config.yaml]

MODEL is a Hugging Face export (bitnet-export's output), a checkpoint directory (RUN_DIR/checkpoints/step_*) or a
run directory (its newest complete checkpoint). A checkpoint is exported to a temporary directory first and the
export is loaded with transformers, so generation runs the very model an export holds.

Decoding (``generate``): one forward over the prompt fills the cache, then one token per forward. Temperature 0
is greedy (argmax); otherwise logits / temperature, then top-k (keep the k largest), then top-p (keep the
smallest set of most likely tokens whose probability reaches p), sampled with a torch.Generator seeded by
``seed``. Generation stops at the end-of-document token or after ``max_new_tokens``.
"""
from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from bitnet_dist.errors import ConfigError
from bitnet_dist.export import ensure_transformers, quiet_library_warnings, require_hf
from bitnet_dist.export.reader import ExportError

ensure_transformers()


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: Optional[int] = None
    stop_at_eos: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if self.temperature < 0:
            raise ConfigError("temperature", self.temperature, ">= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError("top_k", self.top_k, ">= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", self.top_p, "in (0, 1] (1 = off)")


def _resolve_model_dir(path: Path) -> tuple[str, Path]:
    """('export' | 'checkpoint', path): a run directory resolves to its newest complete checkpoint."""
    from bitnet_dist.checkpoint import CheckpointError, CheckpointManager

    if (path / "config.json").is_file():
        return "export", path
    if (path / "manifest.json").is_file() or path.name.startswith("step_"):
        return "checkpoint", path
    if (path / "checkpoints").is_dir():
        try:
            latest = CheckpointManager(path).latest()
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        if latest is None:
            raise ExportError(f"run directory {path} has no checkpoint yet")
        return "checkpoint", latest
    raise ExportError(f"{path} is neither a Hugging Face export (config.json), a checkpoint (manifest.json) nor a run "
                      "directory (checkpoints/)")


def load(model_path, *, config=None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(transformers model in eval mode, tokenizer) from an export, a checkpoint or a run directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path).resolve()
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    kind, path = _resolve_model_dir(path)
    tmp = None
    try:
        if kind == "checkpoint":
            from bitnet_dist.export.hf import export

            tmp = Path(tempfile.mkdtemp(prefix="bitnet-generate-"))
            path = export(path, tmp / "export", config=config)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(device).eval(), tok


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[..., V] fp32 logits with the tokens outside top-k / top-p set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model, input_ids: list[int], sampling: Sampling, eos_id: Optional[int] = None) -> list[int]:
    """New token ids after ``input_ids`` (one sequence), decoding with the model's KV cache."""
    from transformers import DynamicCache

    sampling.check()
    if not input_ids:
        raise ConfigError("prompt", "", "at least one token (an empty prompt: start from the end-of-document token)")
    device = next(model.parameters()).device
    gen = None
    if sampling.temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(sampling.seed) if sampling.seed is not None else torch.seed())
    cache = DynamicCache(config=model.config)
    key = _cache_kwarg(model)
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    limit = getattr(model.config, "max_position_embeddings", None)
    out: list[int] = []
    pos = 0
    for _ in range(sampling.max_new_tokens):
        if limit is not None and pos + ids.shape[1] > limit:
            break  # RoPE was trained up to max_position_embeddings; the caller sees the shorter continuation
        n = ids.shape[1]
        logits = model(input_ids=ids, position_ids=torch.arange(pos, pos + n, device=device)[None], use_cache=True,
                       **{key: cache}).logits[0, -1].float()
        pos += n
        if sampling.temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            probs = torch.softmax(filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p), -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        if sampling.stop_at_eos and eos_id is not None and nxt == eos_id:
            break
        ids = torch.tensor([[nxt]], dtype=torch.long, device=device)
    return out


def complete(model, tok, prompt: str, sampling: Sampling) -> tuple[list[int], str]:
    """(new ids, decoded continuation) for a text prompt."""
    ids = tok.encode(prompt, add_special_tokens=False) or [tok.eos_token_id]
    new = generate(model, ids, sampling, eos_id=tok.eos_token_id)
    return new, tok.decode(new, skip_special_tokens=True)


def main(argv=None) -> None:
    """Console script ``bitnet-generate``."""
    ap = argparse.ArgumentParser(prog="bitnet-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a bitnet-export directory, a checkpoint (RUN_DIR/checkpoints/step_*) or a run directory")
    ap.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable; default: 'The')")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    ap.add_argument("--config", default=None, help="a checkpoint's run config.yaml (default: RUN_DIR/config.yaml)")
    args = ap.parse_args(argv)
    require_hf("bitnet-generate")
    quiet_library_warnings()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    try:
        sampling.check()
        model, tok = load(args.model, config=args.config, device=device)
        for prompt in args.prompt or ["The"]:
            _, text = complete(model, tok, prompt, sampling)
            print(f"{prompt}{text}", flush=True)
    except (ConfigError, ExportError) as e:
        print(f"bitnet-generate: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

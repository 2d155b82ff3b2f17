"""Telemetry: metrics.jsonl (always) + wandb (offline / online / disabled), activation and weight
statistics probes, FLOP accounting and a terminal progress bar. Definitions: docs/telemetry.md.

Only the logging rank writes (``enabled=True``); every rank builds a Telemetry and enters
``stats_probe`` together, because the probe gathers TP-sharded activations and reduces its sums over
all ranks once at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from bitnet_dist import quant
from bitnet_dist.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
WANDB_MODES = ("offline", "online", "disabled")

KINDS = ("qkv", "fc1", "wo", "wdown")
OUTLIER_STDS = 6.0  # |x| > 6 standard deviations of its token counts as an outlier
# Histograms of the H-BitLinear inputs (Wo, Wdown) before / after the Hadamard transform: values divided by
# their token's RMS, HIST_BINS bins over [-HIST_RANGE, HIST_RANGE]; values beyond fall into the end bins.
HIST_KINDS = ("wo", "wdown")
HIST_BINS = 64
HIST_RANGE = 8.0
# Per kind, summed over calls, layers and ranks:
_SUM_FIELDS = ("tokens", "kurt_pre", "kurt_post", "outl_pre", "outl_post", "elems",
               "err8_sq", "err4_sq", "x_sq", "w_neg", "w_zero", "w_pos")
_MAX_FIELDS = ("absmax_pre", "absmax_post")
_S = {f: i for i, f in enumerate(_SUM_FIELDS)}


# -- FLOPs, peaks, memory ---------------------------------------------------------------------------------------
def flops_per_token(model_cfg, seq_length: int, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward) = 6 N + 12 L h s.

    N counts the weights that multiply activations: per layer QKV h(h + 2 g d), Wo h^2, SwiGLU fc1 2 h f,
    Wdown f h, plus the output head h V (the embedding lookup is free). 12 L h s is the attention score
    and value products (2 matmuls x 2 s h FLOPs forward, x3 with backward), counted over the full s x s
    matrix as in PaLM's MFU (causal masking would halve it). Norms, the Hadamard transform and
    quantization are O(h) per token and left out. ``vocab_size``: pass the padded size for the exact head.
    """
    h, f, L = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.num_layers
    heads = model_cfg.num_attention_heads
    groups = model_cfg.num_query_groups or heads
    kv = groups * (h // heads)
    per_layer = h * (h + 2 * kv) + h * h + 2 * h * f + f * h
    n = L * per_layer + h * vocab_size
    return float(6 * n + 12 * L * h * seq_length)


# Dense peak FLOP/s by device-name fragment (first match wins): bf16/fp16 tensor cores; fp32 without TF32
# (torch's default for matmuls). Vendor data sheets (SXM parts unless named).
_PEAKS = (
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 51e12}),
    ("H200", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    ("H100", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}),
)


def device_peak_flops(device, dtype) -> Optional[float]:
    """Peak dense FLOP/s of one device for ``dtype``; None when unknown (CPU, unlisted GPU): no MFU then."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in _PEAKS:
        if fragment in name:
            return peaks.get(dtype)
    return None


def throughput_metrics(tokens: int, seconds: float, flops_token: float, num_devices: int,
                       peak: Optional[float]) -> dict[str, float]:
    """tokens_per_s (global), tflops (achieved per device, TFLOP/s) and mfu (omitted without a peak)."""
    tps = tokens / seconds if seconds > 0 else float("nan")
    per_device = tps * flops_token / max(num_devices, 1)
    out = {"tokens_per_s": tps, "tflops": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
    return out


def memory_stats(device) -> dict[str, float]:
    """GiB: CUDA allocator current/peak/reserved, or the process's resident and peak resident set on CPU."""
    device = torch.device(device)
    gib = 1024.0 ** 3
    if device.type == "cuda":
        return {"mem/allocated_gib": torch.cuda.memory_allocated(device) / gib,
                "mem/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
                "mem/reserved_gib": torch.cuda.memory_reserved(device) / gib}
    import resource

    out = {"mem/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}  # KiB on Linux
    try:
        import psutil

        out["mem/rss_gib"] = psutil.Process().memory_info().rss / gib
    except ImportError:
        pass
    return out


# -- activation / weight statistics --------------------------------------------------------------------------------
def activation_moments(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of activations x [..., features] over each token's features, as 0-d fp32 tensors.

    absmax: max |x|; kurt_sum: sum over tokens of m4 / m2^2 (central moments of the token, 3 for a
    Gaussian); outliers: number of entries with |x| > 6 std of their token; a constant token (std 0)
    adds 0 to both. tokens, elems: counts. No host sync.
    """
    xf = x.detach().float().reshape(-1, x.shape[-1])
    c = xf - xf.mean(dim=-1, keepdim=True)
    m2 = c.pow(2).mean(dim=-1)
    m4 = c.pow(4).mean(dim=-1)
    pos = m2 > 0
    kurt = torch.where(pos, m4 / torch.where(pos, m2, torch.ones_like(m2)).pow(2), torch.zeros_like(m2))
    outliers = ((xf.abs() > OUTLIER_STDS * m2.sqrt().unsqueeze(-1)) & pos.unsqueeze(-1)).sum()
    return {"absmax": xf.abs().max(), "kurt_sum": kurt.sum(), "outliers": outliers.float(),
            # device scalars by a fill kernel: torch.tensor(v, device=cuda) is a copy from pageable host memory,
            # which synchronizes the host with the GPU (it made the probe 2-3x slower on the H100)
            "tokens": xf.new_full((), float(xf.shape[0])), "elems": xf.new_full((), float(xf.numel()))}


def normalized_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts [HIST_BINS] (fp64) of x / RMS(token) over [-HIST_RANGE, HIST_RANGE], ends clamped; all-zero
    tokens count at 0. No host sync."""
    xf = x.detach().float().reshape(-1, x.shape[-1])
    rms = xf.pow(2).mean(dim=-1, keepdim=True).sqrt()
    z = torch.where(rms > 0, xf / rms.clamp_min(1e-30), torch.zeros_like(xf)).clamp(-HIST_RANGE, HIST_RANGE)
    return torch.histc(z, bins=HIST_BINS, min=-HIST_RANGE, max=HIST_RANGE).double()


def hist_edges() -> list[float]:
    return torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1, dtype=torch.float64).tolist()


def quant_error_sq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """||x - Q(x)||^2 with bitnet_dist.quant's per-token quantizer (x holds whole tokens)."""
    codes, scale = quant.act_codes(x, bits)
    return (x.detach().float() - codes.float() * scale).pow(2).sum()


def _gather_features(x: torch.Tensor, layer) -> torch.Tensor:
    """Whole tokens: all-gather a TP feature shard [..., in/TP] over the layer's TP group (rank order)."""
    full = getattr(layer, "input_size", x.shape[-1])
    if x.shape[-1] == full:
        return x
    group = layer.tp_group
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _StatsProbe:
    """Accumulates per-kind sums on device from ``stats_hook`` calls; ``result()`` reduces them once."""

    def __init__(self, model_chunks: Iterable[torch.nn.Module]):
        self.chunks = list(model_chunks)
        self.layers = [m for c in self.chunks for m in c.modules()
                       if hasattr(m, "stats_hook") and getattr(m, "layer_kind", None) in KINDS]
        self.device = next((p.device for c in self.chunks for p in c.parameters()), torch.device("cpu"))
        self.sums = torch.zeros(len(KINDS), len(_SUM_FIELDS), dtype=torch.float64, device=self.device)
        self.maxes = torch.zeros(len(KINDS), len(_MAX_FIELDS), dtype=torch.float64, device=self.device)
        self.hists = torch.zeros(len(KINDS), 2, HIST_BINS, dtype=torch.float64, device=self.device)
        self._weights_seen: set[int] = set()

    def install(self) -> None:
        for m in self.layers:
            m.stats_hook = self.hook

    def remove(self) -> None:
        for m in self.layers:
            m.stats_hook = None

    @torch.no_grad()
    def hook(self, layer, pre: torch.Tensor, post: torch.Tensor) -> None:
        k = KINDS.index(layer.layer_kind)
        same = post is pre  # column layers pass one tensor: gather it once
        pre = _gather_features(pre, layer)
        post = pre if same else _gather_features(post, layer)
        a = activation_moments(pre)
        b = a if same else activation_moments(post)  # QKV / fc1: one tensor, its moments once
        row = torch.stack([a["tokens"], a["kurt_sum"], b["kurt_sum"], a["outliers"], b["outliers"], a["elems"],
                           quant_error_sq(post, 8), quant_error_sq(post, 4),
                           post.detach().float().pow(2).sum(), *self._weight_counts(layer, post.device)])
        self.sums[k] += row.to(self.sums)
        self.maxes[k] = torch.maximum(self.maxes[k], torch.stack([a["absmax"], b["absmax"]]).to(self.maxes))
        if layer.layer_kind in HIST_KINDS:
            self.hists[k] += torch.stack([normalized_histogram(pre), normalized_histogram(post)]).to(self.hists)

    def _weight_counts(self, layer, device) -> list[torch.Tensor]:
        # Once per layer and probe, inside the layer's forward (ZeRO-3 has gathered the weight there).
        if id(layer) in self._weights_seen or not hasattr(layer, "quantized_weight_codes"):
            return [torch.zeros((), device=device)] * 3
        self._weights_seen.add(id(layer))
        codes = layer.quantized_weight_codes()
        return [(codes == v).sum().float().to(device) for v in (-1, 0, 1)]

    def result(self) -> dict[str, float]:
        """Reduce over all ranks (SUM / MAX), one host sync, then the per-kind scalars."""
        sums, maxes, hists = self.sums, self.maxes, self.hists
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            dist.all_reduce(hists)
        s_rows = torch.cat([sums, maxes, hists.flatten(1)], dim=1).tolist()  # the one host sync
        out: dict[str, float] = {}
        nan = float("nan")
        for k, kind in enumerate(KINDS):
            row = s_rows[k]
            s = dict(zip(_SUM_FIELDS, row[:len(_SUM_FIELDS)]))
            m = dict(zip(_MAX_FIELDS, row[len(_SUM_FIELDS):]))
            if s["tokens"] == 0:
                continue
            p = f"stats/{kind}/"
            out[p + "absmax_pre"], out[p + "absmax_post"] = m["absmax_pre"], m["absmax_post"]
            out[p + "kurtosis_pre"] = s["kurt_pre"] / s["tokens"]
            out[p + "kurtosis_post"] = s["kurt_post"] / s["tokens"]
            out[p + "outlier_ratio_pre"] = s["outl_pre"] / s["elems"]
            out[p + "outlier_ratio_post"] = s["outl_post"] / s["elems"]
            out[p + "qerr_int8"] = math.sqrt(s["err8_sq"] / s["x_sq"]) if s["x_sq"] > 0 else nan
            out[p + "qerr_int4"] = math.sqrt(s["err4_sq"] / s["x_sq"]) if s["x_sq"] > 0 else nan
            if kind in HIST_KINDS:
                h = row[len(_SUM_FIELDS) + len(_MAX_FIELDS):]
                for i, when in enumerate(("pre", "post")):
                    counts = h[i * HIST_BINS:(i + 1) * HIST_BINS]
                    total = sum(counts)
                    if total > 0:
                        out[p + f"hist_{when}"] = [c / total for c in counts]
                out[p + "hist_edges"] = hist_edges()
            w = s["w_neg"] + s["w_zero"] + s["w_pos"]
            if w > 0:
                out[p + "wfrac_neg"], out[p + "wfrac_zero"], out[p + "wfrac_pos"] = (
                    s["w_neg"] / w, s["w_zero"] / w, s["w_pos"] / w)
        return out


# -- the sink ------------------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    """A JSON value: tensors and numpy scalars to Python numbers; non-finite floats to null (JSON has no NaN)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _config_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return {}


class Telemetry:
    """Metrics sink of one run: see module docstring and docs/telemetry.md."""

    def __init__(self, cfg, run_dir, *, enabled: bool):
        mode = cfg.logging.wandb
        if mode not in WANDB_MODES:
            raise ConfigError("logging.wandb", mode, "offline, online or disabled")
        self.cfg, self.run_dir, self.enabled = cfg, Path(run_dir), enabled
        self.stats_probe_result: dict[str, float] = {}
        self._bar = None
        self._file = None
        self._wandb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
            if mode != "disabled":
                self._wandb = self._init_wandb(mode)

    def _init_wandb(self, mode: str):
        import wandb  # deferred: wandb is heavy and needed only when logging.wandb is on

        id_path = self.run_dir / WANDB_ID_FILE
        if id_path.is_file():  # a resumed or requeued job continues the same wandb run
            run_id = id_path.read_text().strip()
        else:
            # wandb's own id helper moved between releases; its ids are 8 of [a-z0-9] as well.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_path.write_text(run_id + "\n")
        lg = self.cfg.logging
        return wandb.init(project=lg.project, entity=lg.entity, name=lg.run_name or self.cfg.experiment,
                          id=run_id, resume="allow", mode=mode, dir=os.environ.get("WANDB_DIR", str(self.run_dir)),
                          config=_config_dict(self.cfg))

    @property
    def wandb_run(self):
        return self._wandb

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One line {"step": step, **metrics} in metrics.jsonl and the same values in wandb."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._write({"step": int(step), **clean})
        if self._wandb is not None:
            self._wandb.log(self._for_wandb(clean), step=int(step))

    def _for_wandb(self, clean: dict[str, Any]) -> dict[str, Any]:
        """Scalars as they are (None -> NaN); histogram lists as wandb.Histogram; other lists left out."""
        import wandb  # deferred: wandb is heavy and needed only when logging.wandb is on

        out = {}
        for k, v in clean.items():
            if isinstance(v, list):
                if "/hist_pre" in k or "/hist_post" in k:
                    edges = clean.get(k.rsplit("/", 1)[0] + "/hist_edges")
                    if edges is not None:
                        out[k] = wandb.Histogram(np_histogram=(v, edges))
                continue
            out[k] = float("nan") if v is None else v
        return out

    def event(self, step: int, name: str, **fields: Any) -> None:
        """One line {"step", "event": name, **fields}; wandb gets event/<name> = 1 and its numeric fields."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in fields.items()}
        self._write({"step": int(step), "event": name, **clean})
        if self._wandb is not None:
            nums = {f"event/{name}/{k}": v for k, v in clean.items() if isinstance(v, (int, float))}
            self._wandb.log({f"event/{name}": 1, **nums}, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl records with a step > ``step`` (and a torn last line), atomically.

        Called on resume from the checkpoint of ``step`` so the file's steps stay contiguous. wandb keeps
        what it already received: it ignores re-logged steps at or below its last one (docs/telemetry.md).
        """
        if not self.enabled:
            return
        path = self.run_dir / METRICS_FILE
        self._file.close()
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", math.inf) <= step:
                kept.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._file = open(path, "a", encoding="utf-8")

    @contextlib.contextmanager
    def stats_probe(self, model_chunks: Iterable[torch.nn.Module]):
        """Collect activation / weight statistics of the forward passes run inside the block.

        Enter it on every rank (collectives: TP all-gathers inside the hooks, one all-reduce at exit).
        On exit ``stats_probe_result`` holds {"stats/<kind>/<name>": float}; with no BitLinear layers it
        is empty. Outside the block no hook is installed (zero cost).
        """
        probe = _StatsProbe(model_chunks)
        probe.install()
        try:
            yield probe
        except BaseException:
            probe.remove()
            raise
        probe.remove()
        self.stats_probe_result = probe.result()

    def progress(self, step: int, max_steps: int, **shown: Any) -> None:
        """Progress at ``step`` of ``max_steps`` with ``shown`` values (loss, tokens_per_s, ...), on the logging
        rank with trainer.progress_bar. On a terminal: a tqdm bar with its time-left estimate. Otherwise (a log
        file, a Slurm job's output): one plain line every trainer.log_interval steps and at the last step,
        instead of a bar redrawn line by line."""
        if not self.enabled or not self.cfg.trainer.progress_bar:
            return
        if not _is_terminal(sys.stderr):
            if step % self.cfg.trainer.log_interval == 0 or step == max_steps:
                values = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
                print(f"[bitnet-train] step {step}/{max_steps} {values}".rstrip(), flush=True)
            return
        if self._bar is None:
            self._bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                             mininterval=1.0, smoothing=0.1)
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: _fmt(v) for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _is_terminal(stream) -> bool:
    """Whether ``stream`` (the progress bar's, sys.stderr) is an interactive terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _fmt(v: Any) -> str:
    v = _plain(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)

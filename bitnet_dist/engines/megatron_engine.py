"""The megatron-core engine: tensor, sequence and pipeline parallel (1F1B and interleaved), megatron DDP
with the distributed optimizer, bf16 with fp32 main weights, and dist_checkpointing that reshards.

Wiring, per local model chunk (one per virtual pipeline stage):

    GPTModel (bitnet_dist.model.build_model, our layer spec)
      -> Float16Module          bf16 only: casts the chunk and its first-stage inputs, returns fp32 loss
      -> DistributedDataParallel grads land in contiguous fp32 buffers (``param.main_grad``), reduced in
                                 buckets that overlap backward (overlap_grad_reduce)
    get_megatron_optimizer      AdamW on fp32 main weights, sharded over data parallel (distributed
                                 optimizer), grad-norm clipping over the whole model-parallel group

A plain ``torch.optim`` optimizer would see no gradients here: megatron DDP moves them into
``main_grad`` and sets ``.grad = None`` (notes section 3), hence get_megatron_optimizer.

Loss: ``loss_func`` returns (sum of masked per-token losses, token count, ...) with
``calculate_per_token_loss``; the schedule backpropagates the sum and ``finalize_model_grads`` divides
every gradient by the global token count (broadcast from the last pipeline stage, all-reduced over DP).
That is exactly the gradient of the token-weighted mean over the global batch, the quantity every
engine reports. The reported loss is reduced over DP on the last stage and broadcast over the pipeline
group, so every rank returns the same StepStats.

Megatron's schedules, optimizers and RNG tracker are CUDA-only (notes section 2). On CPU this module
still builds the model chunks through the same path (``build_model_chunks``), which the CPU tests use
for tensor-parallel invariance and checkpoint resharding at the model level.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from bitnet_dist import step_cache
from bitnet_dist.compat import install_cpu_path, install_foreach_multi_tensor
from bitnet_dist.distributed import init_distributed
from bitnet_dist.engines import guard
from bitnet_dist.engines.base import Batch, Engine, StepStats
from bitnet_dist.engines.common import (
    TRAINER_STATE_FILE,
    MegatronDataParallelTopology,
    batch_to_device,
    fused_paths_of,
    init_model_parallel,
    load_trainer_state,
    no_weight_decay,
    position_ids,
    resolve_dtype,
    save_trainer_state,
)
from bitnet_dist.errors import ConfigError
from bitnet_dist.fusions import fused_adam_enabled, megatron_fusions
from bitnet_dist.layers import batch_weight_quant, bit_layers, set_act_bits
from bitnet_dist.model import build_model, transformer_config
from bitnet_dist.presets import check_model
from bitnet_dist.recompute import megatron_recompute

# megatron-core's CUDA-side subsystems (optimizer, schedules, DDP, CUDA graphs, dist-checkpointing) are imported in
# the methods that use them: the engine's CPU paths (tests, checks) never load them.

CKPT_SUBDIR = "megatron"  # dist_checkpointing files inside the step directory
LAYOUT_FILE = "megatron_layout.json"  # informative: the layout that wrote the checkpoint
NVLS_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# -- configuration checks (before any process-group or GPU work) -------------------------------------------
def check_megatron_config(cfg, world_size: Optional[int] = None, cuda: Optional[bool] = None,
                          model_only: bool = False) -> None:
    """Engine-specific checks on top of bitnet_dist.presets.check_model; raises ConfigError.

    ``world_size`` None: not checked (init_parallel checks it again once the group exists);
    ``cuda`` None: torch.cuda.is_available(); ``model_only``: skip what only training needs (CUDA).
    """
    par, t, eng = cfg.parallel, cfg.trainer, cfg.engine
    check_model(cfg.model, cfg.precision, par)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    tp, pp, vp = par.tensor, par.pipeline, par.virtual_pipeline
    if not model_only and not cuda:
        raise ConfigError("engine", "megatron",
                          "deepspeed (or auto) on a machine without a CUDA GPU: megatron-core's schedules, "
                          "optimizers and RNG tracker are CUDA-only")
    if par.zero_stage:
        raise ConfigError("parallel.zero_stage", par.zero_stage,
                          "0 with engine=megatron (it shards the optimizer with parallel.distributed_optimizer)")
    if par.offload_optimizer or par.offload_params:
        raise ConfigError("parallel.offload_optimizer/offload_params", True, "false with engine=megatron")
    if eng.overlap_param_gather and not par.distributed_optimizer:
        raise ConfigError("engine.overlap_param_gather", True,
                          "false unless parallel.distributed_optimizer=true (only the distributed optimizer "
                          "gathers parameters)")
    if getattr(eng, "cuda_graph", False):
        if eng.overlap_param_gather:
            raise ConfigError("engine.cuda_graph", True,
                              "false with engine.overlap_param_gather=true, or set engine.overlap_param_gather=false "
                              "(the distributed optimizer's all-gather is started after the optimizer step, outside "
                              "the captured step, and waited for by forward pre-hooks inside it)")
        if eng.cuda_graph_warmup < 1:
            raise ConfigError("engine.cuda_graph_warmup", eng.cuda_graph_warmup,
                              ">= 1: the first steps run eagerly (the kernels' one-time layout checks and the "
                              "optimizer's state set-up synchronize with the host and cannot be captured)")
    if par.sequence and t.seq_length % tp:
        raise ConfigError("trainer.seq_length", t.seq_length,
                          f"a multiple of parallel.tensor={tp} with parallel.sequence=true (the sequence "
                          f"is split over the tensor-parallel ranks)")
    if t.seq_length > cfg.model.max_sequence_length:
        raise ConfigError("trainer.seq_length", t.seq_length,
                          f"at most model.max_sequence_length={cfg.model.max_sequence_length}")
    if t.dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError("trainer.dtype", t.dtype, "auto, bf16 or fp32")
    if t.dtype == "bf16" and not cuda:
        raise ConfigError("trainer.dtype", "bf16", "fp32 or auto on CPU (the megatron engine's bf16 path is CUDA)")
    if world_size is not None:
        if world_size % (tp * pp):
            raise ConfigError("parallel.tensor * parallel.pipeline", tp * pp,
                              f"a divisor of the number of processes ({world_size})")
        dp = world_size // (tp * pp)
        mbs, gbs = t.micro_batch_size, t.global_batch_size
        if gbs % (mbs * dp):
            raise ConfigError("trainer.global_batch_size", gbs,
                              f"a multiple of micro_batch_size * data_parallel = {mbs} * {dp} = {mbs * dp}")
        if vp is not None:
            m = gbs // (mbs * dp)
            # megatron's interleaved schedule runs micro-batches in groups of PP per virtual stage
            # (schedules.py: "The number of contiguous micro-batches ... should range in [PP, M]")
            if m % pp:
                raise ConfigError("trainer.global_batch_size", gbs,
                                  f"a value giving a number of micro-batches per rank (now {m}) divisible by "
                                  f"parallel.pipeline={pp}, as the interleaved schedule needs, e.g. "
                                  f"{mbs * dp * pp * max(1, m // pp)}")
            if t.eval_batches % pp:
                raise ConfigError("trainer.eval_batches", t.eval_batches,
                                  f"a multiple of parallel.pipeline={pp} with the interleaved schedule")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    """DDP -> Float16Module -> GPTModel."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(m, (DistributedDataParallel, Float16Module)):
        m = m.module
    return m


class MegatronEngine(MegatronDataParallelTopology, Engine):
    """Engine(cfg) on megatron-core. ``model_only=True`` (tests, tools): CPU allowed, ``build`` makes the
    model chunks without DDP or optimizer, and ``train_step`` is unavailable."""

    name = "megatron"

    def __init__(self, cfg, *, model_only: bool = False):
        self.cfg = cfg
        self.model_only = model_only
        check_megatron_config(cfg, model_only=model_only)
        self._device: Optional[torch.device] = None
        self._dtype: Optional[torch.dtype] = None
        self._chunks: list[torch.nn.Module] = []  # wrapped (DDP(Float16Module(GPTModel))) when training
        self._raw: list[torch.nn.Module] = []  # the GPTModel of each chunk
        self.optimizer = None
        self.fused_adam = 0  # how many torch AdamW optimizers use_fused_adam switched (optim.fused)
        self.config = None  # megatron TransformerConfig
        self._vocab_size: Optional[int] = None
        self._graph = None  # megatron-core FullCudaGraphWrapper (engine.cuda_graph)
        self.batched_weights = 0  # weights quantized together per step (layers.batch_weight_quant)
        self.graph_replays = 0  # training steps run by replaying the captured graph

    # -- process groups ------------------------------------------------------------------------------------
    def init_parallel(self) -> None:
        for k, v in NVLS_OFF_ENV.items():  # before the first NCCL communicator is created
            os.environ.setdefault(k, v)
        device = None
        if not dist.is_initialized():
            device = init_distributed().device  # torchrun / Slurm ranks, NCCL on CUDA
        if device is None:  # the group was started elsewhere (tests, tools): one GPU per local rank
            device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
                      if torch.cuda.is_available() else torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            install_cpu_path()
        self._device = device
        par = self.cfg.parallel
        check_megatron_config(self.cfg, world_size=dist.get_world_size(), model_only=self.model_only)
        self._dtype = resolve_dtype(self.cfg.trainer.dtype, self._device)
        init_model_parallel(
            tensor_model_parallel_size=par.tensor,
            pipeline_model_parallel_size=par.pipeline,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        )
        if self._device.type == "cuda":
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            # TP ranks get distinct dropout streams, DP/PP replicas the same: megatron's tracker.
            if getattr(self.cfg.engine, "cuda_graph", False):
                # the captured step registers the tracker's generators with the graph: graph-safe ones
                model_parallel_cuda_manual_seed(self.cfg.trainer.seed, use_cudagraphable_rng=True,
                                                force_reset_rng=True)
            else:
                model_parallel_cuda_manual_seed(self.cfg.trainer.seed)

    # -- model --------------------------------------------------------------------------------------------
    def transformer_config(self):
        """The megatron TransformerConfig of this run (our model fields + engine wiring)."""
        bf16 = self._dtype == torch.bfloat16
        par = self.cfg.parallel
        overrides = dict(
            calculate_per_token_loss=True,
            # p2p buffers between pipeline stages are allocated in this dtype (required when PP > 1)
            pipeline_dtype=self._dtype,
            # STE weights are not leaves of the GEMM, so megatron's fused wgrad accumulation into
            # main_grad cannot apply (notes section 6.3)
            gradient_accumulation_fusion=False,
        )
        overrides.update(megatron_recompute(self.cfg.trainer))  # trainer.recompute: megatron's own
        # trainer.fused_rope / fused_cross_entropy (auto: on with CUDA)
        cuda = self._device.type == "cuda" if self._device is not None else torch.cuda.is_available()
        overrides.update(megatron_fusions(self.cfg.trainer, cuda=cuda))
        if par.virtual_pipeline:
            # Interleaved 1F1B exchanges activations and gradients with both neighbours in one call.
            # At PP=2 both neighbours are the same rank, and megatron-core's batched path
            # (p2p_communication._batched_p2p_ops: send_prev, recv_prev, send_next, recv_next on every
            # rank) pairs rank 0's gradient send with rank 1's activation receive: measured on 2 H200s,
            # micro-batches 3 and 4 of each step got the wrong hidden states (loss off by 3e-3 at step 0,
            # training visibly worse). The unbatched path (_p2p_ops) orders by rank parity and uses a
            # second group at PP=2; Megatron-LM's default for the interleaved schedule is the same
            # (overlap_p2p_comm on, batch_p2p_comm off).
            overrides.update(overlap_p2p_comm=True, batch_p2p_comm=False)
        return transformer_config(self.cfg.model, par, params_dtype=self._dtype, bf16=bf16,
                                  use_cpu_initialization=True, **overrides)

    def build_model_chunks(self, vocab_size: int) -> list[torch.nn.Module]:
        """Build this rank's GPTModel chunks (one per virtual stage) on ``self.device``, unwrapped.

        Weights: build_model's layout-independent init from (trainer.seed, global parameter name), so
        every TP/PP/virtual-PP layout starts from the same weights (and the same as other engines).
        """
        from megatron.core import parallel_state as ps

        self.config = self.transformer_config()
        vp = self.cfg.parallel.virtual_pipeline
        chunks = []
        for v in range(vp or 1):
            stage = None if vp is None else v
            torch.manual_seed(self.cfg.trainer.seed)
            m = build_model(
                self.cfg.model, self.cfg.precision, self.config, vocab_size=vocab_size,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage, seed=self.cfg.trainer.seed,
            )
            chunks.append(m.to(self._device))
        return chunks

    def build(self, vocab_size: int) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.transformer.module import Float16Module

        if self._device is None:
            raise RuntimeError("MegatronEngine.build() before init_parallel()")
        self._vocab_size = vocab_size
        self._raw = self.build_model_chunks(vocab_size)
        self.batched_weights = self._batch_weight_quant()
        if self.model_only:
            self._chunks = list(self._raw)
            return
        eng, par = self.cfg.engine, self.cfg.parallel
        config = self.config
        wrapped = [Float16Module(config, m) if config.bf16 else m for m in self._raw]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=eng.grad_reduce_in_fp32,
            overlap_grad_reduce=eng.overlap_grad_reduce,
            overlap_param_gather=eng.overlap_param_gather,
            use_distributed_optimizer=par.distributed_optimizer,
        )
        # Only the first chunk gets buckets that overlap with backward; the others reduce as one
        # bucket each, as megatron-LM's training.get_model does.
        with self._ddp_stream_context():
            self._chunks = [
                DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
                for i, m in enumerate(wrapped)
            ]
        for m in self._chunks:
            m.broadcast_params()  # DP replicas start identical (they already are: same CPU seed)
        # without TE / apex: megatron's per-tensor grad-norm fallback syncs the host once per tensor
        self.multi_tensor_swaps = install_foreach_multi_tensor()
        self.optimizer = self._make_optimizer()
        # optim.fused (auto: on with CUDA): torch's fused AdamW for the torch AdamW megatron falls back to
        self.fused_adam = (use_fused_adam(self.optimizer) if fused_adam_enabled(self.cfg.optim, self._device.type == "cuda")
                           else 0)

        # what the schedules call around micro-batches (megatron-LM training.py, setup of `config`)
        if eng.overlap_grad_reduce:
            fns = [m.no_sync for m in self._chunks]
            config.no_sync_func = fns[0] if len(fns) == 1 else fns
            fns = [m.start_grad_sync for m in self._chunks]
            config.grad_sync_func = fns[0] if len(fns) == 1 else fns
        if eng.overlap_param_gather:
            fns = [m.start_param_sync for m in self._chunks]
            config.param_sync_func = fns[0] if len(fns) == 1 else fns
        config.finalize_model_grads_func = (finalize_model_grads_capturable if getattr(eng, "cuda_graph", False)
                                            else finalize_model_grads)
        config.grad_scale_func = self.optimizer.scale_loss

    def _batch_weight_quant(self) -> int:
        """All of this rank's ternary weights quantized in one pass per step (layers.batch_weight_quant), unless
        the distributed optimizer's overlapped all-gather is on: the weights of later buckets are then still in
        flight when the first layer runs."""
        if self.cfg.engine.overlap_param_gather:
            return 0
        return batch_weight_quant(self._raw)

    @contextlib.contextmanager
    def _ddp_stream_context(self):
        """engine.cuda_graph: build megatron DDP on a side stream of its own.

        DDP keeps every parameter's AccumulateGrad node alive (it hooks them: ``param.expand_as(param)``), and
        torch (2.11 on the GPU image) runs such a kept node on the stream that was current when it was created,
        waiting there for the gradient's producer (torch warns about it: "ensure that DDP initialization is
        performed under the same stream as subsequent forwards"). Created on the default (legacy) stream, that wait inside the captured
        step is illegal (measured on the H100, v2_a8: cudaErrorStreamCaptureImplicit, "operation would make
        the legacy stream depend on a capturing blocking stream", in AccumulateGrad). On a side stream the
        wait joins that stream into the capture, and the autograd engine joins it back into the capturing
        stream at the end of backward (its leaf-stream sync), before the gradients are finalized."""
        if not (getattr(self.cfg.engine, "cuda_graph", False) and self._device.type == "cuda"):
            yield
            return
        # the eager steps' AccumulateGrad then waits on the default stream: intended, so torch's warning is off
        if hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
            torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
        side = torch.cuda.Stream(device=self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self._device).wait_stream(side)
        torch.cuda.synchronize(self._device)
        self._ddp_stream = side  # keep it alive with the nodes that name it

    def _make_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

        o, par = self.cfg.optim, self.cfg.parallel
        ocfg = OptimizerConfig(
            optimizer="adam", decoupled_weight_decay=True,  # AdamW
            lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps,
            clip_grad=o.clip_grad,
            bf16=self.config.bf16, params_dtype=self._dtype,
            use_distributed_optimizer=par.distributed_optimizer,
            overlap_param_gather_with_optimizer_step=False,
        )
        # the same no-decay set as every engine (engines.common.no_weight_decay): wd_mult 0 there,
        # and train_step scales each group's weight decay by its wd_mult
        no_wd = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="bitnet_no_weight_decay", fn=lambda p, n: no_weight_decay(n, p)))
        return get_megatron_optimizer(ocfg, self._chunks, config_overrides={no_wd: {"wd_mult": 0.0}})

    # -- steps ----------------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        """megatron forward_step_func: one micro-batch through one chunk."""
        b = batch_to_device(next(data_iterator), self._device)
        tokens = b["tokens"]
        out = model(input_ids=tokens, position_ids=position_ids(tokens), attention_mask=None, labels=b["labels"])
        return out, partial(self._loss_func, b["loss_mask"])

    @staticmethod
    def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
        """(sum of masked fp32 per-token losses, token count, report dict); the schedule divides nothing
        (calculate_per_token_loss) and finalize_model_grads divides the gradients by the global count."""
        loss_sum = (per_token_loss.float() * loss_mask).sum()
        num_tokens = loss_mask.sum().to(torch.int)
        return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.detach()}

    # -- full-step CUDA graph (engine.cuda_graph) -------------------------------------------------------------
    def _hooks_installed(self) -> bool:
        """Python that must run inside the step (layer statistics hooks, module forward hooks): such a step runs
        eagerly, as a replayed graph would skip it. The trainer's statistics probes never get here: they take
        a forward-only pass of their own (train.py), so probed steps are replayed too."""
        return any(getattr(x, "stats_hook", None) is not None or x._forward_hooks or x._forward_pre_hooks
                   for m in self._raw for x in m.modules())

    def _forward_backward_func(self, forward_only: bool):
        """megatron's schedule, or (engine.cuda_graph, training) megatron-core's FullCudaGraphWrapper around it:
        the first ``cuda_graph_warmup`` steps run eagerly, the next is captured (every micro-batch's forward
        and backward and the gradient finalization; not the optimizer step) and later steps replay it with
        the micro-batches copied into static buffers. The weights' ternary codes are computed inside the
        step (step_cache opens a generation per step), so a replay re-quantizes the updated weights in place.
        Evaluation and steps with hooks inside the model run eagerly. megatron-core 0.16.1's static-buffer loader
        copies the next micro-batches on its own stream without waiting for the current one (0.17.1 waits):
        safe here because ``_run_schedule`` reads the loss on the host at the end of every step."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fb = get_forward_backward_func()
        if forward_only or not getattr(self.cfg.engine, "cuda_graph", False) or self._hooks_installed():
            return fb
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper

        if self._graph is None:
            self._reset_graph_state()
            self._graph = FullCudaGraphWrapper(fb, cuda_graph_warmup_steps=self.cfg.engine.cuda_graph_warmup)
        it = self._graph.curr_iter("training")
        if it == self.cfg.engine.cuda_graph_warmup:
            # the capture allocates from a private pool: hand the eager steps' cached blocks back first

            gc.collect()
            torch.cuda.empty_cache()
        elif it > self.cfg.engine.cuda_graph_warmup:
            self.graph_replays += 1
        return self._graph

    @staticmethod
    def _reset_graph_state() -> None:
        """FullCudaGraphWrapper keeps its graph, result and step count on the class (megatron-core 0.16/0.17):
        forget the training graph so that the next step warms up and captures afresh."""
        try:
            from megatron.core.full_cuda_graph import FullCudaGraphWrapper
        except ImportError:
            return
        FullCudaGraphWrapper.cuda_graph["training"] = None
        FullCudaGraphWrapper.result["training"] = None
        FullCudaGraphWrapper.curr_iteration["training"] = 0

    def drop_cuda_graph(self) -> None:
        """Discard the captured step (the activation bits changed, a checkpoint was loaded): the next steps
        warm up and capture again with the current settings."""
        if self._graph is None:
            return
        self._graph = None
        self._reset_graph_state()

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _run_schedule(self, batches: Sequence[Batch], forward_only: bool) -> tuple[float, int]:
        from megatron.core import parallel_state as ps

        step_cache.advance()  # new weights since the last call (an optimizer step, a load): derived caches
        n = len(batches)
        mbs, seq = batches[0]["tokens"].shape
        # every chunk walks the same micro-batches: the first stage reads tokens, the last labels/mask
        iters = [iter(batches) for _ in self._chunks]
        out = self._forward_backward_func(forward_only)(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self._chunks if len(self._chunks) > 1 else self._chunks[0],
            num_microbatches=n, seq_length=seq, micro_batch_size=mbs, decoder_seq_length=seq,
            forward_only=forward_only,
        )
        # [loss_sum, tokens] on the last stage (zeros elsewhere), summed over DP, then sent to the
        # whole pipeline group so every rank returns the same number
        t = torch.zeros(2, dtype=torch.float64, device=self._device)
        self._last_out = out  # per-micro-batch records, read only on demand (last_micro_losses)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for d in out:
                t[0] += d["loss_sum"].double()
                t[1] += d["num_tokens"].double()
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        loss_sum, ntok = t.tolist()
        return (loss_sum / ntok if ntok else float("nan")), int(round(ntok))

    @property
    def last_micro_losses(self) -> list[float]:
        """Mean loss of each micro-batch of the last schedule run, in schedule order (last pipeline stage;
        empty elsewhere). For diagnostics: the host syncs happen here, not in the step."""
        return [(d["loss_sum"] / d["num_tokens"].clamp(min=1)).item() for d in getattr(self, "_last_out", [])]

    def train_step(self, micro_batches: Sequence[Batch], lr: float, weight_decay: float) -> StepStats:
        if self.optimizer is None:
            raise RuntimeError("train_step needs build() without model_only (CUDA)")
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = weight_decay * g.get("wd_mult", 1.0)
        for m in self._chunks:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, ntok = self._run_schedule(micro_batches, forward_only=False)
        # megatron-core's optimizer step with the non-finite decision (loss or grad norm) between its norm and
        # its update (bitnet_dist.engines.guard.megatron_step)
        ok, grad_norm = guard.megatron_step(self.optimizer, loss)
        step_cache.advance()  # forwards outside train_step (telemetry probes) must not see the old codes
        return StepStats(loss=loss, grad_norm=grad_norm, num_tokens=ntok,
                         skipped=(not ok) or guard.skip_step(loss, grad_norm))

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[Batch]) -> tuple[float, int]:
        batches = list(batches)
        for m in self._chunks:
            m.eval()
        try:
            if self.optimizer is None:  # model_only: one chunk, no pipeline
                step_cache.advance()
                from megatron.core import parallel_state as ps

                if len(self._chunks) != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
                    raise RuntimeError("model_only eval_loss supports pipeline size 1 only")
                t = torch.zeros(2, dtype=torch.float64, device=self._device)
                for b in batches:
                    bb = batch_to_device(b, self._device)
                    out = self._chunks[0](input_ids=bb["tokens"], position_ids=position_ids(bb["tokens"]),
                                          attention_mask=None, labels=bb["labels"])
                    t[0] += (out.float() * bb["loss_mask"]).sum().double()
                    t[1] += bb["loss_mask"].sum().double()
                dist.all_reduce(t, group=ps.get_data_parallel_group())
                return (t[0] / t[1]).item(), int(t[1].item())
            return self._run_schedule(batches, forward_only=True)
        finally:
            for m in self._chunks:
                m.train()

    # -- activation bits -------------------------------------------------------------------------------------
    def set_act_bits(self, bits: int) -> None:
        if bits not in (4, 8):
            raise ConfigError("precision.act_bits", bits, "4 or 8")
        changed = any(getattr(layer, "act_bits", bits) != bits for m in self._raw for layer in bit_layers(m))
        for m in self._raw:
            set_act_bits(m, bits)
        if changed:
            self.drop_cuda_graph()  # the captured step ran the old bit width's kernels

    def model_chunks(self) -> list[torch.nn.Module]:
        return list(self._raw)

    def checkpoint_files(self) -> list[str]:
        return [LAYOUT_FILE, TRAINER_STATE_FILE, f"{CKPT_SUBDIR}/metadata.json", f"{CKPT_SUBDIR}/*.distcp"]

    def state_tensors(self) -> list:
        """Model parameters, and the main (fp32) weights and Adam state of every optimizer in the chain."""
        out = [p for m in self._raw for p in m.parameters()]
        if self.optimizer is not None:
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                out += guard.optimizer_tensors(getattr(opt, "optimizer", None))
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def sharded_state_dict(self, *, with_optimizer: bool = True, is_loading: bool = False) -> dict:
        """{"model0": ..., ["model1": ...,] ["optimizer": ...]} of ShardedTensors with global keys.

        The ShardedTensor keys carry global layer numbers and global tensor offsets, so the same files
        load at any TP/PP/virtual-PP/DP layout; the dict nesting (model0, model1) is only local.
        """
        # the unwrapped GPTModels: their keys do not depend on the DDP / Float16Module wrappers, and
        # their tensors are the very parameters the optimizer maps its state onto
        sd = {f"model{i}": m.sharded_state_dict(prefix="") for i, m in enumerate(self._raw)}
        if with_optimizer and self.optimizer is not None:
            # fully_reshardable: megatron-core 0.16.1's torch_dist backend rejects the default
            # fully_sharded_model_space ("ShardedTensor.flattened_range is not supported"), and the
            # gathered form loads at any DP layout.
            sd["optimizer"] = self.optimizer.sharded_state_dict(
                sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True})
        return sd

    def _ensure_optimizer_state(self) -> None:
        """Give a never-stepped distributed optimizer its Adam states before a load.

        Without Apex/TE, megatron-core 0.16.1's ``DistributedOptimizer.state_dict()`` asserts that
        all parameter states share one ``step`` (distrib_optimizer.py:642), which fails on an empty
        state, and ``sharded_state_dict(is_loading=True)`` calls it. One zero-gradient step at lr 0
        and weight decay 0 creates the states without moving any weight; the load overwrites them.
        (Float16/FP32 optimizers handle this themselves through their init_state_fn.)
        """
        if self.optimizer is None:
            return
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is None or len(inner.state) or not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                continue
            saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
            opt._init_optimizer_states_with_dummy_values()
            for g, (lr, wd) in zip(inner.param_groups, saved):
                g["lr"], g["weight_decay"] = lr, wd

    def save(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        from megatron.core import dist_checkpointing

        ckpt_dir = Path(ckpt_dir)
        target = ckpt_dir / CKPT_SUBDIR
        if _rank0():
            target.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(self.sharded_state_dict(), str(target))
        if _rank0():
            save_trainer_state(ckpt_dir, trainer_state)
            par = self.cfg.parallel
            (ckpt_dir / LAYOUT_FILE).write_text(json.dumps({
                "engine": self.name, "tensor": par.tensor, "pipeline": par.pipeline,
                "virtual_pipeline": par.virtual_pipeline, "data_parallel": self.dp_size,
                "distributed_optimizer": par.distributed_optimizer, "dtype": str(self._dtype),
            }, indent=1))
        dist.barrier()

    def load(self, ckpt_dir: Path) -> dict[str, Any]:
        from megatron.core import dist_checkpointing

        ckpt_dir = Path(ckpt_dir)
        src = ckpt_dir / CKPT_SUBDIR
        if not (src / "metadata.json").is_file():
            raise FileNotFoundError(f"{src} holds no megatron dist checkpoint (metadata.json missing): was "
                                    f"{ckpt_dir} written by engine=megatron?")
        self._ensure_optimizer_state()
        self.drop_cuda_graph()
        template = self.sharded_state_dict(is_loading=True)
        loaded = dist_checkpointing.load(template, str(src))
        for i, m in enumerate(self._raw):
            m.load_state_dict(loaded[f"model{i}"])
        if self.optimizer is not None:
            self._keep_adam_step_on_load()
            self.optimizer.load_state_dict(loaded["optimizer"])
            unshare_adam_steps(self.optimizer)
            if self.fused_adam:
                # torch's load_state_dict takes the param groups' options from the checkpoint (one written with
                # the foreach form, or without the key, would switch back) and keeps its step counters where
                # they were loaded: switch again, which also moves the counters to the parameters' device
                use_fused_adam(self.optimizer)
        return load_trainer_state(ckpt_dir)

    def _keep_adam_step_on_load(self) -> None:
        """Work around megatron-core 0.16.1 loading ``fully_reshardable`` state into torch Adam.

        Without Apex/TE the inner optimizer is torch AdamW, whose per-parameter state holds ``step``.
        ``DistributedOptimizer.load_state_dict`` restores that step from the param groups
        (distrib_optimizer.py:817-825), then ``load_parameter_state_from_fully_reshardable`` drops
        "step" from the loaded tensors (:2101) while ``_set_main_param_and_optimizer_states`` copies
        every key of the live state (:936-940): KeyError 'step' (measured on the H100). The wrapper
        hands the already restored step back for that key; a no-op where the key is present.
        """
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            orig = getattr(opt, "_set_main_param_and_optimizer_states", None)
            if orig is None or getattr(orig, "_bitnet_keeps_step", False):
                continue

            def keep_step(model_param, tensors, _opt=opt, _orig=orig):
                if "step" not in tensors:
                    try:  # megatron-core internals: leave other releases' layouts alone
                        gi, go = _opt.model_param_group_index_map[model_param]
                        live = _opt.optimizer.state.get(_opt.optimizer.param_groups[gi]["params"][go], {})
                    except (AttributeError, KeyError, IndexError, TypeError):
                        live = {}
                    if torch.is_tensor(live.get("step")):
                        tensors = {**tensors, "step": live["step"].clone()}
                return _orig(model_param, tensors)

            keep_step._bitnet_keeps_step = True
            opt._set_main_param_and_optimizer_states = keep_step

    def fused_paths(self) -> list[str]:
        return fused_paths_of(self.config, bool(self.fused_adam))

    # -- topology -------------------------------------------------------------------------------------------
    @property
    def micro_batch_multiple(self) -> int:
        # the interleaved schedule runs micro-batches in groups of PP (check_megatron_config)
        par = self.cfg.parallel
        return par.pipeline if par.virtual_pipeline is not None else 1

    @property
    def device(self) -> torch.device:
        if self._device is None:
            raise RuntimeError("MegatronEngine.device before init_parallel()")
        return self._device


def finalize_model_grads_capturable(model, num_tokens=None, **kwargs):
    """megatron-core's ``finalize_model_grads`` with the per-token scaling done without a host read.

    Its scaling step (finalize_model_grads.py:484-497 in 0.16.1, the same in 0.17.1) tests ``num_tokens > 0``
    on the device tensor: a host synchronization, which invalidates a CUDA-graph capture (measured on the
    H100: cudaErrorStreamCaptureInvalidated at the end of the captured step, bf16 and v2 alike). Here the
    gradient sync and the other reductions run in megatron's function (num_tokens=None), then the same
    broadcast over the pipeline group, the same all-reduce over data x context parallel ranks and the same
    ``scale_gradients(1 / num_tokens)``, with a count of 0 clamped to 1 instead of skipped (the gradients
    are zero then either way)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads, get_pp_last_rank

    finalize_model_grads(model, None, **kwargs)
    if num_tokens is None:
        return
    pg = kwargs.get("pg_collection")
    pp_group = pg.pp if pg is not None else ps.get_pipeline_model_parallel_group()
    dp_cp_group = pg.dp_cp if pg is not None else ps.get_data_parallel_group(with_context_parallel=True)
    dist.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    dist.all_reduce(num_tokens, group=dp_cp_group)
    scaling = 1.0 / num_tokens.clamp(min=1)
    for chunk in model:
        chunk.scale_gradients(scaling)


def use_fused_adam(optimizer) -> int:
    """Switch the torch AdamW inside megatron's optimizer to torch's fused implementation; returns how many
    optimizers were switched.

    Without Transformer Engine / Apex, megatron-core builds ``torch.optim.AdamW`` without ``fused`` or ``foreach``
    (optimizer/__init__.py), so torch picks the multi-tensor (foreach) form: a dozen passes over the fp32 main
    weights, gradients and moments per step. The fused form is one kernel per tensor chunk with the same update
    rule (the compiled peer of the end-to-end benchmark uses it). torch reads ``fused`` / ``foreach`` from each
    parameter group at every step, and its ``load_state_dict`` puts a fused optimizer's ``step`` counters on the
    parameters' device, so megatron's checkpoint loading is unchanged. Transformer Engine's or Apex's FusedAdam
    (already fused) and optimizers over other devices or non-float parameters are left as they are."""
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        if type(inner) not in (torch.optim.AdamW, torch.optim.Adam):
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if not params or len({p.device for p in params}) != 1 or params[0].device.type not in ("cuda", "cpu") \
                or not all(p.is_floating_point() for p in params):
            continue  # torch's fused AdamW: one device, CUDA (or CPU), floating point
        inner.defaults.update(fused=True, foreach=False)
        for g in inner.param_groups:
            g.update(fused=True, foreach=False)
        for st in inner.state.values():  # counters created before the switch (a fused step keeps them on device)
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=params[0].device, dtype=torch.float32)
        switched += 1
    return switched


def unshare_adam_steps(optimizer) -> int:
    """Give every torch Adam parameter state its own ``step`` tensor after a megatron optimizer load.

    megatron-core 0.16.1 without Apex/TE (``DistributedOptimizer.load_state_dict``, distrib_optimizer.py:817-825)
    assigns one ``step`` tensor object to every parameter's state, and torch's ``Optimizer.load_state_dict``
    keeps "step" values as they are (``_process_value_according_to_param_policy``). torch Adam then increments
    each state's step in place, so the shared counter advances once per parameter per optimizer step and the
    bias correction of a resumed run is wrong from its first step on. This is the likely cause of the resumed
    run separating from the continued one on the H100 (docs/megatron.md); the sharing itself is reproduced on
    CPU in tests/engines/test_megatron_engine.py. Returns how many states got their own copy.
    """
    fixed = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        seen = set()
        for st in getattr(inner, "state", {}).values():
            step = st.get("step") if isinstance(st, dict) else None
            if torch.is_tensor(step):
                if id(step) in seen:
                    st["step"] = step.clone()
                    fixed += 1
                else:
                    seen.add(id(step))
    return fixed

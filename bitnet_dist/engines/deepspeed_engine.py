"""DeepSpeed ZeRO engine: data parallel with ZeRO stages 0-3 around our megatron-core GPTModel.

Tensor parallelism comes from the megatron layers themselves (their collectives run inside
forward/backward); DeepSpeed sees the TP layout through an mpu adapter (engines.common.megatron_mpu)
so that it reduces gradients over the data-parallel group only and counts TP-sharded parameters once
in the gradient norm. Pipeline parallelism is the megatron engine's job.

Gradient scaling: each micro-batch's backward gets ``sum(loss * mask) * dp / N`` where N is the
number of loss tokens in the whole global batch (all micro-batches, all DP ranks; one all-reduce
before the forwards). DeepSpeed averages gradients over DP (the ``dp`` cancels) and we tell it not to
divide by the accumulation steps, so the gradient is exactly that of the global token-weighted mean,
whatever the split of the global batch into ranks and micro-batches.

Runs on CPU (DS_ACCELERATOR=cpu, gloo; fp32 or bf16) and on CUDA (NCCL; bf16 or fp32).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from bitnet_dist import compat, step_cache
from bitnet_dist import model as bm
from bitnet_dist.engines import common, guard
from bitnet_dist.engines.base import Batch, Engine, StepStats
from bitnet_dist.engines.common import MegatronDataParallelTopology
from bitnet_dist.errors import ConfigError
from bitnet_dist.fusions import megatron_fusions
from bitnet_dist.layers import batch_weight_quant, set_act_bits
from bitnet_dist.recompute import megatron_recompute

# DeepSpeed and megatron-core's parallel_state are imported where used (heavy; only the running engine needs them).

CKPT_TAG = "state"  # DeepSpeed's sub-directory inside the checkpoint directory
LAYOUT_FILE = "deepspeed_layout.json"


def check_config(cfg) -> None:
    """DeepSpeed-specific settings; raises ConfigError before any process-group work."""
    par = cfg.parallel
    if getattr(cfg.engine, "cuda_graph", False):
        raise ConfigError("engine.cuda_graph", True,
                          "false with engine=deepspeed (the full-step CUDA graph is megatron-core's; use engine=megatron)")
    if par.pipeline != 1:
        raise ConfigError("parallel.pipeline", par.pipeline,
                          "1 with engine=deepspeed; pipeline parallelism needs engine=megatron")
    if par.virtual_pipeline is not None:
        raise ConfigError("parallel.virtual_pipeline", par.virtual_pipeline,
                          "null with engine=deepspeed (pipeline parallelism needs engine=megatron)")
    if par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", par.zero_stage, "0, 1, 2 or 3")
    if par.tensor > 1 and par.zero_stage > 2:
        raise ConfigError("parallel.zero_stage", par.zero_stage,
                          f"0, 1 or 2 when parallel.tensor={par.tensor} > 1 (ZeRO-3 partitions parameters that "
                          "megatron's tensor-parallel layers already shard); or parallel.tensor=1 with ZeRO-3")
    if par.sequence:
        raise ConfigError("parallel.sequence", par.sequence,
                          "false with engine=deepspeed (sequence parallelism needs engine=megatron)")
    if par.offload_params and par.zero_stage != 3:
        raise ConfigError("parallel.offload_params", True,
                          f"false unless parallel.zero_stage=3 (it is {par.zero_stage}): DeepSpeed offloads "
                          "parameters only with ZeRO-3")
    if par.offload_optimizer and par.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer", True,
                          "false unless parallel.zero_stage is 1, 2 or 3 (ZeRO-Offload needs ZeRO)")
    if cfg.trainer.dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError("trainer.dtype", cfg.trainer.dtype, "auto, bf16 or fp32")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedEngine(MegatronDataParallelTopology, Engine):
    """See bitnet_dist.engines.base.Engine; constructed ``DeepSpeedEngine(cfg: TrainConfig)``."""

    name = "deepspeed"

    def __init__(self, cfg):
        self.cfg = cfg
        self._ds = None  # deepspeed.runtime.engine.DeepSpeedEngine after build()
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._fused: list[str] = []  # the fused paths of the built model (fused_paths)
        self._grad_acc_steps: int | None = None
        self.batched_weights = 0  # weights quantized together per step (layers.batch_weight_quant)

    # -- set-up ------------------------------------------------------------------------------------------------
    def init_parallel(self) -> None:
        check_config(self.cfg)
        tp = self.cfg.parallel.tensor
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        if world % tp:
            raise ConfigError("parallel.tensor", tp, f"a divisor of the number of processes ({world})")
        dp = world // tp
        t = self.cfg.trainer
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError("trainer.global_batch_size", t.global_batch_size,
                              f"a multiple of trainer.micro_batch_size * data-parallel size "
                              f"= {t.micro_batch_size} * {dp}")
        if not torch.cuda.is_available():
            # Must precede the first `import deepspeed` (its accelerator is picked once, at import).
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self._device = common.local_device()
        self._dtype = common.resolve_dtype(t.dtype, self._device)
        common.ensure_process_group(self._device)

        common.init_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        self._grad_acc_steps = t.global_batch_size // (t.micro_batch_size * dp)

    def ds_config(self) -> dict:
        """The DeepSpeed JSON config generated from ours, merged with engine.ds_config_overrides."""
        c, par, o = self.cfg, self.cfg.parallel, self.cfg.optim
        zero: dict[str, Any] = {"stage": par.zero_stage}
        if par.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self._device.type == "cuda"}
        if par.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self._device.type == "cuda"}
        bf16 = self._dtype == torch.bfloat16
        conf = {
            "train_micro_batch_size_per_gpu": c.trainer.micro_batch_size,
            "gradient_accumulation_steps": self._grad_acc_steps,
            "gradient_clipping": float(o.clip_grad),
            "optimizer": {"type": "AdamW", "params": {
                "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                # torch.optim.AdamW: no JIT-built op; ZeRO-Offload needs DeepSpeed's CPU Adam instead.
                "torch_adam": not par.offload_optimizer, "adam_w_mode": True}},
            "bf16": {"enabled": bf16},
            "fp16": {"enabled": False},
            "zero_optimization": zero,
            # Gradients are all-reduced in fp32 with bf16 too (BitNet's STE gradients are small).
            "communication_data_type": "fp32",
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2 ** 62,
            "wall_clock_breakdown": False,
        }
        return _deep_merge(conf, dict(c.engine.ds_config_overrides or {}))

    def build(self, vocab_size: int) -> None:
        import deepspeed  # deferred: DeepSpeed is heavy and only this engine needs it

        if self._device is None:
            raise RuntimeError("call init_parallel() before build()")
        compat.install_cpu_path()
        bf16 = self._dtype == torch.bfloat16
        # trainer.recompute and the fusions: the model is megatron's GPTModel here too, so megatron's settings apply
        tcfg = bm.transformer_config(self.cfg.model, self.cfg.parallel, params_dtype=self._dtype, bf16=bf16,
                                     use_cpu_initialization=True, **megatron_recompute(self.cfg.trainer),
                                     **megatron_fusions(self.cfg.trainer, cuda=self._device.type == "cuda"))
        seed = self.cfg.trainer.seed
        torch.manual_seed(seed)
        # seed=: every weight drawn from (seed, its global name), so any layout starts from the same model.
        model = bm.build_model(self.cfg.model, self.cfg.precision, tcfg, vocab_size=vocab_size, seed=seed)
        model.to(self._device)
        self._fused = common.fused_paths_of(tcfg)
        groups = common.param_groups(model, self.cfg.optim.weight_decay)
        if self._device.type == "cpu":
            # DeepSpeed's shared-memory all-reduce serves only its inference path, yet its TorchBackend
            # JIT-compiles it on CPU (about a minute, needs a compiler): training collectives use gloo.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if self._device.type == "cuda" else "gloo",
                                   dist_init_required=False, verbose=False)
        self._ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config(),
                                                 mpu=common.megatron_mpu(), dist_init_required=False)
        if self.cfg.parallel.zero_stage == 3 and getattr(model, "share_embeddings_and_output_weights", False):
            # The tied output head uses the embedding's weight outside the embedding module.
            deepspeed.zero.register_external_parameter(model.output_layer, model.shared_embedding_or_output_weight())
        # all ternary weights quantized in one pass per step; not under ZeRO-3, whose parameters are gathered
        # module by module inside the forward
        self.batched_weights = 0 if self.cfg.parallel.zero_stage == 3 else batch_weight_quant([model])
        for g in self._ds.optimizer.param_groups:  # fail now, not at the first step
            if common.DECAY_KEY not in g:
                raise RuntimeError("DeepSpeed's optimizer dropped our parameter-group tags")
        # Non-finite steps (bitnet_dist.engines.guard): the torch optimizer inside every DeepSpeed wrapper steps
        # only when the step's loss and gradient norm are finite. DeepSpeed's ZeRO and bf16 optimizers skip an
        # invalid norm themselves in some configurations; the plain fp32 path and the loss are ours.
        self._step_loss = self._pre_norm = None
        self._inner_skips = guard.skip_inner_steps(self._ds.basic_optimizer, self._skip_decision)

    def _skip_decision(self) -> bool:
        """Called by the inner optimizer's step: DeepSpeed's wrappers have computed this step's global norm."""
        wrapper = self._ds.optimizer
        norm = self._pre_norm if wrapper is self._ds.basic_optimizer else getattr(wrapper, "_global_grad_norm", None)
        return guard.skip_step(self._step_loss, guard.clean_norm(norm))

    # -- steps -------------------------------------------------------------------------------------------------
    def _forward_loss_sum(self, b: Batch) -> torch.Tensor:
        per_token = self._ds(input_ids=b["tokens"], position_ids=common.position_ids(b["tokens"]),
                             attention_mask=None, labels=b["labels"])
        return common.masked_loss_sum(per_token, b["loss_mask"])

    def train_step(self, micro_batches: Sequence[Batch], lr: float, weight_decay: float) -> StepStats:
        from megatron.core import parallel_state as ps

        if len(micro_batches) != self._grad_acc_steps:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; this layout needs "
                             f"global_batch_size/(micro_batch_size*dp) = {self._grad_acc_steps}")
        ds, dp_group = self._ds, ps.get_data_parallel_group()
        step_cache.advance()  # the weights changed since the last step (derived-weight caches)
        batches = [common.batch_to_device(b, self._device) for b in micro_batches]
        num_tokens = common.global_token_count(batches, dp_group, self._device)
        scale = self.dp_size / max(num_tokens, 1)
        ds.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        grad_norm = None
        skips_before = self._inner_skips()
        for i, b in enumerate(batches):
            lsum = self._forward_loss_sum(b)
            ds.backward(lsum * scale, scale_wrt_gas=False)
            loss_sum += lsum.detach()
            if i == len(batches) - 1:
                common.apply_lr_wd(ds.optimizer.param_groups, lr, weight_decay)
                # the global loss before the update: a non-finite one skips it (guard.skip_step)
                self._step_loss = common.reduce_loss(loss_sum, num_tokens, dp_group)
                self._pre_norm = None
                if not (ds.zero_optimization() or ds.bfloat16_enabled()):
                    # Plain fp32 DeepSpeed clips without keeping the norm: measure it (grads are reduced).
                    grad_norm = self._pre_norm = self._fp32_grad_norm()
            ds.step()
        step_cache.advance()  # the optimizer stepped at the last micro-batch: later forwards get new codes
        if grad_norm is None:
            grad_norm = ds.get_global_grad_norm()
        loss, grad_norm = self._step_loss, guard.clean_norm(grad_norm)
        skipped = (self._inner_skips() > skips_before or not ds.was_step_applied()
                   or guard.skip_step(loss, grad_norm))
        return StepStats(loss=loss, grad_norm=grad_norm, num_tokens=num_tokens, skipped=skipped)

    def _fp32_grad_norm(self) -> float:
        from deepspeed.runtime.utils import get_flattened_grad_norm

        grads = [p for p in self._ds.module.parameters() if p.grad is not None]
        return float(get_flattened_grad_norm(grads, mpu=self._ds.mpu))

    def eval_loss(self, batches: Iterable[Batch]) -> tuple[float, int]:
        from megatron.core import parallel_state as ps

        step_cache.advance()
        batches = [common.batch_to_device(b, self._device) for b in batches]
        num_tokens = common.global_token_count(batches, ps.get_data_parallel_group(), self._device)
        self._ds.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        with torch.no_grad():
            for b in batches:
                loss_sum += self._forward_loss_sum(b)
        self._ds.train()
        return common.reduce_loss(loss_sum, num_tokens, ps.get_data_parallel_group()), num_tokens

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {"engine": self.name, "zero_stage": self.cfg.parallel.zero_stage,
                "tensor": self.cfg.parallel.tensor, "data_parallel": self.dp_size}

    def save(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        ckpt_dir = Path(ckpt_dir)
        # Every rank writes its own shards; DeepSpeed barriers internally.
        self._ds.save_checkpoint(str(ckpt_dir), tag=CKPT_TAG, client_state={}, save_latest=False)
        if not dist.is_initialized() or dist.get_rank() == 0:
            common.save_trainer_state(ckpt_dir, trainer_state)
            (ckpt_dir / LAYOUT_FILE).write_text(json.dumps(self._layout(), indent=1))
        if dist.is_initialized():
            dist.barrier()

    def load(self, ckpt_dir: Path) -> dict[str, Any]:
        ckpt_dir = Path(ckpt_dir)
        layout_path = ckpt_dir / LAYOUT_FILE
        if not layout_path.is_file():
            raise FileNotFoundError(f"{layout_path} is missing: {ckpt_dir} was not written by the deepspeed engine")
        saved = json.loads(layout_path.read_text())
        for key, now in self._layout().items():
            if saved.get(key) != now:
                raise ValueError(f"checkpoint {ckpt_dir} was written with {key}={saved.get(key)!r}, this run has "
                                 f"{key}={now!r}: resume with the same engine, parallel.zero_stage, "
                                 f"parallel.tensor and number of processes")
        path, _ = self._ds.load_checkpoint(str(ckpt_dir), tag=CKPT_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {ckpt_dir / CKPT_TAG}")
        return common.load_trainer_state(ckpt_dir)

    # -- model access ------------------------------------------------------------------------------------------
    def set_act_bits(self, bits: int) -> None:
        for chunk in self.model_chunks():
            set_act_bits(chunk, bits)

    def fused_paths(self) -> list[str]:
        return list(self._fused)

    def model_chunks(self) -> list[torch.nn.Module]:
        return [self._ds.module]

    def checkpoint_files(self) -> list[str]:
        # DeepSpeed's model states (with ZeRO also one optimizer-state file per rank), our layout and trainer state
        files = [LAYOUT_FILE, common.TRAINER_STATE_FILE, f"{CKPT_TAG}/*model_states.pt"]
        if self.cfg.parallel.zero_stage:
            files.append(f"{CKPT_TAG}/*optim_states.pt")
        return files

    def state_tensors(self) -> list:
        """Model parameters (ZeRO-3: this rank's partition of each), and the fp32 weights and Adam state the torch
        optimizer inside DeepSpeed holds."""
        return [*(getattr(p, "ds_tensor", p) for p in self._ds.module.parameters()),
                *guard.optimizer_tensors(self._ds.basic_optimizer)]

    @property
    def device(self) -> torch.device:
        return self._device

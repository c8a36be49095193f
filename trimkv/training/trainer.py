"""Gate distillation: the frozen model teaches a copy of itself that attends through retention gates.

One optimizer step over a global batch of `train.batch_size` sequences, split into micro-batches
of `train.micro_batch_size` over the ranks and accumulation steps:

1. the teacher forward (gates off, no grad) keeps only the final hidden states;
2. the student forward (gates in training mode, softmax(q k / sqrt(d) + (t - i) log beta_i),
   see trimkv.training.attention) and the losses of trimkv.training.losses, with the logits
   computed in blocks of `train.logit_block_size` positions;
3. backward, then AdamW on the gate parameters only. The base model stays frozen.

Every loss term is a sum divided by a count over the whole global batch, so the gradient does not
depend on how the batch is split over ranks and micro-batches (one exception: the `released`
capacity normalisation, see `_micro_step`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from trimkv.cache import enable_eviction, validate_budget
from trimkv.gates import attach_gates, gate_config_for, gate_mode
from trimkv.gates.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from trimkv.models.loading import load_model, load_tokenizer
from trimkv.training import checkpointing
from trimkv.training.attention import TrainingAttention, resolve_backend, training_attention
from trimkv.training.data import IGNORE_INDEX, batch_order, collate, load_training_examples
from trimkv.training.distributed import (
    DistributedContext,
    deepspeed_engine,
    init_distributed,
    process_device,
    wrap_decoder,
)
from trimkv.training.losses import blockwise_soft_occupancy, capacity_sums, distillation_sums
from trimkv.utils.io import append_jsonl, atomic_write_folder, atomic_write_json, atomic_write_text
from trimkv.utils.tracking import Tracker

log = logging.getLogger(__name__)


def warmup_cosine(total_steps: int, warmup_steps: int, lr: float, min_lr: float):
    """Multiplier for LambdaLR: linear warmup to `lr`, then cosine decay to `min_lr`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return (min_lr + (lr - min_lr) * cosine) / lr

    return factor


class GateCapture:
    """Collects each gate's output (batch, T, kv_heads) during one forward, in layer order."""

    def __init__(self, gates: list[torch.nn.Module]):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [gate.register_forward_hook(self._hook(index)) for index, gate in enumerate(gates)]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            self.outputs[index] = output

        return hook

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def enable_layer_checkpointing(decoder: torch.nn.Module) -> None:
    """Checkpoint every decoder layer: keep its inputs, recompute its activations in backward.

    Implemented on the layers' `forward` rather than through transformers' switch, whose name and
    conditions (the layer must be in training mode) change between releases.
    """
    for layer in decoder.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed


def split_global_batch(indices: list[int], parts: int) -> list[list[int]]:
    """Split a global batch into `parts` contiguous micro-batches of nearly equal size."""
    return [list(part) for part in np.array_split(np.asarray(indices, dtype=np.int64), parts)]


class Trainer:
    """State and steps of one gate-distillation run (one process of a possibly distributed run)."""

    def __init__(self, cfg: Any, output_dir: Path, context: DistributedContext):
        self.cfg = cfg
        self.output_dir = output_dir
        self.context = context
        budget, self.buffer = validate_budget(cfg.budget, cfg.buffer)
        if budget is None:
            raise ValueError("train.py needs a budget (the capacity target M), e.g. budget=512")
        self.budget = budget
        train_cfg = cfg.train
        self.strategy = str(train_cfg.get("strategy", "ddp"))
        self.batch_size = int(train_cfg.batch_size)
        micro = train_cfg.get("micro_batch_size")
        world = context.world_size
        if self.batch_size <= 0 or self.batch_size % world != 0:
            raise ValueError(f"train.batch_size={self.batch_size} must be a positive multiple of the {world} "
                             f"process(es), e.g. train.batch_size={world * max(1, self.batch_size // world)}")
        self.micro_batch_size = self.batch_size // world if micro is None else int(micro)
        if self.micro_batch_size <= 0 or self.batch_size % (self.micro_batch_size * world) != 0:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of train.micro_batch_size="
                f"{self.micro_batch_size} times the {world} process(es); set train.micro_batch_size to a divisor "
                f"of {self.batch_size // world}"
            )
        self.accumulation_steps = self.batch_size // (self.micro_batch_size * world)
        self.uses_deepspeed = self.strategy == "deepspeed" and context.enabled
        if self.uses_deepspeed and train_cfg.get("save_every"):
            # ZeRO partitions the optimizer state per rank; trimkv's checkpoints hold the full state only.
            raise ValueError("train.strategy=deepspeed has no resumable checkpoints in trimkv; set train.save_every=null "
                             "or use train.strategy=fsdp (sharded) or ddp")

    # ----------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        torch.manual_seed(int(cfg.seed))

        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model, process_device(str(cfg.device), self.context))
        self.device = next(self.model.parameters()).device
        enable_eviction(self.model, "sdpa")
        self.gate_config = gate_config_for(self.model, int(cfg.gate.intermediate_size), float(cfg.gate.bias_init))
        self.gates = attach_gates(self.model, self.gate_config)
        for gate in self.gates:
            gate.requires_grad_(True)
        self.decoder = self.model.get_decoder()
        self.output_head = self.model.get_output_embeddings()
        self.decoder_prefix = next(name for name, module in self.model.named_modules() if module is self.decoder)
        train_cfg = cfg.train
        if bool(train_cfg.get("gradient_checkpointing", False)):
            enable_layer_checkpointing(self.decoder)
        self.precision = self._resolve_precision(str(train_cfg.get("precision", "auto")))
        self.attention_backend = resolve_backend(str(train_cfg.get("attention", "auto")), self.device, self.precision)
        if self.attention_backend == "flex" and self.device.type != "cuda":
            raise ValueError(f"train.attention=flex trains only on CUDA (torch {torch.__version__} has no FlexAttention "
                             f"backward on {self.device.type}); use train.attention=sdpa, blockwise or auto")
        self.attention_block_size = int(train_cfg.get("attention_block_size", 512))
        self.logit_block_size = train_cfg.get("logit_block_size")
        self.capacity_block_size = cfg.loss.get("capacity_block_size")
        trainable = sum(parameter.numel() for gate in self.gates for parameter in gate.parameters())
        log.info("gates: %d layers, %d trainable parameters; base model frozen; attention %s, precision %s",
                 len(self.gates), trainable, self.attention_backend, self.precision)

        self._load_data()
        self._build_engine()
        self.capture = GateCapture(self.gates)

    def _resolve_precision(self, precision: str) -> str:
        if precision == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown train.precision {precision!r}; use auto, fp32 or bf16")
        return precision

    def _load_data(self) -> None:
        cfg = self.cfg
        max_length = int(cfg.train.max_length)
        shared_cache = bool(cfg.data.get("cache_dir"))
        # With a cache, rank 0 tokenizes and writes it while the others wait, then read it.
        if self.context.is_main or not shared_cache:
            self.examples = load_training_examples(cfg.data, self.tokenizer, max_length)
        self.context.barrier()
        if not self.context.is_main and shared_cache:
            self.examples = load_training_examples(cfg.data, self.tokenizer, max_length)
        self.batches = batch_order(len(self.examples), self.batch_size, int(cfg.train.epochs), int(cfg.seed))
        # A final short batch that cannot give every rank and accumulation step a sequence is dropped.
        parts = self.context.world_size * self.accumulation_steps
        if self.batches and len(self.batches[-1]) < parts:
            self.batches = self.batches[:-1]
        max_steps = cfg.train.max_steps
        self.total_steps = len(self.batches) if max_steps is None else min(len(self.batches), int(max_steps))
        if self.total_steps == 0:
            raise ValueError(f"no full batch of {self.batch_size} sequences in {len(self.examples)} examples; "
                             "lower train.batch_size or add data")
        self.data_fingerprint = {"examples": len(self.examples), "batches": len(self.batches),
                                 "seed": int(cfg.seed), "batch_size": self.batch_size}

    def _build_engine(self) -> None:
        optim = self.cfg.optim
        self.wrapped_decoder = wrap_decoder(self.decoder, self.strategy, self.context)
        self.parameters = [parameter for parameter in self.decoder.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=float(optim.lr), betas=tuple(optim.betas),
                                           weight_decay=float(optim.weight_decay))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, int(optim.warmup_steps), float(optim.lr), float(optim.min_lr))
        )
        self.engine = None
        if self.uses_deepspeed:
            self.engine = deepspeed_engine(self.decoder, self.optimizer, self.scheduler, self.cfg.train, self.precision,
                                           self.accumulation_steps, float(optim.max_grad_norm))

    # ----------------------------------------------------------------- state

    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Gather the full (unsharded) gate weights and optimizer state, keyed by parameter names."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        if self.uses_deepspeed:
            # ZeRO-2 keeps the parameters whole on every rank, only the optimizer state is partitioned.
            gates = {name: parameter.detach().cpu() for name, parameter in self.decoder.named_parameters()
                     if parameter.requires_grad}
            return gates, {}

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_state_dict(self.wrapped_decoder, self.optimizer, options=options)

    def _write_gates(self, folder: Path, gate_tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write gates in the format of trimkv.gates.save_gates (model parameter names)."""
        prefix = f"{self.decoder_prefix}." if self.decoder_prefix else ""
        tensors = {prefix + name: tensor.detach().contiguous().cpu() for name, tensor in gate_tensors.items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "trimkv-gates"})
        document = {"gate": self.gate_config.to_dict(), **metadata}
        (folder / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")

    def gate_metadata(self, steps: int) -> dict:
        cfg = self.cfg
        return {"base_model": str(cfg.model.path), "budget": self.budget, "buffer": self.buffer, "steps": steps,
                "loss": {key: cfg.loss[key] for key in cfg.loss}}

    def save_checkpoint(self, step: int) -> Path | None:
        """Write checkpoints/step-<step> (all ranks take part; rank 0 writes the shared files)."""
        gate_tensors, optimizer_state = self._state_dicts()
        rng = checkpointing.rng_state()
        if self.context.enabled:
            # Every rank's RNG state goes into the one file that rank 0 writes.
            gathered: list = [None] * self.context.world_size
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        target = None
        if self.context.is_main:
            def write_contents(staging: Path) -> None:
                self._write_gates(staging, gate_tensors, self.gate_metadata(step))
                state = {
                    "step": step,
                    "optimizer": optimizer_state,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": gathered,
                    "data": self.data_fingerprint,
                    "world_size": self.context.world_size,
                }
                checkpointing.save_torch(state, staging / checkpointing.STATE_NAME)

            target = checkpointing.write_checkpoint(self.output_dir, step, write_contents,
                                                    self.cfg.train.get("keep_checkpoints"))
            log.info("saved checkpoint %s", target)
        self.context.barrier()
        return target

    def resume_from(self) -> Path | None:
        """Find the checkpoint to resume from, per `resume`: null/auto, true, false or a path."""
        setting = self.cfg.get("resume")
        if setting is False or str(setting).lower() == "false":
            return None
        if setting is None or str(setting).lower() in ("auto", "true"):
            found = checkpointing.latest_checkpoint(self.output_dir)
            if found is None and str(setting).lower() == "true":
                raise FileNotFoundError(
                    f"resume=true but {checkpointing.checkpoints_dir(self.output_dir)} has no checkpoint; run in the "
                    "interrupted run's folder (hydra.run.dir=<run folder>) or set resume=<run or checkpoint folder>"
                )
            return found
        found = checkpointing.latest_checkpoint(Path(str(setting)).expanduser())
        if found is None:
            raise FileNotFoundError(f"resume={setting}: no checkpoint found there (expected a run folder with "
                                    "checkpoints/latest or a checkpoints/step-<N> folder)")
        return found

    def load_checkpoint(self, folder: Path) -> int:
        """Restore gates, optimizer, scheduler and RNG from `folder`; return the step to continue at."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = torch.load(folder / checkpointing.STATE_NAME, map_location="cpu", weights_only=False)
        if state["data"] != self.data_fingerprint:
            raise ValueError(
                f"checkpoint {folder} was written for data {state['data']}, this run has {self.data_fingerprint}; "
                "resume with the same data, batch size and seed, or start a new run with resume=false"
            )
        prefix = f"{self.decoder_prefix}." if self.decoder_prefix else ""
        gates = {name[len(prefix):]: tensor for name, tensor in load_file(str(folder / WEIGHTS_NAME)).items()}
        set_state_dict(self.wrapped_decoder, self.optimizer, model_state_dict=gates,
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False))
        self.scheduler.load_state_dict(state["scheduler"])
        rng_states = state["rng"]
        checkpointing.set_rng_state(rng_states[self.context.rank % len(rng_states)])
        log.info("resumed from %s at step %d", folder, state["step"])
        return int(state["step"])

    # ----------------------------------------------------------------- steps

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _attention(self, batch: dict[str, torch.Tensor]) -> TrainingAttention:
        packed = bool(self.cfg.data.get("packing", False))
        return TrainingAttention(self.attention_backend, self.attention_block_size,
                                 batch["document_ids"] if packed else None)

    def _micro_step(self, batch: dict[str, torch.Tensor], normalizers: dict[str, float], synchronize: bool):
        """Forward and backward of one micro-batch; return its detached loss sums and gate statistics."""
        loss_cfg = self.cfg.loss
        packed = bool(self.cfg.data.get("packing", False))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if packed:
            inputs["position_ids"] = batch["position_ids"]
        valid = batch["attention_mask"].bool()
        documents = batch["document_ids"] if packed else None

        with torch.no_grad(), gate_mode(self.model, "off"), training_attention(self.model, self._attention(batch)), \
                self._autocast():
            teacher_hidden = self.decoder(**inputs).last_hidden_state

        self.capture.clear()
        # The backward runs inside these contexts too: checkpointed blocks re-run the gated layers.
        with gate_mode(self.model, "train"), training_attention(self.model, self._attention(batch)):
            with self._autocast():
                student_hidden = self.wrapped_decoder(**inputs).last_hidden_state
                kl_sum, ntp_sum, _ = distillation_sums(student_hidden, teacher_hidden, self.output_head,
                                                       batch["labels"], self.logit_block_size)
            del teacher_hidden
            capacity = student_hidden.new_zeros((), dtype=torch.float32)
            statistics = {}
            num_layers = len(self.capture.outputs)
            for index in sorted(self.capture.outputs):
                log_beta = self.capture.outputs[index].transpose(1, 2)  # (batch, kv_heads, T)
                occupancy = blockwise_soft_occupancy(log_beta, valid, documents, self.capacity_block_size)
                total, count = capacity_sums(occupancy, valid, batch["position_ids"], batch["document_weights"],
                                             self.budget, str(loss_cfg.capacity_normalization))
                if loss_cfg.capacity_normalization == "paper":
                    denominator = normalizers["documents"] * count
                else:
                    # NOTE: `released` divides by the active hinges of this micro-batch, summed over ranks.
                    # With gradient accumulation the micro-batches are then averaged, so the result differs
                    # from one large batch: the count is only known after each forward.
                    denominator = self.context.all_reduce_sum(count.clone()).clamp(min=1) * self.accumulation_steps
                capacity = capacity + total / denominator / num_layers
                real = valid[:, None, :].expand_as(log_beta)
                statistics[f"beta_mean/layer{index}"] = float(log_beta.detach().exp()[real].mean())
                statistics[f"occupancy/layer{index}"] = float(occupancy.detach().amax(dim=-1).mean())
            labels = max(normalizers["labels"], 1.0)
            loss = (float(loss_cfg.kl_weight) * kl_sum + float(loss_cfg.ntp_weight) * ntp_sum) / labels \
                + float(loss_cfg.capacity_weight) * capacity
            # DDP and ZeRO average gradients over ranks; the loss is a share of a global sum.
            scaled = loss * self.context.world_size
            if self.engine is not None:
                self.engine.backward(scaled, scale_wrt_gas=False)
            elif synchronize or not hasattr(self.wrapped_decoder, "no_sync"):
                scaled.backward()
            else:
                with self.wrapped_decoder.no_sync():
                    scaled.backward()
        self.capture.clear()
        sums = torch.tensor([float(kl_sum.detach()) / labels, float(ntp_sum.detach()) / labels, float(capacity.detach())],
                            dtype=torch.float64)
        return sums, statistics

    def _normalizers(self, indices: list[int]) -> dict[str, float]:
        """Label positions and documents in the global batch (every rank computes the same numbers)."""
        labels = 0
        documents = 0
        for index in indices:
            example = self.examples[index]
            labels += int((np.asarray(example.labels[1:]) != IGNORE_INDEX).sum())
            documents += example.num_documents
        return {"labels": float(labels), "documents": float(documents)}

    def train_step(self, step: int) -> dict[str, float]:
        indices = self.batches[step]
        normalizers = self._normalizers(indices)
        parts = split_global_batch(indices, self.context.world_size * self.accumulation_steps)
        mine = parts[self.context.rank * self.accumulation_steps:(self.context.rank + 1) * self.accumulation_steps]
        sums = torch.zeros(3, dtype=torch.float64)
        statistics: dict[str, float] = {}
        tokens = 0
        for position, micro in enumerate(mine):
            batch = collate([self.examples[index] for index in micro], self.tokenizer.pad_token_id)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            micro_sums, micro_statistics = self._micro_step(batch, normalizers, position == len(mine) - 1)
            sums += micro_sums
            tokens += int(batch["attention_mask"].sum())
            for key, value in micro_statistics.items():
                statistics[key] = statistics.get(key, 0.0) + value / len(mine)
            if self.engine is not None:
                self.engine.step()

        optim = self.cfg.optim
        if self.engine is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, float(optim.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        else:
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)

        totals = torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64)])
        self.context.all_reduce_sum(totals)
        kl, ntp, capacity = (float(value) for value in totals[:3])
        loss_cfg = self.cfg.loss
        total = float(loss_cfg.kl_weight) * kl + float(loss_cfg.ntp_weight) * ntp + float(loss_cfg.capacity_weight) * capacity
        metrics = {"loss": total, "loss/kl": kl, "loss/ntp": ntp, "loss/capacity": capacity,
                   "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": int(totals[3]),
                   "step": step + 1}
        metrics.update(statistics)
        return metrics

    # ----------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        checkpoint_folder = self.resume_from()
        start_step = self.load_checkpoint(checkpoint_folder) if checkpoint_folder is not None else 0
        tracker = Tracker(cfg.get("logger") if self.context.is_main else None,
                          OmegaConf.to_container(cfg, resolve=True), str(self.output_dir), job_type="train")
        log_path = self.output_dir / "train_log.jsonl"
        if self.context.is_main and start_step and log_path.is_file():
            # Steps after the checkpoint are trained again, so their old log lines go.
            kept_lines = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            atomic_write_text(log_path, "".join(line + "\n" for line in kept_lines))
        save_every = cfg.train.get("save_every")
        log_artifacts = self._log_artifacts()
        first_loss = last_loss = None
        start = time.perf_counter()
        step = start_step
        try:
            with checkpointing.PreemptionGuard() as guard:
                while step < self.total_steps:
                    metrics = self.train_step(step)
                    step += 1
                    first_loss = metrics["loss"] if first_loss is None else first_loss
                    last_loss = metrics["loss"]
                    if self.context.is_main:
                        tracker.log(metrics, step=step)
                        append_jsonl(log_path, [metrics])
                    if step % int(cfg.train.log_every) == 0 or step == self.total_steps:
                        self._log_progress(metrics, time.perf_counter() - start)
                    preempted = self.context.any(guard.requested is not None, self.device)
                    periodic = bool(save_every) and step % int(save_every) == 0 and step < self.total_steps
                    if (periodic or preempted) and not self.uses_deepspeed:
                        saved = self.save_checkpoint(step)
                        if saved is not None and log_artifacts:
                            tracker.log_artifact(str(saved), self._artifact_name(), "retention-gates",
                                                 metadata={"step": step}, aliases=[f"step-{step}"])
                    if preempted:
                        guard.release()
        finally:
            self.capture.remove()

        summary = self._finish(step, first_loss, last_loss, time.perf_counter() - start, tracker, log_artifacts)
        return summary

    def _log_progress(self, metrics: dict, elapsed: float) -> None:
        log.info(
            "step %d/%d loss %.4f kl %.4f ntp %.4f cap %.4f lr %.2e beta_mean(l0) %.4f occupancy(l0) %.1f %.1fs",
            metrics["step"], self.total_steps, metrics["loss"], metrics["loss/kl"], metrics["loss/ntp"],
            metrics["loss/capacity"], metrics["lr"], metrics["beta_mean/layer0"], metrics["occupancy/layer0"], elapsed,
        )

    def _log_artifacts(self) -> bool:
        logger_cfg = self.cfg.get("logger")
        return self.context.is_main and logger_cfg is not None and bool(logger_cfg.get("log_artifact", False))

    def _artifact_name(self) -> str:
        return f"gates-{Path(str(self.cfg.model.path)).name}-M{self.budget}"

    def _finish(self, steps: int, first_loss, last_loss, seconds: float, tracker: Tracker, log_artifacts: bool):
        gate_tensors, _ = self._state_dicts()
        gates_dir = self.output_dir / "gates"
        if self.context.is_main:
            atomic_write_folder(gates_dir, lambda staging: self._write_gates(
                staging, gate_tensors, self.gate_metadata(steps)))
        self.context.barrier()
        summary = {"gates": str(gates_dir), "steps": steps, "first_loss": first_loss, "final_loss": last_loss,
                   "train_seconds": seconds}
        if self.context.is_main:
            atomic_write_json(self.output_dir / "train_summary.json", summary)
            tracker.summary(summary)
            if log_artifacts:
                tracker.log_artifact(str(gates_dir), self._artifact_name(), "retention-gates",
                                     metadata={"step": steps}, aliases=["final"])
            tracker.finish()
            log.info("saved gates to %s", gates_dir)
        return summary


def train(cfg: Any, output_dir: str | Path) -> dict[str, Any]:
    """Distil retention gates as configured and save them to `<output_dir>/gates`; return a summary."""
    context = init_distributed(str(cfg.device))
    try:
        trainer = Trainer(cfg, Path(output_dir), context)
        trainer.setup()
        return trainer.run()
    finally:
        context.close()

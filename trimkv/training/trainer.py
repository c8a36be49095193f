"""Gate distillation: the frozen model teaches a copy of itself that attends through retention gates.

One step: the teacher forward (gates off, no grad), the student forward (gates in training mode:
softmax(q k / sqrt(d) + (t - i) log beta_i)), the losses of trimkv.training.losses, a step of AdamW
on the gate parameters only. The base model stays frozen throughout.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from trimkv.cache import enable_eviction, validate_budget
from trimkv.gates import attach_gates, gate_config_for, gate_mode, save_gates
from trimkv.models.loading import load_model, load_tokenizer
from trimkv.training.data import batch_order, collate, load_training_examples
from trimkv.training.losses import capacity_loss, forward_kl, next_token_loss, soft_occupancy
from trimkv.utils.io import append_jsonl
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


def distillation_step(model, gates_capture: GateCapture, batch: dict[str, torch.Tensor], budget: int, loss_cfg: Any):
    """Run the teacher and the student on `batch`; return (total loss, metrics dict)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad(), gate_mode(model, "off"):
        teacher_logits = model(**inputs).logits
    gates_capture.clear()
    with gate_mode(model, "train"):
        student_logits = model(**inputs).logits

    valid = batch["attention_mask"].bool()
    kl = forward_kl(teacher_logits, student_logits, batch["labels"])
    ntp = next_token_loss(student_logits, batch["labels"])
    capacity_terms = []
    metrics: dict[str, float] = {}
    for index in sorted(gates_capture.outputs):
        log_beta = gates_capture.outputs[index].transpose(1, 2)  # (batch, kv_heads, T)
        occupancy = soft_occupancy(log_beta, valid)
        capacity_terms.append(capacity_loss(occupancy, valid, budget, loss_cfg.capacity_normalization))
        real = valid[:, None, :].expand_as(log_beta)
        metrics[f"beta_mean/layer{index}"] = float(log_beta.detach().exp()[real].mean())
        metrics[f"occupancy/layer{index}"] = float(occupancy.detach().amax(dim=-1).mean())
    capacity = torch.stack(capacity_terms).mean()
    total = loss_cfg.kl_weight * kl + loss_cfg.ntp_weight * ntp + loss_cfg.capacity_weight * capacity
    metrics.update({"loss": total.item(), "loss/kl": kl.item(), "loss/ntp": ntp.item(), "loss/capacity": capacity.item()})
    return total, metrics


def train(cfg: Any, output_dir: str | Path) -> dict[str, Any]:
    """Distil retention gates as configured and save them to `<output_dir>/gates`; return a summary."""
    output_dir = Path(output_dir)
    budget, buffer = validate_budget(cfg.budget, cfg.buffer)
    if budget is None:
        raise ValueError("train.py needs a budget (the capacity target M), e.g. budget=512")
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(int(cfg.seed))

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.device)
    enable_eviction(model, "sdpa")
    gate_config = gate_config_for(model, int(cfg.gate.intermediate_size), float(cfg.gate.bias_init))
    gates = attach_gates(model, gate_config)
    parameters = [parameter for gate in gates for parameter in gate.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    trainable = sum(parameter.numel() for parameter in parameters)
    log.info("gates: %d layers, %d trainable parameters; base model frozen", len(gates), trainable)

    examples = load_training_examples(cfg.data, tokenizer, int(cfg.train.max_length))
    batches = batch_order(len(examples), int(cfg.train.batch_size), int(cfg.train.epochs), int(cfg.seed))
    total_steps = len(batches) if cfg.train.max_steps is None else min(len(batches), int(cfg.train.max_steps))
    optim = cfg.optim
    optimizer = torch.optim.AdamW(parameters, lr=float(optim.lr), betas=tuple(optim.betas),
                                  weight_decay=float(optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(optim.warmup_steps), float(optim.lr), float(optim.min_lr))
    )
    tracker = Tracker(cfg.get("logger"), OmegaConf.to_container(cfg, resolve=True), str(output_dir), job_type="train")
    capture = GateCapture(gates)
    device = next(model.parameters()).device
    log_path = output_dir / "train_log.jsonl"
    first_loss = last_loss = None
    start = time.perf_counter()
    try:
        for step in range(total_steps):
            batch = {key: value.to(device) for key, value in collate([examples[i] for i in batches[step]],
                                                                     tokenizer.pad_token_id).items()}
            loss, metrics = distillation_step(model, capture, batch, budget, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, float(optim.max_grad_norm))
            optimizer.step()
            scheduler.step()
            metrics.update({"lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                            "tokens": int(batch["attention_mask"].sum()), "step": step + 1})
            first_loss = metrics["loss"] if first_loss is None else first_loss
            last_loss = metrics["loss"]
            tracker.log(metrics, step=step + 1)
            append_jsonl(log_path, [metrics])
            if (step + 1) % int(cfg.train.log_every) == 0 or step + 1 == total_steps:
                elapsed = time.perf_counter() - start
                log.info(
                    "step %d/%d loss %.4f kl %.4f ntp %.4f cap %.4f lr %.2e beta_mean(l0) %.4f occupancy(l0) %.1f %.1fs",
                    step + 1, total_steps, metrics["loss"], metrics["loss/kl"], metrics["loss/ntp"],
                    metrics["loss/capacity"], metrics["lr"], metrics["beta_mean/layer0"], metrics["occupancy/layer0"],
                    elapsed,
                )
    finally:
        capture.remove()

    gates_dir = save_gates(
        model,
        output_dir / "gates",
        gate_config,
        {
            "base_model": str(cfg.model.path),
            "budget": budget,
            "buffer": buffer,
            "steps": total_steps,
            "loss": {key: cfg.loss[key] for key in cfg.loss},
        },
    )
    summary = {
        "gates": str(gates_dir),
        "steps": total_steps,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "train_seconds": time.perf_counter() - start,
    }
    tracker.summary(summary)
    if cfg.get("logger") is not None and cfg.logger.get("log_artifact", False):
        tracker.log_artifact(str(gates_dir), f"gates-{Path(str(cfg.model.path)).name}-M{budget}", "retention-gates")
    tracker.finish()
    log.info("saved gates to %s", gates_dir)
    return summary

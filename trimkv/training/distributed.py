"""Data-parallel gate training on the engines of torch (DDP, FSDP2) and DeepSpeed (ZeRO-2).

Processes are started by `torchrun` (or a SLURM/submitit launch that sets the same environment
variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The backend is NCCL on CUDA
and gloo on the CPU. Only the gates train, so each engine wraps the decoder (which contains the
gates) and its gradients, and the frozen backbone stays replicated except under FSDP.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp", "deepspeed")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (no-op in a single process) and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on at least one."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_setting: str) -> DistributedContext:
    """Join the process group described by torchrun's environment, or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_setting in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    log.info("rank %d of %d (local rank %d, backend %s)", rank, world_size, local_rank, dist.get_backend())
    return DistributedContext(rank, world_size, local_rank, initialized_here)


def process_device(device_setting: str, context: DistributedContext) -> str:
    """Return the device of this process: its local GPU under torchrun, else the configured device."""
    if context.enabled and torch.cuda.is_available() and device_setting in ("auto", "cuda"):
        return f"cuda:{context.local_rank}"
    return device_setting


def wrap_decoder(decoder: torch.nn.Module, strategy: str, context: DistributedContext) -> torch.nn.Module:
    """Wrap the decoder for DDP or FSDP2; a single process or DeepSpeed gets it unchanged.

    DDP averages the gate gradients over ranks during backward. FSDP2 (`fully_shard`) shards each
    decoder layer, gates included, and gathers the weights layer by layer.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown train.strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not context.enabled or strategy == "deepspeed":
        return decoder
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.local_rank] if next(decoder.parameters()).is_cuda else None
        return DistributedDataParallel(decoder, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(decoder)
    return decoder


def deepspeed_engine(decoder: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, train_cfg: Any,
                     precision: str, accumulation_steps: int, max_grad_norm: float):
    """Build a DeepSpeed ZeRO engine over the gate parameters with our optimizer and scheduler.

    NOTE: written against the DeepSpeed config documentation and not run by this repository's
    tests, whose CPU machines have no DeepSpeed. DDP and FSDP2 are the tested engines.
    """
    try:
        import deepspeed
    except ImportError as error:
        raise ValueError("train.strategy=deepspeed needs the deepspeed package (pip install deepspeed); "
                         "train.strategy=ddp or fsdp work without it") from error

    config = {
        "train_micro_batch_size_per_gpu": int(train_cfg.micro_batch_size),
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": int(train_cfg.get("zero_stage", 2))},
        "bf16": {"enabled": precision == "bf16"},
    }
    engine, _, _, _ = deepspeed.initialize(model=decoder, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine

"""torchrun plumbing of the trainer: ranks, devices, DDP / FSDP wrapping, full tensors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from terdit_common.cli import check_torchrun_env, env_int


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(tc) -> Dist:
    """The process group under torchrun (WORLD_SIZE > 1) and this rank's device."""
    world = check_torchrun_env() if not dist.is_initialized() else env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local = env_int("LOCAL_RANK", rank)
    if tc.global_batch % world:
        raise ValueError(f"--global-batch {tc.global_batch} must be divisible by the number of "
                         f"ranks ({world})")
    want_cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    if want_cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, device)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_tensor(t: Tensor) -> Tensor:
    """The full tensor of a (possibly FSDP-sharded DTensor) parameter or state."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t




def wrap_model(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """DDP, or FSDP per block (`strategy` fsdp), under several ranks; the model itself on one."""
    if d.world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

"""Process groups and model parallelisation (FSDP2). Models import nothing from here.

``parallelize`` applies, in this order: ``torch.compile`` per block, then ``fully_shard`` per
block and on the root (parameters in bf16 for compute, gradients reduced in float32 when training
in bf16). Activation checkpointing is the model's own switch (``activation_checkpointing``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # launched by torchrun: FSDP2 and sharded checkpoints, even on one GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun; pick the device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun sets both
    if launched and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local, dev, distributed=launched)


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
    return value


def from_main(compute):
    """``compute()`` run on rank 0 only, its (picklable) result given to every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return compute()
    box = [compute() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def parallelize(model: torch.nn.Module, blocks: list[torch.nn.Module], info: DistInfo, *, compile: bool,
                bf16: bool) -> torch.nn.Module:
    """Wrap ``blocks`` (the model's transformer layers) and the root for training."""
    if compile:
        for block in blocks:
            block.compile()
    if info.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    return model

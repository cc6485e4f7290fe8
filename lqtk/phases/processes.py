"""Several processes sharing a block walk (`LayerwiseCalibration` with `trainer.devices N`, `trainer.num_nodes M`,
torchrun or SLURM, as Lightning detects them).

`BlockWalkStrategy` is Lightning's DDP strategy (its launchers, cluster environments, process groups and rank-0
checkpoints) without the DistributedDataParallel wrapper: a walk has no gradients to all-reduce, it exchanges what
it needs explicitly with the collectives below. They do nothing on one process, so the phase's code is the same
for one process and many.
"""

import dataclasses
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry


class BlockWalkStrategy(DDPStrategy):
    """DDP's processes, without the DistributedDataParallel wrapper (`trainer.strategy: block_walk`)."""

    strategy_name = "block_walk"

    def __init__(self, *args, timeout: timedelta = timedelta(hours=12), **kwargs):
        # The other processes wait while one quantizes a group (AQLM on a large layer: hours) or evaluates the fp
        # model: far longer than the collectives' default timeout of 30 min.
        super().__init__(*args, timeout=timeout, **kwargs)

    def configure_ddp(self) -> None:
        """Nothing to wrap: the walk keeps the model out of the LightningModule and has no gradients to reduce."""


StrategyRegistry.register(BlockWalkStrategy.strategy_name, BlockWalkStrategy,
                          description="processes that share LayerwiseCalibration's walk")


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_to(owner: int, obj):
    """Every process's `obj`, in rank order, on process `owner` (None elsewhere). Tensors travel on the CPU."""
    rank, size = world()
    if size == 1:
        return [obj]
    gathered = [None] * size if rank == owner else None
    dist.gather_object(_to_cpu(obj), gathered, dst=owner)
    return gathered


def broadcast_from(owner: int, obj):
    """Process `owner`'s `obj` on every process (tensors on the CPU)."""
    if world()[1] == 1:
        return obj
    box = [_to_cpu(obj)]
    dist.broadcast_object_list(box, src=owner)
    return box[0]


def _to_cpu(obj):
    """`obj` with every tensor inside it (dicts, lists, tuples, dataclasses) on the CPU: a pickled CUDA tensor would
    be unpickled on the sender's device."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj

"""Disk a block-by-block run leaves in its folder, and the check that refuses a run whose filesystem lacks it.

What stays on disk: `checkpoints/last.ckpt` (the next block's cached inputs (N, T, D)) and `blocks/` (every finished
block's result), and each export folder (the model's tensors: the blocks as quantized, the rest as loaded). Both are
estimated from the blocks finished so far, every block counted at their mean size: the dry run calls this after
block 0, a real run before the walk (blocks not counted yet: a lower bound) and again at its first checkpoint,
before the checkpoint is written.
"""

import shutil
from pathlib import Path

import torch

from lqtk.anatomy import tied_names
from lqtk.errors import LqtkError


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, a tensor shared under two names (tied embeddings) once."""
    tied = tied_names(module)  # stored once (released, they are two meta tensors)
    sizes = {id(t) if t.is_meta else t.data_ptr(): t.numel() * t.element_size()  # a streamed block is on meta
             for name, t in module.state_dict(keep_vars=True).items() if name not in tied}
    return sum(sizes.values())


def disk_needs(model: torch.nn.Module, blocks: torch.nn.ModuleList, finished: int, inputs: torch.Tensor,
               exports: int) -> dict[str, int]:
    """Bytes of the run's last checkpoint and of its `exports` export folders, every block the mean size of the
    first `finished` blocks (0: blocks left out)."""
    sizes = [tensor_bytes(block) for block in blocks]
    block = sum(sizes[:finished]) // finished if finished else 0
    outside_blocks = tensor_bytes(model) - sum(sizes)
    return {"checkpoint_bytes": inputs.numel() * inputs.element_size() + len(blocks) * block,
            "export_bytes": exports * (outside_blocks + len(blocks) * block)}


def free_bytes(folder: Path) -> int:
    """Free bytes of the filesystem that holds `folder` (or would hold it: its nearest existing parent), counting
    the space of a checkpoint there as free, since the run replaces it."""
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    checkpoint = folder / "checkpoints" / "last.ckpt"
    return shutil.disk_usage(existing).free + (checkpoint.stat().st_size if checkpoint.is_file() else 0)


def check_disk_space(folder: Path, needs: dict[str, int]) -> None:
    """Refuse the run, before its work is lost, if `folder`'s filesystem cannot hold `needs`."""
    free = free_bytes(folder)
    if sum(needs.values()) > free:
        checkpoint, export = size_text(needs["checkpoint_bytes"]), size_text(needs["export_bytes"])
        raise LqtkError(f"{folder} needs about {checkpoint} for the checkpoint (cached block inputs and results) and "
                        f"{export} for the export, but its filesystem has {size_text(free)} free: free some space or "
                        "choose another trainer.default_root_dir")


def size_text(size: float) -> str:
    """`size` bytes in the largest binary unit it reaches (1.50 GiB, 180.5 KiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{size:.0f} B"

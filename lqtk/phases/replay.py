"""Computing each op of a block once across the passes of layerwise calibration.

Calibrating a block takes one pass over the calibration batches per group of Linears, and a last pass for the
block's outputs; every pass starts again at the block's input. Once every Linear of a sub-module (self_attn, mlp)
is quantized, that sub-module's outputs no longer change within the block: `SubmoduleReplay` records them the first
time they are computed and hands them back in later passes. A sub-module whose output is its last Linear's output
(self_attn ends in o_proj, mlp in down_proj) is replayed from that Linear's inputs, saved while they were being
calibrated, so its body never runs again. A replayed output is the tensor a rerun would compute (same inputs, same
layers, same kernels), so results do not change.
"""

from collections.abc import Callable

import torch
from torch import nn

from lqtk.anatomy import linear_layers


def record_tails(block: nn.Module, tails: dict[str, tuple[str, int] | None]) -> list:
    """Hooks that, when `block` next runs, fill `tails` with, for each child of the block that holds Linears, the
    Linear (name within the block) whose output is the child's output and the length of the tuple the child returns
    (0: a bare tensor), or None where the child computes its output after its last Linear. Returns the handles."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors are kept alive, so their ids stay unique

    def linear_hook(name):
        def hook(module, args, output):
            outputs.setdefault(id(output), (name, output))
        return hook

    def child_hook(name):
        def hook(module, args, output):
            tensor, rest = (output, ()) if isinstance(output, torch.Tensor) else (output[0], output[1:])
            linear = outputs.get(id(tensor))
            tuple_len = 0 if isinstance(output, torch.Tensor) else len(output)
            tails[name] = (linear[0], tuple_len) if linear and all(r is None for r in rest) else None
        return hook

    children = {name: child for name, child in block.named_children() if linear_layers(child)}
    handles = [m.register_forward_hook(linear_hook(name)) for name, m in linear_layers(block).items()]
    return handles + [child.register_forward_hook(child_hook(name)) for name, child in children.items()]


class SubmoduleReplay:
    """Replays the finished sub-modules of one block (see the module docstring) while the block is calibrated.

    Args:
        block: The block being calibrated.
        tails: What `record_tails` found for the block (children that did not run are left out).
        batch_index: Returns the calibration batch being run (records are kept per batch).
        device: Where replayed tensors are handed back; records are kept on the CPU, like the block inputs.
    """

    def __init__(self, block: nn.Module, tails: dict[str, tuple[str, int] | None], batch_index: Callable[[], int],
                 device: torch.device):
        self.block, self.tails, self.batch_index, self.device = block, tails, batch_index, device
        self.record = True  # false in the last pass: nothing reads what it would record
        self.outputs: dict[str, dict[int, object]] = {}
        self.tail_inputs: dict[str, dict[int, torch.Tensor]] = {}
        self.finished: list[str] = []

    def needs_input(self, linear: str) -> bool:
        return any(tail is not None and tail[0] == linear for tail in self.tails.values())

    def save_input(self, linear: str, x: torch.Tensor) -> None:
        self.tail_inputs.setdefault(linear, {})[self.batch_index()] = x.detach().cpu()

    def finish(self, child: str) -> None:
        """`child`'s Linears are all quantized: from now on it is computed at most once per batch."""
        original = getattr(self.block, child).forward

        def forward(*args, **kwargs):
            batch, seen = self.batch_index(), self.outputs.setdefault(child, {})
            if batch in seen:
                return _to(seen[batch], self.device)
            output = self._from_tail(child, batch)
            if output is None:
                output = original(*args, **kwargs)
            if self.record:
                seen[batch] = _to(output, "cpu")
            return output

        getattr(self.block, child).forward = forward  # the instance attribute shadows the class's forward
        self.finished.append(child)

    def _from_tail(self, child: str, batch: int):
        tail = self.tails.get(child)
        x = self.tail_inputs.get(tail[0], {}).get(batch) if tail else None
        if x is None:
            return None
        y = self.block.get_submodule(tail[0])(x.to(self.device))
        return (y, *[None] * (tail[1] - 1)) if tail[1] else y

    def close(self) -> None:
        """Restore the sub-modules' own forwards and drop every record."""
        for child in self.finished:
            del getattr(self.block, child).forward
        self.finished, self.outputs, self.tail_inputs = [], {}, {}


def _to(output, device):
    if isinstance(output, torch.Tensor):
        return output.to(device)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in output)

"""The order in which `LayerwiseCalibration` calibrates the Linears of each block: passes of groups.

A group is the Linears that read the same input tensor (q/k/v; gate/up): they share one Hessian. A pass is the
groups whose Hessians one run of the block accumulates; with `sequential`, each pass calibrates on the outputs of
the groups quantized in the passes before it. Groups and their order come from one probe run of the block. Groups whose
Linears differ only in an index of a ModuleList (the experts of an MoE block: `mlp.experts.3.down_proj`) do not
feed each other, so they share a pass, placed where the first of them ran: an MoE block takes two passes (all
gate/up, all down) rather than two per expert. An expert the probe routed no token to joins its siblings' pass.
"""

import re
from collections.abc import Callable

import torch
from torch import nn

from lqtk.errors import LqtkError


def calibration_passes(linears: dict[str, nn.Module], run_block: Callable[[], None],
                       sequential: bool) -> list[list[list[str]]]:
    """A block's passes, each a list of groups of Linear names (relative to the block), in execution order.
    `linears` holds the block's Linears to calibrate by name; `run_block` runs the block once, on calibration inputs
    (real tokens: an MoE router routes them as it will route the calibration). Without `sequential`, one pass of all
    groups: every Linear calibrates on the fp block's activations."""
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def record(name, x):  # inputs are kept alive in `seen`, so identity comparison is safe
        for x_seen, names in seen:
            if x_seen is x:
                return names.append(name)
        seen.append((x, [name]))

    hooks = [m.register_forward_pre_hook(lambda m, args, n=name: record(n, args[0])) for name, m in linears.items()]
    try:
        run_block()
    finally:
        for hook in hooks:
            hook.remove()
    groups = [names for _, names in seen]
    passes = _passes(groups, [name for name in linears if not any(name in group for group in groups)])
    return passes if sequential else [[group for one_pass in passes for group in one_pass]]


def _passes(groups: list[list[str]], unreached: list[str]) -> list[list[list[str]]]:
    """Groups merged into passes by their first Linear's name with ModuleList indices wildcarded; each Linear the
    probe did not reach is a group of its own in the pass of its reached siblings."""
    passes, pass_of = [], {}
    for group in groups + [[name] for name in unreached]:
        key = re.sub(r"(^|\.)\d+\.", r"\1#.", group[0])
        if key not in pass_of:
            if group[0] in unreached:
                raise LqtkError(f"{group[0]} did not run in a forward pass of the model, so its calibration inputs "
                                "are unknown: add it to the phase's `skip` list")
            pass_of[key] = len(passes)
            passes.append([])
        passes[pass_of[key]].append(group)
    return passes

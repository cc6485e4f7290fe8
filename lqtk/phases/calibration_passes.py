"""The order in which `LayerwiseCalibration` calibrates the Linears of each block: passes of groups.

A group is the Linears that read the same input tensor (q/k/v; gate/up): they share one Hessian. A pass is the
groups whose Hessians one run of the block accumulates; with `sequential`, each pass calibrates on the outputs of
the groups quantized in the passes before it. Groups and their order come from one probe forward. Groups whose
Linears differ only in an index of a ModuleList (the experts of an MoE block: `mlp.experts.3.down_proj`) do not
feed each other, so they share a pass, placed where the first of them ran: an MoE block takes two passes (all
gate/up, all down) rather than two per expert. An expert the probe routed no token to joins its siblings' pass.
"""

import re

import torch
from torch import nn

from lqtk.errors import LqtkError
from lqtk.models import probe_forward


def calibration_passes(model: nn.Module, block_linears: list[dict[str, nn.Module]],
                       sequential: bool) -> list[list[list[str]]]:
    """Per block, its passes; each pass a list of groups of Linear names (relative to the block), in execution
    order. `block_linears` holds each block's Linears to calibrate by name. Without `sequential`, one pass of all
    groups: every Linear calibrates on the fp block's activations."""
    passes = [_passes(groups, [name for name in linears if not any(name in group for group in groups)])
              for groups, linears in zip(_probe_groups(model, block_linears), block_linears)]
    return passes if sequential else [[[group for one_pass in block for group in one_pass]] for block in passes]


def _probe_groups(model: nn.Module, block_linears: list[dict[str, nn.Module]]) -> list[list[list[str]]]:
    """Per block, the groups of Linears that read the same input tensor, in the order they first ran on a short
    random input."""
    seen: list[list[tuple[torch.Tensor, list[str]]]] = [[] for _ in block_linears]

    def record(block_seen, name, x):  # inputs are kept alive in `seen`, so identity comparison is safe
        for x_seen, names in block_seen:
            if x_seen is x:
                return names.append(name)
        block_seen.append((x, [name]))

    probe_forward(model, [m.register_forward_pre_hook(lambda m, args, s=seen[i], n=name: record(s, n, args[0]))
                          for i, linears in enumerate(block_linears) for name, m in linears.items()])
    return [[names for _, names in block_seen] for block_seen in seen]


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

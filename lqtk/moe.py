"""Mixture-of-experts models: experts as per-expert Linears, so that they can be calibrated one by one.

transformers (>= 5) stores the experts of an MoE block (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...) fused, as 3D
parameters `gate_up_proj` (E, 2·I, D) and `down_proj` (E, D, I) of one `...Experts` module, so there is no Linear
per expert to hook or to quantize. `unfuse_experts` replaces each such module by `LinearExperts`: the same forward
(the same routing, the same operations in the same order, so the same logits bit for bit) through one
`gate_up_proj` and one `down_proj` nn.Linear per expert, named `<block>.mlp.experts.<e>.gate_up_proj`. Hooks on
them see exactly the tokens routed to expert e. `lqtk.models.load_causal_lm` unfuses every model it loads, fp or an
lqtk export (whose tensors are stored under the unfused names), so the two always have the same structure.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Linears that route tokens rather than transform them, kept in full precision by default: the MoE routers that are
# nn.Linears (in transformers >= 5 most routers are `...TopKRouter` modules, which are no Linears and never
# quantized; Qwen2-MoE's sigmoid gate of its shared expert is one).
ROUTER_LINEARS = ("mlp.gate", "block_sparse_moe.gate", "shared_expert_gate")


class Expert(nn.Module):
    """One expert: gate and up projections in one Linear (as the 3D weight stores them), the gated activation,
    the down projection."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.act_fn = act_fn
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False, dtype=gate_up.dtype,
                                      device=gate_up.device)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, dtype=down.dtype, device=down.device)
        if gate_up.device.type != "meta":  # a skeleton's experts (lqtk.streaming) get their weights when loaded
            self.gate_up_proj.weight.data.copy_(gate_up)
            self.down_proj.weight.data.copy_(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LinearExperts(nn.ModuleList):
    """The experts of one MoE block as a list of `Expert`s, computing what transformers' eager experts forward
    computes (`Qwen2MoeExperts.forward`): each expert runs on the tokens routed to it, weighted by their routing
    weight, and the results are summed in expert order."""

    def __init__(self, fused: nn.Module):
        super().__init__(Expert(gate_up, down, fused.act_fn) for gate_up, down in zip(fused.gate_up_proj,
                                                                                       fused.down_proj))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (tokens, D); top_k_index and top_k_weights (tokens, k): the chosen experts and weights."""
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)  # (E, k, tokens)
        for expert_index in expert_mask.sum(dim=(1, 2)).nonzero()[:, 0].tolist():
            top_k_pos, token_idx = torch.where(expert_mask[expert_index])
            current = self[expert_index](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts in the layout `LinearExperts` reproduces: [gate; up] concatenated, not
    transposed, no biases, no norm after the experts (other layouts stay fused: their experts stay in fp)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3 and isinstance(down, nn.Parameter)
            and getattr(module, "is_concatenated", True) and not getattr(module, "is_transposed", False)
            and not getattr(module, "has_bias", False) and not getattr(module, "has_post_expert_norm", False))


def expert_weight_sources(model: nn.Module, stored: set[str]) -> dict[str, list[tuple[str, int | None]]]:
    """Where each unfused expert Linear's weight of `model` (fused experts) is in a checkpoint holding the tensors
    `stored`: a row of the fused 3D weights, or the per-expert `gate_proj`, `up_proj` and `down_proj` of the hub
    layout (which transformers fuses when it loads). {weight name: [(stored name, row or None), ...]}, joined along
    dim 0 (lqtk.streaming reads the experts block by block this way)."""
    sources = {}
    for name, module in model.named_modules():
        if not is_fused_experts(module):
            continue
        for e in range(module.gate_up_proj.shape[0]):
            fused = f"{name}.gate_up_proj" in stored
            sources[f"{name}.{e}.gate_up_proj.weight"] = ([(f"{name}.gate_up_proj", e)] if fused else
                                                          [(f"{name}.{e}.{proj}.weight", None)
                                                           for proj in ("gate_proj", "up_proj")])
            sources[f"{name}.{e}.down_proj.weight"] = [(f"{name}.down_proj", e) if fused else
                                                       (f"{name}.{e}.down_proj.weight", None)]
    return sources


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Replace every fused experts module of `model` by `LinearExperts` (in place; returns `model`). A model without
    fused experts is left as it is."""
    fused = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name in fused:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LinearExperts(getattr(owner, child)))  # one block at a time: the fused copy is freed
    return model

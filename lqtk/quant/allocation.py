"""Mixed precision under a bit budget: one candidate quantization per layer, so that the layers' summed proxy loss is
least while their storage fits the budget.

The proxy loss of a quantized layer is its output error on the calibration inputs, tr(ΔW H ΔWᵀ) = 2 E ||ΔW x||²
(GPTQ's objective), each output channel i weighted by how much the model's loss feels it: F_i, the mean squared
gradient of the next-token loss with respect to that output (the diagonal Fisher of the layer's output). Then
½ Σ_i F_i [ΔW H ΔWᵀ]_ii is the second-order estimate of the rise in the mean next-token loss, which adds up over
layers (as HAWQ's and SqueezeLLM's sensitivities do); unweighted, a layer's error inside attention scores would
count as much as one written to the residual stream, and an early layer's as much as a late one's.

Choosing one candidate per layer under a storage budget is the multiple-choice knapsack; `allocate` solves it by
dynamic programming over the budget cut into `resolution` units, each candidate's storage rounded up to whole units,
so the choice never exceeds the budget and is optimal up to that rounding (at most one unit per layer is left unused).
"""

import math

import torch
import torch.nn.functional as F


def output_fisher(model: torch.nn.Module, windows: torch.Tensor, names: list[str], batch_size: int = 2):
    """{name: F (O,)}: for each Linear `names` of `model`, the mean over the tokens of `windows` (n, T) of the squared
    gradient of the next-token loss (summed over tokens) with respect to each of its outputs. The weights stay
    frozen: the gradient flows from the embeddings' output."""
    sums, tokens = dict.fromkeys(names, 0.0), 0

    def keep(name):
        def hook(module, args, output):
            output.register_hook(lambda grad: sums.__setitem__(name, sums[name] + grad.detach().float().pow(2)
                                                               .flatten(0, -2).sum(0)))
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.requires_grad_()))
    try:
        for batch in windows.split(batch_size):
            logits = model(batch, use_cache=False).logits[:, :-1]
            F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").backward()
            tokens += batch[:, 1:].numel()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: total / tokens for name, total in sums.items()}


def output_error(delta: torch.Tensor, hessian: torch.Tensor, channel_weights: torch.Tensor | None = None) -> float:
    """tr(Δ H Δᵀ) for a weight error Δ (O, I) and H (I, I); with `channel_weights` (O,), Σ_i w_i [Δ H Δᵀ]_ii."""
    delta = delta.float()
    rows = (delta @ hessian.to(delta.device) * delta).sum(1)
    return (rows if channel_weights is None else rows * channel_weights.to(rows.device)).sum().item()


def allocate(costs: list[list[float]], losses: list[list[float]], budget: float, resolution: int = 2**16) -> list[int]:
    """For each layer l the candidate c_l minimizing Σ losses[l][c_l] subject to Σ costs[l][c_l] ≤ budget.

    Raises ValueError when even the cheapest candidates exceed the budget."""
    if sum(min(options) for options in costs) > budget:
        raise ValueError(f"the cheapest candidates take {sum(min(options) for options in costs):.6g} bits, more than "
                         f"the budget of {budget:.6g}")
    def units(cost: float) -> int:  # rounded up: the choice's true storage is at most its units'
        return math.ceil(cost * resolution / budget)

    # best[u]: least loss of the layers so far within u units; choices[l][u]: layer l's candidate there
    best = torch.zeros(resolution + 1, dtype=torch.float64)
    choices = []
    for layer_costs, layer_losses in zip(costs, losses):
        new = torch.full_like(best, float("inf"))
        choice = torch.zeros(resolution + 1, dtype=torch.int16)
        for c, (cost, loss) in enumerate(zip(layer_costs, layer_losses)):
            size = units(cost)
            if size > resolution:
                continue
            candidate = torch.full_like(best, float("inf"))
            candidate[size:] = best[: resolution + 1 - size] + loss
            better = candidate < new
            new[better], choice[better] = candidate[better], c
        best = new
        choices.append(choice)
    if not torch.isfinite(best[resolution]):  # the rounding up can push a just-feasible budget over
        raise ValueError(f"no choice fits the budget of {budget:.6g} bits at this resolution: raise it slightly")
    picked, left = [], resolution
    for layer in reversed(range(len(costs))):
        c = int(choices[layer][left])
        picked.append(c)
        left -= units(costs[layer][c])
    return picked[::-1]

"""Mixed precision under a bit budget: one candidate quantization per layer, so that the layers' summed proxy loss is
least while their storage fits the budget.

The proxy loss of a quantized layer is its output error on the calibration inputs, tr(ΔW H ΔWᵀ) = Σ ||ΔW x||² / n
(GPTQ's objective; summed over layers as in HAWQ-V3 and the mixed-precision GPTQ papers). Choosing one candidate per
layer under a storage budget is the multiple-choice knapsack; `allocate` solves it by dynamic programming over the
budget cut into `resolution` units, each candidate's storage rounded up to whole units, so the choice never exceeds
the budget and is optimal up to that rounding (at most one unit per layer is left unused).
"""

import math

import torch


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(Δ H Δᵀ) for a weight error Δ (O, I) and H (I, I)."""
    delta = delta.float()
    return (delta @ hessian.to(delta.device) * delta).sum().item()


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

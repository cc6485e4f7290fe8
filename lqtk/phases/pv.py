"""PV-tuning's V step: moving the integer codes of a quantized model with the gradient of its loss (Malinovskii et
al. 2024, "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression", https://arxiv.org/abs/2405.14852).

The P step trains the continuous parameters (codebooks, scales) by backpropagation; the codes get no gradient. The V
step works on the decoded weight Ŵ of each quantized layer instead:
    1. its gradient ∂L/∂Ŵ is collected during the backward pass (summed over micro-batches and processes);
    2. a straight-through target T (a dense copy of the weight, T = Ŵ at the start) takes an Adam step with it;
    3. the format re-chooses codes to bring Ŵ nearer to T (`WeightFormat.nearest_codes`: AQLM's beam search,
       rounding for scalar codes, the nearest level of a LeanQuant table), changing at most `max_code_change` of
       the layer's code units per step, those that gain most. T keeps the updates too small to flip a code, so
       they add up over steps until one does. With `trust_ratio` the change also moves Ŵ by at most that fraction
       of its norm (as the authors' `code_trust_ratio`): the allowed fraction of changes is halved until it does,
       the largest gains kept.

The targets and their Adam moments are replicated on every process (each gets the same summed gradient and applies
the same update), so they are complete in any process's checkpoint and resume on any number of processes; the code
search of each layer runs on one process (layers dealt round-robin) and its codes are broadcast to the others. The
cost is 12 bytes per weight on every process: the AQLM authors shard these per layer, the next step here at scale.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lqtk.errors import LqtkError
from lqtk.formats import FORMATS, WeightFormat
from lqtk.nn import quantized_layers


@dataclass
class PVTuning:
    """The V step's settings."""

    lr: float = 1e-4
    """Adam learning rate of the straight-through targets."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas of the straight-through targets."""
    max_code_change: float = 0.01
    """At most this fraction of a layer's code units (AQLM groups, scalar weights) changes per step."""
    beam_size: int = 4
    """Code states kept per group by AQLM's beam search."""
    trust_ratio: float | None = None
    """At most this ||Ŵ_new − Ŵ|| / ||Ŵ|| per layer and step (null: only max_code_change bounds it)."""


class StraightThroughCodes:
    """The V step's state for every quantized layer of `model`: gradient accumulators, targets, Adam moments."""

    def __init__(self, model: nn.Module, config: PVTuning):
        self.config, self.layers = config, quantized_layers(model)
        for name, layer in self.layers.items():
            if type(FORMATS[layer.format]).nearest_codes is WeightFormat.nearest_codes:
                raise LqtkError(f"PV-tuning needs a code search, which the {layer.format!r} format of {name} does "
                                "not have: set pv null (continuous parameters only)")
        weights = {name: layer.quantized_weight.dequantize() for name, layer in self.layers.items()}
        self.targets = {name: w.clone() for name, w in weights.items()}
        self.moments = {name: (torch.zeros_like(w), torch.zeros_like(w)) for name, w in weights.items()}
        self.steps = 0
        for name, layer in self.layers.items():
            layer.weight_grad = torch.zeros_like(weights[name])

    def to(self, device: torch.device) -> "StraightThroughCodes":
        for name, layer in self.layers.items():
            layer.weight_grad = layer.weight_grad.to(device)
            self.targets[name] = self.targets[name].to(device)
            self.moments[name] = tuple(m.to(device) for m in self.moments[name])
        return self

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Steps 2 and 3 for every layer; zeroes the gradient accumulators. Called by every process (the gradient
        sum, the gathering of sharded codebooks and scales and the code broadcast are collective). Returns, over all
        layers, the fraction of weights whose decoded value changed and ||Ŵ_new − Ŵ|| / ||Ŵ||."""
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        self.steps += 1
        beta1, beta2 = self.config.betas
        changed = torch.zeros(3)  # changed weights, ||ΔŴ||², ||Ŵ||² over the layers this process searched
        for index, (name, layer) in enumerate(self.layers.items()):
            grad = layer.weight_grad
            if distributed:
                dist.all_reduce(grad)
                grad /= world  # the mean, as data-parallel gradients are
            m, v = self.moments[name]
            m.lerp_(grad, 1 - beta1)
            v.lerp_(grad.square(), 1 - beta2)
            step = (m / (1 - beta1**self.steps)) / ((v / (1 - beta2**self.steps)).sqrt() + 1e-8)
            self.targets[name].sub_(self.config.lr * step)
            grad.zero_()
            tensors = {key: full(t) for key, t in layer.tensors().items()}
            owner = index % world
            if rank == owner:
                codes, delta, norm = self.nearest_codes(name, layer, tensors)
                changed += torch.tensor([(delta != 0).sum().item(), delta.square().sum().item(), norm**2])
            else:
                codes = {key: torch.empty_like(tensors[key]) for key in tensors if not tensors[key].is_floating_point()}
            for key, value in codes.items():
                if distributed:
                    dist.broadcast(value, src=owner)
                getattr(layer, key).copy_(value)
        if distributed:
            changed = changed.to(grad.device)
            dist.all_reduce(changed)
        weights = sum(layer.weight_grad.numel() for layer in self.layers.values())
        return {"code_change": changed[0].item() / weights, "weight_change": (changed[1] / changed[2]).sqrt().item()}

    def nearest_codes(self, name: str, layer, tensors: dict) -> tuple[dict, torch.Tensor, float]:
        """The format's code search towards the layer's target within the step's bounds; its codes, ΔŴ, ||Ŵ||."""
        fmt = FORMATS[layer.format]
        weight = fmt.dequantize(tensors, layer.spec)
        norm, fraction = weight.norm().item(), self.config.max_code_change
        while fraction * weight.numel() >= 1:  # below one weight's worth, no change fits
            codes = fmt.nearest_codes(tensors, layer.spec, self.targets[name], fraction, self.config.beam_size)
            delta = fmt.dequantize({**tensors, **codes}, layer.spec) - weight
            if self.config.trust_ratio is None or delta.norm() <= self.config.trust_ratio * norm:
                return codes, delta, norm
            fraction /= 2
        return {key: t for key, t in tensors.items() if not t.is_floating_point()}, torch.zeros_like(weight), norm

    def state_dict(self) -> dict:
        return {"targets": self.targets, "moments": self.moments, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.targets.values())).device
        self.targets = {name: t.to(device) for name, t in state["targets"].items()}
        self.moments = {name: tuple(m.to(device) for m in pair) for name, pair in state["moments"].items()}
        self.steps = state["steps"]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; collective when sharded."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()

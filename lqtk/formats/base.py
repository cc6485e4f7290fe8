"""The interface every storage format implements, and the container a quantized weight lives in.

A `QuantizedWeight` is named tensors plus a JSON-able `spec` that tells its storage `format` how to turn them back
into a dense weight (or how to run the matmul directly). Formats are the ground floor of lqtk: they import nothing
above them, so a model can be loaded and run without any calibration code. The methods that produce them
(`lqtk.quant`) declare which format they write; a new format registers itself with `register_format`.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Matmul = Callable[..., torch.Tensor]
"""`matmul(format_name, x, tensors, spec, bias, cache)`: x Ŵᵀ + b of a stored weight (see `WeightFormat.linear`)."""


class WeightFormat:
    """How a stored weight is decoded. Subclasses set `name` and implement `dequantize`; `linear` is overridden by
    formats that transform the activations around an inner format's weight (incoherence, activation quantization)."""

    name: str

    def dequantize(self, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict, bias: torch.Tensor | None,
               cache: Callable[[str, Callable], object] | None = None, matmul: Matmul | None = None) -> torch.Tensor:
        """x Ŵᵀ + b by decoding Ŵ. `cache(name, decode)`, the layer's, returns decode()'s result kept under `name`
        while its tensors do not change (calibration and evaluation run many batches through a frozen layer).
        A wrapping format runs its inner weight's matmul through `matmul` (the layer's choice between a kernel and
        decoding, `lqtk.nn.quantized_matmul`; default `decoded_matmul`), passing `cache` on."""
        decode = functools.partial(self.dequantize, tensors, spec)
        return F.linear(x, (cache("weight", decode) if cache else decode()).to(x.dtype), bias)

    def nearest_codes(self, tensors: dict[str, torch.Tensor], spec: dict, target: torch.Tensor, max_change: float,
                      beam_size: int) -> dict[str, torch.Tensor]:
        """All integer tensors, re-chosen with the floating ones fixed to bring the decoded weight nearer to the
        dense `target` in squared error, changing at most a `max_change` fraction of the code units (PV-tuning's V
        step). Formats without a code search leave this out."""
        raise NotImplementedError


def decoded_matmul(format_name: str, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict,
                   bias: torch.Tensor | None, cache=None) -> torch.Tensor:
    """x Ŵᵀ + b through the formats alone: every weight decoded, no kernel."""
    return FORMATS[format_name].linear(x, tensors, spec, bias, cache, decoded_matmul)


def largest_gains(gain: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the positive entries of `gain` among its ceil(fraction · numel) largest."""
    count = min(gain.numel(), max(1, int(fraction * gain.numel() + 0.999999)))
    threshold = gain.flatten().topk(count).values[-1]
    return (gain >= threshold) & (gain > 0)


FORMATS: dict[str, WeightFormat] = {}


def register_format(cls: type[WeightFormat]) -> type[WeightFormat]:
    FORMATS[cls.name] = cls()
    return cls


@dataclass
class QuantizedWeight:
    """A quantized (O, I) weight: `tensors` decoded by `FORMATS[format]` with `spec`; `method` made it. `history`
    holds what an iterative method wants reported (e.g. its objective per round); it is not part of the export."""

    method: str
    format: str
    spec: dict
    tensors: dict[str, torch.Tensor]
    history: dict[str, list[float]] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return FORMATS[self.format].dequantize(self.tensors, self.spec)


def storage_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits it takes to store these tensors as they are (packed codes, scales, zeros, codebooks)."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())

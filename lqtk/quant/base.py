"""The interface every quantization method implements, and the container its result lives in.

A method is a `WeightQuantizer`: a config object whose `quantize(weight, hessian)` turns a dense (O, I) weight and
the calibration Hessian H = XᵀX of its inputs into a `QuantizedWeight`. A `QuantizedWeight` is a general container:
named tensors plus a JSON-able `spec` that tells its storage `format` how to turn them back into a dense weight (or
how to run the matmul directly). New methods add a format with `register_format` and need no change elsewhere.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lqtk.errors import LqtkError
from lqtk.kernels.dispatch import kernel_linear


class WeightFormat:
    """How a stored weight is decoded. Subclasses set `name` and implement `dequantize`; `linear` may be
    overridden by formats that transform activations too (incoherence processing, activation quantization)."""

    name: str

    def dequantize(self, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict, bias: torch.Tensor | None,
               cache: Callable[[str, Callable], object] | None = None) -> torch.Tensor:
        """x Ŵᵀ + b: by a kernel reading the stored tensors where one applies (lqtk.kernels.dispatch), else by
        decoding Ŵ. `cache(name, decode)`, the layer's, returns decode()'s result kept under `name` while its tensors
        do not change (calibration and evaluation run many batches through a frozen layer); formats that wrap
        another pass it on to the inner format's `linear`."""
        y = kernel_linear(self.name, x, tensors, spec, cache)
        if y is not None:
            return y if bias is None else y + bias
        decode = functools.partial(self.dequantize, tensors, spec)
        return F.linear(x, (cache("weight", decode) if cache else decode()).to(x.dtype), bias)

    def nearest_codes(self, tensors: dict[str, torch.Tensor], spec: dict, target: torch.Tensor, max_change: float,
                      beam_size: int) -> dict[str, torch.Tensor]:
        """All integer tensors, re-chosen with the floating ones fixed to bring the decoded weight nearer to the
        dense `target` in squared error, changing at most a `max_change` fraction of the code units (PV-tuning's V
        step). Formats without a code search leave this out."""
        raise NotImplementedError


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


class WeightQuantizer:
    """Base of all quantization methods (a config object; subclasses are dataclasses)."""

    #: whether `quantize` needs the calibration Hessian (RTN does not; the phase then skips collecting it)
    needs_hessian: bool = True
    #: how many rows of a layer's calibration inputs `quantize_shared` wants besides H (activation quantization
    #: calibrates on them); 0: none are kept
    input_sample_rows: int = 0

    def check_fits(self, shape: tuple[int, int]) -> None:
        """Raise an LqtkError proposing a setting that fits if this method cannot encode an (O, I) weight. The phase
        checks every layer before it starts, so a bad setting fails in seconds, not after hours of calibration."""

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None,
                 progress: Callable[[str], None] | None = None) -> QuantizedWeight:
        """`progress(status)` is called by long-running methods to say where they are (shown by the phase)."""
        raise NotImplementedError

    def quantize_shared(self, weights: list[torch.Tensor], hessian: torch.Tensor | None,
                        progress: Callable[[str], None] | None = None,
                        inputs: torch.Tensor | None = None) -> list[QuantizedWeight]:
        """Quantize Linears that read the same input, hence share `hessian` (q/k/v, gate/up). One by one here;
        methods whose rows are independent given H override it to quantize them stacked, in one pass. `inputs`
        (n, I): a sample of the calibration inputs, for methods with `input_sample_rows`."""
        return [self.quantize(weight, hessian, progress) for weight in weights]


class HessianAccumulator:
    """H = 2/n · Σ xxᵀ over a layer's n calibration inputs x (the mean, not the sum, keeps H's scale independent of
    the number of tokens), summed pairwise over the calibration batches by their index in the whole calibration
    set: node (level, k) holds the sum over batches [k·2^level, (k+1)·2^level), and two sibling nodes are added,
    left + right, as soon as both exist. Every node's value is then fixed by the batches alone, not by which
    process summed which batches or in what order nodes arrive, so processes that each sum a contiguous share of
    the batches and `merge` their nodes get bit for bit the H of one process (and pairwise sums are more accurate
    than running ones). Holds about log2(batches) + 1 (features × features) nodes. H is symmetric, so only its
    upper triangle is accumulated, in row panels (about 40% fewer FLOPs than xᵀx); `hessian()` mirrors it.

    With `sample_rows` > 0 it also keeps up to that many evenly strided input rows of each batch (on the CPU), which
    `sample()` returns in batch order, so they too do not depend on how batches were shared out."""

    panels = 8

    def __init__(self, features: int, device: torch.device | str | None = None, sample_rows: int = 0):
        self.features, self.device, self.sample_rows = features, device, sample_rows
        self.nodes: dict[tuple[int, int], torch.Tensor] = {}  # (level, k) -> Σ over its batches (upper triangle)
        self.leaf: tuple[int, torch.Tensor] | None = None  # the batch being added to: (index, Σ so far)
        self.samples: dict[int, torch.Tensor] = {}  # batch -> its sampled input rows
        self.count = 0

    def add(self, x: torch.Tensor, batch: int = 0) -> None:
        """Add inputs x (..., features) of calibration batch `batch` (its index among all calibration batches; a
        batch may come in several parts, e.g. an MoE expert's tokens)."""
        x = x.reshape(-1, x.shape[-1]).float()
        if self.leaf is not None and self.leaf[0] != batch:
            self._close_leaf()
        if self.leaf is None:
            self.leaf = (batch, torch.zeros(self.features, self.features, device=self.device))
        upper, width = self.leaf[1], -(-x.shape[1] // self.panels)
        for i in range(0, x.shape[1], width):
            upper[i:i + width, i:].addmm_(x[:, i:i + width].T, x[:, i:], alpha=2)
        self.count += x.shape[0]
        if self.sample_rows:
            rows = x[::max(1, x.shape[0] // self.sample_rows)][:self.sample_rows].cpu()
            self.samples[batch] = torch.cat([self.samples[batch], rows]) if batch in self.samples else rows

    def _close_leaf(self) -> None:
        """The batch being added to is complete: it becomes node (0, batch)."""
        if self.leaf is not None:
            self._insert(0, *self.leaf)
            self.leaf = None

    def _insert(self, level: int, k: int, total: torch.Tensor) -> None:
        while (level, k ^ 1) in self.nodes:
            sibling = self.nodes.pop((level, k ^ 1))
            total = sibling.add_(total) if k & 1 else total.add_(sibling)  # always left + right
            level, k = level + 1, k >> 1
        self.nodes[(level, k)] = total

    def partial(self) -> tuple[dict[tuple[int, int], torch.Tensor], int, dict[int, torch.Tensor]]:
        """This accumulator's nodes, count and samples, to be `merge`d into another's (another process's)."""
        self._close_leaf()
        return self.nodes, self.count, self.samples

    def merge(self, nodes: dict[tuple[int, int], torch.Tensor], count: int,
              samples: dict[int, torch.Tensor] | None = None) -> None:
        """Add another accumulator's `partial()` (of other batches)."""
        self.partial()
        for (level, k), total in nodes.items():
            self._insert(level, k, total.to(self.device))
        self.count += count
        self.samples.update(samples or {})

    def sample(self) -> torch.Tensor | None:
        """The sampled input rows (n, features) of all batches, in batch order; None without sampling."""
        return torch.cat([self.samples[batch] for batch in sorted(self.samples)]) if self.samples else None

    def hessian(self) -> torch.Tensor:
        """H from the nodes, added in batch order; zeros when nothing was added."""
        nodes = self.partial()[0]
        if not nodes:
            return torch.zeros(self.features, self.features, device=self.device)
        first, *rest = (nodes[key] for key in sorted(nodes, key=lambda key: key[1] << key[0]))
        upper = first.triu()  # a new tensor: the nodes stay as they are
        for node in rest:
            upper.add_(node)
        upper.triu_().div_(self.count)
        return upper.add_(upper.triu(1).T)  # mirrored in place: 3 (features x features) tensors at the peak, not 4


def check_finite(weight: torch.Tensor, name: str) -> None:
    if not torch.isfinite(weight).all():
        raise LqtkError(f"{name} has NaN/Inf weights: the model is corrupt or was saved after a diverged run")

"""The interface every quantization method implements, and the Hessian it calibrates on.

A method is a `WeightQuantizer`: a config object whose `quantize(weight, hessian)` turns a dense (O, I) weight and
the calibration Hessian H = XᵀX of its inputs into a `QuantizedWeight` of the storage format it declares
(`format`, a name in `lqtk.formats.FORMATS`). A new method with a new format adds the format to `lqtk.formats`.
"""

from collections.abc import Callable

import torch

from lqtk.formats import QuantizedWeight


class WeightQuantizer:
    """Base of all quantization methods (a config object; subclasses are dataclasses)."""

    #: whether `quantize` needs the calibration Hessian (RTN does not; the phase then skips collecting it)
    needs_hessian: bool = True
    #: the storage format its `QuantizedWeight`s are in (a name in lqtk.formats.FORMATS)
    format: str
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

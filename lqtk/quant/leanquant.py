"""LeanQuant: loss-error-aware grids for GPTQ's error feedback (Zhang & Shrivastava 2024, "LeanQuant: Accurate and
Scalable LLM Quantization with Loss-Error-Aware Grid", https://arxiv.org/abs/2407.10032).

Quantizing weight j of a row with GPTQ costs (w_j − q_j)² / d_j², d_j the j-th diagonal entry of the upper Cholesky
factor of H⁻¹ (GPTQ's `U[j, j]`): inputs with a small d_j are expensive to get wrong. A min/max grid ignores this and
spends its levels on outliers that may be cheap. LeanQuant places the grid where the loss error is, weighting each
column by d_j^(−p) (p = 4 sharpens the weighting towards the expensive columns):
- non-uniform: per output row, 2^b levels fitted by weighted k-means on the row's weights, once before the walk;
  codes index a per-row table (the `lut` format);
- affine: per group, the (scale, zero) whose weighted rounding error is least (the shrunk-range search of the `mse`
  observer, with these weights and squared error).
The k-means runs on all rows of a layer at once: levels are kept sorted, so a weight's nearest level is a binary
search among the midpoints, and the update is a scatter-add.
"""

from dataclasses import dataclass
from typing import Literal

import torch

from lqtk.errors import LqtkError
from lqtk.formats import LUTFormat, QuantizedWeight
from lqtk.formats.lut import nearest_level
from lqtk.formats.packing import pack_bits
from lqtk.quant.gptq import GPTQ


def weighted_kmeans(w: torch.Tensor, weight: torch.Tensor, levels: int, iters: int = 100) -> torch.Tensor:
    """Ascending levels (O, K) minimizing Σ_j weight_j (w_oj − level(w_oj))² for every row o of `w` (O, n) at once.
    Starts from K evenly spaced levels between the row's min and max (as LeanQuant at 2-3 bits); a level that
    loses all its weights keeps its place, so a row with fewer distinct values than levels stays finite."""
    w = w.float()
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    centers = lo + (hi - lo) * torch.linspace(0, 1, levels, device=w.device)
    weight = weight.float().expand_as(w)
    for _ in range(iters):
        assign = nearest_level(w, centers)
        mass = torch.zeros_like(centers).scatter_add_(1, assign, weight)
        total = torch.zeros_like(centers).scatter_add_(1, assign, weight * w)
        updated = torch.where(mass > 0, total / mass.clamp(min=torch.finfo(mass.dtype).tiny), centers)
        updated = updated.sort(1).values
        if torch.equal(updated, centers):
            break
        centers = updated
    return centers


@dataclass
class LeanQuant(GPTQ):
    """GPTQ with a loss-error-aware grid: per-row non-uniform levels, or affine groups."""

    method = "leanquant"
    group_size: int | None = None
    """Input columns per scale/zero group of the affine grid (the nonuniform grid has one table per row: null)."""
    grid: Literal["nonuniform", "affine"] = "nonuniform"
    """`nonuniform`: a table of 2^bits levels per row (group_size must be null); `affine`: GPTQ's grid with the
    scale search weighted by the loss error (set observer: mse)."""
    exponent: float = 4.0
    """p in the column weights d_j^(−p) (0: plain k-means / unweighted search)."""
    kmeans_iters: int = 100
    """Upper bound on the k-means iterations (it stops when no level moves)."""

    def __post_init__(self):
        super().__post_init__()
        if self.exponent < 0:
            raise LqtkError(f"LeanQuant: exponent={self.exponent} must be >= 0 (it weights the columns by "
                            "d^(-exponent); 0 is unweighted)")
        if self.grid == "affine" and self.observer != "mse":
            raise LqtkError("LeanQuant's affine grid searches the scale that minimizes the loss error: set "
                            f"observer: mse (not {self.observer!r})")
        if self.grid == "nonuniform" and self.group_size is not None:
            raise LqtkError(f"LeanQuant's nonuniform grid is one table per row: set group_size null "
                            f"(not {self.group_size})")

    @property
    def format(self) -> str:
        return LUTFormat.name if self.grid == "nonuniform" else super().format

    def column_importance(self, hessian, inverse_cholesky):
        d = inverse_cholesky.diagonal()
        return (d / d.min()).pow(-self.exponent)  # scaled to at most 1: d^(-4) overflows fp32 for small d

    def fit_grid(self, w, importance):
        if self.grid == "affine":
            return super().fit_grid(w, importance)
        return weighted_kmeans(w, importance, 2**self.bits, self.kmeans_iters).half().float()

    def round_to_grid(self, column, grid, index):
        if self.grid == "affine":
            return super().round_to_grid(column, grid, index)
        q = nearest_level(column[:, None], grid)[:, 0]
        return q, grid.gather(1, q[:, None])[:, 0]

    def pack_grids(self, method, codes, grids):
        if self.grid == "affine":
            return super().pack_grids(method, codes, grids)
        levels, = grids
        tensors = {"qweight": pack_bits(codes, self.bits), "levels": levels.half()}
        return QuantizedWeight(method, LUTFormat.name, {"bits": self.bits, "shape": list(codes.shape)}, tensors)


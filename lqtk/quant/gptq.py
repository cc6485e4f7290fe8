"""GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323, Algorithm 1) with lazy block updates,
act-order and static groups.

Columns are quantized one at a time; each column's rounding error is spread over the columns not yet quantized
through the upper Cholesky factor U of H⁻¹, which minimises ||(W - Q) X||² given H = XᵀX. With act-order the
columns are visited by decreasing diag(H), but groups stay in the original column order (so the stored format
needs no g_idx): a group's scale and zero are fixed when the walk first reaches one of its columns, from that
group's weights as updated so far.

Without act-order this loop is also QuIP's LDLQ (Chee et al. 2023, https://arxiv.org/abs/2307.13304, Theorem 6):
Ŵ = Q(W + (W − Ŵ) Ù) with H = (Ù + I) D (Ù + I)ᵀ, Ù strictly upper triangular, is the same rounding, because
column k's feedback U[k, k:] / U[k, k] is row k of (Ù + I)⁻¹ (tests/test_quip_leanquant.py checks the codes agree).
The grid is the config's (`fit_grid`, `round_to_grid`): affine here, LeanQuant's in `leanquant.py`.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lqtk.errors import LqtkError
from lqtk.formats import QuantizedWeight
from lqtk.quant.affine import AffineQuantizer
from lqtk.quant.base import WeightQuantizer
from lqtk.quant.primitives import group_starts


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, damp_increment: float, max_damp: float = 1.0):
    """Upper-triangular U with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H). A non positive-definite H raises the
    damping by `damp_increment` and retries (with a warning) up to `max_damp`.

    U is the inverse of the upper factor R of H = R Rᵀ, which is the Cholesky factor of H in reversed index order:
    one Cholesky and one triangular inverse, without forming H⁻¹ (3-4x faster than inverting then factoring)."""
    mean_diag = hessian.diagonal().mean()
    while damp <= max_damp:
        damped = hessian.flip(0, 1)  # a copy, in reversed index order (the diagonal stays the diagonal)
        damped.diagonal().add_(damp * mean_diag)
        reversed_lower, info = torch.linalg.cholesky_ex(damped)
        del damped  # (I, I) matrices are the largest tensors of a wide layer: no more of them at once than needed
        if info == 0:
            upper = reversed_lower.flip(0, 1)
            del reversed_lower
            eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
            return torch.linalg.solve_triangular(upper, eye, upper=True)
        warnings.warn(f"GPTQ: Hessian is not positive definite with damp={damp:.3f}; retrying with more damping")
        damp += damp_increment
    raise LqtkError(
        f"GPTQ: the Hessian stays singular up to damp={max_damp}: the calibration inputs of this layer are "
        "degenerate (constant or too few tokens); use more or more varied calibration windows"
    )


@dataclass
class ErrorFeedback(WeightQuantizer):
    """GPTQ's walk over the columns, on the grid a subclass brings: `column_importance`, `fit_grid`,
    `round_to_grid` and `pack_grids` (`AffineQuantizer`'s are the reference), and `group_size`, the input columns
    that share a grid. A grid of vectors (`vector_size` > 1 consecutive columns rounded together,
    `round_vector_to_grid`) is walked a vector at a time, as QuIP#'s block LDLQ: the vector is rounded from the
    weights updated by every column before it, then each of its columns' errors is fed forward."""

    vector_size = 1

    act_order: bool = True
    """Quantize columns by decreasing Hessian diagonal (the most sensitive inputs first)."""
    block_size: int = 128
    """Columns per lazy batch update (speed only; the result does not depend on it)."""
    damp: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    damp_increment: float = 0.01
    """How much `damp` grows on each retry when the damped Hessian is still not positive definite."""

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None, progress=None) -> QuantizedWeight:
        return self.quantize_shared([weight], hessian, progress)[0]

    def quantize_shared(self, weights: list[torch.Tensor], hessian: torch.Tensor | None,
                        progress=None, inputs=None) -> list[QuantizedWeight]:
        """Rows are quantized independently given H (codes and grids of a row depend on that row alone), so Linears
        sharing H go through one walk over their stacked rows: one factorization and one column loop, not one each."""
        if hessian is None:
            raise ValueError(f"{type(self).__name__} needs the calibration Hessian of the layer's inputs")
        codes, grids = gptq_quantize(torch.cat(weights), hessian, self)
        quantized, start = [], 0
        for weight in weights:
            rows = slice(start, start + weight.shape[0])
            start = rows.stop
            quantized.append(self.pack_grids(self.method, codes[rows], [grid_rows(grid, rows) for grid in grids]))
        return quantized


@dataclass
class GPTQ(ErrorFeedback, AffineQuantizer):
    """GPTQ on the affine grid of `AffineQuantizer` (subclasses bring other grids)."""

    method = "gptq"


def grid_rows(grid, rows: slice):
    """The part of a group's grid (a tensor, or a tuple of tensors, with one row per output row) for `rows`."""
    return grid[rows] if isinstance(grid, torch.Tensor) else tuple(t[rows] for t in grid)


@contextmanager
def cpu_threads(count: int):
    """Run the body with `count` intra-op CPU threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: ErrorFeedback):
    """Quantize weight (O, I) given H (I, I) on the config's grid. Returns codes (O, I) and the grid of each group.
    The column loop issues thousands of tiny ops on one thread: with several, their synchronisation costs more than
    the work (10-50x slower when the cores are shared with another process). A group's grid search (whole (O, n)
    tensors) gets them all back."""
    threads = torch.get_num_threads()
    with cpu_threads(1):
        return _gptq_loop(weight, hessian, config, threads)


def walk_order(diagonal: torch.Tensor, act_order: bool, vector_size: int) -> torch.Tensor:
    """The columns in walk order: by decreasing Hessian diagonal with act-order (whole vectors of `vector_size`
    columns by their sum, each vector's columns in order), else in order."""
    if not act_order:
        return torch.arange(len(diagonal))
    if vector_size == 1:
        return torch.argsort(diagonal, descending=True)
    vectors = torch.argsort(diagonal.reshape(-1, vector_size).sum(1), descending=True)
    return (vectors[:, None] * vector_size + torch.arange(vector_size)).reshape(-1)


def _gptq_loop(weight: torch.Tensor, hessian: torch.Tensor, config: ErrorFeedback, grid_threads: int):
    out_features, in_features = weight.shape
    diagonal = hessian.diagonal().float()
    dead = diagonal == 0  # inputs that were always zero: any value is exact, make them 0
    perm = walk_order(diagonal.masked_fill(dead, 1), config.act_order, config.vector_size)
    W, H, dead = weight.float()[:, perm], hessian.float()[perm[:, None], perm], dead[perm]  # copies, walk order
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_cholesky(H, config.damp, config.damp_increment)
    position = torch.argsort(perm)  # original column -> its place in the walk
    importance = config.column_importance(H, U)[position]

    starts = group_starts(in_features, config.group_size)
    bounds = list(zip(starts, starts[1:] + [in_features]))
    original = perm.tolist()  # walk position -> original column
    group_of = [column // bounds[0][1] for column in original]  # every group but the last is bounds[0][1] wide
    grids = [None] * len(bounds)
    codes = torch.zeros(in_features, out_features, dtype=torch.uint8)  # bits <= 8

    for i1 in range(0, in_features, config.block_size):
        i2 = min(i1 + config.block_size, in_features)
        W1 = W[:, i1:i2].T.contiguous()  # the block's columns as contiguous rows: the loop reads and updates them
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            g = group_of[j]
            if grids[g] is None:
                # The group's columns are all still ahead of the walk; bring them up to date with the errors
                # of this block so far (the lazy update has not reached W yet) and fix the group's grid.
                start, end = bounds[g]
                cols = position[start:end]
                group = W[:, cols] - Err1[:i].T @ U[i1:j, cols]
                with cpu_threads(grid_threads):
                    grids[g] = config.fit_grid(group, importance[start:end])
            if config.vector_size == 1:
                q, value = config.round_to_grid(W1[i], grids[g], original[j] - bounds[g][0])
            else:
                if j % config.vector_size == 0:  # a vector's first column: round the whole vector
                    vector = slice(i, i + config.vector_size)
                    vector_codes, vector_values = config.round_vector_to_grid(
                        W1[vector], grids[g], original[j] - bounds[g][0], U.diagonal()[i1:i2][vector] ** -2)
                q, value = vector_codes[j % config.vector_size], vector_values[j % config.vector_size]
            codes[j] = q
            err = (W1[i] - value) / U[j, j]
            W1[i:] -= U[j, j:i2, None] * err
            Err1[i] = err
        W[:, i2:] -= Err1.T @ U[i1:i2, i2:]

    return codes[position].T.contiguous(), grids

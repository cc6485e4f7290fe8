"""How the scalar methods (RTN, GPTQ) choose an affine grid: the supported schemes, the groups of a row, and the
observers that pick each group's scale and zero point (the grid itself: `lqtk.formats.affine`).

A weight row is cut into groups of `group_size` input columns (the last group of a row is shorter when
`group_size` does not divide the input dim, as in GPTQ's reference code). Each group has a scale and an
integer zero point:  w ≈ (q - zero) * scale,  q in [0, 2**bits - 1].
"""

import torch

from lqtk.errors import LqtkError
from lqtk.formats.affine import fake_quantize, range_qparams

SUPPORTED_BITS = (2, 3, 4, 8)


def check_scheme(bits: int, group_size: int | None) -> None:
    if bits not in SUPPORTED_BITS:
        raise LqtkError(f"unsupported bits={bits}: choose one of {SUPPORTED_BITS}")
    if group_size is not None and group_size < 1:
        raise LqtkError(f"group_size={group_size} must be >= 1, or null for one group per output channel")


def group_starts(in_features: int, group_size: int | None) -> list[int]:
    """First column of each group; the last group may be shorter (576 = 4x128 + 64 gives 5 groups)."""
    step = in_features if group_size is None else group_size
    return list(range(0, in_features, step))


def minmax_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` (O, n) covering the row's range; both (O, 1) fp32."""
    return range_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), bits, symmetric)


def mse_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    importance: torch.Tensor | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale search: shrink the min/max range by factors 1, 1-1/grid, ... and keep, per row, the range whose
    rounding error sum_j importance_j |q(w_j) - w_j|^norm is least (GPTQ/GPTQModel `mse`, llm-compressor's MSE
    observer). `importance` (n,) weights the columns, e.g. diag(H) so the error is measured where the inputs are."""
    wmin, wmax = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    best_scale, best_zero = range_qparams(wmin, wmax, bits, symmetric)
    best_err = torch.full_like(best_scale, float("inf"))
    for i in range(int(max_shrink * grid) + 1):
        shrink = 1 - i / grid
        # the range of w·shrink is shrink·[wmin, wmax] exactly (multiplying by a positive number keeps the order)
        scale, zero = range_qparams(wmin * shrink, wmax * shrink, bits, symmetric)
        err = fake_quantize(w, scale, zero, bits).sub_(w).abs_().pow_(norm)  # in place: one temporary, not five
        if importance is not None:
            err.mul_(importance)
        err = err.sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero

"""The config shared by the scalar methods that write the `affine` format (RTN, GPTQ): bits, groups, the observer."""

from dataclasses import dataclass
from typing import Literal

import torch

from lqtk.formats import AffineFormat, QuantizedWeight
from lqtk.formats.affine import quantize_affine
from lqtk.formats.packing import pack_bits
from lqtk.quant.base import WeightQuantizer
from lqtk.quant.primitives import check_scheme, minmax_qparams, mse_qparams


@dataclass
class AffineQuantizer(WeightQuantizer):
    """Integer grid per group of input columns (config shared by RTN and GPTQ)."""

    format = AffineFormat.name

    bits: int = 4
    """Bits per weight code: 2, 3, 4 or 8."""
    group_size: int | None = 128
    """Input columns per scale/zero group (null: one group per output channel). A shorter last group covers the
    remainder when it does not divide the input dim."""
    symmetric: bool = False
    """Symmetric grid with the zero point fixed at 2^(bits-1) (not stored), or asymmetric with a stored zero."""
    observer: Literal["minmax", "mse"] = "minmax"
    """How a group's range is chosen: its min/max, or a search over shrunk ranges for the least error."""
    mse_grid: int = 100
    """Scale search: number of shrink steps between 1 and 0."""
    mse_max_shrink: float = 0.8
    """Scale search: largest fraction of the range that may be cut."""
    mse_norm: float = 2.4
    """Scale search: error exponent |q(w) - w|^norm (2.4 as GPTQ's reference and GPTQModel)."""

    def __post_init__(self):
        check_scheme(self.bits, self.group_size)

    def qparams(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero of each row of the group `w` (O, n). Scales are rounded to fp16, the storage dtype, here,
        so that what the algorithm sees is exactly what the export decodes."""
        if self.observer == "mse":
            args = (self.mse_grid, self.mse_max_shrink, self.mse_norm)
            scale, zero = mse_qparams(w, self.bits, self.symmetric, importance, *args)
        else:
            scale, zero = minmax_qparams(w, self.bits, self.symmetric)
        return scale.half().float(), zero

    # The grid interface of GPTQ's error-feedback loop (other grids, e.g. LeanQuant's, override these four).
    def column_importance(self, hessian: torch.Tensor, inverse_cholesky: torch.Tensor) -> torch.Tensor:
        """Weight of each input column (I,) in a group's scale search: diag(H), where the inputs are large."""
        return hessian.diagonal()

    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid of a group `w` (O, n): its scale and zero (O, 1)."""
        return self.qparams(w, importance)

    def round_to_grid(self, column: torch.Tensor, grid, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (O,) of a column (O,), the `index`-th of its group, on the group's grid, and their values."""
        scale, zero = grid[0][:, 0], grid[1][:, 0]
        q = quantize_affine(column, scale, zero, self.bits)
        return q.long(), (q - zero) * scale

    def pack_grids(self, method: str, codes: torch.Tensor, grids: list) -> QuantizedWeight:
        """Store codes (O, I) and the grid of each group."""
        scales, zeros = zip(*grids)
        return self.pack(method, codes, torch.cat(scales, 1), torch.cat(zeros, 1).long())

    def pack(self, method: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> QuantizedWeight:
        """Store codes (O, I), scales (O, G) and zeros (O, G) in the `affine` format."""
        tensors = {"qweight": pack_bits(codes, self.bits), "scales": scales.half()}
        if not self.symmetric:
            tensors["zeros"] = pack_bits(zeros, self.bits)
        spec = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "shape": list(codes.shape)}
        return QuantizedWeight(method, AffineFormat.name, spec, tensors)

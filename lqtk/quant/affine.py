"""The `affine` storage format (integer codes, per-group scale and zero point) and the config shared by the
scalar methods that produce it (RTN, GPTQ)."""

from dataclasses import dataclass
from typing import Literal

import torch

from lqtk.quant.base import QuantizedWeight, WeightFormat, WeightQuantizer, largest_gains, register_format
from lqtk.quant.primitives import (
    check_scheme,
    decode_by_rows,
    minmax_qparams,
    mse_qparams,
    pack_bits,
    quantize_affine,
    unpack_bits,
)


@register_format
class AffineFormat(WeightFormat):
    """w[o, i] = (q[o, i] - zero[o, g(i)]) · scale[o, g(i)],  g(i) = i // group_size.

    tensors: `qweight` int32 (O, ceil(I·b/32)), codes packed densely along the input dim;
             `scales` fp16 (O, G); `zeros` int32 (O, ceil(G·b/32)) packed zero points, asymmetric only
             (symmetric zero points are 2^(b-1) and not stored).
    spec: bits, group_size (null = one group per row), symmetric, shape [O, I]."""

    name = "affine"

    def dequantize(self, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
        def decode(rows):
            q = unpack_bits(rows["qweight"], spec["bits"], spec["shape"][1])
            scale, zero = self.per_weight(rows, spec, q)
            return (q - zero) * scale
        return decode_by_rows(decode, tensors, spec["shape"])

    def nearest_codes(self, tensors, spec, target, max_change, beam_size):
        """Each weight's nearest grid point is found by rounding; the weights whose change gains most are taken."""
        bits, (_, in_features) = spec["bits"], spec["shape"]
        q = unpack_bits(tensors["qweight"], bits, in_features)
        scale, zero = self.per_weight(tensors, spec, q)
        current = (q - zero) * scale
        proposed = torch.clamp(torch.round(target / scale) + zero, 0, 2**bits - 1)
        gain = (current - target).square() - ((proposed - zero) * scale - target).square()
        q = torch.where(largest_gains(gain, max_change), proposed.to(q.dtype), q)
        return {name: t for name, t in tensors.items() if not t.is_floating_point()} | {"qweight": pack_bits(q, bits)}

    def per_weight(self, tensors, spec, q):
        """Scale and zero point of every weight (O, I)."""
        bits, (_, in_features) = spec["bits"], spec["shape"]
        scales = tensors["scales"].float()
        if "zeros" in tensors:
            zeros = unpack_bits(tensors["zeros"], bits, scales.shape[1])
        else:
            zeros = torch.full_like(scales, 2 ** (bits - 1))
        group = torch.arange(in_features, device=q.device) // (spec["group_size"] or in_features)
        return scales[:, group], zeros[:, group]


@dataclass
class AffineQuantizer(WeightQuantizer):
    """Integer grid per group of input columns (config shared by RTN and GPTQ)."""

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

    def round_to_grid(self, column: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (O,) of a column (O,) on its group's grid, and their values."""
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

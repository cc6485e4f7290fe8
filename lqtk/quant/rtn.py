"""Round-to-nearest: each group's grid from its own weights, no calibration data."""

from dataclasses import dataclass

import torch

from lqtk.formats import QuantizedWeight
from lqtk.formats.affine import quantize_affine
from lqtk.quant.affine import AffineQuantizer
from lqtk.quant.primitives import group_starts


@dataclass
class RTN(AffineQuantizer):
    """Round-to-nearest weight quantization."""

    needs_hessian = False

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None, progress=None) -> QuantizedWeight:
        w = weight.float()
        in_features = w.shape[1]
        codes, grids = torch.empty_like(w, dtype=torch.int64), []
        starts = group_starts(in_features, self.group_size)
        for start, end in zip(starts, starts[1:] + [in_features]):
            scale, zero = self.qparams(w[:, start:end])
            codes[:, start:end] = quantize_affine(w[:, start:end], scale, zero, self.bits)
            grids.append((scale, zero))
        return self.pack_grids("rtn", codes, grids)

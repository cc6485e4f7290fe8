"""The `lut` storage format: integer codes indexing a table of levels per output row (LeanQuant's non-uniform grid)."""

import torch

from lqtk.formats.base import WeightFormat, largest_gains, register_format
from lqtk.formats.packing import decode_by_rows, pack_bits, unpack_bits


@register_format
class LUTFormat(WeightFormat):
    """w[o, i] = levels[o, q[o, i]].

    tensors: `qweight` int32 (O, ceil(I·b/32)) packed codes; `levels` fp16 (O, 2^b), each row's table, ascending.
    spec: bits, shape [O, I]."""

    name = "lut"

    def dequantize(self, tensors, spec):
        return decode_by_rows(lambda rows: rows["levels"].float().gather(
            1, unpack_bits(rows["qweight"], spec["bits"], spec["shape"][1])), tensors, spec["shape"])

    def nearest_codes(self, tensors, spec, target, max_change, beam_size):
        """Each weight's nearest level of its row; the weights whose change gains most are taken."""
        levels = tensors["levels"].float()
        q = unpack_bits(tensors["qweight"], spec["bits"], spec["shape"][1])
        proposed = nearest_level(target, levels)
        gain = (levels.gather(1, q) - target).square() - (levels.gather(1, proposed) - target).square()
        q = torch.where(largest_gains(gain, max_change), proposed, q)
        return {"qweight": pack_bits(q, spec["bits"])}


def nearest_level(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (O, n) of the nearest of each row's ascending `levels` (O, K) for the weights `w` (O, n)."""
    midpoints = (levels[:, 1:] + levels[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), w.contiguous())

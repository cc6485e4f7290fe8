"""Quantization methods: the producers of `lqtk.formats`, as pure tensor code (no Lightning, no I/O). Each is a
config dataclass whose `quantize` turns a weight and its calibration Hessian into a `QuantizedWeight` of the format
it declares (`format`)."""

from lqtk.quant.affine import AffineQuantizer
from lqtk.quant.agile_quant import AgileQuant
from lqtk.quant.aqlm import AQLM
from lqtk.quant.base import HessianAccumulator, WeightQuantizer
from lqtk.quant.ggml import GGML
from lqtk.quant.gptq import GPTQ
from lqtk.quant.leanquant import LeanQuant
from lqtk.quant.quip import QuIP
from lqtk.quant.rtn import RTN

__all__ = ["AQLM", "AffineQuantizer", "AgileQuant", "GGML", "GPTQ", "HessianAccumulator", "LeanQuant", "QuIP", "RTN",
           "WeightQuantizer"]

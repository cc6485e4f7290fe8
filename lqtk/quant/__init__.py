"""Quantization methods as pure tensor code: no Lightning, no I/O."""

from lqtk.quant.activations import ActivationQuantizedFormat, AgileQuant
from lqtk.quant.affine import AffineFormat, AffineQuantizer
from lqtk.quant.aqlm import AQLM, AQLMFormat
from lqtk.quant.base import FORMATS, HessianAccumulator, QuantizedWeight, WeightFormat, WeightQuantizer
from lqtk.quant.gptq import GPTQ
from lqtk.quant.incoherence import IncoherentFormat, QuIP
from lqtk.quant.leanquant import LeanQuant, LUTFormat
from lqtk.quant.rtn import RTN

__all__ = [
    "AQLM", "ActivationQuantizedFormat", "AgileQuant", "FORMATS", "GPTQ", "RTN", "AQLMFormat", "AffineFormat",
    "AffineQuantizer", "IncoherentFormat",
    "LUTFormat", "LeanQuant", "QuIP", "QuantizedWeight", "WeightFormat", "WeightQuantizer", "HessianAccumulator",
]

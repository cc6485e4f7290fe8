"""Storage formats of quantized weights: how an export stores a Linear's weight and how it is decoded. The ground
floor of lqtk (nothing above it is imported here), so loading and running a quantized model needs no calibration
code. One file per format; importing this package registers them all in `FORMATS`."""

from lqtk.formats.act_quant import ActivationQuantizedFormat
from lqtk.formats.affine import AffineFormat
from lqtk.formats.aqlm import AQLMFormat
from lqtk.formats.base import FORMATS, QuantizedWeight, WeightFormat, decoded_matmul, register_format, storage_bits
from lqtk.formats.ggml import GGMLFormat
from lqtk.formats.incoherent import IncoherentFormat
from lqtk.formats.lut import LUTFormat

__all__ = ["AQLMFormat", "ActivationQuantizedFormat", "AffineFormat", "FORMATS", "GGMLFormat", "IncoherentFormat",
           "LUTFormat", "QuantizedWeight", "WeightFormat", "decoded_matmul", "register_format", "storage_bits"]

from lqtk.nn.quantized_linear import QuantizedLinear, set_submodule

__all__ = ["QuantizedLinear", "set_submodule"]

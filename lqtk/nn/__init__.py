from lqtk.nn.quantized_linear import (
    QuantizedLinear,
    quantized_layers,
    quantized_linear_from_config,
    quantized_matmul,
    set_submodule,
)

__all__ = ["QuantizedLinear", "quantized_layers", "quantized_linear_from_config", "quantized_matmul", "set_submodule"]

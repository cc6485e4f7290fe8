"""Fast matmul kernels for quantized weight formats."""

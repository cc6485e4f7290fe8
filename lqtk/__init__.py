"""lqtk: quantize causal language models to 2-4 bits per weight with PyTorch Lightning."""

from lqtk import transformers_quantizer  # noqa: F401  (registers quant_method "lqtk": transformers loads lqtk exports)

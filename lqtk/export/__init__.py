from lqtk.export.callback import ExportQuantized
from lqtk.model_format import bits_per_weight, load_quantized, save_quantized

__all__ = ["ExportQuantized", "bits_per_weight", "load_quantized", "save_quantized"]

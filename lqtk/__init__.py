"""lqtk: quantize causal language models to 2-4 bits per weight with PyTorch Lightning.

    import lqtk
    from lqtk.quant import GPTQ

    export = lqtk.quantize("tiny-llama", GPTQ(bits=4, group_size=128), output_dir="runs/x")   # see lqtk.api
    model = lqtk.load(export)

`import lqtk` stays light: it registers the "lqtk" quant_method with transformers (so that
`AutoModelForCausalLM.from_pretrained` loads lqtk exports) and loads `lqtk.api` (and with `quantize`, Lightning and
the calibration side) only when `quantize` or `load` is first used."""

import importlib

from lqtk import transformers_quantizer  # noqa: F401  (registers quant_method "lqtk": transformers loads lqtk exports)

__all__ = ["load", "quantize"]
LAZY = {"load": "lqtk.api", "quantize": "lqtk.api"}  # name → module defining it, imported on first use (PEP 562)


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'lqtk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

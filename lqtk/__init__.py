"""lqtk: quantize causal language models to 2-4 bits per weight with PyTorch Lightning.

    import lqtk
    from lqtk.quant import GPTQ

    export = lqtk.quantize("tiny-llama", GPTQ(bits=4, group_size=128), output_dir="runs/x")   # see lqtk.api
    model = lqtk.load(export)

`import lqtk` stays light (the `lqtk` command answers `--help` without loading torch): it registers lqtk's exports
with transformers (lqtk.transformers_quantizer, so that `AutoModelForCausalLM.from_pretrained` loads them) as soon as
transformers is imported, before or after lqtk, and loads `lqtk.api` (and with `quantize`, Lightning and the
calibration side) only when `quantize` or `load` is first used."""

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["load", "quantize"]
LAZY = {"load": "lqtk.api", "quantize": "lqtk.api"}  # name → module defining it, imported on first use (PEP 562)


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'lqtk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports lqtk.transformers_quantizer right after the `transformers` package itself is imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                importlib.import_module("lqtk.transformers_quantizer")

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    importlib.import_module("lqtk.transformers_quantizer")
else:
    sys.meta_path.insert(0, RegisterWithTransformers())

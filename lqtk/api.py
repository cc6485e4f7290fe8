"""lqtk from Python, one verb each way: `quantize` a model folder into a verified export, `load` an export.

    import lqtk
    from lqtk.quant import GPTQ

    export = lqtk.quantize("tiny-llama", GPTQ(bits=4, group_size=128), output_dir="runs/api")  # runs/api/model
    model = lqtk.load(export)                   # a transformers causal LM with lqtk's QuantizedLinear layers

`quantize` runs what `lqtk fit --config <a calibration recipe>` runs, in this process: the `LayerwiseCalibration`
phase on a `TextDataModule`, with the `ExportQuantized` callback and the recipes' Trainer settings, seeded as the
recipes are; the same arguments give the same export, bit for bit. The run folder `output_dir` is a recipe's
`trainer.default_root_dir`: `checkpoints/`, the export `model/` and `metrics.json`.
"""

import os
import warnings
from pathlib import Path

import torch
from transformers import PreTrainedModel

from lqtk.errors import LqtkError
from lqtk.models import load_causal_lm

# the Trainer settings of the recipes' `trainer:` section (configs/smollm2-135m/*.yaml) and of LqtkCLI
TRAINER_DEFAULTS = {"accelerator": "auto", "devices": 1, "max_epochs": -1, "logger": False,
                    "enable_model_summary": False, "use_distributed_sampler": False}


def quantize(model: str | os.PathLike, quantizer, *, data=None, output_dir: str | os.PathLike, overwrite: bool = False,
             evaluate: bool = True, seed: int = 0, trainer: dict | None = None, export: dict | None = None,
             **phase_options) -> Path:
    """Quantize every Linear in the decoder blocks of `model` with `quantizer`, block by block on calibration
    windows (`lqtk.phases.LayerwiseCalibration`), then write, verify and evaluate the export; returns the export
    folder `output_dir/model` (the figures are in `output_dir/metrics.json`).

    Args:
        model: A local Hugging Face causal-LM folder, or a reference model name (`smollm2-135m`, `tiny-llama`, ...).
            A model already loaded in Python is refused: save it first (`model.save_pretrained(folder)` and
            `tokenizer.save_pretrained(folder)`) and pass the folder; the phase streams the weights block by block
            from the folder's safetensors.
        quantizer: The method and its settings, e.g. `lqtk.quant.GPTQ(bits=4, group_size=128)` or `lqtk.quant.RTN(...)`.
        data: The calibration and evaluation windows: None for the defaults (those of a recipe without a `data:`
            section: the Shakespeare split), a dict of `lqtk.data.TextDataModule` arguments (e.g. `{"seq_len": 512,
            "num_calibration_windows": 128, "calibration_files": [...]}`), or a TextDataModule. The tokenizer is the
            model's unless given.
        output_dir: The run folder (a recipe's `trainer.default_root_dir`).
        overwrite: Replace a finished export already in `output_dir`; otherwise one is refused.
        evaluate: Measure the fp and quantized perplexity on the evaluation windows into metrics.json.
        seed: The global seed (a recipe's `seed_everything`); the calibration windows have their own (`data.seed`).
        trainer: Other `lightning.Trainer` arguments, as a recipe's `trainer:` section, e.g. `{"accelerator": "cpu"}`
            (default: a GPU when there is one, one process).
        export: Other `lqtk.export.ExportQuantized` arguments, as a recipe's `export:` section, e.g.
            `{"serving_formats": ["compressed-tensors"]}` or `{"verify_windows": 4}`.
        **phase_options: Other `LayerwiseCalibration` arguments, e.g. `sequential=False`, `save_hessians=True`,
            `layer_quantizers={"mlp.down_proj": GPTQ(bits=4)}`.
    """
    # Lightning and the calibration side load here, not with the module: `lqtk.load` needs neither
    from lightning import seed_everything
    from lightning.pytorch import Trainer

    from lqtk.export import ExportQuantized
    from lqtk.phases import LayerwiseCalibration
    from lqtk.phases.processes import BlockWalkStrategy

    if isinstance(model, torch.nn.Module):
        raise LqtkError("lqtk.quantize takes a model folder or a reference model name, not a loaded model: save it "
                        "with model.save_pretrained(folder) and tokenizer.save_pretrained(folder), and pass the folder")
    if not isinstance(model, str | os.PathLike):
        raise LqtkError(f"lqtk.quantize got a {type(model).__name__} as its model: pass a model folder or a reference "
                        "model name")
    model, output_dir = str(model), Path(output_dir)
    if (output_dir / "model").exists() and not overwrite:
        raise LqtkError(f"{output_dir / 'model'} already holds a finished export: choose another output_dir, or pass "
                        "overwrite=True to replace it")
    seed_everything(seed, workers=True)  # as LightningCLI seeds a recipe, before its classes are made
    datamodule = data_module(data, model)
    phase = LayerwiseCalibration(model=model, quantizer=quantizer, **phase_options)
    callback = ExportQuantized(**{**(export or {}), "dirpath": str(output_dir), "overwrite": overwrite,
                                  "evaluate": evaluate})
    settings = {**TRAINER_DEFAULTS, **(trainer or {}), "default_root_dir": str(output_dir)}
    settings["callbacks"] = [*settings.get("callbacks", []), callback]
    several = settings.get("num_nodes", 1) > 1 or str(settings["devices"]) not in ("1", "[0]")
    if settings.get("strategy", "auto") == "auto" and several:  # as LqtkCLI: DDP cannot wrap a walk without gradients
        settings["strategy"] = BlockWalkStrategy.strategy_name
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*configure_optimizers` returned `None`")  # phases need none
        Trainer(**settings).fit(phase, datamodule=datamodule)
    return callback.model_dir


def data_module(data, model: str):
    """The TextDataModule that `quantize`'s `data` names, reading `model`'s tokenizer unless it names another."""
    from lqtk.data import TextDataModule

    if data is None or isinstance(data, dict):
        return TextDataModule(**{"tokenizer": model, **(data or {})})
    if isinstance(data, TextDataModule):
        if data.tokenizer is None:
            data.tokenizer = model
        return data
    raise LqtkError(f"lqtk.quantize got a {type(data).__name__} as its data: pass None (the default corpus), a dict "
                    "of lqtk.data.TextDataModule arguments, or a TextDataModule")


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model in `path` (an lqtk export, another HF causal-LM folder, or a reference model name), fully loaded in
    `dtype` and in eval mode: a transformers model, with `lqtk.nn.QuantizedLinear` layers for an export's quantized
    Linears, ready for `model(ids)` or `model.generate(...)`. (Plain transformers loads an export too, once `lqtk` is
    imported: `AutoModelForCausalLM.from_pretrained(path)`.)"""
    return load_causal_lm(path, dtype=dtype, lazy=False).eval()

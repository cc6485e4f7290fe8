"""Every recipe parses against the CLI's signatures and instantiates its phase, quantizer and data module; the
reference model has recipes for every method, width and phase."""

import importlib
from pathlib import Path

import pytest
import yaml
from lightning import LightningModule

import lqtk.phases
import lqtk.quant
from helpers import REPO
from lqtk.data import TextDataModule
from lqtk.fit import LqtkCLI
from lqtk.phases import BlockFinetune, KLDistillation, LayerwiseCalibration, MixedCalibration, Requantize
from lqtk.quant import AgileQuant, WeightQuantizer

RECIPES = sorted((REPO / "configs").rglob("*.yaml"))
REFERENCE = REPO / "configs" / "smollm2-135m"  # the reference model: a recipe per method and width
WEIGHT_WIDTHS = (2, 3, 4)  # bits per weight code
ACTIVATION_WIDTHS = {AgileQuant: (8, 4)}  # methods that quantize the inputs: bits per activation code
NO_RECIPE = {("AQLM", 4)}  # 4 codebooks x 8 bits per group of 8: not landed (AQLM is the 2- and 3-bit method)
RECIPE_PREFIX = {"GGML": "gguf"}  # recipe names that are not the method's: the GGUF files llama.cpp users know


def build(node):
    """A recipe's `class_path`/`init_args` node as the object it names (other values as they are)."""
    if isinstance(node, dict) and "class_path" in node:
        module, _, name = node["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**{k: build(v) for k, v in
                                                                 node.get("init_args", {}).items()})
    return node


def nested(quantizer):
    """The quantizer and the ones it wraps (`inner`), outermost first."""
    while isinstance(quantizer, WeightQuantizer):
        yield quantizer
        quantizer = getattr(quantizer, "inner", None)


def width(quantizer) -> int:
    """Bits per weight code of the innermost weight method (AQLM: its codes' bits per weight)."""
    *_, weights = nested(quantizer)
    if isinstance(weights, lqtk.quant.AQLM):
        return weights.num_codebooks * weights.nbits_per_codebook // weights.in_group_size
    return weights.bits


def test_there_are_recipes_for_every_method_and_width():
    """Every method lqtk.quant exports (a WeightQuantizer that quantizes) has a calibration recipe of its own for the
    reference model at every width, and every phase a recipe that runs it: a new method or phase without recipes
    fails here."""
    methods = {cls for cls in (getattr(lqtk.quant, name) for name in lqtk.quant.__all__)
               if isinstance(cls, type) and issubclass(cls, WeightQuantizer)
               and cls.quantize is not WeightQuantizer.quantize}  # not the bases of the methods
    assert {"GPTQ", "RTN", "AQLM", "QuIP", "LeanQuant", "AgileQuant"} <= {cls.__name__ for cls in methods}  # (sanity)
    expected = {(cls.__name__, bits) for cls in methods for bits in ACTIVATION_WIDTHS.get(cls, WEIGHT_WIDTHS)}
    found, phases = set(), set()
    for recipe in sorted(REFERENCE.glob("*.yaml")):
        model = yaml.safe_load(recipe.read_text())["model"]
        phases.add(model["class_path"].rpartition(".")[2])
        if "quantizer" not in model.get("init_args", {}):
            continue
        quantizers = list(nested(build(model["init_args"]["quantizer"])))
        for activations in (q for q in quantizers if type(q) in ACTIVATION_WIDTHS):
            found.add((type(activations).__name__, activations.bits))
        if not any(type(q) in ACTIVATION_WIDTHS for q in quantizers):  # weight-only: named by its outer method
            found.add((type(quantizers[0]).__name__, width(quantizers[0])))
    assert sorted(expected - NO_RECIPE - found) == [], "methods and widths without a recipe"
    assert not NO_RECIPE & found, "a recipe landed: take it out of NO_RECIPE"
    assert {name for name in lqtk.phases.__all__ if issubclass(getattr(lqtk.phases, name), LightningModule)} <= phases


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_recipe_instantiates(recipe: Path, tmp_path):
    cli = LqtkCLI(datamodule_class=TextDataModule, subclass_mode_model=True, run=False,
                  auto_configure_optimizers=False, args=["--config", str(recipe),
                                                         "--trainer.default_root_dir", str(tmp_path)])
    assert cli.datamodule.tokenizer == cli.model.model_path  # linked
    if isinstance(cli.model, BlockFinetune):  # fine-tunes the export of the calibration recipe it is named after
        calibration = recipe.stem.removesuffix("-ft")
        assert cli.model.model_path == f"runs/{recipe.parent.name}/{calibration}/model"
    elif isinstance(cli.model, KLDistillation):  # distills an export of the method it is named after
        method = recipe.stem.removesuffix("-distill").removesuffix("-pv")
        assert cli.model.model_path.startswith(f"runs/{recipe.parent.name}/{method}")
        assert (cli.model.pv is not None) == recipe.stem.endswith("-pv")
    elif isinstance(cli.model, Requantize):  # from the Hessians of the calibration recipe its chain starts with
        start = recipe.stem.removesuffix("-mix") if recipe.stem.endswith("-mix") else "gptq-w4g128"  # GGUF's own
        assert cli.model.model_path.endswith("-tiny/model" if "debug" in str(recipe) else f"{start}/model")
        assert all(isinstance(q, WeightQuantizer) for q in cli.model.candidates) and cli.model.budget_bits
    elif isinstance(cli.model, MixedCalibration):  # the allocation of the recipe it is named after
        assert cli.model.model_path == f"runs/{recipe.parent.name}/{recipe.stem.removesuffix('-seq')}/model"
    else:
        quantizer = cli.model.quantizer
        assert isinstance(cli.model, LayerwiseCalibration) and isinstance(quantizer, WeightQuantizer)
        weights = quantizer.inner if isinstance(quantizer, AgileQuant) else quantizer  # W4A8: named by its weights
        assert recipe.stem.startswith(RECIPE_PREFIX.get(type(weights).__name__, type(weights).__name__.lower()))
    assert all(line.strip().startswith("#") or "#" in line for line in recipe.read_text().splitlines()
               if line.strip() and not line.strip().endswith(":")), "every key is commented"

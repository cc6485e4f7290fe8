"""Every recipe parses against the CLI's signatures and instantiates its phase, quantizer and data module."""

from pathlib import Path

import pytest

from helpers import REPO
from lqtk.cli import LqtkCLI
from lqtk.data import TextDataModule
from lqtk.phases import BlockFinetune, KLDistillation, LayerwiseCalibration, MixedCalibration, Requantize
from lqtk.quant import AgileQuant, WeightQuantizer

RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_recipes_for_every_method_and_width():
    names = {p.stem for p in RECIPES}
    assert {"rtn-w4g128", "rtn-w3g128", "rtn-w2g64", "gptq-w4g128", "gptq-w3g128", "gptq-w2g64",
            "gptq-tiny", "aqlm-2x8-g8", "aqlm-2x8-g8-ft", "aqlm-3x8-g8-ft", "aqlm-tiny",
            "aqlm-tiny-ft", "aqlm-2x8-g8-distill", "aqlm-2x8-g8-pv", "gptq-w2g64-distill", "gptq-w2g64-pv",
            "aqlm-tiny-distill", "quip-w2", "quip-w3", "quip-w4", "leanquant-nu-w2", "leanquant-nu-w3",
            "leanquant-nu-w4", "leanquant-aff-w3g128", "quip-leanquant-nu-w2", "quip-tiny", "gptq-w4a8",
            "gptq-w4a8-trip", "gptq-w4a4", "gptq-w4a4-trip", "gptq-w4a8-tiny", "gptq-w4a8-prune25",
            "gptq-w4a8-prune50", "mixed-2.5", "mixed-3.0", "mixed-2.5-seq", "mixed-3.0-seq", "mixed-tiny",
            "mixed-tiny-seq"} <= names


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
        assert cli.model.model_path.endswith("-tiny/model" if "debug" in str(recipe) else "gptq-w4g128/model")
        assert all(isinstance(q, WeightQuantizer) for q in cli.model.candidates) and cli.model.budget_bits
    elif isinstance(cli.model, MixedCalibration):  # the allocation of the recipe it is named after
        assert cli.model.model_path == f"runs/{recipe.parent.name}/{recipe.stem.removesuffix('-seq')}/model"
    else:
        quantizer = cli.model.quantizer
        assert isinstance(cli.model, LayerwiseCalibration) and isinstance(quantizer, WeightQuantizer)
        weights = quantizer.inner if isinstance(quantizer, AgileQuant) else quantizer  # W4A8: named by its weights
        assert recipe.stem.startswith(type(weights).__name__.lower())
    assert all(line.strip().startswith("#") or "#" in line for line in recipe.read_text().splitlines()
               if line.strip() and not line.strip().endswith(":")), "every key is commented"

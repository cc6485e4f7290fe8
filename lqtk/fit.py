"""`lqtk fit`: one phase from a recipe, through LightningCLI (phases in `model:`, the data module in `data:`, the
export in `export:`, Lightning's Trainer in `trainer:`)."""

import importlib
import inspect
import os
import re
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lqtk import phases, quant
from lqtk.data import TextDataModule
from lqtk.dry_run import DryRun
from lqtk.errors import LqtkError
from lqtk.export import ExportQuantized
from lqtk.phases.processes import BlockWalkStrategy


class LqtkCLI(LightningCLI):
    """Phases come from the recipe (`model: {class_path: lqtk.phases.LayerwiseCalibration, init_args: ...}`); the
    data module reads the phase's model for its tokenizer, and the export goes to the trainer's root folder."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportQuantized, "export")
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace a finished export in the run.")
        parser.link_arguments("model.init_args.model", "data.tokenizer")
        parser.link_arguments("trainer.default_root_dir", "export.dirpath")
        parser.link_arguments("overwrite", "export.overwrite")
        parser.add_argument("--dry_run", type=bool, default=False, help="Run block 0 only and print estimates of the "
                            "whole run's time, peak memory and disk; nothing is written into the run folder.")
        parser.add_argument("--dry_run_output", type=str | None, default=None,
                            help="With --dry_run: also write the estimates and measurements to this JSON file.")
        # lqtk's data module deals the windows out to the processes itself (process_batches, GlobalBatches)
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def before_instantiate_classes(self) -> None:
        """Refuses `--ckpt_path last` without a checkpoint (Lightning would warn and start afresh). Several processes
        for LayerwiseCalibration: Lightning's auto choice, DDP, would wrap the phase in DistributedDataParallel,
        which a walk without gradients cannot have; it gets `block_walk` instead."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer, phase = config.trainer, config.model.class_path
        checkpoints = Path(trainer.default_root_dir or ".") / "checkpoints"
        if not config.get("dry_run"):  # a dry run writes nothing there
            check_run_folder(checkpoints.parent)
        resuming = config.get("ckpt_path") == "last" and not config.get("dry_run")  # a dry run refuses any
        if resuming and not any(checkpoints.glob("last*.ckpt")):
            raise LqtkError(f"--ckpt_path last: there is no checkpoint in {checkpoints}: pass the run folder of the "
                            "stopped run as trainer.default_root_dir, or start afresh without --ckpt_path")
        several = trainer.num_nodes > 1 or str(trainer.devices) not in ("1", "[0]")
        if trainer.strategy == "auto" and phase.endswith(".LayerwiseCalibration") and several:
            trainer.strategy = BlockWalkStrategy.strategy_name

    def before_fit(self) -> None:
        """Refuses, before the processes start, a launch the data or the phase cannot run on (each process would
        otherwise refuse it after loading the model)."""
        self.datamodule.check_processes(self.trainer.world_size)
        self.model.check_launch(self.trainer)

    def instantiate_trainer(self, **kwargs):
        if not self._get(self.config_init, "dry_run"):
            return super().instantiate_trainer(**kwargs)
        if self._get(self.config_init, "ckpt_path") is not None:
            raise LqtkError("the dry run estimates a run from its start: drop --ckpt_path (or --dry_run)")
        self.save_config_callback = None  # a dry run writes nothing into the run folder: no config.yaml, no log
        trainer = super().instantiate_trainer(**kwargs, logger=False)
        if trainer.world_size > 1:
            raise LqtkError("the dry run measures one process: run it with trainer.devices 1 and trainer.num_nodes 1")
        export = next(callback for callback in trainer.callbacks if isinstance(callback, ExportQuantized))
        trainer.callbacks.remove(export)
        trainer.callbacks.append(DryRun(export, self._get(self.config_init, "dry_run_output")))
        return trainer


class SaveRecipe(SaveConfigCallback):
    """The run folder's config.yaml, written once the run has passed every check (a resumed checkpoint accepted
    too), so that a refused run leaves its folder as it was."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")


def fit(args: list[str]) -> None:
    """`lqtk fit ARGS`: the phase of a recipe."""
    if not {"--config", "-c", "-h", "--help", "--print_config"} & {arg.split("=")[0] for arg in args}:
        raise LqtkError("lqtk fit runs a recipe: pass --config RECIPE.yaml (e.g. configs/debug/gptq-tiny.yaml; "
                        "every recipe under configs/ explains its options in comments)")
    parsing = {"exit_on_error": False}  # a recipe's error is raised, and told in one line by `recipe_error`
    try:
        LqtkCLI(
            datamodule_class=TextDataModule,
            subclass_mode_model=True,
            save_config_callback=SaveRecipe,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites the same config.yaml
            auto_configure_optimizers=False,
            parser_kwargs=parsing | {"fit": parsing | {"description": help_description(), "usage": USAGE}},
            args=["fit", *args],
        )
    except ArgumentError as err:
        raise LqtkError(recipe_error(str(err))) from None
    except SIGTERMException as err:  # Lightning's stop at the end of the batch under way: SystemExit, exit code 0
        raise LqtkError("stopped by SIGTERM at the end of a batch (the blocks finished before it are in the run's "
                        "checkpoints/last.ckpt); resume with --ckpt_path last") from err


def check_run_folder(folder: Path) -> None:
    """Refuse, before any work, a run folder that cannot be created or written (checked without writing there)."""
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    if not existing.is_dir():
        raise LqtkError(f"the run folder {folder} cannot be created, {existing} is a file: choose another "
                        "trainer.default_root_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LqtkError(f"the run folder {folder} is not writable ({existing} is read-only to this user): choose "
                        f"another trainer.default_root_dir, or make it writable (chmod u+w {existing})")


USAGE = "lqtk fit --config RECIPE.yaml [--ckpt_path last] [--overwrite true] [--dry_run true] [--KEY VALUE ...]"
STRUCTURE = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "- Problem with given class_path",
             "Problem with given class_path", "Given value", "- Expected a <class 'NoneType'>")


def recipe_error(message: str) -> str:
    """jsonargparse's report of a recipe it cannot take (a tree over the Union's alternatives, 10+ lines) as one
    line: the innermost cause, the key it is under, and what that place accepts."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys, classes = [], []
    for line in lines:
        if match := re.match(r'Parser key "([^"]+)"', line):
            keys.append(match[1])
        elif match := re.search(r"Problem with given class_path '([^']+)'", line):
            classes.append(match[1])
        elif not line.startswith(STRUCTURE):
            cause = line
            break
    else:
        return message
    where = f" (at {'.'.join(keys)})" if keys else ""
    option = re.match(r"Option '([^']+)' is not accepted", cause)
    if option and classes:
        cls = import_path(classes[-1])
        accepted = [name for name in inspect.signature(cls).parameters if name not in ("args", "kwargs")]
        return f"{cause} by {classes[-1]}{where}: it accepts {', '.join(accepted)}"
    if classes and "has no attribute" in cause:
        module = importlib.import_module(classes[-1].rpartition(".")[0])
        names = [name for name in getattr(module, "__all__", []) if inspect.isclass(getattr(module, name))]
        return f"{classes[-1]} does not exist{where}: {module.__name__} has {', '.join(names)}"
    return cause + where


def import_path(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def help_description() -> str:
    """What `lqtk fit --help` says first: where a phase's and a quantizer's own options are."""
    phase_names = [name for name in phases.__all__ if issubclass(getattr(phases, name), phases.base.Phase)]
    quantizers = [name for name in quant.__all__ if isinstance(cls := getattr(quant, name), type)
                  and issubclass(cls, quant.WeightQuantizer) and cls.quantize is not quant.WeightQuantizer.quantize]
    return ("Run one phase of a recipe: calibrate (quantize), fine-tune, distill or re-quantize a model. "
            "A recipe (configs/*/*.yaml) explains each of its options in comments; any option can be overridden "
            "here, e.g. --model.init_args.quantizer.init_args.bits 3. "
            f"Phases (--model): {', '.join(phase_names)}; their options: lqtk fit --model.help "
            "lqtk.phases.LayerwiseCalibration. "
            f"Quantizers (--model.init_args.quantizer): {', '.join(quantizers)}; their options: lqtk fit "
            "--config RECIPE.yaml --model.init_args.quantizer.help lqtk.quant.GPTQ. "
            "The Trainer's options below are Lightning's (epochs are blocks to a calibration phase).")

"""`Phase`: what every phase shares, and all that the export (`lqtk.export.ExportQuantized`) and the chains rely on.

A phase starts from `model_path`, spends `quantize_time_s` on its own work (not loading, evaluating or exporting),
and says what its result is compared with (`fp_reference`), what the export writes (`exported_model`), what goes into
metrics.json (`phase_metrics`) and what must match for a checkpoint to be resumed (`identity`). Its part of a
checkpoint is framed here, once: `checkpoint["lqtk"] = {phase, identity, quantize_time_s, ...}`, refused on resume
unless this phase wrote it for a run of the same identity.
"""

import dataclasses

import torch
from lightning import LightningModule

from lqtk.errors import LqtkError
from lqtk.quant import WeightQuantizer


class Phase(LightningModule):
    """Base of every phase (LayerwiseCalibration, BlockFinetune, KLDistillation, Requantize, ...)."""

    model_path: str
    #: the method a calibration phase applies to every layer (the export checks it before the work); None for
    #: phases that tune or re-quantize a model they load
    quantizer: WeightQuantizer | None = None

    def __init__(self):
        super().__init__()
        # No save_hyperparameters(): LightningCLI would let a checkpoint's hyperparameters override the recipe on
        # resume; instead `identity()` is checkpointed and a mismatch is refused.
        self.automatic_optimization = False
        self.quantize_time_s = 0.0

    def check_launch(self, trainer) -> None:
        """Refuse, before any process starts or any model loads, settings that `trainer` cannot run (none here)."""

    def fp_reference(self) -> tuple[torch.nn.Module, str]:
        """The fp model the phase's result is compared with, and its path."""
        raise NotImplementedError

    def exported_model(self) -> torch.nn.Module | None:
        """The model the export writes (called on every process; rank 0's is written)."""
        return self.model

    def phase_metrics(self) -> dict:
        """The phase's own figures for metrics.json (per layer, per block, per step)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed by this run."""
        raise NotImplementedError

    def export_files(self) -> dict[str, dict]:
        """JSON files the lqtk export (`model/`) carries beside its weights for the phases chained after it
        ({file name: content}); none by default."""
        return {}

    def phase_time_s(self) -> float:
        """`quantize_time_s` up to now (a phase still timing a stretch of work adds it)."""
        return self.quantize_time_s

    def save_phase_state(self, checkpoint: dict, **state) -> None:
        """Write the phase's part of `checkpoint`: its name, identity and time, and `state`."""
        checkpoint["lqtk"] = {"phase": type(self).__name__, "identity": self.identity(),
                              "quantize_time_s": self.phase_time_s(), **state}

    def load_phase_state(self, checkpoint: dict) -> dict:
        """The phase's part of `checkpoint`, refused unless this phase wrote it for a run of this identity; restores
        `quantize_time_s`."""
        state = checked_state(checkpoint, type(self).__name__, self.identity())
        self.quantize_time_s = state["quantize_time_s"]
        return state


def described(quantizer: WeightQuantizer) -> dict:
    """`quantizer` as a recipe names it ({class_path, init_args}, nested quantizers too): jsonargparse rebuilds it."""
    def value(v):
        return described(v) if isinstance(v, WeightQuantizer) else v
    return {"class_path": f"{type(quantizer).__module__}.{type(quantizer).__qualname__}",
            "init_args": {f.name: value(getattr(quantizer, f.name)) for f in dataclasses.fields(quantizer)}}


def checked_state(checkpoint: dict, phase: str, identity: dict) -> dict:
    """The phase's part of `checkpoint`, refused unless `phase` wrote it for a run of this `identity()`."""
    state = checkpoint.get("lqtk")
    if state is None or state.get("phase", "LayerwiseCalibration") != phase:
        raise LqtkError(f"this checkpoint was not written by {phase}: pass a checkpoint of this recipe's run, or start "
                        "afresh without --ckpt_path")
    if state["identity"] != identity:
        changed = sorted(k for k in identity if state["identity"].get(k) != identity[k])
        raise LqtkError(f"the checkpoint belongs to another run (different {', '.join(changed)}): resume with the "
                        "recipe that wrote it, or use another trainer.default_root_dir for this one")
    return state

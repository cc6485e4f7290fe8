"""`Requantize`: quantize a calibrated model's layers again from the Hessians its calibration kept on disk
(`LayerwiseCalibration(save_hessians=true)`, lqtk.phases.hessian_cache), without running the model: other bits,
group sizes, damping or methods for chosen layers, or a mixed-precision allocation under a bit budget.

One epoch per decoder block: each chosen Linear of the block is quantized with every candidate, from the fp model's
weight and the cached H of its group, and each result's true storage bits and proxy loss tr(ΔW H ΔWᵀ) (its output
error on the calibration inputs) are measured; the results go to `candidates/<block>.safetensors`. After the last
block every chosen layer takes one candidate: the only one, or with `budget_bits` the allocation of least summed
proxy loss whose average bits/weight over all quantized Linears fits the budget (lqtk.quant.allocation). The layers
not chosen keep the calibration's quantization. The export records each layer's method and settings in its layer
config, so evaluation and the kernels run the mix as is.

Not sequential: a layer's cached H holds the inputs it had during the calibration, i.e. after the layers quantized
before it *then*, not after their re-quantized versions. A checkpoint after each block holds the measurements;
`ckpt_path=last` resumes after the last finished block.
"""

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentParser
from safetensors import safe_open

from lqtk.anatomy import block_prefix, decoder_blocks
from lqtk.errors import LqtkError
from lqtk.formats import storage_bits
from lqtk.models import load_causal_lm, resolve_model
from lqtk.nn import quantized_layers, set_submodule
from lqtk.nn.quantized_linear import quantized_linear_from_config
from lqtk.phases.base import Phase, described
from lqtk.phases.hessian_cache import group_files, load_group
from lqtk.phases.layerwise import LayerwiseCalibration
from lqtk.phases.walk import BlockCheckpoint, BlockProgressBar, block_file, progress_bars, report
from lqtk.quant.allocation import allocate, output_error, output_fisher
from lqtk.quant.base import WeightQuantizer
from lqtk.streaming import materialize, release, save_block
from lqtk.weights import save_file_atomically

ALLOCATION_FILE = "allocation.json"
"""In a Requantize run's export: its candidates, budget and each layer's choice (read by MixedCalibration)."""


class Requantize(Phase):
    """Re-quantization of a calibrated model's Linears from its cached Hessians.

    Args:
        model: The calibrated model: the export (`model/`) of a LayerwiseCalibration run with `save_hessians`.
        fp_model: The fp model it was quantized from (its weights are quantized again).
        candidates: Quantizers to try on every chosen layer. One: the layers are re-quantized with it. Several: each
            layer takes one of them, chosen under `budget_bits`.
        budget_bits: Average storage bits per weight over all quantized Linears (those kept included) that the
            allocation must not exceed.
        layers: Regular expressions (searched in the full names) of the Linears to re-quantize; default: all.
        hessians: The cached Hessians (default: `hessians/` beside `model`).
        sensitivity_windows: With `budget_bits`, weigh each layer's output error per channel by the diagonal Fisher
            of its output (lqtk.quant.allocation), measured with the fp model's loss on this many calibration windows
            (one forward and backward of the whole fp model, which must fit in memory); 0: unweighted.
    """

    progress_label = "requantize"

    def __init__(self, model: str, fp_model: str, candidates: list[WeightQuantizer], budget_bits: float | None = None,
                 layers: list[str] | None = None, hessians: str | None = None, sensitivity_windows: int = 16):
        super().__init__()
        if not candidates:
            raise LqtkError("Requantize has no candidates: name at least one quantizer")
        if budget_bits is None and len(candidates) > 1:
            raise LqtkError(f"{len(candidates)} candidates and no budget_bits to choose among them: set budget_bits "
                            "(average bits/weight), or keep one candidate")
        self.model_path, self.fp_model_path, self.hessians = model, fp_model, hessians
        self.candidates, self.budget_bits, self.layers = candidates, budget_bits, layers
        self.sensitivity_windows = sensitivity_windows if budget_bits is not None else 0
        self.fisher: dict[str, torch.Tensor] | None = None  # chosen layer -> its output channels' weights
        self.measurements: dict[str, list[dict]] = {}  # chosen layer -> per candidate: bits, loss, layer config
        self.allocation: dict[str, int] | None = None  # chosen layer -> its candidate, once all blocks are done
        self.status = ""

    def configure_optimizers(self):
        return None

    def configure_callbacks(self):
        return [*progress_bars(self, BlockProgressBar), BlockCheckpoint()]

    # --- set-up -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise LqtkError("Requantize runs on one process: run it with trainer.devices 1 and trainer.num_nodes 1")
        model, fp_model = load_causal_lm(self.model_path, lazy=True), load_causal_lm(self.fp_model_path, lazy=True)
        if not quantized_layers(model) or quantized_layers(fp_model):
            raise LqtkError(f"model must be a calibration run's export and fp_model the fp model it came from; got "
                            f"{self.model_path} and {self.fp_model_path}")
        folder = Path(self.hessians) if self.hessians else resolve_model(self.model_path).parent / "hessians"
        self.group_files = group_files(folder) if folder.is_dir() else {}
        if not self.group_files:
            raise LqtkError(f"{folder} holds no cached Hessians: calibrate with LayerwiseCalibration's save_hessians "
                            "true (or point `hessians` at the folder of such a run)")
        patterns, layers = [re.compile(pattern) for pattern in self.layers or [""]], quantized_layers(model)
        self.chosen = [name for name in layers if any(p.search(name) for p in patterns)]
        if not self.chosen:
            raise LqtkError(f"no quantized Linear of {self.model_path} matches layers {self.layers}: check the names")
        missing = [name for name in self.chosen if name not in self.group_files]
        if missing:
            raise LqtkError(f"{folder} has no Hessian for {missing[:3]} ({len(missing)} layers): re-quantize only "
                            "layers of the calibration run that cached them")
        for name in self.chosen:
            for quantizer in self.candidates:
                try:
                    quantizer.check_fits((layers[name].out_features, layers[name].in_features))
                except LqtkError as err:
                    raise LqtkError(f"{name}: {err}") from err
        self.__dict__.update(model=model, fp_model=fp_model, blocks=decoder_blocks(model))
        self.trainer.limit_train_batches = 1  # a block's work is one step: it needs no calibration batch

    def on_fit_start(self) -> None:
        self.trainer.fit_loop.max_epochs = len(self.blocks)

    def prefix(self, index: int) -> str:
        return block_prefix(self.model, index)

    # --- one block per epoch ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx) -> None:
        start, index = time.perf_counter(), self.current_epoch
        if self.sensitivity_windows and self.fisher is None:
            report(self, f"the fp model's output sensitivities on {self.sensitivity_windows} windows")
            windows = self.trainer.datamodule.calibration_windows()[: self.sensitivity_windows]
            fp_model = load_causal_lm(self.fp_model_path).requires_grad_(False).to(self.device)
            self.fisher = {name: f.cpu() for name, f in output_fisher(fp_model, windows.to(self.device),
                                                                      self.chosen).items()}
            del fp_model
        with torch.no_grad():
            self.measure_block(index)
        self.quantize_time_s += time.perf_counter() - start

    def measure_block(self, index: int) -> None:
        """Quantize block `index`'s chosen layers with every candidate: their bits and proxy losses into
        `measurements`, their tensors into the block's candidates file."""
        materialize(self.fp_model, index)
        groups: dict[Path, list[str]] = {}
        prefix = self.prefix(index)
        for name in (name for name in self.chosen if name.startswith(prefix)):
            groups.setdefault(self.group_files[name], []).append(name)
        tensors = {}
        for file, names in groups.items():
            _, hessian, inputs = load_group(file)
            hessian = hessian.to(self.device)
            weights = [self.fp_model.get_submodule(name).weight.detach().to(self.device) for name in names]
            for c, quantizer in enumerate(self.candidates):
                report(self, f"{', '.join(names)}: candidate {c + 1}/{len(self.candidates)}")
                for name, weight, quantized in zip(names, weights, quantizer.quantize_shared(weights, hessian,
                                                                                                inputs=inputs)):
                    delta = weight - quantized.dequantize().to(weight.device)
                    sensitivity = None if self.fisher is None else self.fisher[name] / 2
                    self.measurements.setdefault(name, []).append(
                        {"bits": storage_bits(quantized.tensors), "loss": output_error(delta, hessian, sensitivity),
                         "config": {"method": quantized.method, "format": quantized.format, **quantized.spec}})
                    tensors.update({f"{c}/{name}.{key}": t.cpu() for key, t in quantized.tensors.items()})
        save_file_atomically(tensors, block_file(self, "candidates", index), {"format": "pt"})
        release(decoder_blocks(self.fp_model)[index])

    # --- the choice and the model -------------------------------------------------------------------------
    def allocate(self) -> dict[str, int]:
        """Each chosen layer's candidate: the only one, or the least-loss allocation within `budget_bits`."""
        if self.budget_bits is None:
            return dict.fromkeys(self.measurements, 0)
        layers = quantized_layers(self.model)
        weights = sum(m.in_features * m.out_features for m in layers.values())
        kept = sum(storage_bits(m.tensors()) for name, m in layers.items() if name not in self.measurements)
        names = list(self.measurements)
        try:
            picks = allocate([[c["bits"] for c in self.measurements[name]] for name in names],
                             [[c["loss"] for c in self.measurements[name]] for name in names],
                             self.budget_bits * weights - kept)
        except ValueError as err:
            least = (kept + sum(min(c["bits"] for c in self.measurements[name]) for name in names)) / weights
            raise LqtkError(f"budget_bits {self.budget_bits} is out of reach ({err}): the fewest bits the candidates "
                            f"allow is {least:.3f}; raise budget_bits and resume with --ckpt_path last (the "
                            "measurements are kept), or add a candidate with fewer bits") from err
        return dict(zip(names, picks))

    def exported_model(self) -> torch.nn.Module:
        """The calibrated model with every chosen layer replaced by its candidate (each changed block written to
        `blocks/`, as a calibration does)."""
        start = time.perf_counter()
        self.allocation = self.allocate()
        for index in range(len(self.blocks)):
            prefix = self.prefix(index)
            names = [name for name in self.allocation if name.startswith(prefix)]
            if not names:
                continue
            materialize(self.model, index)
            with safe_open(block_file(self, "candidates", index), "pt") as f:
                for name in names:
                    c = self.allocation[name]
                    stored = f"{c}/{name}."
                    tensors = {key[len(stored):]: f.get_tensor(key) for key in f.keys() if key.startswith(stored)}
                    layer = quantized_linear_from_config(self.measurements[name][c]["config"], tensors,
                                                         self.model.get_submodule(name).bias)
                    set_submodule(self.model, name, layer)
            save_block(self.model, index, block_file(self, "blocks", index))
        self.quantize_time_s += time.perf_counter() - start
        return self.model

    def fp_reference(self) -> tuple[torch.nn.Module, str]:
        return self.fp_model, self.fp_model_path

    def export_files(self) -> dict[str, dict]:
        """`allocation.json`: what MixedCalibration, chained after this run, quantizes each layer with."""
        return {ALLOCATION_FILE: {"fp_model": str(self.fp_model_path), "budget_bits": self.budget_bits,
                                  "candidates": [described(q) for q in self.candidates],
                                  "allocation": self.allocation}}

    def phase_metrics(self) -> dict:
        counts = [0] * len(self.candidates)
        for c in (self.allocation or {}).values():
            counts[c] += 1
        uniform = [{"bits": sum(m[c]["bits"] for m in self.measurements.values()),
                    "proxy_loss": sum(m[c]["loss"] for m in self.measurements.values())}
                   for c in range(len(self.candidates))]
        return {"budget_bits": self.budget_bits, "candidates": self.identity()["candidates"],
                "layers_per_candidate": counts, "allocation": self.allocation,
                "proxy_loss": sum(self.measurements[name][c]["loss"] for name, c in (self.allocation or {}).items()),
                "uniform": uniform}  # per candidate, the chosen layers' storage bits and proxy loss if all took it

    # --- checkpoints --------------------------------------------------------------------------------------
    def identity(self) -> dict:
        candidates = [{"class": type(q).__qualname__, **dataclasses.asdict(q)} for q in self.candidates]
        return {"model": str(self.model_path), "fp_model": str(self.fp_model_path), "candidates": candidates,
                "layers": self.layers, "hessians": self.hessians,  # not budget_bits: the measurements serve any
                "sensitivity_windows": self.sensitivity_windows}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.save_phase_state(checkpoint, fisher=self.fisher, measurements=self.measurements)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = self.load_phase_state(checkpoint)
        self.measurements, self.fisher = state["measurements"], state["fisher"]


class MixedCalibration(LayerwiseCalibration):
    """A mixed-precision allocation quantized as a calibration quantizes: the fp model that a `Requantize` run with
    `budget_bits` came from, block by block on the calibration windows, each Linear with the candidate that run
    allocated to it, on the inputs of the Linears quantized before it. The allocation is found without running the
    model; this pass makes the chosen quantizations compensate each other's errors (the Requantize run's layers were
    each quantized on the inputs of the calibration's uniform ones).

    Args:
        model: The export of a finished Requantize run with `budget_bits` (chained after it).
        sequential, replay, compute_dtype: As LayerwiseCalibration's.
    """

    def __init__(self, model: str, sequential: bool = True, replay: bool = True,
                 compute_dtype: Literal["float32", "bfloat16"] = "float32"):
        # the fp model and the quantizers come from the Requantize run in `setup`: a recipe is instantiated (checked,
        # printed) before the run it names exists
        super().__init__(model, quantizer=None, sequential=sequential, replay=replay, compute_dtype=compute_dtype)
        self.allocated_by, self.budget_bits = model, None

    def setup(self, stage: str) -> None:
        file = resolve_model(self.allocated_by) / ALLOCATION_FILE
        try:
            allocation = json.loads(file.read_text())
            parser = ArgumentParser()
            parser.add_argument("--candidates", type=list[WeightQuantizer])
            candidates = parser.instantiate_classes(parser.parse_object({"candidates": allocation["candidates"]}))
            self.budget_bits = allocation["budget_bits"]
        except (OSError, KeyError, TypeError) as err:
            raise LqtkError(f"{self.allocated_by} is not the export of a finished Requantize run (no {err}): chain "
                            "MixedCalibration after a Requantize recipe with budget_bits") from err
        if self.budget_bits is None:
            raise LqtkError(f"{self.allocated_by} comes from a Requantize run without budget_bits, which allocates "
                            "nothing: chain MixedCalibration after a mixed-precision recipe")
        candidates = candidates.candidates
        self.model_path, self.quantizer = allocation["fp_model"], candidates[0]
        self.layer_quantizers = {f"^{re.escape(name)}$": candidates[c] for name, c in allocation["allocation"].items()}
        super().setup(stage)

    def phase_metrics(self) -> dict:
        return {**super().phase_metrics(), "budget_bits": self.budget_bits, "allocated_by": self.allocated_by}

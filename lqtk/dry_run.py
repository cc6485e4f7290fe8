"""`lqtk fit --config R --dry_run true`: estimate a block-by-block run from its first block, run on this machine.

`DryRun` takes the place of the export callback. The phase runs as it would (model loaded, calibration inputs
captured, block 0 calibrated, quantized and checkpointed) and stops after block 0; the evaluations are timed on two
batches instead of all of them, and the export is written, reloaded and verified in a temporary folder on a stand-in
of the finished model: the model as block 0 left it (block 0 quantized, the others fp, all streamed block by block),
which overstates the export's write time a little and takes the export's size from block 0's (`disk_needs`).
The whole run is then extrapolated:

    quantize_time_s = capture + blocks × block 0's own work          (the phase's quantize_time_s, as metrics.json)
    wall_time_s     = loading + fp evaluation (none if cached) + capture + blocks × block 0's wall time (checkpoint
                      included) + export (write, reload, verify) + evaluation of the export
    peak_rss_bytes  = the larger of the walk's peak, plus the growth of the last checkpoint's in-memory copy, and
                      the export's peak (measured on the stand-in)

Nothing is written into the run folder: no config.yaml, checkpoint, export or metrics.json.
"""

import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback
from transformers import AutoTokenizer

from lqtk.disk import disk_needs, free_bytes, size_text
from lqtk.errors import LqtkError
from lqtk.evaluate import EVAL_BATCH_SIZE, fp_perplexity_cache_file, perplexity
from lqtk.export import ExportQuantized
from lqtk.models import resolve_model
from lqtk.phases.walk import BlockWalk
from lqtk.streaming import to_device


class DryRun(Callback):
    """Stop a block-by-block phase after block 0 and print (and with `output`, write as JSON) the whole run's
    estimated time, peak memory and disk, for the export settings of `export`."""

    def __init__(self, export: ExportQuantized, output: str | None = None):
        self.export, self.output = export, output
        self.measured: dict[str, float] = {}
        self.workdir = tempfile.TemporaryDirectory(prefix="lqtk-dry-run-")  # the one checkpoint and export

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, BlockWalk):
            raise LqtkError(f"the dry run estimates block-by-block phases (LayerwiseCalibration, BlockFinetune), not "
                            f"{type(pl_module).__name__}: run it without --dry_run")
        self.start = time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.measured["load_s"] = time.perf_counter() - self.start
        for callback in trainer.checkpoint_callbacks:  # block 0's checkpoint is measured, then thrown away
            callback.dirpath = str(Path(self.workdir.name) / "checkpoints")
        start = time.perf_counter()
        windows = trainer.datamodule.evaluation_windows()  # tokenized by every run: the export is verified on them
        self.measured["tokenize_evaluation_s"] = time.perf_counter() - start
        fp_model, fp_model_path = pl_module.fp_reference()
        self.fp_perplexity_cached = fp_perplexity_cache_file(resolve_model(fp_model_path), windows).exists()
        evaluated = self.export.evaluate and not self.fp_perplexity_cached  # as the export callback decides
        self.measured["fp_evaluation_s"] = evaluation_time(fp_model, trainer, windows) if evaluated else 0.0
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.fit_loop.max_epochs = 1  # block 0 only (the phase set the walk's length in its on_fit_start)
        self.measured["capture_s"] = pl_module.quantize_time_s  # the phase's own clock: inputs captured
        self.measured["capture_wall_s"] = time.perf_counter() - self.fit_start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.block_start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.measured["block_wall_s"] = time.perf_counter() - self.block_start  # its checkpoint included
        self.measured["block_quantize_s"] = pl_module.quantize_time_s - self.measured["capture_s"]
        self.measured["walk_peak_rss_bytes"] = peak_rss_bytes()
        checkpoint = Path(self.workdir.name) / "checkpoints" / "last.ckpt"
        self.measured["first_checkpoint_bytes"] = checkpoint.stat().st_size
        self.measured["inputs_bytes"] = pl_module.inputs.numel() * pl_module.inputs.element_size()
        self.needs = disk_needs(pl_module.model, pl_module.blocks, 1, pl_module.inputs, len(self.export.writers))

    def on_fit_end(self, trainer, pl_module) -> None:
        model = pl_module.exported_model()
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(pl_module.model_path))
        root, export_s = Path(self.workdir.name) / "export", 0.0
        for folder in self.export.writers:
            start = time.perf_counter()
            reloaded = self.export.write_verified(model, tokenizer, root, folder, trainer)
            export_s += time.perf_counter() - start
            if folder == "model" and self.export.evaluate:
                windows = trainer.datamodule.evaluation_windows()
                self.measured["quantized_evaluation_s"] = evaluation_time(reloaded, trainer, windows)
        self.measured["export_s"] = export_s
        self.measured["export_written_bytes"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        self.measured["peak_rss_bytes"] = peak_rss_bytes()
        if trainer.strategy.root_device.type == "cuda":
            self.measured["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        self.report(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.workdir.cleanup()

    def estimates(self, blocks: int) -> dict[str, float]:
        m = self.measured
        wall = (m["load_s"] + m["tokenize_evaluation_s"] + m["fp_evaluation_s"] + m["capture_wall_s"]
                + blocks * m["block_wall_s"] + m["export_s"] + m.get("quantized_evaluation_s", 0.0))
        # the last checkpoint, built in memory before it is written, holds every block's result, not one
        walk_peak = m["walk_peak_rss_bytes"] + (blocks - 1) * (m["first_checkpoint_bytes"] - m["inputs_bytes"])
        estimate = {"quantize_time_s": m["capture_s"] + blocks * m["block_quantize_s"], "wall_time_s": wall,
                    "peak_rss_bytes": max(walk_peak, m["peak_rss_bytes"])}
        if "peak_gpu_bytes" in m:  # blocks visit the GPU one at a time: the peak does not grow with depth
            estimate["peak_gpu_bytes"] = m["peak_gpu_bytes"]
        return estimate | self.needs | {"disk_bytes": sum(self.needs.values())}

    def report(self, trainer, pl_module) -> None:
        result = {"model": str(pl_module.model_path), "phase": type(pl_module).__name__,
                  "blocks": len(pl_module.blocks), "device": str(trainer.strategy.root_device),
                  "estimate": self.estimates(len(pl_module.blocks)), "measured": self.measured,
                  "fp_perplexity_cached": self.fp_perplexity_cached,
                  "run_folder": str(self.export.dirpath), "free_disk_bytes": free_bytes(self.export.dirpath)}
        print(format_report(result))
        if self.output:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.output).write_text(json.dumps(result, indent=2) + "\n")


def evaluation_time(model: torch.nn.Module, trainer, windows: torch.Tensor, timed_batches: int = 4) -> float:
    """Seconds the export callback's evaluation of `model` on `windows` takes, from a few of its batches: the first
    (with the moves to the device and back, and a quantized model's first decoding) once, the median of up to
    `timed_batches` more for each batch after it."""
    batches = windows.split(EVAL_BATCH_SIZE)
    start = time.perf_counter()
    to_device(model, trainer.strategy.root_device)
    try:
        perplexity(model, batches[0], EVAL_BATCH_SIZE)
        first = time.perf_counter() - start
        seconds = [timed(perplexity, model, batch, EVAL_BATCH_SIZE) for batch in batches[1 : 1 + timed_batches]]
    finally:
        start = time.perf_counter()
        to_device(model, "cpu")
    first += time.perf_counter() - start
    return first + (len(batches) - 1) * (statistics.median(seconds) if seconds else 0.0)


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_report(result: dict) -> str:
    estimate, measured, blocks = result["estimate"], result["measured"], result["blocks"]
    size = {key: size_text(value) for key, value in estimate.items() if key.endswith("_bytes")}
    lines = [f"lqtk dry run: {result['phase']} on {result['model']} ({blocks} blocks, {result['device']}), "
             "estimated from block 0:",
             f"  quantize time  {estimate['quantize_time_s']:9.1f} s   (capture {measured['capture_s']:.1f} s + "
             f"{blocks} × {measured['block_quantize_s']:.2f} s)",
             f"  wall time      {estimate['wall_time_s']:9.1f} s   ({blocks} × {measured['block_wall_s']:.2f} s; "
             f"evaluation fp {measured['fp_evaluation_s']:.1f} s, quantized "
             f"{measured.get('quantized_evaluation_s', 0.0):.1f} s; export {measured['export_s']:.1f} s)",
             f"  peak RAM (RSS) {size['peak_rss_bytes']:>11}"]
    if "peak_gpu_bytes" in estimate:
        lines.append(f"  peak GPU       {size['peak_gpu_bytes']:>11}   (torch.cuda.max_memory_allocated)")
    lines.append(f"  disk           {size['disk_bytes']:>11}   (checkpoint {size['checkpoint_bytes']}, export "
                 f"{size['export_bytes']}; {size_text(result['free_disk_bytes'])} free for {result['run_folder']})")
    if estimate["disk_bytes"] > result["free_disk_bytes"]:
        lines.append("  the run folder's filesystem lacks that room: the run would be refused")
    return "\n".join(lines)

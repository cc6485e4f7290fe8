"""`ExportQuantized`: at the end of a phase, write the quantized model, prove the written folder loads and computes
what the phase computed, evaluate it, and write `metrics.json` beside it.

    <dirpath>/model/         the export (see lqtk.export.format), renamed into place only once verified
    <dirpath>/metrics.json   method, bits_per_weight, perplexity, fp_perplexity, quantize_time_s, wall_time_s, ...
"""

import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback
from transformers import AutoTokenizer

from lqtk.errors import LqtkError
from lqtk.evaluate import EVAL_BATCH_SIZE, fp_perplexity, perplexity
from lqtk.export.format import bits_per_weight, save_quantized
from lqtk.models import load_causal_lm, resolve_model
from lqtk.nn import quantized_layers


class ExportQuantized(Callback):
    """Export, verify and evaluate the phase's quantized model.

    Args:
        dirpath: Run folder; the model goes to `dirpath/model`, the figures to `dirpath/metrics.json`.
        overwrite: Replace a finished export already in `dirpath` (otherwise the run refuses to start).
        evaluate: Measure fp and quantized perplexity on the datamodule's evaluation windows.
        verify_windows: Evaluation windows on which the reloaded export's logits must match the in-memory model.
        atol: Largest allowed absolute logit difference between the reloaded export and the in-memory model.
    """

    def __init__(self, dirpath: str, overwrite: bool = False, evaluate: bool = True, verify_windows: int = 2,
                 atol: float = 1e-4):
        self.dirpath = Path(dirpath)
        self.overwrite, self.evaluate, self.verify_windows, self.atol = overwrite, evaluate, verify_windows, atol
        self.fp_perplexity: float | None = None

    @property
    def model_dir(self) -> Path:
        return self.dirpath / "model"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.start = time.perf_counter()
        if self.model_dir.exists() and not self.overwrite:
            raise LqtkError(f"{self.model_dir} already holds a finished export: choose another output folder "
                            "(trainer.default_root_dir) or pass --overwrite true to replace it")
        for stale in self.dirpath.glob(".export-*"):  # left by a run killed while exporting
            shutil.rmtree(stale, ignore_errors=True)

    def state_dict(self) -> dict:
        return {"fp_perplexity": self.fp_perplexity}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fp_perplexity = state_dict["fp_perplexity"]

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.evaluate and self.fp_perplexity is None:  # measured before the first block is quantized
            model_dir = resolve_model(pl_module.model_path)
            self.fp_perplexity = self._on_device(pl_module.model, trainer, fp_perplexity, model_dir)

    def _on_device(self, model, trainer, evaluate, *args):
        """Run `evaluate` on the evaluation windows with the model on the trainer's device (then back on CPU)."""
        model.to(trainer.strategy.root_device)
        try:
            return evaluate(model, *args, trainer.datamodule.evaluation_windows(), EVAL_BATCH_SIZE)
        finally:
            model.to("cpu")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        model = pl_module.model
        if not quantized_layers(model):
            raise LqtkError("the phase produced no quantized layer: check the recipe's `skip` list")
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.dirpath, prefix=".export-") as tmp:
            tmp = Path(tmp) / "model"
            save_quantized(model, tmp)
            AutoTokenizer.from_pretrained(resolve_model(pl_module.model_path)).save_pretrained(tmp)
            reloaded = load_causal_lm(tmp)
            self._verify(model, reloaded, trainer)
            metrics = self._metrics(pl_module, reloaded, trainer)
            if self.model_dir.exists():  # only reached with overwrite: setup refused otherwise
                shutil.rmtree(self.model_dir)
            tmp.rename(self.model_dir)
        (self.dirpath / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps({k: v for k, v in metrics.items() if k != "layer_errors"}, indent=2))

    @torch.no_grad()
    def _verify(self, model, reloaded, trainer) -> None:
        """The export must compute what the phase computed: compare logits on a few evaluation windows."""
        windows = trainer.datamodule.evaluation_windows()[: self.verify_windows]
        diff = (model(windows, use_cache=False).logits - reloaded(windows, use_cache=False).logits).abs().max()
        if not diff <= self.atol:
            raise LqtkError(f"the written export does not reproduce the quantized model (max logit difference "
                            f"{diff:.3g} > {self.atol}); nothing was written. This is a bug in the export of its "
                            "weight format: please report it")

    def _metrics(self, pl_module, model, trainer) -> dict:
        metrics = {
            "method": "+".join(sorted({layer.method for layer in quantized_layers(model).values()})),
            "quantizer": pl_module.identity()["quantizer"],
            "bits_per_weight": bits_per_weight(model),
            "quantize_time_s": pl_module.quantize_time_s,
        }
        if self.evaluate:
            ppl, tokens = self._on_device(model, trainer, perplexity)
            data = trainer.datamodule
            metrics.update(perplexity=ppl, fp_perplexity=self.fp_perplexity, ratio_to_fp=ppl / self.fp_perplexity,
                           tokens=tokens, seq_len=data.seq_len, bos=data.bos)
        metrics.update(wall_time_s=time.perf_counter() - self.start,
                       peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       model=str(pl_module.model_path), export=str(self.model_dir),
                       layer_errors=pl_module.layer_errors)
        return metrics

"""`ExportQuantized`: at the end of a phase, write the quantized model, prove the written folder loads and computes
what the phase computed, evaluate it, and write `metrics.json` beside it.

    <dirpath>/model/         the export (see lqtk.export.format), renamed into place only once verified
    <dirpath>/model-hf-aqlm/ with `hf_aqlm`: the same model in the Hugging Face AQLM layout (lqtk.export.hf_aqlm),
                             verified by loading it with plain transformers + aqlm
    <dirpath>/model-compressed-tensors/, <dirpath>/model-gptq/
                             with `serving_formats`: the same (affine) model in compressed-tensors pack-quantized and
                             GPTQ v1 layouts (lqtk.export.serving), verified by loading them: with transformers +
                             compressed-tensors when installed, else (and for GPTQ, whose loader needs gptqmodel) by
                             lqtk.export.serving's own decoder of the written layout
    <dirpath>/metrics.json   method, bits_per_weight, perplexity, fp_perplexity, quantize_time_s, wall_time_s, ...
"""

import importlib.util
import json
import logging
import resource
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from lightning import Callback
from transformers import AutoTokenizer

from lqtk.disk import check_disk_space, disk_needs
from lqtk.errors import LqtkError
from lqtk.evaluate import EVAL_BATCH_SIZE, fp_perplexity, perplexity, streamed_logits
from lqtk.export.gguf import GGUF_NAME, export_gguf, with_gguf_embedding
from lqtk.export.hf_aqlm import save_hf_aqlm
from lqtk.export.serving import (
    SERVING_FORMATS,
    check_quantizer_servable,
    load_compressed_tensors,
    load_decoded,
    save_serving,
    serving_folder,
)
from lqtk.formats import AQLMFormat, GGMLFormat
from lqtk.gguf_file import check_architecture, load_gguf
from lqtk.model_format import bits_per_weight, save_quantized
from lqtk.models import load_causal_lm, resolve_model
from lqtk.nn import quantized_layers
from lqtk.phases.base import Phase
from lqtk.phases.walk import BlockWalk
from lqtk.streaming import load_outside_blocks, materialize_all, release_outside_blocks, to_device, weight_files

log = logging.getLogger(__name__)

_COMPRESSED_TENSORS_AVAILABLE = importlib.util.find_spec("compressed_tensors") is not None


class ExportQuantized(Callback):
    """Export, verify and evaluate the phase's quantized model.

    Args:
        dirpath: Run folder; the model goes to `dirpath/model`, the figures to `dirpath/metrics.json`.
        overwrite: Replace a finished export already in `dirpath` (otherwise the run refuses to start).
        evaluate: Measure fp and quantized perplexity on the datamodule's evaluation windows.
        verify_windows: Evaluation windows on which the reloaded export's logits must match the in-memory model.
        atol: Largest allowed absolute logit difference between the reloaded export and the in-memory model.
        hf_aqlm: Also write `model-hf-aqlm/`, loadable by plain transformers with the `aqlm` package (AQLM only).
        hf_atol: `atol` for the HF AQLM export: aqlm's kernels sum in another order (SmolLM2's 30 blocks: 4e-4 on
            logits of magnitude ~30), while a layout error would be off by O(1).
        max_shard_mb: Largest shard of the lqtk export in MiB: a larger model is written as shards with an index, as
            transformers writes them (the export holds one shard and one block at a time).
        serving_formats: Also write the model in these serving formats, beside `model/`: "compressed-tensors"
            (`model-compressed-tensors/`, pack-quantized: vLLM, transformers + compressed-tensors) and "gptq"
            (`model-gptq/`, the GPTQ v1 checkpoint: transformers + optimum + gptqmodel, vLLM). Affine models only
            (RTN, GPTQ, LeanQuant's affine grid); each is checked to compute the phase's logits within `atol`.
        gguf: Also write `model.gguf` for llama.cpp (models quantized with lqtk.quant.GGML: their blocks as they
            are; lqtk.export.gguf), checked through transformers' GGUF loader: its logits must be the export's with
            the token embedding the GGUF stores (llama.cpp's Q8_0 or Q6_K), within `atol`.
        gguf_file_type: The llama.cpp file type the GGUF records (e.g. Q4_K_M); default: that of most weights.
    """

    def __init__(self, dirpath: str, overwrite: bool = False, evaluate: bool = True, verify_windows: int = 2,
                 atol: float = 1e-4, hf_aqlm: bool = False, hf_atol: float = 1e-2, max_shard_mb: int = 128,
                 serving_formats: list[str] | None = None, gguf: bool = False, gguf_file_type: str | None = None):
        self.dirpath = Path(dirpath)
        self.overwrite, self.evaluate, self.verify_windows = overwrite, evaluate, verify_windows
        self.serving_formats = list(dict.fromkeys(serving_formats or []))
        self.gguf, self.gguf_file_type = gguf, gguf_file_type
        unknown = sorted(set(self.serving_formats) - set(SERVING_FORMATS))
        if unknown:
            raise LqtkError(f"unknown export.serving_formats {unknown}: choose from {sorted(SERVING_FORMATS)}")
        # folder: (writer, atol of its check, loader of the written folder: the lqtk export reloads lazily, the HF
        # AQLM layout through transformers, the serving layouts through their loader or lqtk's decoder of them)
        shard_bytes = max_shard_mb * 2**20
        self.writers = {"model": (partial(save_quantized, max_shard_bytes=shard_bytes), atol,
                                  partial(load_causal_lm, lazy=True))}
        if hf_aqlm:
            self.writers["model-hf-aqlm"] = (save_hf_aqlm_loaded, hf_atol, partial(load_causal_lm, lazy=False))
        for format_name in self.serving_formats:
            writer = partial(save_serving, format_name=format_name, max_shard_bytes=shard_bytes)
            in_transformers = format_name == "compressed-tensors" and _COMPRESSED_TENSORS_AVAILABLE
            self.writers[serving_folder(format_name)] = (
                writer, atol, load_compressed_tensors if in_transformers else load_decoded)
        self.fp_perplexity: float | None = None
        self.disk_checked_with_blocks = False

    @property
    def model_dir(self) -> Path:
        return self.dirpath / "model"

    @property
    def exports(self) -> list[str]:
        return [*self.writers, *([GGUF_NAME] if self.gguf else [])]

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.start = time.perf_counter()
        for folder in self.exports:
            if (self.dirpath / folder).exists() and not self.overwrite:
                raise LqtkError(f"{self.dirpath / folder} already holds a finished export: choose another output "
                                "folder (trainer.default_root_dir) or pass --overwrite true to replace it")
        for stale in self.dirpath.glob(".export-*"):  # left by a run killed while exporting
            shutil.rmtree(stale, ignore_errors=True)

    def state_dict(self) -> dict:
        return {"fp_perplexity": self.fp_perplexity}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fp_perplexity = state_dict["fp_perplexity"]

    def on_fit_start(self, trainer, pl_module: Phase) -> None:
        # refused now rather than after the whole phase: by the method a calibration phase applies, else by the
        # layers of the model a phase tunes
        checked = self.serving_formats or "model-hf-aqlm" in self.writers
        formats = None if pl_module.quantizer or not checked else {
            m.format for m in quantized_layers(pl_module.model).values()}
        if "model-hf-aqlm" in self.writers:
            is_aqlm = pl_module.quantizer.format == AQLMFormat.name if pl_module.quantizer else formats == {"aqlm"}
            if not is_aqlm:
                raise LqtkError("export.hf_aqlm needs an AQLM model: set export.hf_aqlm false, or quantize with "
                                "lqtk.quant.AQLM")
        for format_name in self.serving_formats:
            if pl_module.quantizer:
                check_quantizer_servable(pl_module.quantizer, format_name)
            elif formats - {"affine"}:
                raise LqtkError(f"export.serving_formats has {format_name!r}, which stores 'affine' layers only, "
                                f"and this model has {sorted(formats - {'affine'})} layers: remove it")
        if self.gguf:
            check_architecture(pl_module.model.config)
            if pl_module.quantizer is not None and pl_module.quantizer.format != GGMLFormat.name:
                raise LqtkError(f"export.gguf writes llama.cpp's types, and {type(pl_module.quantizer).__name__} "
                                "writes lqtk's own: quantize with lqtk.quant.GGML, or set export.gguf false (and "
                                "round the export later: lqtk export --format gguf --type T)")
        if self.evaluate and self.fp_perplexity is None and trainer.is_global_zero:  # before the phase's work
            fp_model, fp_model_path = pl_module.fp_reference()
            self.fp_perplexity = self._on_device(fp_model, trainer, fp_perplexity, resolve_model(fp_model_path))

    def _on_device(self, model, trainer, evaluate, *args):
        """Run `evaluate` on the evaluation windows with the model on the trainer's device (then back on CPU); a
        streamed model's blocks go there one at a time."""
        to_device(model, trainer.strategy.root_device)
        try:
            return evaluate(model, *args, trainer.datamodule.evaluation_windows(), EVAL_BATCH_SIZE)
        finally:
            to_device(model, "cpu")

    def on_train_start(self, trainer, pl_module) -> None:
        if isinstance(pl_module, BlockWalk):  # the cached inputs and the fp part of the export, before any block
            check_disk_space(self.dirpath, self._disk_needs(pl_module, finished=0))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Before the first checkpoint of the run is written: the whole run's disk, from the blocks finished."""
        if isinstance(pl_module, BlockWalk) and not self.disk_checked_with_blocks:
            check_disk_space(self.dirpath, self._disk_needs(pl_module, finished=trainer.current_epoch + 1))
            self.disk_checked_with_blocks = True

    def _disk_needs(self, pl_module: BlockWalk, finished: int) -> dict[str, int]:
        return disk_needs(pl_module.model, pl_module.blocks, finished, pl_module.inputs, exports=len(self.writers))

    def on_fit_end(self, trainer, pl_module) -> None:
        model = pl_module.exported_model()  # every process: a sharded phase gathers its model
        if not trainer.is_global_zero:
            return
        if not quantized_layers(model):
            raise LqtkError("the phase produced no quantized layer: check the recipe's `skip` list")
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(pl_module.model_path))
        with tempfile.TemporaryDirectory(dir=self.dirpath, prefix=".export-") as tmp:
            for folder in self.writers:
                reloaded = self.write_verified(model, tokenizer, Path(tmp), folder, trainer)
                if folder == "model":
                    metrics = self._metrics(pl_module, reloaded, trainer)
                    for name, content in pl_module.export_files().items():
                        (Path(tmp) / folder / name).write_text(json.dumps(content, indent=2) + "\n")
                    if self.gguf:
                        fp_model = getattr(pl_module, "fp_model_path", pl_module.model_path)  # names the model
                        self.write_gguf_verified(Path(tmp), trainer, resolve_model(fp_model))
            for folder in self.exports:  # every export verified: put them in place
                if (self.dirpath / folder).is_dir():  # only reached with overwrite: setup refused otherwise
                    shutil.rmtree(self.dirpath / folder)
                (Path(tmp) / folder).replace(self.dirpath / folder)
        (self.dirpath / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        per_layer = set(pl_module.phase_metrics())
        print(json.dumps({k: v for k, v in metrics.items() if k not in per_layer}, indent=2))

    def write_verified(self, model, tokenizer, root: Path, folder: str, trainer) -> torch.nn.Module:
        """Write export `folder` of `model` under `root`, reload it and check it computes what `model` computes;
        the reloaded model. The logits of `model` go to files first and a streamed `model` gives back its tensors
        outside the blocks before the export is reloaded: one vocabulary-sized embedding and head at a time."""
        write, atol, load = self.writers[folder]
        load_outside_blocks(model)  # given back by the previous export's check
        write(model, root / folder)
        tokenizer.save_pretrained(root / folder)
        windows = trainer.datamodule.evaluation_windows()[: self.verify_windows]
        expected = root / f".{folder}-logits"
        expected.mkdir()
        for batch, start, logits in streamed_logits(model, windows):
            torch.save(logits, expected / f"{batch}-{start}.pt")
        if weight_files(model) is not None:  # it reads them back from its files when needed
            release_outside_blocks(model)
        reloaded = load(root / folder)
        self._verify(expected, reloaded, windows, folder, atol)
        shutil.rmtree(expected)
        return reloaded

    def write_gguf_verified(self, root: Path, trainer, source: Path) -> None:
        """Write root/model.gguf from the export in root/model (named after the fp model in `source`) and check that
        transformers' GGUF loader computes the logits of that export with the GGUF's own token embedding."""
        export_gguf(root / "model", root / GGUF_NAME, file_type=self.gguf_file_type, source=source)
        windows = trainer.datamodule.evaluation_windows()[: self.verify_windows]
        expected = root / f".{GGUF_NAME}-logits"
        expected.mkdir()
        reference = with_gguf_embedding(load_causal_lm(root / "model"), root / GGUF_NAME)
        for batch, start, logits in streamed_logits(reference, windows):
            torch.save(logits, expected / f"{batch}-{start}.pt")
        del reference
        self._verify(expected, load_gguf(root / GGUF_NAME), windows, GGUF_NAME, self.writers["model"][1])
        shutil.rmtree(expected)

    @torch.no_grad()
    def _verify(self, expected: Path, reloaded, windows: torch.Tensor, folder: str, atol: float) -> None:
        """The export must compute what the phase computed: compare its logits on a few evaluation windows with the
        phase's model's, saved in `expected` (the model runs block by block: a streamed one never holds more than
        one block)."""
        diff = max((torch.load(expected / f"{batch}-{start}.pt") - logits).abs().max()
                   for batch, start, logits in streamed_logits(reloaded, windows))
        if not diff <= atol:
            raise LqtkError(f"the written export {folder}/ does not reproduce the quantized model (max logit "
                            f"difference {diff:.3g} > {atol}); nothing was written. This is a bug in the export of "
                            "its weight format: please report it")
        log.info("%s/ reproduces the quantized model: max logit difference %.3g", folder, diff)

    def _metrics(self, pl_module, model, trainer) -> dict:
        identity = pl_module.identity()
        metrics = {
            "method": "+".join(sorted({layer.method for layer in quantized_layers(model).values()})),
            "phase": type(pl_module).__name__,
            **{key: value for key, value in identity.items()
               if key in ("quantizer", "block_tuning", "tuning", "distillation")},
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
                       **({"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if torch.cuda.is_initialized() else {}),
                       model=str(pl_module.model_path), export=str(self.model_dir),
                       **({"serving_exports": {name: str(self.dirpath / serving_folder(name))
                                               for name in self.serving_formats}} if self.serving_formats else {}),
                       **pl_module.phase_metrics())
        return metrics


def save_hf_aqlm_loaded(model, out: Path) -> None:
    """`save_hf_aqlm` of a streamed model: an AQLM model is small, so its blocks are all loaded first."""
    save_hf_aqlm(materialize_all(model), out)

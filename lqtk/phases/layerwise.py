"""`LayerwiseCalibration`: quantize a causal LM block by block on cached block inputs (the GPTQ pipeline).

One epoch per decoder block. Before the first block, the calibration windows are run through the model up to
block 0 and its inputs are cached. Within block k, the block's Linears are taken in sequential groups (Linears
that read the same input: q/k/v, then o, then gate/up, then down): for each group the calibration inputs run
through the block while hooks accumulate the group's input Hessians, then the group is quantized and swapped for
QuantizedLinears, so later groups calibrate on the outputs of the quantized ones. A last pass through the fully
quantized block gives block k+1's inputs. The training steps are the calibration batches of the first pass; the
progress bar names the pass under way and extrapolates the time left for the whole walk.

Checkpoints (one per block) hold only what the walk produced: the finished blocks' quantized tensors, the next
block's inputs and the run's identity; `ckpt_path=last` resumes after the last finished block.
"""

import dataclasses
import time

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from lqtk.errors import LqtkError
from lqtk.models import decoder_blocks, linear_layers, load_causal_lm
from lqtk.nn import QuantizedLinear, quantized_layers, quantized_linear_from_config, set_submodule
from lqtk.quant.base import WeightQuantizer, accumulate_hessian


class _StopForward(Exception):
    """Raised by a hook once the Linears being calibrated have seen their inputs: the rest of the block is
    not needed for this pass."""


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output  # transformers < 5 returns a tuple


class LayerwiseCalibration(LightningModule):
    """Block-by-block post-training quantization of every Linear inside the decoder blocks.

    Args:
        model: Local HF causal-LM folder, or a reference model name (`smollm2-135m`, `tiny-llama`).
        quantizer: The method and its settings (`class_path: lqtk.quant.GPTQ`, `init_args: {bits: 4, ...}`).
        sequential: Calibrate each group of Linears on the outputs of the already quantized groups of the same
            block (true-sequential); if false, all Linears of a block calibrate on the fp block's activations.
        skip: Names (suffixes) of Linears inside the blocks to keep in full precision, e.g. `mlp.gate` of MoE routers.
    """

    def __init__(self, model: str, quantizer: WeightQuantizer, sequential: bool = True, skip: list[str] | None = None):
        super().__init__()
        # No save_hyperparameters(): LightningCLI would let a checkpoint's hyperparameters override the recipe on
        # resume; instead `identity()` is checkpointed and a mismatch is refused.
        self.model_path, self.quantizer, self.sequential = model, quantizer, sequential
        self.skip = tuple(skip or ())
        self.automatic_optimization = False
        self.inputs: torch.Tensor | None = None  # (N, T, D) inputs of the current block, on the CPU
        self.quantize_time_s = 0.0
        self.layer_errors: dict[str, float] = {}  # relative output error of each quantized Linear
        self.status = ""

    # --- set-up -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Kept out of the module tree: Lightning must neither move the whole model to the device (blocks go one at
        # a time) nor checkpoint the fp weights.
        model = load_causal_lm(self.model_path)
        self.__dict__.update(model=model, blocks=decoder_blocks(model))
        self.groups = self._sequential_groups()

    def configure_optimizers(self):
        return None

    def configure_callbacks(self):
        return [BlockProgressBar(), BlockCheckpoint()]

    def on_fit_start(self) -> None:
        self.trainer.fit_loop.max_epochs = len(self.blocks)  # the phase's length is the model's depth
        start = time.perf_counter()
        inputs, self.block_kwargs = self._capture_block_inputs(self.trainer.datamodule.train_dataloader())
        if self.inputs is None:  # a fresh run; a resumed one has the next block's inputs from its checkpoint
            self.inputs = inputs
        self.quantize_time_s += time.perf_counter() - start

    def _capture_block_inputs(self, batches) -> tuple[torch.Tensor, list[dict]]:
        """Run each batch up to block 0 and keep what block 0 receives: hidden states and keyword arguments
        (position embeddings, masks) per batch, to be replayed into every block."""
        hidden, kwargs = [], []

        def capture(module, args, block_kwargs):
            hidden.append((args[0] if args else block_kwargs.pop("hidden_states")).cpu())
            kwargs.append({k: v for k, v in block_kwargs.items() if k != "hidden_states"})
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model.to(self.device)  # only the embedding runs; moved back below
            for batch in batches:
                try:
                    self.model(batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
            self.model.to("cpu")
        return torch.cat(hidden), kwargs

    def _linears(self, block) -> dict:
        return {name: m for name, m in linear_layers(block).items() if not name.endswith(self.skip)}

    def _sequential_groups(self) -> list[list[list[str]]]:
        """Per block, its Linears grouped by shared input in execution order (found by one probe forward of a
        short random input); one group of all of them when `sequential` is false."""
        if not self.sequential:
            return [[list(self._linears(block))] for block in self.blocks]
        seen: list[list[tuple[torch.Tensor, list[str]]]] = [[] for _ in self.blocks]

        def record(block_seen, name, x):  # inputs are kept alive in `seen`, so identity comparison is safe
            for x_seen, names in block_seen:
                if x_seen is x:
                    return names.append(name)
            block_seen.append((x, [name]))

        hooks = [m.register_forward_pre_hook(lambda m, args, s=seen[i], n=name: record(s, n, args[0]))
                 for i, block in enumerate(self.blocks) for name, m in self._linears(block).items()]
        try:
            with torch.no_grad():
                self.model(torch.randint(0, self.model.config.vocab_size, (1, 8)), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return [[names for _, names in block_seen] for block_seen in seen]

    # --- the walk -----------------------------------------------------------------------------------------
    @property
    def block(self) -> torch.nn.Module:
        return self.blocks[self.current_epoch]

    def on_train_epoch_start(self) -> None:
        self.epoch_start = time.perf_counter()
        self.block.to(self.device)
        self.hessian: tuple[torch.Tensor, int] | None = None  # (H, tokens) of the group being calibrated

    def _batch(self, index: int) -> tuple[slice, torch.Tensor, dict]:
        size = self.trainer.datamodule.batch_size
        rows = slice(index * size, (index + 1) * size)
        return rows, self.inputs[rows].to(self.device), self.block_kwargs[index]

    @torch.no_grad()
    def training_step(self, batch, batch_idx) -> None:
        """The steps are the calibration batches; `batch_idx` picks their cached block inputs. The steps
        calibrate the block's first group of Linears; the later groups and the outputs follow at epoch end."""
        self._calibrate(batch_idx, self.groups[self.current_epoch][0])

    def _calibrate(self, batch_index: int, names: list[str]) -> None:
        self._report(f"calibrating {', '.join(names)}")
        if self.quantizer.needs_hessian:
            _, hidden, kwargs = self._batch(batch_index)
            self._accumulate_hessian(hidden, kwargs, names)

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        groups = self.groups[self.current_epoch]
        self._quantize_group(groups[0])
        for names in groups[1:]:
            for index in range(len(self.block_kwargs)):
                self._calibrate(index, names)
            self._quantize_group(names)
        next_inputs = torch.empty_like(self.inputs)
        for index in range(len(self.block_kwargs)):
            self._report("computing the quantized block's outputs")
            rows, hidden, kwargs = self._batch(index)
            next_inputs[rows] = _block_output(self.block(hidden, **kwargs)).cpu()
        self.inputs = next_inputs
        self.block.to("cpu")
        self.quantize_time_s += time.perf_counter() - self.epoch_start

    def _report(self, status: str) -> None:
        self.status = f"block {self.current_epoch + 1}/{len(self.blocks)} {status}"
        bar = self.trainer.progress_bar_callback
        if isinstance(bar, BlockProgressBar):
            bar.show(self)

    def _accumulate_hessian(self, hidden: torch.Tensor, kwargs: dict, names: list[str]) -> None:
        """Add this batch to the group's Hessian. The Linears of a group share their input, so they share H: the
        hook on the first one accumulates it and stops the forward there."""
        def hook(module, args):
            if self.hessian is None:
                self.hessian = (torch.zeros(module.in_features, module.in_features, device=self.device), 0)
            hessian, count = self.hessian
            self.hessian = (hessian, accumulate_hessian(hessian, count, args[0]))
            raise _StopForward

        handle = self.block.get_submodule(names[0]).register_forward_pre_hook(hook)
        try:
            self.block(hidden, **kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()

    def _quantize_group(self, names: list[str]) -> None:
        prefix = self._block_prefix()
        hessian = self.hessian[0] if self.hessian else None
        self.hessian = None
        for name in names:
            linear = self.block.get_submodule(name)
            self._report(f"quantizing {name}")
            weight = self.quantizer.quantize(linear.weight.detach(), hessian)
            quantized = QuantizedLinear(weight, linear.bias).to(self.device)
            set_submodule(self.block, name, quantized)
            self.layer_errors[prefix + name] = relative_output_error(linear.weight, quantized, hessian)

    def _block_prefix(self) -> str:
        names = {id(m): n for n, m in self.model.named_modules()}
        return f"{names[id(self.blocks)]}.{self.current_epoch}."

    # --- checkpoints --------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed by this run."""
        quantizer = {"class": type(self.quantizer).__qualname__, **dataclasses.asdict(self.quantizer)}
        return {"model": str(self.model_path), "quantizer": quantizer, "sequential": self.sequential,
                "skip": list(self.skip), "data": dict(self.trainer.datamodule.hparams)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        layers = quantized_layers(self.model)
        checkpoint["lqtk"] = {
            "identity": self.identity(),
            "layers": {name: (m.layer_config(), m.tensors(), m.bias) for name, m in layers.items()},
            "inputs": self.inputs,
            "quantize_time_s": self.quantize_time_s,
            "layer_errors": self.layer_errors,
            "rng": torch.random.get_rng_state(),  # for methods that draw random numbers (k-means init, rotations)
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lqtk")
        if state is None:
            raise LqtkError("this checkpoint was not written by LayerwiseCalibration: pass a checkpoint of this "
                            "recipe's run, or start afresh without --ckpt_path")
        ours = self.identity()
        if state["identity"] != ours:
            changed = sorted(k for k in ours if state["identity"].get(k) != ours[k])
            raise LqtkError(f"the checkpoint belongs to another run (different {', '.join(changed)}): resume with "
                            "the recipe that wrote it, or use another trainer.default_root_dir for this one")
        for name, (config, tensors, bias) in state["layers"].items():
            set_submodule(self.model, name, quantized_linear_from_config(config, tensors, bias))
        self.inputs = state["inputs"]
        self.quantize_time_s = state["quantize_time_s"]
        self.layer_errors = state["layer_errors"]
        torch.random.set_rng_state(state["rng"])


def relative_output_error(weight: torch.Tensor, quantized: QuantizedLinear, hessian: torch.Tensor | None) -> float:
    """||(W - Q) X||² / ||W X||² over the calibration inputs (tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)); plain weight error
    when there is no Hessian."""
    w = weight.detach().float()
    delta = w - quantized.quantized_weight.dequantize().to(w.device)
    if hessian is None:
        return (delta.pow(2).sum() / w.pow(2).sum()).item()
    return ((delta @ hessian * delta).sum() / (w @ hessian * w).sum()).item()


class BlockProgressBar(RichProgressBar):
    """Lightning's (rich) progress bar, described by what the phase is doing (block k/n, the current Linears) and
    the time left for the whole walk, extrapolated from the blocks finished in this run."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.walk_start, self.first_block = time.perf_counter(), trainer.current_epoch

    def show(self, pl_module) -> None:
        if self.progress is None or self.train_progress_bar_id is None:
            return
        done = pl_module.current_epoch - self.first_block
        eta = ""
        if done > 0:
            left = (time.perf_counter() - self.walk_start) / done * (len(pl_module.blocks) - pl_module.current_epoch)
            eta = f" · walk ETA {left / 60:.1f} min"
        self.progress.update(self.train_progress_bar_id, description=pl_module.status + eta)
        self.refresh()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.show(pl_module)


class BlockCheckpoint(ModelCheckpoint):
    """`checkpoints/last.ckpt` after every block (epoch). ModelCheckpoint's own rule skips a save while the
    optimizer step count stands still, and a calibration phase takes no optimizer steps."""

    def __init__(self, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

"""`BlockWalk`: what every block-by-block phase shares (LayerwiseCalibration, BlockFinetune).

One epoch per decoder block. Before the first block the calibration windows run through the model up to block 0 and
its inputs are cached (with the keyword arguments every block receives: position embeddings, masks); each epoch works on
one block with those inputs and leaves the next block's inputs in `self.inputs`. A checkpoint after every block
holds what the walk produced plus the run's `identity()`; `ckpt_path=last` continues after the last finished block
and refuses a checkpoint of another run.

With several processes (`lqtk.phases.processes`), each takes a contiguous share of the calibration batches and keeps
only their inputs; a checkpoint holds all of them, so a run resumes on any number of processes.
"""

import functools
import time
from pathlib import Path

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from lqtk.data import process_batches
from lqtk.errors import LqtkError
from lqtk.models import block_output
from lqtk.phases.block_tuning import BlockTuning, tune_block
from lqtk.phases.processes import gather_to
from lqtk.streaming import activation_buffer, block_prefix, to_device


class StopForward(Exception):
    """Raised by a hook once what a pass needs has been seen: the rest of the forward is not needed."""


class BlockWalk(LightningModule):
    """Base of the block-by-block phases. Subclasses set `self.model` and `self.blocks` in `setup`, do a block's
    work in the epoch hooks, and add their own state with `walk_state` / `restore_walk_state`."""

    def __init__(self):
        super().__init__()
        # No save_hyperparameters(): LightningCLI would let a checkpoint's hyperparameters override the recipe on
        # resume; instead `identity()` is checkpointed and a mismatch is refused.
        self.automatic_optimization = False
        self.inputs: torch.Tensor | None = None  # (N, T, D) inputs of the current block (this process's), on the CPU
        self.activations_dir: Path | None = None  # if set, block inputs and outputs are memory-mapped files there
        self.batch_index = 0  # the calibration batch being run (set by `batch`)
        self.compute_dtype = torch.float32  # of the block forwards (`autocast`)
        self.quantize_time_s = 0.0  # time spent in the phase's own work (not loading, evaluating or exporting)
        self.status = ""

    def configure_optimizers(self):
        return None

    def configure_callbacks(self):
        return [BlockProgressBar(), BlockCheckpoint()]

    def process_batches(self) -> range:
        """Indices (among all calibration batches) of the batches this process calibrates on."""
        data = self.trainer.datamodule
        return process_batches(data.num_calibration_windows, data.batch_size, self.global_rank, self.trainer.world_size)

    def on_fit_start(self) -> None:
        self.trainer.fit_loop.max_epochs = len(self.blocks)  # the phase's length is the model's depth
        batches = self.trainer.datamodule.train_dataloader()  # tokenizes the text: data preparation, not timed
        start = time.perf_counter()
        inputs, self.block_kwargs = self.capture_block_inputs(batches)
        if self.inputs is None:  # a fresh run; a resumed one has the next block's inputs from its checkpoint
            self.inputs = inputs
        if self.activations_dir is not None:
            self.inputs = self.activation_buffer(self.inputs.shape).copy_(self.inputs)
        self.quantize_time_s += time.perf_counter() - start

    @torch.no_grad()
    def capture_block_inputs(self, batches) -> tuple[torch.Tensor, list[list[dict]]]:
        """Run each batch through the model with every block standing aside (passing its hidden states through
        unchanged) and keep block 0's hidden states and, per batch, the keyword arguments each block receives:
        position embeddings and masks differ between blocks where sliding-window and full attention alternate
        (Gemma-3), so block k is replayed with its own. Blocks share the objects they were passed, not copies."""
        hidden, kwargs = [], []

        def record(index, *args, **block_kwargs):
            hidden_states = args[0] if args else block_kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(hidden_states.cpu())
                kwargs.append([])
            kwargs[-1].append(block_kwargs)
            if index == len(self.blocks) - 1:
                raise StopForward  # the final norm and head are not needed
            return hidden_states

        for index, block in enumerate(self.blocks):
            block.forward = functools.partial(record, index)  # an instance attribute shadows the class's forward
        try:
            to_device(self.model, self.device)  # only the embedding runs (a streamed model's blocks are not loaded)
            for batch in batches:
                try:
                    self.model(batch.to(self.device), use_cache=False)
                except StopForward:
                    pass
        finally:
            for block in self.blocks:
                del block.forward
            to_device(self.model, "cpu")
        return torch.cat(hidden), kwargs

    @property
    def block(self) -> torch.nn.Module:
        return self.blocks[self.current_epoch]

    def block_prefix(self, index: int) -> str:
        """Module path of block `index` with a trailing dot (`model.layers.3.`)."""
        return block_prefix(self.model, index)

    def batch(self, index: int) -> tuple[slice, torch.Tensor, dict]:
        """Rows, cached inputs (on the device) and block keyword arguments of calibration batch `index`."""
        size = self.trainer.datamodule.batch_size
        rows = slice(index * size, (index + 1) * size)
        self.batch_index = index
        return rows, self.inputs[rows].to(self.device), self.block_kwargs[index][self.current_epoch]

    def autocast(self):
        """The context of the block forwards: matmuls in `compute_dtype`, anything else (cached inputs and outputs,
        Hessians, quantization) in fp32."""
        return torch.autocast(self.device.type, self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    @torch.no_grad()
    def block_outputs(self, block: torch.nn.Module) -> torch.Tensor:
        """`block` applied to every cached input batch: (N, T, D) on the CPU."""
        outputs = self.activation_buffer(self.inputs.shape)
        for index in range(len(self.block_kwargs)):
            rows, hidden, kwargs = self.batch(index)
            with self.autocast():
                outputs[rows] = block_output(block(hidden, **kwargs)).cpu()
        return outputs

    def activation_buffer(self, shape) -> torch.Tensor:
        """(N, T, D) in memory, or memory-mapped in `activations_dir` (a new file each time: see activation_buffer)."""
        file = None if self.activations_dir is None else self.activations_dir / f"block-{self.global_rank}.f32"
        return activation_buffer(shape, file)

    def tune_current_block(self, targets: torch.Tensor, tuning: BlockTuning) -> None:
        """Fine-tune the current block towards `targets` (N, T, D) on the cached inputs; its held-out errors go to
        `self.tuning_results`."""
        batches = [(hidden, targets[rows].to(self.device), kwargs)
                   for rows, hidden, kwargs in map(self.batch, range(len(self.block_kwargs)))]
        name = self.block_prefix(self.current_epoch).rstrip(".")
        self.tuning_results[name] = tune_block(self.block, batches, tuning, self.current_epoch, name)

    def report(self, status: str) -> None:
        report(self, status)

    def fp_reference(self) -> tuple[torch.nn.Module, str]:
        """The fp model the phase's result is compared with, and its path (the model itself, before the walk)."""
        return self.model, self.model_path

    def exported_model(self) -> torch.nn.Module:
        """The model the export writes (called on every process; rank 0's is written)."""
        return self.model

    def phase_metrics(self) -> dict:
        """Per-layer and per-block figures for metrics.json."""
        raise NotImplementedError

    # --- checkpoints --------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed by this run."""
        raise NotImplementedError

    def walk_state(self) -> dict:
        """The subclass's part of a checkpoint."""
        raise NotImplementedError

    def restore_walk_state(self, state: dict) -> None:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Called on every process; process 0 writes the checkpoint, with every process's block inputs."""
        shares = gather_to(0, self.inputs)
        checkpoint["lqtk"] = {"phase": type(self).__name__, "identity": self.identity(),
                              "inputs": None if shares is None else torch.cat(shares),
                              "quantize_time_s": self.quantize_time_s, "rng": torch.random.get_rng_state(),
                              **self.walk_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checked_state(checkpoint, type(self).__name__, self.identity())
        batches, size = self.process_batches(), self.trainer.datamodule.batch_size
        self.inputs = state["inputs"][batches.start * size: batches.stop * size]  # this process's share
        self.quantize_time_s = state["quantize_time_s"]
        torch.random.set_rng_state(state["rng"])  # for methods that draw random numbers
        self.restore_walk_state(state)


def beside_checkpoints(phase: LightningModule, name: str) -> Path:
    """`name` in the folder of the phase's `checkpoints/`, whose state the files kept there complete (a dry run moves
    both to a temporary folder)."""
    return Path(phase.trainer.checkpoint_callback.dirpath).parent / name


def block_file(phase: LightningModule, folder: str, index: int) -> Path:
    """`<folder>/<block index's prefix>safetensors` beside the phase's checkpoints."""
    return beside_checkpoints(phase, folder) / f"{block_prefix(phase.model, index)}safetensors"


def report(phase: LightningModule, status: str) -> None:
    """Show `status` of a block-by-block phase (one epoch per block in `phase.blocks`) on its progress bar."""
    phase.status = f"block {phase.current_epoch + 1}/{len(phase.blocks)} {status}"
    bar = phase.trainer.progress_bar_callback
    if isinstance(bar, BlockProgressBar):
        bar.show(phase)


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
    optimizer step count stands still, and the phases step their optimizers themselves (or have none)."""

    def __init__(self, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

"""`BlockWalk`: what every block-by-block phase shares (LayerwiseCalibration, BlockFinetune).

One epoch per decoder block. Before the first block the calibration windows run through the model up to block 0 and
its inputs are cached (with the keyword arguments every block receives: position embeddings, masks); each epoch works on
one block with those inputs and leaves the next block's inputs in `self.inputs`. A checkpoint after every block
holds what the walk produced plus the run's `identity()`; `ckpt_path=last` continues after the last finished block
and refuses a checkpoint of another run.

With several processes (`lqtk.phases.processes`), each takes a contiguous share of the calibration batches and keeps
only their inputs; a checkpoint holds all of them, so a run resumes on any number of processes.
"""

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from lqtk import console
from lqtk.anatomy import block_output, block_prefix
from lqtk.data import process_batches
from lqtk.forward import block_inputs
from lqtk.phases.base import Phase
from lqtk.phases.block_tuning import BlockTuning, tune_block
from lqtk.phases.processes import gather_to
from lqtk.streaming import activation_buffer, to_device


class BlockWalk(Phase):
    """Base of the block-by-block phases. Subclasses set `self.model` and `self.blocks` in `setup`, do a block's
    work in the epoch hooks, and add their own state with `walk_state` / `restore_walk_state`."""

    progress_label = "calibrate"  # what the progress lines call the walk

    def __init__(self):
        super().__init__()
        self.inputs: torch.Tensor | None = None  # (N, T, D) inputs of the current block (this process's), on the CPU
        self.activations_dir: Path | None = None  # if set, block inputs and outputs are memory-mapped files there
        self.batch_index = 0  # the calibration batch being run (set by `batch`)
        self.compute_dtype = torch.float32  # of the block forwards (`autocast`)
        self.status = ""

    def configure_optimizers(self):
        return None

    def configure_callbacks(self):
        return [*progress_bars(self, BlockProgressBar), BlockCheckpoint()]

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
        """Block 0's hidden states of every batch, and per batch the keyword arguments each block receives
        (`lqtk.forward.block_inputs`)."""
        hidden, kwargs = [], []
        to_device(self.model, self.device)  # only the embedding runs (a streamed model's blocks are not loaded)
        try:
            for batch in batches:
                batch_hidden, batch_kwargs = block_inputs(self.model, batch.to(self.device))
                hidden.append(batch_hidden.cpu())
                kwargs.append(batch_kwargs)
        finally:
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
        """The model itself, before the walk."""
        return self.model, self.model_path

    # --- checkpoints --------------------------------------------------------------------------------------
    def walk_state(self) -> dict:
        """The subclass's part of a checkpoint."""
        raise NotImplementedError

    def restore_walk_state(self, state: dict) -> None:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Called on every process; process 0 writes the checkpoint, with every process's block inputs."""
        shares = gather_to(0, self.inputs)
        self.save_phase_state(checkpoint, inputs=None if shares is None else torch.cat(shares),
                              rng=torch.random.get_rng_state(), **self.walk_state())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = self.load_phase_state(checkpoint)
        batches, size = self.process_batches(), self.trainer.datamodule.batch_size
        self.inputs = state["inputs"][batches.start * size: batches.stop * size]  # this process's share
        torch.random.set_rng_state(state["rng"])  # for methods that draw random numbers
        self.restore_walk_state(state)


def beside_checkpoints(phase: Phase, name: str) -> Path:
    """`name` in the folder of the phase's `checkpoints/`, whose state the files kept there complete (a dry run moves
    both to a temporary folder)."""
    return Path(phase.trainer.checkpoint_callback.dirpath).parent / name


def block_file(phase: Phase, folder: str, index: int) -> Path:
    """`<folder>/<block index's prefix>safetensors` beside the phase's checkpoints."""
    return beside_checkpoints(phase, folder) / f"{block_prefix(phase.model, index)}safetensors"


def report(phase: Phase, status: str) -> None:
    """Show `status` of a block-by-block phase (one epoch per block in `phase.blocks`) on its progress bar."""
    phase.status = f"block {phase.current_epoch + 1}/{len(phase.blocks)} {status}"
    bar = phase.trainer.progress_bar_callback
    if isinstance(bar, BlockProgressBar):
        bar.show(phase)


def progress_bars(phase: Phase, bar: type[RichProgressBar]) -> list[RichProgressBar]:
    """[bar()] in place of Lightning's rich bar; none with trainer.enable_progress_bar false (or another bar)."""
    return [bar()] if isinstance(phase.trainer.progress_bar_callback, RichProgressBar) else []


def epochs(trainer) -> int | None:
    """How many epochs the fit runs, where max_steps or max_epochs bound it (-1: unbounded)."""
    batches, max_epochs = trainer.num_training_batches, trainer.max_epochs
    by_epochs = max_epochs if max_epochs is not None and max_epochs > 0 else None
    if trainer.max_steps > 0 and 0 < batches < float("inf"):
        by_steps = -(-trainer.max_steps // int(batches))
        return by_steps if by_epochs is None else min(by_steps, by_epochs)
    return by_epochs


class PhaseProgressBar(RichProgressBar):
    """Lightning's rich bar on a terminal (`lqtk.console.terminal`), numbering epochs from 1 of their real count;
    where the output is a file or a pipe, no bar (no control sequences) but plain lines, which subclasses print
    when `self.plain`. Only process 0 shows either."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # disables the bar on the other processes
        self.plain = self.is_enabled and not console.terminal()
        if self.plain:
            self.disable()

    def _get_train_description(self, current_epoch: int) -> str:
        total = epochs(self.trainer)
        description = f"Epoch {current_epoch + 1}" + (f"/{total}" if total else "")
        return f"{description:{len(self.validation_description)}}"


class BlockProgressBar(PhaseProgressBar):
    """On a terminal, the rich bar described by what the phase is doing (block k/n, the current Linears) and the
    time left for the whole walk, extrapolated from the blocks finished in this run. Elsewhere one line per block:
    `calibrate block 3/30 · done in 0:13 · 0:41 elapsed, ETA 5:52`."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.walk_start, self.first_block = time.perf_counter(), trainer.current_epoch
        self.lines = console.Progress(f"{getattr(pl_module, 'progress_label', 'walk')} block", len(pl_module.blocks),
                                      done=self.first_block)
        self.block_start = self.walk_start

    def block_done(self, trainer) -> None:
        """A line for the block just finished (epoch hooks of callbacks run before the phase's own)."""
        if self.plain and trainer.current_epoch > self.lines.done:
            now = time.perf_counter()
            self.lines.update(trainer.current_epoch, f"done in {console.clock(now - self.block_start)}")
            self.block_start = now

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.block_done(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self.block_done(trainer)

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

"""`KLDistillation`: end-to-end fine-tuning of a quantized model (the student) towards its fp model (the teacher) by
the KL divergence of their next-token distributions (AQLM §3.3 end to end, QuIP#'s fine-tuning), optionally with
PV-tuning's code updates (`lqtk.phases.pv`).

Student: an lqtk export, integer codes frozen (PV-tuning moves them), the floating tensors chosen by `trainable`
trained by AdamW (or bitsandbytes' 8-bit AdamW) with a warm-up + cosine schedule, gradient accumulation over the
global batch and gradient clipping. Teacher: the fp model, frozen, in eval mode, its logits computed on the fly under
no_grad (a cache of top-k teacher logits would save the teacher's forward pass but costs k·(4+4) bytes per token of
disk and reads, and drops the tail of the distribution; at these corpus sizes the forward pass is the cheaper side).

Scale-out is Lightning's: under `ModelParallelStrategy` every decoder block of both models is sharded with FSDP2
(`fully_shard`, over all processes of all nodes), the embedding and head stay whole on every process (frozen: they
need no gradient exchange, and the chunked loss applies the head outside the model's forward). The teacher is sharded
the same way rather than replicated: in fp it is the largest object of the run (4-8x the student), so replicating it
would cap the model size at one device's memory. It is not part of the checkpoint (frozen; reloaded from its folder).
Under DDP (or one device) nothing is sharded. Checkpoints are Lightning's (distributed ones under FSDP2, resharded on
load, so a run resumes on another number of processes); the data order is `GlobalBatches`'.
"""

import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics.text import Perplexity

from lqtk import console
from lqtk.anatomy import decoder_blocks
from lqtk.errors import LqtkError
from lqtk.evaluate import logits_in_chunks, output_logits
from lqtk.models import load_causal_lm
from lqtk.nn import quantized_layers
from lqtk.phases.base import Phase
from lqtk.phases.block_tuning import trainable_parameters
from lqtk.phases.finetune import load_student_and_teacher
from lqtk.phases.pv import PVTuning, StraightThroughCodes
from lqtk.phases.walk import PhaseProgressBar, epochs, progress_bars

TRAINABLE = ("codebooks", "scales", "norms")


class KLDistillation(Phase):
    """Distill an fp teacher into a quantized student, end to end.

    Args:
        model: The student: an lqtk export folder (the previous phase's `model/`).
        teacher: The fp model the student was quantized from.
        trainable: Which floating tensors train: `codebooks`, `scales` (of the quantized layers) and `norms`.
        optimizer: `adamw`, `adamw8bit` (bitsandbytes; 2 bytes of state per parameter instead of 8), or
            `paged_adamw8bit` (bitsandbytes' paged variant, where the device has paged memory).
        lr: Peak learning rate, reached after `warmup_steps` and decayed to `min_lr_ratio`·lr by a cosine.
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: The cosine's floor, as a fraction of lr.
        temperature: Softmax temperature of both distributions (the loss is scaled by its square).
        kl_chunk_size: Positions whose logits exist at once: the loss runs over chunks of positions, each recomputed
            in the backward pass, so (tokens × vocabulary) logits never all exist.
        max_grad_norm: Clip the global gradient norm to this (null: no clipping).
        mixed_precision: FSDP2 compute dtype: `auto` (bf16 on a GPU that has it, else fp32), `bf16` or `fp32`.
        checkpoint_every_n_steps: Steps between two checkpoints (`checkpoints/last.ckpt`).
        pv: PV-tuning: also update the integer codes (null: continuous parameters only).
    """

    def __init__(self, model: str, teacher: str, trainable: list[str] = list(TRAINABLE),
                 optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw", lr: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.1, temperature: float = 1.0, kl_chunk_size: int = 1024,
                 max_grad_norm: float | None = 1.0, mixed_precision: Literal["auto", "bf16", "fp32"] = "auto",
                 checkpoint_every_n_steps: int = 1, pv: PVTuning | None = None):
        super().__init__()
        unknown = set(trainable) - set(TRAINABLE)
        if unknown or not trainable:
            raise LqtkError(f"trainable={trainable}: choose a non-empty subset of {list(TRAINABLE)}")
        self.model_path, self.teacher_path, self.trainable = model, teacher, list(trainable)
        self.optimizer_name, self.lr, self.betas, self.weight_decay = optimizer, lr, tuple(betas), weight_decay
        self.warmup_steps, self.min_lr_ratio, self.temperature = warmup_steps, min_lr_ratio, temperature
        self.kl_chunk_size, self.max_grad_norm, self.mixed_precision = kl_chunk_size, max_grad_norm, mixed_precision
        self.checkpoint_every_n_steps, self.pv = checkpoint_every_n_steps, pv
        self.model: nn.Module | None = None
        self.val_perplexity = Perplexity(ignore_index=-100)
        self.history: list[dict] = []  # validation perplexity per epoch, training KL per step

    # --- models -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        student, teacher = load_student_and_teacher(self.model_path, self.teacher_path)
        student.requires_grad_(False).train()
        teacher.requires_grad_(False).eval()
        for layer in quantized_layers(student).values():  # trained in fp32; the export stores them back in fp16
            for tensor in layer.parameters(recurse=False):
                tensor.data = tensor.data.float()
        for p in trainable_parameters(student, "norms" in self.trainable, self.trainable):
            p.requires_grad_(True)
        if not any(p.requires_grad for p in student.parameters()):
            raise LqtkError(f"{self.model_path} has no {'/'.join(self.trainable)} tensors to train: choose other "
                            "`trainable` groups, or distill a model exported by a calibration phase")
        if self.pv is not None:
            self.codes = StraightThroughCodes(student, self.pv)
        device = self.trainer.strategy.root_device
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (self.trainer.world_size,))
            for model in (student, teacher):
                shard(model, mesh, self.compute_dtype(device))
        teacher.to(device)
        if self.pv is not None:
            self.codes.to(device)
        self.model = student
        self.__dict__["teacher"] = teacher  # outside the module tree: frozen, not checkpointed

    def check_launch(self, trainer) -> None:
        if self.optimizer_name != "adamw" and isinstance(trainer.strategy, ModelParallelStrategy):
            raise LqtkError(f"optimizer {self.optimizer_name}: bitsandbytes' 8-bit optimizers cannot update "
                            "FSDP2-sharded (DTensor) parameters; use optimizer adamw with ModelParallelStrategy, "
                            f"or {self.optimizer_name} with trainer.strategy ddp (or auto on one device)")

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        use_bf16 = self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and bf16)
        return torch.bfloat16 if use_bf16 else torch.float32

    def configure_optimizers(self):
        self.check_launch(self.trainer)  # again here: a Trainer driven from Python has no CLI to call it first
        params = [p for p in self.model.parameters() if p.requires_grad]
        kwargs = dict(lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(params, **kwargs)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit if self.optimizer_name == "adamw8bit" else bnb.optim.PagedAdamW8bit
            optimizer = cls(params, **kwargs)
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise LqtkError("KLDistillation needs trainer.max_steps (optimizer steps; the cosine schedule ends there)")

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)]

    def configure_callbacks(self):
        return [*progress_bars(self, StepProgressBar), StepCheckpoint(self.checkpoint_every_n_steps)]

    # --- training -----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.started = time.perf_counter()

    def training_step(self, windows: torch.Tensor, batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        data = self.trainer.datamodule
        tokens = data.global_batch_size * windows.shape[1]
        kl_sum = windows.new_zeros((), dtype=torch.float32)
        for micro_batch in windows.split(data.batch_size):
            kl = self.kl_divergence(micro_batch)
            # data-parallel gradients are averaged over the W processes: scale the sum so that the result is the
            # mean KL per token of the global batch, whatever W is
            self.manual_backward(kl * self.trainer.world_size / tokens)
            kl_sum += kl.detach()
        if self.max_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        optimizer.step()  # P step: the continuous parameters
        optimizer.zero_grad(set_to_none=True)
        # V step: the codes, from the gradient of the decoded weights
        code_changes = {} if self.pv is None else self.codes.step()
        scheduler.step()
        kl_mean = self.trainer.strategy.reduce(kl_sum, reduce_op="sum") / tokens
        self.log("kl", kl_mean, prog_bar=True)
        self.history.append({"step": self.global_step, "kl": kl_mean.item(), **code_changes,
                             "time_s": self.quantize_time_s + time.perf_counter() - self.started})

    def kl_divergence(self, windows: torch.Tensor) -> torch.Tensor:
        """Σ over the positions of `windows` of KL(teacher ‖ student), at the temperature, times its square."""
        with torch.no_grad():
            teacher_hidden = self.teacher.model(windows, use_cache=False).last_hidden_state
        hidden = self.model.model(windows, use_cache=False).last_hidden_state
        total = hidden.new_zeros((), dtype=torch.float32)
        chunks = [h.flatten(0, 1).split(self.kl_chunk_size) for h in (hidden, teacher_hidden)]
        for student_chunk, teacher_chunk in zip(*chunks):
            total = total + checkpoint(self._kl_chunk, student_chunk, teacher_chunk, use_reentrant=False)
        return total * self.temperature**2

    def _kl_chunk(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logp = F.log_softmax(output_logits(self.teacher, teacher_hidden) / self.temperature, dim=-1)
        logp = F.log_softmax(output_logits(self.model, student_hidden) / self.temperature, dim=-1)
        return F.kl_div(logp, teacher_logp, log_target=True, reduction="sum")

    # --- validation ---------------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, targets = batch
        for start, logits in logits_in_chunks(self.model, inputs[:, :-1]):
            self.val_perplexity.update(logits, targets[:, 1 + start:1 + start + logits.shape[1]])

    def on_validation_epoch_end(self) -> None:
        perplexity = self.val_perplexity.compute()
        self.val_perplexity.reset()
        self.log("val_perplexity", perplexity, prog_bar=True, sync_dist=False)  # already synced by torchmetrics
        if not self.trainer.sanity_checking:
            self.history.append({"step": self.global_step, "epoch": self.current_epoch,
                                 "val_perplexity": perplexity.item()})

    # --- checkpoints and export ---------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"model": str(self.model_path), "teacher": str(self.teacher_path),
                "distillation": {"trainable": self.trainable, "optimizer": self.optimizer_name, "lr": self.lr,
                                 "temperature": self.temperature, "pv": None if self.pv is None else vars(self.pv)}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.save_phase_state(checkpoint, history=self.history,
                              **({} if self.pv is None else {"pv": self.codes.state_dict()}))

    def phase_time_s(self) -> float:
        """The training and validation time (the stretch since `started` too)."""
        return self.quantize_time_s + time.perf_counter() - self.started

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = self.load_phase_state(checkpoint)
        self.history = state["history"]
        if self.pv is not None:
            self.codes.load_state_dict(state["pv"])

    def exported_model(self) -> nn.Module | None:
        """Gather the (possibly sharded) student into a plain model in its storage dtypes, for the export. Called by
        every process (the gather is collective); rank 0 gets the model, the others None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.quantize_time_s += time.perf_counter() - self.started
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        self.memory = [self.memory_figures()] * self.trainer.world_size
        if self.trainer.world_size > 1:
            torch.distributed.all_gather_object(self.memory, self.memory[0])
        if not self.trainer.is_global_zero:
            return None
        for rank, figures in enumerate(self.memory):
            print(f"process {rank}: " + ", ".join(f"{k.removesuffix('_bytes')} {v / 2**20:.3f} MiB"
                                                  for k, v in figures.items()))
        exported = load_causal_lm(self.model_path)
        exported.load_state_dict(state)  # copies into the export's own dtypes (fp16 codebooks and scales)
        return exported

    def memory_figures(self) -> dict[str, int]:
        """This process's bytes of parameters (sharded ones: its shards), of optimizer state, and its peak memory."""
        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if hasattr(t, "to_local") else t

        def size(tensors) -> int:
            return sum(local(t).numel() * local(t).element_size() for t in tensors)

        params = list(self.model.parameters())  # each shared tensor once
        state = [v for s in self.optimizers().optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"parameters_bytes": size(params),
                "trainable_parameters_bytes": size(p for p in params if p.requires_grad),
                "optimizer_state_bytes": size(state), "peak_memory_bytes": peak}

    def fp_reference(self) -> tuple[nn.Module, str]:
        return load_causal_lm(self.teacher_path), self.teacher_path

    def phase_metrics(self) -> dict:
        return {"distillation_history": self.history, "memory_per_process": self.memory}


def shard(model: nn.Module, mesh, compute_dtype: torch.dtype) -> None:
    """FSDP2 over `mesh`: one group per decoder block, the rest of the body (final norm) in the root group; the
    embedding (tied to the head in many models) stays whole on every process."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    embedding = model.get_input_embeddings()
    fully_shard(model.model, mesh=mesh, mp_policy=policy, ignored_params=set(embedding.parameters()))


class StepProgressBar(PhaseProgressBar):
    """Lightning's rich bar on a terminal (epochs counted from 1 of their real number); elsewhere a line per group of
    steps (about 20 lines a run): `distill step 4/6 · epoch 2/3 · kl 0.0123 · val_perplexity 258 · 0:05 elapsed,
    ETA 0:03`."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.lines = console.Progress("distill step", trainer.max_steps, done=trainer.global_step)
        self.every = max(1, trainer.max_steps // 20)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        step = trainer.global_step
        if self.plain and (step % self.every == 0 or step == trainer.max_steps):
            metrics = "".join(f" · {name} {value:.4g}" for name, value in self.get_metrics(trainer, pl_module).items()
                              if isinstance(value, float))
            self.lines.update(step, f"epoch {trainer.current_epoch + 1}/{epochs(trainer)}{metrics}")


class StepCheckpoint(ModelCheckpoint):
    """A checkpoint every n optimizer steps: written to `checkpoints/step-<n>.ckpt` (a folder of shards under FSDP2),
    then `last.ckpt`, a symbolic link, is switched to it in one atomic rename and the older one removed. A process
    killed at any moment leaves `last.ckpt` pointing at a complete checkpoint."""

    def __init__(self, every_n_steps: int):
        super().__init__(save_last=True, save_top_k=0, every_n_train_steps=every_n_steps,
                         save_on_train_epoch_end=False, enable_version_counter=False)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        last = Path(filepath)
        written = last.with_name(f"step-{trainer.global_step}.ckpt")
        if trainer.is_global_zero:
            remove(written)  # left by a run killed before it linked it
        trainer.strategy.barrier("checkpoint folder clean")
        super()._save_checkpoint(trainer, str(written))
        trainer.strategy.barrier("checkpoint written")
        if trainer.is_global_zero:
            link = last.with_name(".last.ckpt.new")
            remove(link)
            link.symlink_to(written.name)
            os.replace(link, last)
            for old in last.parent.glob("step-*.ckpt"):
                if old != written:
                    remove(old)
        trainer.strategy.barrier("checkpoint linked")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

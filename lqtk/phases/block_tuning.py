"""Fine-tune one quantized decoder block to reproduce the fp block (the AQLM paper's block fine-tuning, §3.3).

The block's inputs are the quantized model's own stream, its targets the fp block's outputs on the same inputs; the
trainable parameters are the floating tensors of its `QuantizedLinear`s (AQLM codebooks and scales, GPTQ scales) and
its norms, while integer codes stay frozen. One function, two callers: `BlockFinetune` (a phase of its own, after
calibration) and `LayerwiseCalibration` (`block_tuning`: each block tuned before its outputs feed the next).
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lqtk.anatomy import block_output
from lqtk.errors import LqtkError
from lqtk.nn import QuantizedLinear

log = logging.getLogger(__name__)


@dataclass
class BlockTuning:
    """Adam on the mean squared error between the block's outputs and the fp block's, with early stopping."""

    lr: float = 1e-4
    """Adam learning rate (the AQLM authors: 1e-4, betas (0.9, 0.95))."""
    max_steps: int = 100
    """Upper bound on optimizer steps per block, each on one batch of calibration windows."""
    validation_batches: int = 1
    """Calibration batches held out (the last ones) to decide when to stop; the others are trained on."""
    eval_every: int = 10
    """Steps between two evaluations of the held-out loss."""
    patience: int = 2
    """Stop after this many evaluations without a better held-out loss; the best parameters are kept."""
    tune_norms: bool = True
    """Train the block's norm weights too (besides the quantized layers' floating tensors)."""
    seed: int = 0
    """Seed of the order of the training batches (with the block's index, so each block has its own)."""


def trainable_parameters(block: nn.Module, tune_norms: bool, tensors: list[str] | None = None) -> list[nn.Parameter]:
    """The floating tensors of the block's quantized layers (frozen codes are buffers), only those named in
    `tensors` if given (e.g. `scales`), and, optionally, its norms."""
    params = [p for m in block.modules() if isinstance(m, QuantizedLinear)
              for name, p in m.named_parameters(recurse=False)
              if p is not m.bias and (tensors is None or name in tensors)]
    if tune_norms:
        params += [p for m in block.modules() if "norm" in type(m).__name__.lower()
                   for p in m.parameters(recurse=False)]
    return params


def tune_block(block: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, dict]], tuning: BlockTuning,
               block_index: int, name: str = "block") -> dict:
    """Train `block` in place on `batches` of (inputs, fp targets, block keyword arguments), holding out the last
    `validation_batches` for early stopping. Trainable tensors are trained in fp32 and stored back in their own dtype
    (fp16 for codebooks and scales), so the block computes afterwards exactly what its export will.
    Returns the held-out relative error ||Y_q − Y||² / ||Y||² before and after, and the steps taken."""
    params = trainable_parameters(block, tuning.tune_norms)
    if not params:
        raise LqtkError(f"{name} has no trainable tensors: fine-tune a model exported by a calibration phase "
                        "(AQLM codebooks/scales or GPTQ scales), not an fp model")
    if not 0 < tuning.validation_batches < len(batches):
        raise LqtkError(f"block tuning holds out {tuning.validation_batches} of {len(batches)} calibration batches; "
                        "it needs at least one to train on and one to validate: change validation_batches or "
                        "data.num_calibration_windows / data.batch_size")
    train, held_out = batches[: -tuning.validation_batches], batches[-tuning.validation_batches :]
    dtypes = [p.dtype for p in params]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=tuning.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(tuning.seed * 100_003 + block_index)
    best = before = held_out_error(block, held_out)
    start_state = best_state = [p.detach().clone() for p in params]
    step, stale = 0, 0
    try:
        with torch.enable_grad():
            while step < tuning.max_steps and stale < tuning.patience:
                for index in torch.randperm(len(train), generator=generator).tolist():
                    inputs, targets, kwargs = train[index]
                    loss = F.mse_loss(block_output(block(inputs, **kwargs)), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    if not math.isfinite(loss.item()):
                        raise LqtkError(f"{name}: the fine-tuning loss became {loss.item()} at step {step}: lower "
                                        "block_tuning.lr")
                    if step % tuning.eval_every == 0 or step == tuning.max_steps:
                        error = stored_error(block, held_out, params, dtypes)
                        if error < best:
                            best, best_state, stale = error, [p.detach().clone() for p in params], 0
                        else:
                            stale += 1
                    if step == tuning.max_steps or stale == tuning.patience:
                        break
    finally:
        for p, kept, dtype in zip(params, best_state, dtypes):
            p.requires_grad_(False)
            p.data = kept.to(dtype)
    after = held_out_error(block, held_out)
    if after > before:  # a better fp32 loss may still round worse; never store a block worse than it came
        for p, kept, dtype in zip(params, start_state, dtypes):
            p.data = kept.to(dtype)
        after = held_out_error(block, held_out)
    if after >= before:  # early stopping kept the starting tensors: say so, a phase must not change nothing quietly
        log.warning("%s: fine-tuning changed nothing: the held-out error (%.3g) did not fall in %d steps, so the "
                    "block is kept as it was; a lower lr (now %g) or more calibration windows may help", name, before,
                    step, tuning.lr)
    return {"error_before": before, "error_after": after, "steps": step}


def stored_error(block: nn.Module, batches, params: list[nn.Parameter], dtypes: list[torch.dtype]) -> float:
    """The held-out error of the trained tensors rounded to the dtypes they are stored in, so that early stopping
    picks what the export will compute, not an fp32 state that rounds worse."""
    trained = [p.data for p in params]
    for p, dtype in zip(params, dtypes):
        p.data = p.data.to(dtype).float()
    try:
        return held_out_error(block, batches)
    finally:
        for p, data in zip(params, trained):
            p.data = data


@torch.no_grad()
def held_out_error(block: nn.Module, batches) -> float:
    error = sum(F.mse_loss(block_output(block(x, **kwargs)), y, reduction="sum") for x, y, kwargs in batches)
    return (error / sum(y.square().sum() for _, y, _ in batches)).item()

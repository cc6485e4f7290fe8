"""Perplexity of a causal LM over evaluation windows (the WikiText-2 protocol of GPTQ and most quantization
papers: the text joined and tokenized once, cut into non-overlapping windows of seq_len tokens, every window
scored independently with no context carried over; each window's first token is only context)."""

import hashlib
import json
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torchmetrics.text import Perplexity

from lqtk.anatomy import decoder_blocks
from lqtk.console import Progress, clock, say
from lqtk.forward import final_hidden_states
from lqtk.models import cache_dir
from lqtk.token_pruning import PruningRun

EVAL_BATCH_SIZE = 2  # windows per forward
LOGIT_POSITIONS = 256  # positions whose logits exist at once: 256 x a 262k vocabulary is 268 MB in fp32
PROGRESS_EVERY_S = 30  # at most one progress line per so many seconds while an evaluation runs


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the final hidden states `hidden`: the model's head (in its weight's dtype), and the final
    soft-capping of the models that have one (Gemma-2)."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def logits_in_chunks(model: torch.nn.Module, windows: torch.Tensor, positions: int = LOGIT_POSITIONS):
    """Yield (start, fp32 logits (B, n, V) of positions start..start+n) of `model` on `windows` (B, T): the body
    runs once, the head on `positions` positions at a time, so that (tokens x vocabulary) logits never all exist."""
    yield from head_in_chunks(model, model.get_decoder()(windows, use_cache=False).last_hidden_state, positions)


def head_in_chunks(model: torch.nn.Module, hidden: torch.Tensor, positions: int = LOGIT_POSITIONS):
    """`logits_in_chunks` from the final hidden states (B, T, D)."""
    for start in range(0, hidden.shape[1], positions):
        yield start, output_logits(model, hidden[:, start:start + positions])


def streamed_logits(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE,
                    pruning: PruningRun | None = None):
    """Yield (batch, start, logits) of `model` on `windows` as `logits_in_chunks` does per batch, with the body run
    block by block over all batches (`lqtk.streaming.final_hidden_states`): a streamed model's blocks are
    materialized once each, a loaded model's decoded quantized weights exist for one block at a time. With
    `pruning`, the logits are those of each batch's kept positions (`pruning.positions`)."""
    for batch, hidden in enumerate(final_hidden_states(model, windows, batch_size, pruning)):
        for start, logits in head_in_chunks(model, hidden):
            yield batch, start, logits


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) of `model` on `windows` (n, seq_len). A model with token pruning
    (`model.lqtk_token_pruning`, an export's setting) is scored at its kept positions only (lqtk.token_pruning)."""
    metric = Perplexity(sync_on_compute=False)  # one process's windows, also inside a multi-process run
    config = getattr(model, "lqtk_token_pruning", None)
    pruning = None if config is None else PruningRun(config)
    targets, scored, start_time = windows[:, 1:].split(batch_size), 0, time.monotonic()
    with block_progress(model, f"perplexity of {len(windows)} windows: block"):
        for batch, start, logits in streamed_logits(model, windows[:, :-1], batch_size, pruning):  # last: context
            target = targets[batch] if pruning is None else targets[batch].gather(1, pruning.positions[batch])
            target = target[:, start:start + logits.shape[1]]
            metric.update(logits.cpu(), target)
            scored += target.numel()
    ppl = metric.compute().item()
    say(f"perplexity of {len(windows)} windows: {ppl:.4g} ({clock(time.monotonic() - start_time)})")
    return ppl, scored


@contextmanager
def block_progress(model: torch.nn.Module, what: str):
    """Plain progress lines (lqtk.console) while the blocks run one after another over all windows
    (`final_hidden_states`): at most one per PROGRESS_EVERY_S, with the blocks done and the ETA."""
    blocks = decoder_blocks(model)
    progress = Progress(what, len(blocks), every_s=PROGRESS_EVERY_S)

    def starts(index: int, block: torch.nn.Module, args) -> None:
        if "forward" not in block.__dict__ and index > progress.done:  # not a stand-in (lqtk.forward.stand_ins)
            progress.update(index)

    hooks = [block.register_forward_pre_hook(partial(starts, index)) for index, block in enumerate(blocks)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def fp_perplexity(model: torch.nn.Module, model_dir: Path, windows: torch.Tensor, batch_size: int) -> float:
    """`perplexity` of an unquantized model, remembered in the cache folder by (weights files, windows): every
    recipe of a table shares the fp model and evaluation split, and its evaluation costs about a minute."""
    cache = fp_perplexity_cache_file(model_dir, windows)
    if cache.exists():
        return json.loads(cache.read_text())["perplexity"]
    ppl, _ = perplexity(model, windows, batch_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"perplexity": ppl, "model": str(model_dir)}))
    return ppl


def fp_perplexity_cache_file(model_dir: Path, windows: torch.Tensor) -> Path:
    """Where `fp_perplexity` remembers the perplexity of the fp model in `model_dir` on `windows`."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([str(model_dir.resolve()), files]).encode() + windows.numpy().tobytes())
    return cache_dir() / "fp_perplexity" / f"{key.hexdigest()[:32]}.json"

"""Agile-Quant's attention-guided token pruning during prefill (https://arxiv.org/abs/2312.05693, "activation-aware
token pruning"): from a chosen block on, only the tokens that received the most attention go on.

After block `start_layer - 1` has run, each window keeps `keep_ratio` of its tokens: the `recent` last ones always
(the last token among them: it predicts what comes next), and of the others those that received the most attention
in that block. A token's attention received is its column of the block's attention probabilities, summed over heads
and over the queries that can see it and divided by their number (a causal model's early tokens are seen by more
queries). Pruning also removes activation outliers carried by unimportant tokens, which helps activation quantization.
The blocks from `start_layer` on run on the kept tokens, in their order and at their original positions (rotary
embeddings of the kept positions, causal attention among them).

Perplexity with pruning (`lqtk.evaluate.perplexity`): every window is scored at its kept positions only, each
predicting the token that follows it in the text (pruned or not), with the pruned tokens absent from the context of
the blocks from `start_layer` on. The number of scored tokens is reported; it is about keep_ratio of the windows'.
"""

import copy
from dataclasses import asdict, dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

from lqtk.anatomy import block_output
from lqtk.errors import LqtkError

OBSERVED_ATTENTION = "lqtk_observed"


@dataclass
class TokenPruning:
    """Where and how much to prune (an export's `token_pruning`, applied by its evaluation)."""

    start_layer: int
    """First block that runs on the kept tokens only (≥ 1: the attention of the block before it ranks them)."""
    keep_ratio: float
    """Fraction of each window's tokens kept."""
    recent: int = 16
    """The last `recent` tokens of a window are always kept."""

    def __post_init__(self):
        if self.start_layer < 1 or not 0 < self.keep_ratio <= 1 or self.recent < 1:
            raise LqtkError(f"token pruning {asdict(self)}: give start_layer ≥ 1 (the block before it ranks the "
                            "tokens), keep_ratio in (0, 1] and recent ≥ 1")


def attention_received(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, T): mean causal attention probability each position receives, over heads and the queries that see it.
    query (B, H, T, d), key (B, H_kv, T, d) as the attention function gets them (rotary embeddings applied)."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    length = scores.shape[-1]
    future = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    seen_by = torch.arange(length, 0, -1, device=scores.device) * query.shape[1]
    return probs.sum((1, 2)) / seen_by


def kept_positions(importance: torch.Tensor, keep_ratio: float, recent: int) -> torch.Tensor:
    """(B, K) ascending positions kept in each window: the last `recent`, and the most important of the others,
    K = max(recent, round(keep_ratio · T)) (at most T)."""
    length = importance.shape[1]
    keep = min(length, max(recent, round(keep_ratio * length)))
    recent = min(recent, keep)
    ranked = importance[:, :length - recent].topk(keep - recent, dim=1).indices
    tail = torch.arange(length - recent, length, device=importance.device).expand(importance.shape[0], -1)
    return torch.cat([ranked, tail], 1).sort(1).values


def _observed_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's attention function, after handing (query, key) to the module's observer."""
    module.lqtk_observer(query, key, kwargs.get("scaling") or query.shape[-1] ** -0.5)
    return AttentionInterface._global_mapping[module.lqtk_attention](module, query, key, value, attention_mask,
                                                                     **kwargs)


AttentionInterface.register(OBSERVED_ATTENTION, _observed_attention)


class PruningRun:
    """Prunes the batches of one block-by-block forward (`lqtk.streaming.final_hidden_states` runs each block on
    all batches through `run_block`); `positions` then holds each batch's kept positions (B, K)."""

    def __init__(self, config: TokenPruning):
        self.config = config
        self.positions: list[torch.Tensor] = []  # per batch, in the order the batches ran

    def run_block(self, block: torch.nn.Module, index: int, blocks: int, hidden: list[torch.Tensor],
                  kwargs: list[dict]) -> list[torch.Tensor]:
        """Block `index` (of `blocks`) on every batch's hidden states (with its keyword arguments): before
        start_layer − 1 as is; at it, ranking the tokens and returning the kept ones; after it, on the kept ones."""
        start = self.config.start_layer
        if start >= blocks:
            raise LqtkError(f"token pruning from block {start}, but the model has {blocks} blocks: choose "
                            f"start_layer between 1 and {blocks - 1}")
        if index < start - 1:
            return [block_output(block(x, **kw)) for x, kw in zip(hidden, kwargs)]
        if index == start - 1:
            with _Observing(self, _attention_module(block)):
                hidden = [block_output(block(x, **kw)) for x, kw in zip(hidden, kwargs)]
            return [self._prune(batch, x) for batch, x in enumerate(hidden)]
        return [block_output(block(x, **self._block_kwargs(batch, kw))) for batch, (x, kw) in
                enumerate(zip(hidden, kwargs))]

    def _prune(self, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        index = self.positions[batch]
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    def _block_kwargs(self, batch: int, kwargs: dict) -> dict:
        """A later block's keyword arguments for the kept tokens of `batch`: rotary embeddings and position ids
        at the kept positions. Blocks given an attention mask (padding, sliding windows) are refused."""
        if kwargs.get("attention_mask") is not None:
            raise LqtkError("token pruning needs blocks with plain causal attention, but this model passes its "
                            "blocks an attention mask (sliding-window layers or padding): evaluate it without "
                            "token_pruning")
        index = self.positions[batch]
        cut = dict(kwargs)
        if kwargs.get("position_embeddings") is not None:
            cut["position_embeddings"] = tuple(_at_positions(t, index) for t in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            cut["position_ids"] = _at_positions(kwargs["position_ids"], index)
        if kwargs.get("cache_position") is not None:
            cut["cache_position"] = None  # positions are given explicitly; no cache in a prefill of whole windows
        return cut


def _at_positions(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (1 or B, T, ...) at positions index (B, K): (B, K, ...)."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    return tensor.gather(1, index.view(*index.shape, *[1] * (tensor.dim() - 2)).expand(-1, -1, *tensor.shape[2:]))


def _attention_module(block: torch.nn.Module) -> torch.nn.Module:
    modules = [m for m in block.modules() if hasattr(m, "config") and hasattr(m, "layer_idx")
               and "attention" in type(m).__name__.lower()]
    if len(modules) != 1:
        raise LqtkError(f"token pruning: found {len(modules)} attention modules in a {type(block).__name__}, not "
                        "one: this architecture is not supported")
    return modules[0]


class _Observing:
    def __init__(self, run: PruningRun, module: torch.nn.Module):
        self.run, self.module = run, module

    def __enter__(self):
        config = self.module.config
        if config._attn_implementation not in AttentionInterface._global_mapping:
            raise LqtkError(f"token pruning ranks tokens inside the attention function, and this model's "
                            f"{config._attn_implementation!r} is not one transformers registers: load it with "
                            "attn_implementation='sdpa'")
        self.module.lqtk_attention = config._attn_implementation
        self.module.lqtk_observer = self._rank
        self.module.config = copy.copy(config)  # the other blocks keep their attention function
        self.module.config._attn_implementation = OBSERVED_ATTENTION
        self.original_config = config
        return self

    def _rank(self, query, key, scaling):
        importance = attention_received(query, key, scaling)
        self.run.positions.append(kept_positions(importance, self.run.config.keep_ratio, self.run.config.recent))

    def __exit__(self, *exc):
        self.module.config = self.original_config
        del self.module.lqtk_attention, self.module.lqtk_observer

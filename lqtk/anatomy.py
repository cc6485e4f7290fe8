"""Where things are in a transformers causal LM: its decoder blocks, their Linears, the blocks' module path, tied
weights. Every layer of lqtk that walks a model block by block asks here."""

import torch
from torch import nn
from transformers import PreTrainedModel

from lqtk.errors import LqtkError


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList with `num_hidden_layers` entries (model.model.layers for
    Llama, Mistral, Qwen; transformer.h for GPT-2 style models)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise LqtkError(f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
                    f"{model.config.num_hidden_layers} blocks")


def block_output(output) -> torch.Tensor:
    """The hidden states a decoder block returns (transformers < 5 returns a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def linear_layers(block: nn.Module, types=(nn.Linear,)) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if isinstance(m, types)}


def check_linear_layers(model: PreTrainedModel) -> None:
    """Refuse, before any work, a model whose decoder blocks hold no nn.Linear (GPT-2's Conv1D layers): lqtk
    quantizes the blocks' Linears, and would find nothing to quantize."""
    blocks = decoder_blocks(model)
    if not any(linear_layers(block) for block in blocks):
        layers = sorted({type(m).__name__ for m in blocks[0].modules() if getattr(m, "weight", None) is not None
                         and m.weight.dim() == 2}) if len(blocks) else []
        raise LqtkError(f"the architecture {type(model).__name__} (model_type {model.config.model_type!r}) is not "
                        "supported, its decoder blocks hold no nn.Linear (their weights are in "
                        f"{', '.join(layers) or 'no layer'}) and lqtk quantizes Linear layers: use a model with "
                        "nn.Linear projections (Llama, Mistral, Qwen2, Phi-3, Gemma 3)")


def blocks_prefix(model: nn.Module) -> str:
    """Module path of the decoder blocks' list with a trailing dot (`model.layers.`)."""
    blocks = decoder_blocks(model)  # the walk stops there: it comes before the blocks' own modules
    return next(name for name, module in model.named_modules() if module is blocks) + "."


def block_prefix(model: nn.Module, index: int) -> str:
    """Module path of block `index` with a trailing dot (`model.layers.3.`)."""
    return f"{blocks_prefix(model)}{index}."


def tied_names(model: nn.Module) -> dict[str, str]:
    """{tied name: the name it is tied to} (lm_head.weight: model.embed_tokens.weight)."""
    return getattr(model, "all_tied_weights_keys", None) or {}

"""The lqtk export format: a Hugging Face model folder whose quantized Linears are stored as their named tensors.

    config.json         the model's config, with "model_type": "lqtk" and the model's own model_type in
                        "lqtk_base_model_type" (so that transformers without lqtk refuses the folder instead of
                        loading it with random weights in place of the quantized Linears), plus
                        "quantization_config": {"quant_method": "lqtk", "format_version": 1,
                                                "token_pruning": {...} (only with token pruning, lqtk.token_pruning),
                                                "layers": {"model.layers.0.self_attn.q_proj":
                                                           {"method": "gptq", "format": "affine", "bits": 4,
                                                            "group_size": 128, "symmetric": false,
                                                            "shape": [576, 576]}, ...}}
    model.safetensors   every tensor of the model; a quantized Linear `name` has `name.<tensor>` for each tensor of
                        its format (affine: `qweight`, `scales`, `zeros`) and `name.bias` if it has one, no `.weight`;
                        above the shard size, shards model-0000k-of-0000n.safetensors and model.safetensors.index.json
                        instead, as transformers writes them
    tokenizer files     copied from the source model

`load_quantized` rebuilds the model on the meta device with `QuantizedLinear`s in place of those Linears
(`install_quantized_layers`, which transformers' loader uses too: lqtk.transformers_quantizer) and loads its tensors
(those of the decoder blocks only when they run, if lazy); `lqtk.models.load_causal_lm` calls it for any folder whose
quant_method is "lqtk". `AutoConfig` reads an export's config.json as its base model's config once lqtk is imported
(lqtk.transformers_quantizer registers model_type "lqtk"); exports written before model_type "lqtk" (the base
model_type in "model_type", same format_version) load as before."""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME

from lqtk.errors import LqtkError
from lqtk.formats import storage_bits
from lqtk.moe import unfuse_experts
from lqtk.nn import quantized_layers, set_submodule
from lqtk.streaming import empty_model, meta_quantized_linear, open_streamed, save_sharded
from lqtk.token_pruning import TokenPruning
from lqtk.weights import SHARD_BYTES, WeightFiles

FORMAT_VERSION = 1
MODEL_TYPE = "lqtk"  # config.json's model_type: unknown to transformers until lqtk registers it
BASE_MODEL_TYPE = "lqtk_base_model_type"  # the config key holding the model's own model_type ("llama", ...)


def bits_per_weight(model: torch.nn.Module) -> float | None:
    """True average storage bits per weight over the quantized Linears (codes, scales, zeros, codebooks)."""
    layers = quantized_layers(model).values()
    weights = sum(m.in_features * m.out_features for m in layers)
    return sum(storage_bits(m.tensors()) for m in layers) / weights if weights else None


def save_quantized(model: PreTrainedModel, out: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json (with quantization_config) and the weights of `model` into folder `out`, block by block
    (a streamed model's blocks are materialized one at a time)."""
    layers = {name: m.layer_config() for name, m in quantized_layers(model).items()}
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "lqtk", "format_version": FORMAT_VERSION, "layers": layers}
    if getattr(model, "lqtk_token_pruning", None) is not None:
        config["quantization_config"]["token_pruning"] = asdict(model.lqtk_token_pruning)
    type(model.config).from_dict(config).save_pretrained(out)
    file = Path(out) / CONFIG_NAME
    saved = json.loads(file.read_text())
    saved[BASE_MODEL_TYPE], saved["model_type"] = saved["model_type"], MODEL_TYPE
    file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")  # as transformers writes it
    save_sharded(model, out, max_shard_bytes)


def base_config_dict(config_dict: dict) -> dict:
    """The config dict of the model an export's config.json (`config_dict`) holds: its model_type "lqtk" replaced
    by the base model's; an export written before model_type "lqtk", or anything else, as it is."""
    if not isinstance(config_dict, dict) or config_dict.get("model_type") != MODEL_TYPE:
        return config_dict
    base = {key: value for key, value in config_dict.items() if key != BASE_MODEL_TYPE}
    base["model_type"] = config_dict.get(BASE_MODEL_TYPE)
    return base


def load_quantized(path: Path, config: PretrainedConfig, dtype: torch.dtype, lazy: bool = False) -> PreTrainedModel:
    quant = config.quantization_config
    if quant.get("format_version") != FORMAT_VERSION:
        raise LqtkError(f"{path} is lqtk format version {quant.get('format_version')}; this lqtk reads "
                        f"version {FORMAT_VERSION}")
    del config.quantization_config  # ours, not a transformers quantizer's
    try:
        files = WeightFiles(path)
    except LqtkError as err:
        raise LqtkError(f"{err}; the export is incomplete: export the model again") from err
    model = install_quantized_layers(empty_model(config, dtype), files, quant["layers"], quant.get("token_pruning"))
    return open_streamed(model, files, lazy, strict=True)


def install_quantized_layers(model: PreTrainedModel, files: WeightFiles, layers: dict,
                             token_pruning: dict | None) -> PreTrainedModel:
    """Give the skeleton `model` the structure its export was saved in: one Linear per MoE expert, and a
    `QuantizedLinear` on the meta device for every entry of `layers` (name: `layer_config()`), with the tensors
    `files` store for it; the token pruning it runs with, if any."""
    unfuse_experts(model)
    for name, layer in layers.items():
        set_submodule(model, name, meta_quantized_linear(files, name, layer))
    if token_pruning:
        model.lqtk_token_pruning = TokenPruning(**token_pruning)
    return model

"""The lqtk export format: a Hugging Face model folder whose quantized Linears are stored as their named tensors.

    config.json         the model's config plus
                        "quantization_config": {"quant_method": "lqtk", "format_version": 1,
                                                "layers": {"model.layers.0.self_attn.q_proj":
                                                           {"method": "gptq", "format": "affine", "bits": 4,
                                                            "group_size": 128, "symmetric": false,
                                                            "shape": [576, 576]}, ...}}
    model.safetensors   every tensor of the model; a quantized Linear `name` has `name.<tensor>` for each tensor of
                        its format (affine: `qweight`, `scales`, `zeros`) and `name.bias` if it has one, no `.weight`
    tokenizer files     copied from the source model

`load_quantized` rebuilds the model with `QuantizedLinear`s in place of those Linears; `lqtk.models.load_causal_lm`
calls it for any folder whose quant_method is "lqtk"."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lqtk.errors import LqtkError
from lqtk.moe import unfuse_experts
from lqtk.nn import quantized_layers, quantized_linear_from_config, set_submodule
from lqtk.quant.base import storage_bits

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


def bits_per_weight(model: torch.nn.Module) -> float | None:
    """True average storage bits per weight over the quantized Linears (codes, scales, zeros, codebooks)."""
    layers = quantized_layers(model).values()
    weights = sum(m.in_features * m.out_features for m in layers)
    return sum(storage_bits(m.tensors()) for m in layers) / weights if weights else None


def save_quantized(model: PreTrainedModel, out: Path) -> None:
    """Write config.json (with quantization_config) and model.safetensors of `model` into folder `out`."""
    layers = {name: m.layer_config() for name, m in quantized_layers(model).items()}
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "lqtk", "format_version": FORMAT_VERSION, "layers": layers}
    type(model.config).from_dict(config).save_pretrained(out)
    save_model(model, str(out / WEIGHTS_NAME))  # drops the duplicate of tied weights


def load_quantized(path: Path, config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    quant = config.quantization_config
    if quant.get("format_version") != FORMAT_VERSION:
        raise LqtkError(f"{path} is lqtk format version {quant.get('format_version')}; this lqtk reads "
                        f"version {FORMAT_VERSION}")
    del config.quantization_config  # ours, not a transformers quantizer's
    model = unfuse_experts(AutoModelForCausalLM.from_config(config, dtype=dtype))  # the structure it was saved in
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise LqtkError(f"{weights_file} is missing: the export is incomplete; export the model again")
    state = load_file(weights_file)
    for name, layer in quant["layers"].items():
        tensors = {key[len(name) + 1 :]: value for key, value in state.items() if key.startswith(name + ".")}
        bias = tensors.pop("bias", None)
        set_submodule(model, name, quantized_linear_from_config(layer, tensors, bias))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_model stored one name of each tied tensor (lm_head.weight = embed_tokens.weight): the other is loaded
    params = model.state_dict()
    loaded = {params[key].data_ptr() for key in state if key in params}
    missing = [key for key in missing if params[key].data_ptr() not in loaded]
    if missing or unexpected:
        raise LqtkError(f"{weights_file} does not match its config (missing {sorted(missing)[:5]}, unexpected "
                        f"{sorted(unexpected)[:5]}): the export is corrupt; export the model again")
    return model.eval()

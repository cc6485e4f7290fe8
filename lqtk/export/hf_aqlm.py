"""Export an lqtk `aqlm` model as a Hugging Face AQLM folder, loadable by plain transformers with the `aqlm` package.

    config.json         the model's config plus
                        "quantization_config": {"quant_method": "aqlm", "in_group_size": g, "out_group_size": 1,
                                                "num_codebooks": M, "nbits_per_codebook": B,
                                                "linear_weights_not_to_quantize": [...]}
    model.safetensors   per quantized Linear `name`: `name.codes` [O, J, M] int8/int16, `name.codebooks`
                        [M, 2^B, 1, g] and `name.scales` [O, 1, 1, 1] in the model's dtype, `name.bias` if any;
                        every other tensor of the model as it is

Only the lqtk `aqlm` format maps onto it: HF AQLM has one (M, B, g) for the whole model and no other weight format."""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.quantizers_utils import should_convert_module

from lqtk.errors import LqtkError
from lqtk.formats.aqlm import unpack_codes
from lqtk.nn import quantized_layers
from lqtk.weights import WEIGHTS_NAME

# aqlm's CPU kernel for 8-bit codebooks (numba, imported on aqlm's first forward) gives wrong results on several
# threads: verifying or evaluating an export in this process must use one
os.environ.setdefault("NUMBA_NUM_THREADS", "1")


def save_hf_aqlm(model: PreTrainedModel, out: Path) -> None:
    """Write config.json (with an AQLM quantization_config) and model.safetensors of `model` into folder `out`."""
    layers = quantized_layers(model)
    if not layers:
        raise LqtkError("the model has no quantized layer: quantize it with the AQLM method before exporting "
                        "to the HF AQLM format")
    not_aqlm = {name: layer.format for name, layer in layers.items() if layer.format != "aqlm"}
    if not_aqlm:
        name, format_name = next(iter(not_aqlm.items()))
        raise LqtkError(f"{len(not_aqlm)} quantized layers (e.g. {name}) are in the {format_name!r} format, which "
                        "HF AQLM cannot store: quantize with the AQLM method, or export in the lqtk format")
    settings = {name: (layer.spec["num_codebooks"], layer.spec["nbits_per_codebook"], layer.spec["in_group_size"])
                for name, layer in layers.items()}
    if len(set(settings.values())) > 1:
        examples = {setting: name for name, setting in settings.items()}
        raise LqtkError("HF AQLM stores one setting for the whole model; these layers differ in (num_codebooks, "
                        f"nbits_per_codebook, in_group_size): {examples}. Quantize every layer with the same "
                        "setting, or export in the lqtk format")
    num_codebooks, nbits, group_size = next(iter(settings.values()))
    if nbits > 16:
        raise LqtkError(f"nbits_per_codebook={nbits}: HF AQLM stores codes as int8/int16, so at most 16 bits; "
                        "quantize with nbits_per_codebook <= 16")

    dtype = model.get_input_embeddings().weight.dtype
    state = model.state_dict()
    for name, layer in layers.items():
        for tensor_name in layer.tensor_names:
            del state[f"{name}.{tensor_name}"]
        state.update({f"{name}.{key}": value for key, value in _hf_tensors(layer, dtype).items()})
    # a tied pair (lm_head.weight = embed_tokens.weight) is one tensor: safetensors refuses to store it twice, and
    # transformers re-ties it on load. Keep the first name, the embedding, as save_pretrained does.
    kept, seen = {}, set()
    for key, tensor in state.items():
        if (tensor.data_ptr(), tensor.shape) not in seen:
            seen.add((tensor.data_ptr(), tensor.shape))
            kept[key] = tensor.detach().cpu().contiguous()

    # transformers turns every nn.Linear not listed here into an AQLM layer, and 5.23 matches the list against MODULE
    # names: "lm_head.weight" alone (the hub convention, kept for other readers) leaves lm_head an uninitialized
    # AQLM layer, with only a warning. So each unquantized Linear is listed under both names.
    dense = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    embeddings = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    keep = [f"{name}.weight" for name in embeddings] + [key for name in dense for key in (f"{name}.weight", name)]
    # the list is matched as prefixes, regexes and suffixes: make sure it selects exactly the quantized layers
    if {name for name in [*layers, *dense] if should_convert_module(name, keep)} != set(layers):
        raise LqtkError("the model's module names make transformers' linear_weights_not_to_quantize match the wrong "
                        "layers: export this model in the lqtk format instead")

    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "aqlm", "in_group_size": group_size, "out_group_size": 1,
                                     "num_codebooks": num_codebooks, "nbits_per_codebook": nbits,
                                     "linear_weights_not_to_quantize": keep}
    type(model.config).from_dict(config).save_pretrained(out)
    save_file(kept, str(out / WEIGHTS_NAME), metadata={"format": "pt"})  # transformers checks the "format"


def _hf_tensors(layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One lqtk `aqlm` layer's tensors in the layout of `aqlm.QuantizedLinear` (out_group_size 1)."""
    spec, tensors = layer.spec, layer.tensors()
    nbits = spec["nbits_per_codebook"]
    codes = unpack_codes(tensors["codes"], spec)  # (O, J, M) in [0, 2^B)
    # aqlm stores codes in the smallest signed int that holds B bits and reads them back modulo 2^B
    codes = torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes)
    codes = codes.to(torch.int8 if nbits <= 8 else torch.int16)
    return {"codes": codes, "codebooks": tensors["codebooks"].to(dtype).unsqueeze(2),
            "scales": tensors["scales"].to(dtype).view(-1, 1, 1, 1)}

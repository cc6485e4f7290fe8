"""Serving exports of `affine` models (RTN, GPTQ, LeanQuant's affine grid): the layouts inference engines read.

compressed-tensors `pack-quantized` ("compressed-tensors"; vLLM, transformers + `compressed-tensors`):

    config.json         the model's config plus "quantization_config": {"quant_method": "compressed-tensors",
                        "format": "pack-quantized", "quantization_status": "compressed", "config_groups": {
                        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": false,
                        "strategy": "group", "group_size": 64, ...}, ...}, ...}, "ignore": ["lm_head"], ...}
    model.safetensors   per quantized Linear `name` (O outputs, I inputs, b bits, G groups):
                        `name.weight_packed` int32 [O, ceil(I·b/32)]: codes u = q + 2^(b-1) in a row's LSB-first bit
                            stream (lqtk's `qweight` as it is);
                        `name.weight_scale` [O, G] in the model's dtype; `name.weight_shape` int64 [O, I];
                        `name.weight_zero_point` int32 [ceil(O·b/32), G], asymmetric only: zero points, packed the
                            same way along the OUTPUT dim; w = (u - zero) · scale;
                        `name.bias` if any; every other tensor as it is.
    compressed-tensors 0.20 has no g_idx and refuses a group size that does not divide I, so lqtk's shorter last
    group (576 inputs in groups of 128: 4 x 128 + 64) is stored exactly in groups of the gcd of the group size and
    every layer's I (64 there), each lqtk group's scale and zero repeated. One group size for all layers (here
    the 1536-wide inputs' groups of 128 are split too), because transformers' dequantizing loader
    (the CPU path of asymmetric models) applies the first config group's scheme to every layer; layers of other
    bits or symmetry are config groups of their own, targeted by module name (symmetric ones load per module).

GPTQ v1 checkpoint ("gptq"; transformers + optimum + gptqmodel, vLLM, ...):

    config.json         "quantization_config": {"quant_method": "gptq", "bits": b, "group_size": g (-1 per channel),
                        "desc_act": false, "sym": ..., "checkpoint_format": "gptq"}
    model.safetensors   per quantized Linear: `name.qweight` int32 [I·b/32, O] (each output column the LSB-first
                        stream of its codes along the input dim: lqtk's `qweight` transposed; 3-bit codes straddle
                        words); `name.qzeros` int32 [G, O·b/32] holding (zero - 1) mod 2^b packed along the output
                        dim (symmetric: zero 2^(b-1)); `name.scales` fp16 [G, O]; `name.g_idx` int32 [I] = i // g,
                        which also covers a shorter last group; `name.bias` if any.
    One (bits, group_size, symmetric) for the whole model; I·b and O·b multiples of 32. A group size loaders do not
    take (they take 16, 32, ..., 1024) is stored in groups of the largest they take that divides it, scales and zeros
    repeated. v1 cannot hold a zero point 0 (stored as 2^b - 1, read back as 2^b by the original kernels, and as 0
    plus a carry into the next output's zero by gptqmodel): such a group is stored as the same weights with the codes
    mirrored (2^b - 1 - q), zero 2^b - 1 and the scale negated.

`save_serving` writes either from a model whose quantized layers are `QuantizedLinear`s in the `affine` format (a
streamed one block by block), `export_serving` from an lqtk export folder; both check every layer before writing and
write into a temporary folder renamed into place at the end. `load_decoded` rebuilds a plain fp model from a
written folder with decoders written from the layouts above (not lqtk's packing code): a check of the export that
needs neither compressed-tensors nor gptqmodel.
"""

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from lqtk.anatomy import block_prefix, decoder_blocks
from lqtk.errors import LqtkError
from lqtk.formats import FORMATS
from lqtk.formats.packing import pack_bits, unpack_bits
from lqtk.models import load_causal_lm
from lqtk.nn import QuantizedLinear, quantized_layers
from lqtk.streaming import empty_model, tensor_groups
from lqtk.weights import INDEX_NAME, SHARD_BYTES, WEIGHTS_NAME, save_tensor_groups

log = logging.getLogger(__name__)

GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # what gptqmodel's kernels accept (vLLM's: 32, 64, 128)


def serving_folder(format_name: str) -> str:
    """The folder a run writes a serving export into, beside its lqtk `model/`."""
    return f"model-{format_name}"


def check_servable(model: PreTrainedModel, format_name: str) -> dict[str, QuantizedLinear]:
    """The quantized layers of `model`, or an LqtkError naming the first layer `format_name` cannot store."""
    if format_name not in SERVING_FORMATS:
        raise LqtkError(f"unknown serving format {format_name!r}: choose from {sorted(SERVING_FORMATS)}")
    layers = quantized_layers(model)
    if not layers:
        raise LqtkError(f"the model has no quantized layer: nothing to export in the {format_name} format")
    for name, layer in layers.items():
        if layer.format != "affine":
            holders = ("the lqtk format (model/) and the HF AQLM format (export.hf_aqlm)" if layer.format == "aqlm"
                       else "the lqtk format (model/) alone")
            raise LqtkError(
                f"layer {name} is in the {layer.format!r} format, which the {format_name} format cannot hold: it "
                "stores integer codes with a scale and zero per group, lqtk's 'affine' format (RTN, GPTQ, "
                f"LeanQuant's affine grid). Export it in the lqtk format: {holders} can hold {layer.format!r} "
                "layers; or quantize with an affine method")
    linears = {name for name, m in empty_model(model.config, torch.float32).named_modules()
               if isinstance(m, nn.Linear)}
    outside = sorted(set(layers) - linears)
    if outside:
        raise LqtkError(f"layer {outside[0]} is not an nn.Linear of the transformers model (MoE experts stored "
                        f"fused?): the {format_name} format stores quantized nn.Linear modules only; export this "
                        "model in the lqtk format")
    if format_name == "gptq":
        _check_gptq(model, layers)
    return layers


def _check_gptq(model: PreTrainedModel, layers: dict[str, QuantizedLinear]) -> None:
    settings = {name: (m.spec["bits"], m.spec["group_size"], m.spec["symmetric"]) for name, m in layers.items()}
    if len(set(settings.values())) > 1:
        examples = {setting: name for name, setting in settings.items()}
        raise LqtkError("the GPTQ format stores one setting for the whole model; these layers differ in (bits, "
                        f"group_size, symmetric): {examples}. Use the compressed-tensors format, which stores one "
                        "per layer, or the lqtk format")
    bits, group_size, _ = next(iter(settings.values()))
    if group_size is not None and _gptq_group_size(group_size) is None:
        raise LqtkError(f"group_size={group_size}: GPTQ loaders take groups of {GPTQ_GROUP_SIZES}, and none of them "
                        "divides it (so that each group could repeat its scale); use the compressed-tensors format")
    multiple = 32 // math.gcd(bits, 32)  # codes that fill whole int32 words
    for name, layer in layers.items():
        out_features, in_features = layer.spec["shape"]
        if in_features % multiple or out_features % multiple:
            raise LqtkError(f"layer {name} is {out_features} x {in_features}: the GPTQ format packs {bits}-bit codes "
                            f"into whole int32 words along both dims, so both must be multiples of {multiple}; use the "
                            "compressed-tensors format")
    prefix = block_prefix(model, 0).rsplit(".", 2)[0] + "."  # "model.layers."
    outside = sorted(name for name in layers if not name.startswith(prefix))
    if outside:
        raise LqtkError(f"layer {outside[0]} is quantized but outside the decoder blocks, where GPTQ loaders quantize "
                        "nothing; export in the compressed-tensors or lqtk format")


# --- compressed-tensors pack-quantized ----------------------------------------------------------------------------
def _ct_tensors(name: str, layer: QuantizedLinear, dtype: torch.dtype, quant: dict) -> dict[str, torch.Tensor]:
    spec, tensors = layer.spec, layer.tensors()
    bits, (out_features, in_features) = spec["bits"], spec["shape"]
    scales = tensors["scales"]
    group = _scheme_of(quant, name)["group_size"] or in_features
    # lqtk group of each compressed-tensors group: group j covers inputs [j·group, (j+1)·group)
    lqtk_group = torch.arange(math.ceil(in_features / group)) * group // (spec["group_size"] or in_features)
    scale = _exact(scales[:, lqtk_group], dtype, name, "compressed-tensors stores them in the model's dtype")
    out = {"weight_packed": tensors["qweight"].clone(), "weight_scale": scale,
           "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    if not spec["symmetric"]:
        zeros = unpack_bits(tensors["zeros"], bits, scales.shape[1])[:, lqtk_group]  # (O, G')
        out["weight_zero_point"] = pack_bits(zeros.T.contiguous(), bits).T.contiguous()  # packed along the outputs
    return out


def _ct_quantization_config(model: PreTrainedModel, layers: dict[str, QuantizedLinear]) -> dict:
    """One config group per (bits, symmetric, per channel or not): transformers' dequantizing loader (the CPU path
    of asymmetric layers) applies the first group's scheme to every layer, so the group size is shared too: the
    largest dividing every layer's lqtk group size and input dim."""
    schemes: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        schemes.setdefault((layer.spec["bits"], layer.spec["symmetric"], layer.spec["group_size"] is None),
                           []).append(name)
    groups = {}
    for number, ((bits, symmetric, per_channel), names) in enumerate(sorted(schemes.items(), key=lambda kv: kv[1][0])):
        group = None if per_channel else math.gcd(*(math.gcd(layers[name].spec["group_size"],
                                                             layers[name].spec["shape"][1]) for name in names))
        weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
                   "strategy": "channel" if per_channel else "group", "group_size": group, "dynamic": False,
                   "actorder": None}
        # one scheme: every Linear not ignored; several: each group lists its modules by name
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{number}"] = {"targets": targets, "weights": weights, "input_activations": None,
                                     "output_activations": None}
    dense = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": dense, "kv_cache_scheme": None}


# --- GPTQ v1 ------------------------------------------------------------------------------------------------------
def _gptq_group_size(group_size: int | None) -> int | None:
    """The GPTQ group size that stores lqtk's `group_size` exactly: itself if loaders take it, else the largest they
    take that divides it (each lqtk group's scale and zero repeated); None when none does (or per channel)."""
    return max((size for size in GPTQ_GROUP_SIZES if group_size and group_size % size == 0), default=None)


def _gptq_tensors(name: str, layer: QuantizedLinear, dtype: torch.dtype, quant: dict) -> dict[str, torch.Tensor]:
    spec, tensors = layer.spec, layer.tensors()
    bits, (_, in_features) = spec["bits"], spec["shape"]
    scales = tensors["scales"]
    if "zeros" in tensors:
        zeros = unpack_bits(tensors["zeros"], bits, scales.shape[1])
    else:
        zeros = torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int64)
    group = in_features if quant["group_size"] == -1 else quant["group_size"]
    # lqtk group of each GPTQ group: GPTQ group j covers inputs [j·group, (j+1)·group)
    lqtk_group = torch.arange(math.ceil(in_features / group)) * group // (spec["group_size"] or in_features)
    zeros = zeros[:, lqtk_group]
    scales = _exact(scales[:, lqtk_group], torch.float16, name, "the GPTQ format stores fp16 scales")
    qweight = tensors["qweight"]
    flip = zeros == 0  # (O, G)
    if flip.any():
        # v1 stores zero - 1, so a zero point 0 is stored as 2^b - 1, which the original kernels read back as 2^b
        # and gptqmodel's v1 -> v2 conversion (+1 per packed field) carries into the next output's zero. The same
        # weights q·s are (q' - z')·s' with q' = 2^b - 1 - q, z' = 2^b - 1, s' = -s: exact, and any loader reads it.
        maxq = 2**bits - 1
        codes = unpack_bits(qweight, bits, in_features)
        column_group = torch.arange(in_features) // group
        codes = torch.where(flip[:, column_group], maxq - codes, codes)
        qweight, zeros = pack_bits(codes, bits), zeros.masked_fill(flip, maxq)
        scales = torch.where(flip, -scales, scales)
    return {"qweight": qweight.T.contiguous(),
            "qzeros": pack_bits(((zeros - 1) % 2**bits).T.contiguous(), bits),  # v1: zero - 1 (loaders add 1)
            "scales": scales.T.contiguous(),
            "g_idx": (torch.arange(in_features) // group).to(torch.int32)}


def _gptq_quantization_config(model: PreTrainedModel, layers: dict[str, QuantizedLinear]) -> dict:
    bits, group_size, symmetric = next((m.spec["bits"], m.spec["group_size"], m.spec["symmetric"])
                                       for m in layers.values())
    config = {"quant_method": "gptq", "bits": bits, "group_size": _gptq_group_size(group_size) or -1, "desc_act": False,
              "sym": symmetric, "checkpoint_format": "gptq"}
    prefix = block_prefix(model, 0).rsplit(".", 2)[0] + "."
    in_blocks = {name for name, m in model.named_modules() if name.startswith(prefix)
                 and isinstance(m, (nn.Linear, QuantizedLinear))}
    if in_blocks != set(layers):  # some Linears of the blocks stay dense: list those that are not
        # optimum keeps the block Linears whose name ends with one of these (full names: exactly these)
        config["modules_in_block_to_quantize"] = [sorted(layers)]
        selected = {name for name in in_blocks if any(name.endswith(kept) for kept in layers)}
        if selected != set(layers):
            raise LqtkError("the model's module names make optimum's modules_in_block_to_quantize select the wrong "
                            "layers: export this model in the compressed-tensors or lqtk format")
    return config


def _exact(tensor: torch.Tensor, dtype: torch.dtype, name: str, why: str) -> torch.Tensor:
    cast = tensor.to(dtype)
    if not torch.equal(cast.float(), tensor.float()):
        raise LqtkError(f"layer {name} has {tensor.dtype} scales that {dtype} cannot hold exactly ({why}; "
                        "fine-tuned scales?): export in the lqtk format")
    return cast


SERVING_FORMATS: dict[str, tuple[Callable, Callable]] = {
    "compressed-tensors": (_ct_tensors, _ct_quantization_config),
    "gptq": (_gptq_tensors, _gptq_quantization_config),
}


# --- writing ------------------------------------------------------------------------------------------------------
def save_serving(model: PreTrainedModel, out: Path, format_name: str, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write `model` (quantized layers in the `affine` format) into a new folder `out` in serving format
    `format_name` ("compressed-tensors" or "gptq"): config.json and the weights, block by block. Every layer is
    checked first, and each converted layer is decoded back (`decode_layer`) and compared with lqtk's weight
    exactly; the folder appears only once complete."""
    layers = check_servable(model, format_name)
    convert, quantization_config = SERVING_FORMATS[format_name]
    dtype = model.get_input_embeddings().weight.dtype
    if out.exists():
        raise LqtkError(f"{out} already exists: choose another folder or remove it")
    if getattr(model, "lqtk_token_pruning", None) is not None:
        log.warning("the %s export does not record token pruning: engines run the full prefill", format_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config(model, layers)
        type(model.config).from_dict(config).save_pretrained(tmp)

        def converted_groups():
            for group in tensor_groups(model):
                for name in [name for name in layers if f"{name}.{layers[name].tensor_names[0]}" in group]:
                    layer = layers[name]  # materialized: its block is being consumed
                    for tensor_name in layer.tensor_names:
                        del group[f"{name}.{tensor_name}"]
                    tensors = convert(name, layer, dtype, config["quantization_config"])
                    expected = FORMATS["affine"].dequantize(layer.tensors(), layer.spec)
                    if not torch.equal(decode_layer(tensors, format_name, config["quantization_config"], name),
                                       expected):
                        raise LqtkError(f"the {format_name} tensors of {name} do not decode to its weight: this is "
                                        "a bug in lqtk's serving export, please report it")
                    group.update({f"{name}.{key}": value for key, value in tensors.items()})
                yield group

        save_tensor_groups(converted_groups(), tmp, max_shard_bytes)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_serving(lqtk_folder: Path, out: Path, format_name: str, max_shard_bytes: int = SHARD_BYTES) -> None:
    """`save_serving` of an lqtk export folder (read block by block), with its tokenizer files."""
    model = load_causal_lm(lqtk_folder, lazy=True)
    tokenizer = AutoTokenizer.from_pretrained(lqtk_folder)
    save_serving(model, out, format_name, max_shard_bytes)
    tokenizer.save_pretrained(out)


# --- independent decoding -----------------------------------------------------------------------------------------
def _bit_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unsigned `bits`-bit values 0..count-1 of each row's LSB-first bit stream over its int32 words (R, W):
    value e is bits e·b .. e·b+b-1 of the stream, bit k of the stream bit k mod 32 of word k // 32."""
    shifts = torch.arange(32, dtype=torch.int64)
    stream = ((words.to(torch.int64).unsqueeze(-1) >> shifts) & 1).flatten(1)  # (R, 32·W)
    values = stream[:, : count * bits].reshape(words.shape[0], count, bits)
    return (values << torch.arange(bits)).sum(-1)


def _scheme_of(quantization_config: dict, name: str) -> dict:
    for group in quantization_config["config_groups"].values():
        if group["targets"] == ["Linear"] or name in group["targets"]:
            return group["weights"]
    raise LqtkError(f"{name} is in no config group")


def decode_layer(tensors: dict[str, torch.Tensor], format_name: str, quantization_config: dict,
                 name: str) -> torch.Tensor:
    """The fp32 weight (O, I) the serving tensors of layer `name` stand for, read as the format describes it."""
    if format_name == "compressed-tensors":
        scheme = _scheme_of(quantization_config, name)
        bits = scheme["num_bits"]
        out_features, in_features = tensors["weight_shape"].tolist()
        codes = _bit_stream(tensors["weight_packed"], bits, in_features) - 2 ** (bits - 1)  # signed q
        groups = tensors["weight_scale"].shape[1]
        if scheme["symmetric"]:
            zero = torch.zeros(out_features, groups, dtype=torch.int64)
        else:
            zero = _bit_stream(tensors["weight_zero_point"].T, bits, out_features).T - 2 ** (bits - 1)
        group = torch.arange(in_features) // (scheme["group_size"] or in_features)
        return (codes - zero[:, group]).float() * tensors["weight_scale"].float()[:, group]
    bits = quantization_config["bits"]
    in_features, out_features = tensors["g_idx"].shape[0], tensors["scales"].shape[1]
    codes = _bit_stream(tensors["qweight"].T, bits, in_features)  # (O, I)
    zero = (_bit_stream(tensors["qzeros"], bits, out_features) + 1) % 2**bits  # (G, O): stored zero - 1
    group = tensors["g_idx"].long()
    return (codes - zero[group].T).float() * tensors["scales"].float()[group].T


def load_decoded(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A plain fp model from a serving export, every quantized layer decoded by `decode_layer` (needs neither
    compressed-tensors nor gptqmodel, and holds the whole decoded model)."""
    config = AutoConfig.from_pretrained(folder)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    format_name = "gptq" if quant["quant_method"] == "gptq" else "compressed-tensors"
    del config.quantization_config
    index = folder / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_NAME]
    stored = {}
    for file in files:
        with safe_open(folder / file, "pt") as f:
            stored.update({name: f.get_tensor(name) for name in f.keys()})
    marker = "weight_packed" if format_name == "compressed-tensors" else "qweight"
    layers = [name[: -len(marker) - 1] for name in stored if name.endswith(f".{marker}")]
    for name in layers:
        tensors = {key[len(name) + 1:]: stored.pop(key) for key in list(stored) if key.rsplit(".", 1)[0] == name}
        bias = tensors.pop("bias", None)
        stored[f"{name}.weight"] = decode_layer(tensors, format_name, quant, name)
        if bias is not None:
            stored[f"{name}.bias"] = bias
    model = empty_model(config, dtype)
    unexpected = sorted(stored.keys() - model.state_dict().keys())
    if unexpected:
        raise LqtkError(f"{folder} holds tensors its config has no place for ({unexpected[:5]}): it is corrupt")
    model.load_state_dict({name: t.to(dtype) for name, t in stored.items()}, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing:
        raise LqtkError(f"{folder} lacks tensors {missing[:5]}: the export is incomplete; write it again")
    decoder_blocks(model)  # a causal LM with blocks, as lqtk's evaluation expects
    return model.eval()


def load_compressed_tensors(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A compressed-tensors export loaded by transformers + compressed-tensors on the CPU: asymmetric layers need
    `CompressedTensorsConfig(dequantize=True)` (the compressed path refuses their packed zero points there)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    symmetric = all(group["weights"]["symmetric"] for group in quant["config_groups"].values())
    extra = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).eval()


def check_quantizer_servable(quantizer, format_name: str) -> None:
    """Before a calibration phase: refuse a quantizer whose layers `format_name` could not store."""
    if quantizer.format != "affine":
        raise LqtkError(f"the {type(quantizer).__name__} quantizer makes 'non-affine' layers, which the {format_name} "
                        "format cannot hold (it stores lqtk's 'affine' format: RTN, GPTQ, LeanQuant's affine grid; "
                        f"this quantizer writes {quantizer.format!r}): remove it from export.serving_formats")
    if format_name == "gptq" and quantizer.group_size is not None and _gptq_group_size(quantizer.group_size) is None:
        raise LqtkError(f"group_size={quantizer.group_size}: GPTQ loaders take groups of {GPTQ_GROUP_SIZES}, and none "
                        "of them divides it; choose such a group size or remove gptq from export.serving_formats")

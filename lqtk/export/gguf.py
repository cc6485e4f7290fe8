"""GGUF export: an lqtk export folder written as a llama.cpp model file (`lqtk.gguf_file`).

Linears calibrated on a GGML grid (`lqtk.quant.GGML`, the `ggml` format) are written as their bytes. Linears in
another format, or in fp, are rounded to `linear_type` on its grid (round-to-nearest with the type's scale search:
no calibration, as llama.cpp's quantizer without an importance matrix), and refused without one. The token
embedding (and an untied output head) are typed as llama.cpp's quantizer types them: Q6_K, or Q8_0 when the hidden
size is not a multiple of 256; norms and biases stay F32.
"""

import json
import re
from collections import Counter
from pathlib import Path

import gguf
import torch
from transformers import AutoConfig

from lqtk.errors import LqtkError
from lqtk.formats import FORMATS
from lqtk.formats.ggml import TYPES, GGMLFormat
from lqtk.gguf_file import check_architecture, write_gguf
from lqtk.quant.ggml import GGML
from lqtk.weights import WeightFiles

GGUF_NAME = "model.gguf"  # in a run folder, beside model/
LINEAR_SUFFIXES = ("_proj.weight",)  # the Linears of a Llama-architecture block, by their weight's name


def rounded(weight: torch.Tensor, type_name: str) -> tuple[str, torch.Tensor]:
    """`weight` (O, I) rounded to nearest on the grid of `type_name` (or its 32-wide fallback): (type, blocks)."""
    quantizer = GGML(type=type_name, act_order=False).for_shape(weight.shape[1])
    quantized = quantizer.quantize(weight.float(), torch.eye(weight.shape[1]))
    return quantized.spec["type"], quantized.tensors["blocks"]


def output_type(hidden_size: int) -> str:
    """llama.cpp's type for the token embedding and output head."""
    return "Q6_K" if hidden_size % TYPES["Q6_K"].block == 0 else "Q8_0"


def layer_order(name: str) -> tuple[int, str]:
    """llama-quantize's tensor order: the tensors outside the blocks first, then block by block."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def export_gguf(model_dir: Path, out: Path, linear_type: str | None = None, file_type: str | None = None,
                source: Path | None = None) -> None:
    """Write the lqtk export (or fp model) in `model_dir` as the GGUF file `out`. `file_type`: the llama.cpp file
    type recorded (e.g. "Q4_K_M"); default: MOSTLY_ the type of most Linear weights. `source`: the folder of the fp
    model it was quantized from, whose name names the model (default: `model_dir`)."""
    model_dir = Path(model_dir)
    if linear_type is not None and linear_type not in TYPES:
        raise LqtkError(f"unknown GGML type {linear_type!r}: choose one of {', '.join(TYPES)}")
    config_dict = json.loads((model_dir / "config.json").read_text())
    config = AutoConfig.from_pretrained(model_dir)
    check_architecture(config)
    layers = config_dict.get("quantization_config", {}).get("layers", {})
    files = WeightFiles(model_dir)
    others = sorted({layer["format"] for layer in layers.values()} - {GGMLFormat.name})
    fp_linears = [name for name in files.files if name.endswith(LINEAR_SUFFIXES) and name[:-7] not in layers]
    if (others or fp_linears) and linear_type is None:
        what = f"{others} layers" if others else f"fp Linears ({fp_linears[0]}, ...)"
        raise LqtkError(f"{model_dir} has {what}, which a GGUF stores in a GGML type: quantize with lqtk.quant.GGML, "
                        "or name the type to round them to (--type, e.g. Q4_K)")

    def tensors():  # in any order: written in layer_order
        of_layers = {name for layer in layers for name in files.files if name.startswith(layer + ".")}
        for name in set(files.files) - of_layers:
            tensor = files.read([name])[name]
            if name in fp_linears:
                yield name, rounded(tensor, linear_type)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                yield name, rounded_output(tensor, output_type(config.hidden_size))
            else:
                yield name, tensor
        for layer, spec in layers.items():
            names = [name for name in files.files if name.startswith(layer + ".")]
            stored = {name[len(layer) + 1:]: t for name, t in files.read(names).items()}
            if spec["format"] == GGMLFormat.name:
                yield f"{layer}.weight", (spec["type"], stored["blocks"])
            else:
                weight = FORMATS[spec["format"]].dequantize(stored, spec)
                yield f"{layer}.weight", rounded(weight, linear_type)
            if "bias" in stored:
                yield f"{layer}.bias", stored["bias"]

    written = list(tensors())
    counts = Counter()
    for _, value in written:
        if isinstance(value, tuple):
            counts[value[0]] += value[1].numel()
    file_type = file_type or (f"MOSTLY_{counts.most_common(1)[0][0]}" if counts else "ALL_F32")
    try:
        kind = gguf.LlamaFileType[file_type if file_type.startswith(("MOSTLY_", "ALL_")) else f"MOSTLY_{file_type}"]
    except KeyError:
        raise LqtkError(f"unknown llama.cpp file type {file_type!r}: e.g. Q4_K_M, Q3_K_M, Q2_K, IQ4_XS") from None
    write_gguf(out, config, model_dir, sorted(written, key=lambda item: layer_order(item[0])), kind,
               source or model_dir)


def rounded_output(weight: torch.Tensor, type_name: str) -> tuple[str, torch.Tensor]:
    """The embedding or output head: Q8_0 by the `gguf` package's quantizer (llama.cpp's own, bit for bit), other
    types on lqtk's grid."""
    if type_name == "Q8_0":
        blocks = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
        return type_name, torch.from_numpy(blocks)
    return rounded(weight, type_name)


def with_gguf_embedding(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """`model` with the token embedding (and output head) that the GGUF file `path` stores, dequantized by the
    `gguf` package: the model that file holds when its Linears are `model`'s."""
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    for module, name in [(model.get_input_embeddings(), "token_embd.weight"),
                         (model.get_output_embeddings(), "output.weight")]:
        if name in stored:
            t = stored[name]
            weight = gguf.quants.dequantize(t.data, t.tensor_type).reshape(module.weight.shape)
            module.weight = torch.nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
    if "output.weight" not in stored:  # tied: the head reads the embedding
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model

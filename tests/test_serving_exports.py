"""Serving exports (lqtk.export.serving): a tiny Llama with RTN `affine` layers, written in compressed-tensors
pack-quantized and GPTQ v1 layouts, loads in transformers (+ compressed-tensors, or + optimum + gptqmodel in
.venv-gptqmodel) and computes lqtk's logits; the written tensors decode, by decoders written here from the layouts'
descriptions (shared/FACTS.md), to lqtk's weights exactly; other layers and settings are refused, nothing written;
the export callback writes and verifies both beside model/."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from helpers import REPO, fails_with, recipe_args
from lqtk.anatomy import decoder_blocks, linear_layers
from lqtk.cli import main
from lqtk.errors import LqtkError
from lqtk.export.serving import load_decoded, save_serving
from lqtk.models import load_causal_lm
from lqtk.nn import QuantizedLinear, quantized_layers, set_submodule
from lqtk.quant import RTN, LeanQuant
from lqtk.reference_models import build_tiny_llama

GPTQ_PYTHON = REPO / ".venv-gptqmodel" / "bin" / "python"
GPTQ_SCRIPT = REPO / "scripts" / "gptq_serving_check.py"
# (bits, symmetric, group_size) on inputs of 64 and 160: 48 leaves a shorter last group in both (64 = 48 + 16,
# 160 = 3 x 48 + 16), 128 in the 160-wide ones only (and covers all 64), None is per channel
SETTINGS = [(4, True, 48), (4, False, 48), (2, True, 128), (2, False, 64), (3, False, 48), (3, True, 32),
            (8, False, None)]
GPTQMODEL_SETTINGS = [(4, False, 48), (3, True, 32), (2, True, 128), (8, False, None)]  # a load each: ~10 s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "fp"
    build_tiny_llama(path)  # hidden 64, intermediate 160, k/v 32 outputs
    return path


def quantized_tiny(tiny, bits, symmetric, group_size):
    """The tiny model with every block Linear RTN-quantized; rows 0-3 of q_proj in block 0 are made non-negative so
    that their groups have the zero point 0 (GPTQ v1 cannot store it as it is)."""
    model = load_causal_lm(tiny)
    rtn = RTN(bits=bits, group_size=group_size, symmetric=symmetric)
    for block in decoder_blocks(model):
        for name, linear in linear_layers(block).items():
            weight = linear.weight.detach().clone()
            if block is decoder_blocks(model)[0] and name == "self_attn.q_proj":
                weight[:4] = weight[:4].abs()
            set_submodule(block, name, QuantizedLinear(rtn.quantize(weight), linear.bias))
    return model


def token_ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def lqtk_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.quantized_weight.dequantize() for name, layer in quantized_layers(model).items()}


def read_stream(words: torch.Tensor, bits: int, count: int) -> list[list[int]]:
    """Values 0..count-1 of each row's bit stream: the row's int32 words concatenated LSB first (word k holds bits
    32k..32k+31), value e at bits e·b..e·b+b-1. Plain Python integers, independent of lqtk's packing code."""
    rows = []
    for row in words.tolist():
        stream = sum((word & 0xFFFFFFFF) << (32 * k) for k, word in enumerate(row))
        rows.append([(stream >> (e * bits)) & (2**bits - 1) for e in range(count)])
    return rows


def decode_compressed_tensors(state, name, weights) -> torch.Tensor:
    """FACTS: `weight_packed` [O, ceil(I·b/32)], u = q + 2^(b-1) in the row's stream; `weight_scale` [O, G];
    `weight_zero_point` [ceil(O·b/32), G] (zero + 2^(b-1), packed along dim 0); w = (q - zp) · scale."""
    bits, offset = weights["num_bits"], 2 ** (weights["num_bits"] - 1)
    out_features, in_features = state[f"{name}.weight_shape"].tolist()
    q = torch.tensor(read_stream(state[f"{name}.weight_packed"], bits, in_features)) - offset
    scale = state[f"{name}.weight_scale"]
    assert list(state[f"{name}.weight_packed"].shape) == [out_features, -(-in_features * bits // 32)]
    if weights["symmetric"]:
        assert f"{name}.weight_zero_point" not in state
        zero = torch.zeros(scale.shape, dtype=torch.int64)
    else:
        packed = state[f"{name}.weight_zero_point"]
        assert list(packed.shape) == [-(-out_features * bits // 32), scale.shape[1]]
        zero = torch.tensor(read_stream(packed.T, bits, out_features)).T - offset
    group = torch.arange(in_features) // (weights["group_size"] or in_features)
    assert scale.shape[1] == -(-in_features // (weights["group_size"] or in_features))
    return (q - zero[:, group]).float() * scale.float()[:, group]


def decode_gptq(state, name, bits) -> torch.Tensor:
    """FACTS: `qweight` [I·b/32, O], input row r in word r // (32/b) at shift b·(r mod 32/b) (for 3 bits, the
    dense stream); `qzeros` [G, O·b/32] hold zero - 1, read back as stored + 1 (the original kernels); `scales` fp16
    [G, O]; `g_idx` [I]; w[o, i] = scales[g_idx[i], o] · (q[i, o] - zero[g_idx[i], o])."""
    qweight, qzeros, scales, g_idx = (state[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx"))
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    assert list(qweight.shape) == [in_features * bits // 32, out_features] and scales.dtype == torch.float16
    assert list(qzeros.shape) == [scales.shape[0], out_features * bits // 32] and g_idx.dtype == torch.int32
    if 32 % bits == 0:
        per_word, words = 32 // bits, qweight.to(torch.int64) & 0xFFFFFFFF
        rows = torch.arange(in_features)
        q = (words[rows // per_word] >> (bits * (rows % per_word))[:, None]) & (2**bits - 1)  # (I, O)
    else:
        q = torch.tensor(read_stream(qweight.T, bits, in_features)).T
    stored = torch.tensor(read_stream(qzeros, bits, out_features))  # (G, O)
    assert (stored != 2**bits - 1).all(), "a stored 2^b - 1 (zero point 0) is read back as 2^b by GPTQ kernels"
    zero = stored + 1
    group = g_idx.long()
    return (scales.float()[group] * (q - zero[group])).T


@pytest.mark.parametrize("bits, symmetric, group_size", SETTINGS)
def test_compressed_tensors_export_loads_in_transformers(tiny, tmp_path, bits, symmetric, group_size):
    model = quantized_tiny(tiny, bits, symmetric, group_size)
    save_serving(model, tmp_path / "ct", "compressed-tensors")

    quant = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "pack-quantized" and quant["ignore"] == ["lm_head"]
    # one group size for all layers, dividing every lqtk group and input dim (64- and 160-wide inputs)
    [group] = quant["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"]["group_size"] == {48: 16, 128: 32, 64: 32, 32: 32, None: None}[group_size]
    state = load_file(tmp_path / "ct" / "model.safetensors")
    for name, weight in lqtk_weights(model).items():
        weights = next(group["weights"] for group in quant["config_groups"].values()
                       if group["targets"] == ["Linear"] or name in group["targets"])
        assert torch.equal(decode_compressed_tensors(state, name, weights), weight), name
        assert f"{name}.weight" not in state

    extra = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **extra)
    ids = token_ids(model)
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("bits, symmetric, group_size", SETTINGS)
def test_gptq_export_has_the_checkpoint_layout(tiny, tmp_path, bits, symmetric, group_size):
    model = quantized_tiny(tiny, bits, symmetric, group_size)
    save_serving(model, tmp_path / "gptq", "gptq")

    quant = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    # loaders take groups of 16, 32, ..., 1024: 48 is stored as groups of 16 (each lqtk group's scale repeated)
    assert quant == {"quant_method": "gptq", "bits": bits, "group_size": {48: 16, None: -1}.get(group_size, group_size),
                     "desc_act": False, "sym": symmetric, "checkpoint_format": "gptq"}
    state = load_file(tmp_path / "gptq" / "model.safetensors")
    for name, weight in lqtk_weights(model).items():
        assert torch.equal(decode_gptq(state, name, bits), weight), name
    ids = token_ids(model)
    with torch.no_grad():
        assert torch.equal(load_decoded(tmp_path / "gptq")(ids).logits, model(ids).logits)


def test_gptq_export_loads_with_gptqmodel(tiny, tmp_path):
    """One subprocess in .venv-gptqmodel loads each export (every bit width, symmetric and asymmetric with zero
    points 0, shorter last groups, a group size stored as 16s, per channel)."""
    if not GPTQ_PYTHON.exists():
        pytest.skip(".venv-gptqmodel is missing (transformers' GPTQ loader needs optimum + gptqmodel, whose numpy pin "
                    "clashes with .venv): create it with scripts/gptqmodel_env.sh")
    folders, expected, rounded = [], [], []
    for bits, symmetric, group_size in GPTQMODEL_SETTINGS:
        model = quantized_tiny(tiny, bits, symmetric, group_size)
        folder = tmp_path / f"w{bits}-{symmetric}-{group_size}"
        save_serving(model, folder, "gptq")
        ids = token_ids(model)
        # gptqmodel dequantizes in fp16, (q - zero).half() · scale: the reference rounds the weights the same way
        reference = load_decoded(folder)
        for layer in quantized_layers(model):
            reference.get_submodule(layer).weight.data = reference.get_submodule(layer).weight.half().float()
        with torch.no_grad():
            expected.append(model(ids).logits)
            rounded.append(reference(ids).logits)
        folders.append(folder)
    torch.save(ids, tmp_path / "ids.pt")
    logits = [tmp_path / f"{folder.name}.pt" for folder in folders]
    proc = subprocess.run([str(GPTQ_PYTHON), str(GPTQ_SCRIPT), "--model", *map(str, folders), "--ids",
                           str(tmp_path / "ids.pt"), "--logits", *map(str, logits)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for setting, file, lqtk_logits, fp16_logits in zip(GPTQMODEL_SETTINGS, logits, expected, rounded):
        got = torch.load(file)
        scale = lqtk_logits.abs().max().item()
        torch.testing.assert_close(got, fp16_logits, rtol=1e-4, atol=1e-4 * scale, msg=str(setting))
        torch.testing.assert_close(got, lqtk_logits, rtol=1e-3, atol=1e-3 * scale, msg=str(setting))  # fp16 weights


@pytest.mark.parametrize("format_name", ["compressed-tensors", "gptq"])
def test_a_non_affine_layer_is_refused_and_nothing_written(tiny, tmp_path, format_name):
    model = quantized_tiny(tiny, 4, False, 32)
    linear = load_causal_lm(tiny).model.layers[1].mlp.down_proj
    lut = LeanQuant(bits=2).quantize(linear.weight.detach(), torch.eye(linear.in_features))  # non-uniform: `lut`
    set_submodule(model, "model.layers.1.mlp.down_proj", QuantizedLinear(lut))
    with pytest.raises(LqtkError, match=rf"layer model.layers.1.mlp.down_proj is in the 'lut' format, which the "
                                        rf"{format_name} format cannot hold: .* the lqtk format \(model/\) alone"):
        save_serving(model, tmp_path / "out", format_name)
    assert list(tmp_path.iterdir()) == []


def test_settings_gptq_cannot_store_are_refused(tiny, tmp_path):
    model = quantized_tiny(tiny, 4, False, 32)
    rtn = RTN(bits=2, group_size=32)
    set_submodule(model, "model.layers.1.mlp.down_proj",
                  QuantizedLinear(rtn.quantize(load_causal_lm(tiny).model.layers[1].mlp.down_proj.weight.detach())))
    with pytest.raises(LqtkError, match="the GPTQ format stores one setting for the whole model"):
        save_serving(model, tmp_path / "out", "gptq")
    save_serving(model, tmp_path / "ct", "compressed-tensors")  # which stores one per layer
    with pytest.raises(LqtkError, match="group_size=24: GPTQ loaders take groups of"):
        save_serving(quantized_tiny(tiny, 4, True, 24), tmp_path / "out", "gptq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


@pytest.mark.slow
def test_the_export_callback_writes_and_verifies_serving_exports(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    main(recipe_args(corpus, run, "--export.serving_formats", "[compressed-tensors, gptq]"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["serving_exports"] == {"compressed-tensors": str(run / "model-compressed-tensors"),
                                          "gptq": str(run / "model-gptq")}
    lqtk_model = load_causal_lm(run / "model")
    ids = token_ids(lqtk_model)
    with torch.no_grad():
        expected = lqtk_model(ids).logits
        for folder in ("model-compressed-tensors", "model-gptq"):
            assert (run / folder / "tokenizer.json").exists()
            torch.testing.assert_close(load_decoded(run / folder)(ids).logits, expected, rtol=0, atol=0)
    # a finished export is kept: a second run into the same folder is refused before any work
    fails_with(capsys, recipe_args(corpus, run, "--export.serving_formats", "[gptq]"),
               "already holds a finished export")


def test_serving_export_of_a_non_affine_method_is_refused_before_calibrating(corpus, tmp_path, capsys):
    argv = recipe_args(corpus, tmp_path / "run", "--export.serving_formats", "[gptq]",
                       recipe=str(REPO / "configs" / "debug" / "aqlm-tiny.yaml"))
    fails_with(capsys, argv, "the AQLM quantizer makes 'non-affine' layers, which the gptq format cannot hold")
    assert not (tmp_path / "run" / "checkpoints").exists()

"""HF AQLM export: a tiny Llama with random lqtk `aqlm` layers, written by `save_hf_aqlm` and loaded by plain
transformers + the `aqlm` package, computes the same logits as lqtk; models it cannot store are refused."""
# ruff: noqa: E402  (NUMBA_NUM_THREADS must be set before the imports)

import os

# aqlm's CPU kernel for 8-bit codebooks (numba) races when run on several threads; the pool size is read when numba
# is imported, which only happens in aqlm's first 8-bit forward, after every test module has been collected
os.environ["NUMBA_NUM_THREADS"] = "1"

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lqtk.anatomy import decoder_blocks, linear_layers
from lqtk.errors import LqtkError
from lqtk.export.hf_aqlm import save_hf_aqlm
from lqtk.formats import QuantizedWeight
from lqtk.formats.packing import pack_bits
from lqtk.models import load_causal_lm
from lqtk.nn import QuantizedLinear, set_submodule
from lqtk.quant import RTN
from lqtk.reference_models import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "fp"
    build_tiny_llama(path)  # hidden 64, intermediate 160: every in-features is a multiple of g = 8
    return path


def random_aqlm(weight: torch.Tensor, num_codebooks: int, nbits: int, gen: torch.Generator, group_size: int = 8):
    out_features, in_features = weight.shape
    groups = in_features // group_size
    codes = torch.randint(0, 2**nbits, (out_features, groups, num_codebooks), generator=gen)
    tensors = {"codes": pack_bits(codes.reshape(out_features, groups * num_codebooks), nbits),
               "codebooks": (0.05 * torch.randn(num_codebooks, 2**nbits, group_size, generator=gen)).half(),
               "scales": (0.5 + torch.rand(out_features, 1, generator=gen)).half()}
    spec = {"num_codebooks": num_codebooks, "nbits_per_codebook": nbits, "in_group_size": group_size,
            "shape": [out_features, in_features]}
    return QuantizedWeight("aqlm", "aqlm", spec, tensors)


def quantize_blocks(model, make_weight) -> None:
    """Replace every Linear of the decoder blocks (lm_head stays dense, as in real AQLM models)."""
    for block in decoder_blocks(model):
        for name, linear in linear_layers(block).items():
            set_submodule(block, name, QuantizedLinear(make_weight(name, linear.weight.detach()), linear.bias))


@pytest.mark.parametrize("num_codebooks, nbits", [pytest.param(2, 8, marks=pytest.mark.slow), (1, 16)])  # numba, torch
def test_transformers_loads_the_export_and_computes_the_same_logits(tiny, tmp_path, num_codebooks, nbits):
    model = load_causal_lm(tiny)
    gen = torch.Generator().manual_seed(0)
    quantize_blocks(model, lambda name, weight: random_aqlm(weight, num_codebooks, nbits, gen))
    save_hf_aqlm(model, tmp_path)

    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["num_codebooks"] == num_codebooks and quant["nbits_per_codebook"] == nbits
    assert {"lm_head", "lm_head.weight", "model.embed_tokens.weight"} <= set(quant["linear_weights_not_to_quantize"])
    state = load_file(tmp_path / "model.safetensors")
    assert state["model.layers.0.mlp.down_proj.codes"].dtype == (torch.int8 if nbits == 8 else torch.int16)
    assert "model.layers.0.mlp.down_proj.weight" not in state and "lm_head.weight" not in state  # tied

    if nbits == 8:  # in case numba was imported before this module set NUMBA_NUM_THREADS
        import numba

        numba.set_num_threads(1)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # no lqtk code involved
    assert type(loaded.model.layers[0].mlp.down_proj).__module__.startswith("aqlm")
    assert isinstance(loaded.lm_head, torch.nn.Linear)  # a dense, tied lm_head, not an uninitialized AQLM layer
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    diff = (expected - got).abs().max().item()
    print(f"{num_codebooks}x{nbits}: max logit difference {diff:.3g} (logit scale {expected.abs().max():.3g})")
    assert diff <= 1e-4 * max(1.0, expected.abs().max().item())


def test_non_aqlm_layers_are_refused(tiny, tmp_path):
    model = load_causal_lm(tiny)
    quantize_blocks(model, lambda name, weight: RTN().quantize(weight, None))
    with pytest.raises(LqtkError, match="'affine' format, which HF AQLM cannot store"):
        save_hf_aqlm(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_mixed_settings_are_refused(tiny, tmp_path):
    model = load_causal_lm(tiny)
    gen = torch.Generator().manual_seed(0)
    quantize_blocks(model, lambda name, weight: random_aqlm(weight, 1, 16 if name == "mlp.down_proj" else 8, gen))
    with pytest.raises(LqtkError, match="HF AQLM stores one setting for the whole model"):
        save_hf_aqlm(model, tmp_path)

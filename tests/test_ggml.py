"""llama.cpp's block types (`lqtk.formats.ggml`), GPTQ on their grids (`lqtk.quant.GGML`) and GGUF files
(`lqtk.gguf_file`, `lqtk.export.gguf`), against the `gguf` package's reference code: no llama.cpp needed."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from helpers import REPO, correlated_problem, fails_with, recipe_args
from lqtk.cli import main
from lqtk.errors import LqtkError
from lqtk.export.gguf import with_gguf_embedding
from lqtk.formats.ggml import TYPES, grid_table, sign_table
from lqtk.gguf_file import check_gguf, load_gguf, rope_permute
from lqtk.models import load_causal_lm
from lqtk.nn import quantized_layers
from lqtk.quant import GGML

GGUF_RECIPE = str(REPO / "configs" / "debug" / "gguf-tiny.yaml")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.view(np.uint32))


def reference_decode(blocks: torch.Tensor, type_name: str) -> np.ndarray:
    return quants.dequantize(blocks.numpy(), GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name", list(TYPES))
def test_blocks_decode_as_the_gguf_package_does(type_name):
    """Random bytes (fp16 fields finite): lqtk's decoding is the reference's bit for bit, and packing the fields
    it unpacks gives the bytes back (every bit of the block belongs to a field)."""
    kind = TYPES[type_name]
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (40, kind.size), dtype=torch.uint8, generator=g)
    for at in kind.halves.values():
        blocks[:, at:at + 2] = (torch.randn(40, 1, generator=g) * 0.01).half().view(torch.uint8)
    assert same_bits(kind.decode(blocks).numpy(), reference_decode(blocks, type_name).reshape(40, -1))
    assert torch.equal(kind.pack(*kind.unpack(blocks)), blocks)


def weighted_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    d = w - q
    return float(torch.einsum("oi,ij,oj->", d, hessian, d))


@pytest.mark.parametrize("type_name", list(TYPES))
def test_gptq_on_the_grid_beats_round_to_nearest(type_name):
    """On correlated inputs, error feedback on the type's grid has a lower Hessian-weighted error than rounding to
    nearest with the type's scale search (lqtk's, and llama.cpp's own where the gguf package has it), and the
    stored blocks decode, by the reference, to exactly the weight lqtk decodes."""
    w, hessian, _ = correlated_problem(out_features=32, in_features=512)
    w = w * 0.02
    quantized = GGML(type=type_name).quantize(w, hessian)
    ours = quantized.dequantize()
    reference = reference_decode(quantized.tensors["blocks"].reshape(-1, TYPES[type_name].size), type_name)
    assert same_bits(ours.numpy(), reference.reshape(ours.shape))
    nearest = GGML(type=type_name, act_order=False).quantize(w, torch.eye(512)).dequantize()
    assert weighted_error(w, ours, hessian) < 0.8 * weighted_error(w, nearest, hessian)
    try:
        llama = quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType[type_name]),
                                  GGMLQuantizationType[type_name])
    except NotImplementedError:  # the gguf package quantizes the 32-wide types only
        return
    assert weighted_error(w, ours, hessian) < 0.8 * weighted_error(w, torch.from_numpy(llama), hessian)


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"])
def test_vector_rounding_finds_the_best_entries_and_signs(type_name):
    """The i-quants' rounding of 8 weights: the least weighted error over every codebook entry (per 4 or 8 weights)
    and every sign code (128 where the 8th sign makes the count of minus signs even, else 256), by brute force."""
    g = torch.Generator().manual_seed(1)
    rows = 64
    columns, weight = torch.randn(8, rows, generator=g), torch.rand(8, generator=g) + 0.1
    scale = torch.rand(rows, 1, generator=g) * 0.05 + 0.01
    config = GGML(type=type_name)
    codes, values = config.round_vector_to_grid(columns, (scale, torch.zeros(rows, 1)), 0, weight)
    cost = (weight[:, None] * (columns - values).square()).sum(0)

    grid = grid_table(type_name)
    x = columns.T.reshape(rows, 1, -1, grid.shape[1])  # (rows, 1, halves, dim)
    codes_of_signs = sign_table(TYPES[type_name].sign_bits)
    signs = codes_of_signs.reshape(1, len(codes_of_signs), -1, grid.shape[1])
    entry_cost = (weight.reshape(-1, grid.shape[1])[:, None] *
                  (x[..., None, :] - scale.reshape(rows, 1, 1, 1, 1) * signs[..., None, :] * grid).square()).sum(-1)
    best = entry_cost.amin(-1).sum(-1).amin(1)  # the best entry of each half, under the best sign code
    assert torch.allclose(cost, best, rtol=1e-5, atol=1e-7)
    level = torch.tensor(TYPES[type_name].levels, dtype=torch.float32)[(codes >> 1).long()]
    assert torch.equal(values, scale.T * level * torch.where(codes & 1 == 1, -1.0, 1.0))  # code: level · 2 + minus


def test_rows_the_type_cannot_take_fall_back_as_llama_cpp_does():
    w, hessian, _ = correlated_problem(out_features=8, in_features=96)
    with pytest.warns(UserWarning, match="Q5_0"):
        quantized = GGML(type="Q4_K").quantize(w, hessian)
    assert quantized.spec["type"] == "Q5_0"
    with pytest.raises(LqtkError, match="Q4_K_M"):  # a file type is not a tensor type: the error lists the types
        GGML(type="Q4_K_M")
    with pytest.raises(LqtkError, match="multiple of 32"):
        GGML(type="Q8_0").check_fits((8, 100))


def test_rope_permute_is_llama_cpp_s():
    rows = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of 8 rows
    expected = torch.cat([head.reshape(2, 4, 3).transpose(0, 1).reshape(8, 3) for head in rows.split(8)])
    assert torch.equal(rope_permute(rows, 2), expected)


@pytest.fixture(scope="module")
def gguf_run(corpus, tmp_path_factory):
    """The debug GGUF recipe on a tiny Llama whose MLP is 256 wide, so that its down-projection takes Q4_K's
    super-blocks and the other Linears the 32-wide fallback."""
    from lqtk.reference_models import build_tiny_llama

    root = tmp_path_factory.mktemp("gguf")
    build_tiny_llama(root / "fp", intermediate_size=256)
    run = root / "run"
    main(recipe_args(corpus, run, "--model.init_args.model", str(root / "fp"), "--export.evaluate", "false",
                     recipe=GGUF_RECIPE))
    return run


def test_gguf_holds_the_export_s_blocks(gguf_run):
    """Every Linear of the file, dequantized by the gguf package, is the export's weight bit for bit (q and k
    rows in GGML's rotary order); norms are F32 and the embedding llama.cpp's Q8_0."""
    reader = GGUFReader(gguf_run / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    model = load_causal_lm(gguf_run / "model")
    config = model.config
    types = set()
    for name, layer in quantized_layers(model).items():
        block, linear = name.split(".")[2], name.split(".")[-1]
        gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[linear]
        stored = tensors[f"blk.{block}.{gguf_name}.weight"]
        assert stored.tensor_type.name == layer.spec["type"]
        types.add(layer.spec["type"])
        weight = layer.quantized_weight.dequantize()
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(linear)
        if heads:
            weight = rope_permute(weight, heads)
        assert same_bits(weight.numpy(), quants.dequantize(stored.data, stored.tensor_type).reshape(weight.shape))
    assert types == {"Q5_0", "Q4_K"}
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert "output.weight" not in tensors  # tied: llama.cpp reads the embedding
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == config.num_hidden_layers


def test_gguf_computes_the_export_s_logits(gguf_run):
    """Read back through transformers' GGUF loader, the file gives the export's logits (with the GGUF's Q8_0
    embedding) within float tolerance."""
    windows = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = with_gguf_embedding(load_causal_lm(gguf_run / "model"), gguf_run / "model.gguf")
    with torch.no_grad():
        expected = reference(windows).logits
        logits = load_gguf(gguf_run / "model.gguf")(windows).logits
    assert torch.allclose(logits, expected, atol=1e-4)


def test_a_truncated_gguf_is_refused(gguf_run, tmp_path):
    data = (gguf_run / "model.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.gguf").write_text("not a gguf\n")
    for name in ("cut.gguf", "text.gguf"):
        with pytest.raises(LqtkError, match="not a complete GGUF"):
            check_gguf(tmp_path / name)


def test_export_command_writes_the_run_s_file_and_rounds_fp_models(gguf_run, tmp_path, capsys):
    """`lqtk export --format gguf` of the run's export is the run's model.gguf (but for the model's name, which the
    run takes from the fp model's folder); an fp model needs --type, and is then rounded on that type's grid (with the
    fallback for rows it cannot take)."""
    main(["export", "--format", "gguf", "--model", str(gguf_run / "model"), "--output", str(tmp_path / "a.gguf")])
    written, run = GGUFReader(tmp_path / "a.gguf"), GGUFReader(gguf_run / "model.gguf")
    assert [(t.name, t.tensor_type, bytes(t.data)) for t in written.tensors] == \
        [(t.name, t.tensor_type, bytes(t.data)) for t in run.tensors]
    named = ("general.name", "general.basename", "general.size_label")
    assert {k: bytes(f.parts[-1]) for k, f in written.fields.items() if k not in named and not k.startswith("GGUF.")} \
        == {k: bytes(f.parts[-1]) for k, f in run.fields.items() if k not in named and not k.startswith("GGUF.")}
    fp = gguf_run.parent / "fp"
    fails_with(capsys, ["export", "--format", "gguf", "--model", str(fp), "--output", str(tmp_path / "b.gguf")],
               "fp Linears")
    fails_with(capsys, ["export", "--format", "gguf", "--model", str(fp), "--output", str(tmp_path / "b.gguf"),
                        "--type", "Q9_K"], "unknown GGML type 'Q9_K'")
    fails_with(capsys, ["export", "--format", "gguf", "--model", str(fp), "--output", str(tmp_path / "b.bin"),
                        "--type", "Q4_K"], "does not end in .gguf")
    assert not list(tmp_path.glob("b.*")) and not list(tmp_path.glob(".b*"))  # nothing written, no partial file
    with pytest.warns(UserWarning, match="Q5_0"):
        main(["export", "--format", "gguf", "--model", str(fp), "--output", str(tmp_path / "b.gguf"), "--type",
              "Q4_K"])
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "b.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.0.attn_q.weight"] == "Q5_0"
    fp_model = load_causal_lm(fp)
    down = load_gguf(tmp_path / "b.gguf").model.layers[0].mlp.down_proj.weight
    assert (down - fp_model.model.layers[0].mlp.down_proj.weight).abs().max() < 0.01  # rounded, not garbage

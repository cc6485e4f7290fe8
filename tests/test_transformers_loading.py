"""An lqtk export in plain transformers: without lqtk, `AutoModelForCausalLM.from_pretrained` refuses it with an error
naming lqtk (config.json's model_type "lqtk") rather than load it with random weights in place of its quantized
Linears; after `import lqtk`, `AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer` read it as the base model's
folder and compute what `lqtk.load` computes; exports written before model_type "lqtk" still load."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import lqtk
from lqtk.model_format import BASE_MODEL_TYPE, MODEL_TYPE
from lqtk.models import load_causal_lm, resolve_model
from lqtk.nn import QuantizedLinear, quantized_layers
from lqtk.quant import RTN
from lqtk.streaming import materialize_all
from lqtk.token_pruning import TokenPruning

PRUNING = TokenPruning(start_layer=1, keep_ratio=0.5, recent=4)
# reference model → (its model_type, the export's token pruning): a dense model with pruning, an MoE one without
MODELS = {"tiny-llama": ("llama", PRUNING), "tiny-qwen2-moe": ("qwen2_moe", None)}
IDS = torch.arange(1, 25)[None]


@pytest.fixture(scope="module")
def exports(corpus, tmp_path_factory):
    """reference model name → the export `lqtk.quantize` writes of it (RTN 4-bit, no evaluation)."""
    root = tmp_path_factory.mktemp("exports")
    data = {"calibration_files": [str(corpus["calibration"])], "evaluation_files": [str(corpus["evaluation"])],
            "seq_len": 32, "num_calibration_windows": 2, "batch_size": 2}
    return {name: lqtk.quantize(name, RTN(bits=4, group_size=32), data=data, output_dir=root / name, evaluate=False,
                                trainer={"accelerator": "cpu", "enable_progress_bar": False}, token_pruning=pruning)
            for name, (_, pruning) in MODELS.items()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_an_export_names_its_base_model_type_under_model_type_lqtk(exports, name):
    config = json.loads((exports[name] / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config[BASE_MODEL_TYPE] == MODELS[name][0]
    assert config["quantization_config"]["quant_method"] == "lqtk" and config["quantization_config"]["layers"]


@pytest.mark.slow
def test_plain_transformers_refuses_an_export_with_an_error_naming_lqtk(exports, tmp_path):
    """What a user without lqtk sees: an error, not a model with random weights."""
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(exports['tiny-llama'])!r})\n"
            "assert 'lqtk' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ValueError: The checkpoint you are trying to load has model type `lqtk`" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_transformers_after_import_lqtk_loads_what_lqtk_loads(exports, name):
    export = exports[name]
    config = AutoConfig.from_pretrained(export)
    assert config.model_type == MODELS[name][0] and not hasattr(config, BASE_MODEL_TYPE)
    loaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ours = lqtk.load(export)
    assert type(loaded) is type(ours) and loaded.config.model_type == MODELS[name][0]
    assert quantized_layers(loaded).keys() == quantized_layers(ours).keys()
    assert all(isinstance(layer, QuantizedLinear) for layer in quantized_layers(loaded).values())
    assert getattr(loaded, "lqtk_token_pruning", None) == getattr(ours, "lqtk_token_pruning", None) == MODELS[name][1]
    assert torch.equal(logits(loaded), logits(ours))
    assert torch.equal(logits(materialize_all(load_causal_lm(export, lazy=True))), logits(ours))
    source, tokenizer = AutoTokenizer.from_pretrained(resolve_model(name)), AutoTokenizer.from_pretrained(export)
    assert type(tokenizer) is type(source) and tokenizer("to be or not").input_ids == source("to be or not").input_ids


@pytest.mark.slow
def test_an_export_written_before_model_type_lqtk_still_loads(exports, tmp_path):
    """config.json with the base model's model_type and no lqtk_base_model_type (same format_version)."""
    export, old = exports["tiny-llama"], tmp_path / "old"
    shutil.copytree(export, old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = config.pop(BASE_MODEL_TYPE)
    (old / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    expected = logits(lqtk.load(export))
    assert torch.equal(logits(lqtk.load(old)), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32).eval()), expected)

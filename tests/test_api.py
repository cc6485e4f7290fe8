"""The Python API on the tiny model: `lqtk.quantize` exports bit for bit what `lqtk fit` exports with the equivalent
recipe, `lqtk.load` runs the export, `import lqtk` loads neither the API nor Lightning until they are used, and every
script in examples/ runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lqtk
from lqtk.cli import main
from lqtk.errors import LqtkError
from lqtk.nn import QuantizedLinear
from lqtk.quant import GPTQ

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "debug" / "gptq-tiny.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def exports(corpus, tmp_path_factory):
    """The export of `lqtk.quantize` and that of `lqtk fit --config configs/debug/gptq-tiny.yaml`, with the same
    settings (the recipe's, written out here as a user of the API writes them), evaluation off in both."""
    root = tmp_path_factory.mktemp("api")
    data = {"calibration_files": [str(corpus["calibration"])], "evaluation_files": [str(corpus["evaluation"])],
            "seq_len": 64, "num_calibration_windows": 8, "batch_size": 4, "seed": 0}
    quantizer = GPTQ(bits=4, group_size=48, symmetric=False, act_order=True, damp=0.01, observer="minmax")
    ours = lqtk.quantize("tiny-llama", quantizer, data=data, output_dir=root / "api", evaluate=False, seed=0,
                         trainer={"accelerator": "cpu"}, sequential=True, save_hessians=True)
    main(["fit", "--config", str(RECIPE), "--trainer.default_root_dir", str(root / "cli"), "--export.evaluate", "false",
          "--data.calibration_files", f"[{corpus['calibration']}]",
          "--data.evaluation_files", f"[{corpus['evaluation']}]"])
    assert ours == root / "api" / "model"
    return ours, root / "cli" / "model"


@pytest.mark.slow
def test_quantize_exports_what_the_cli_exports_bit_for_bit(exports):
    ours, theirs = exports
    files = sorted(file.name for file in ours.glob("*.safetensors"))
    assert files and files == sorted(file.name for file in theirs.glob("*.safetensors"))
    for name in files:
        mine, cli = load_file(ours / name), load_file(theirs / name)
        assert mine.keys() == cli.keys()
        for key in mine:
            assert mine[key].dtype == cli[key].dtype and torch.equal(mine[key], cli[key]), key
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    metrics = [json.loads((export.parent / "metrics.json").read_text()) for export in exports]
    assert metrics[0]["quantizer"] == metrics[1]["quantizer"] and "perplexity" not in metrics[0]


@pytest.mark.slow
def test_load_runs_the_export(exports):
    model = lqtk.load(exports[0])
    assert not model.training
    assert sum(isinstance(module, QuantizedLinear) for module in model.modules()) == 2 * 7
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_quantize_refuses_a_loaded_model_and_a_finished_export(exports, tmp_path):
    with pytest.raises(LqtkError, match="save_pretrained"):
        lqtk.quantize(torch.nn.Linear(4, 4), GPTQ(), output_dir=tmp_path)
    with pytest.raises(LqtkError, match="overwrite=True"):
        lqtk.quantize("tiny-llama", GPTQ(), output_dir=exports[0].parent)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_import_lqtk_loads_the_api_only_when_used():
    heavy = "[m for m in sys.modules if m.split('.')[0] in ('lightning', 'lightning_fabric', 'pytorch_lightning') " \
            "or m.startswith('lqtk.phases')]"
    code = ("import sys\nimport lqtk\n"
            "assert 'lqtk.api' not in sys.modules\n"
            "assert lqtk.__all__ == ['load', 'quantize'] and {'load', 'quantize'} <= set(dir(lqtk))\n"
            "from lqtk import load\n"
            f"assert 'lqtk.api' in sys.modules and load is lqtk.load and not {heavy}, {heavy}\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_an_export_loads_and_runs_without_the_calibration_side(exports):
    """formats + kernels + nn + the loader are the runtime: loading and running an export (with transformers, and
    with lqtk's loader) imports no module of lqtk.quant or lqtk.phases."""
    code = ("import sys\nimport torch\nimport lqtk.formats, lqtk.kernels, lqtk.nn\n"
            "from transformers import AutoModelForCausalLM\nfrom lqtk.models import load_causal_lm\n"
            f"ids = torch.arange(1, 17)[None]\n"
            f"for model in (AutoModelForCausalLM.from_pretrained({str(exports[0])!r}),"
            f" load_causal_lm({str(exports[0])!r})):\n"
            "    assert lqtk.nn.quantized_layers(model)\n"
            "    assert torch.isfinite(model(ids).logits).all()\n"
            "calibration = [m for m in sys.modules if m.startswith(('lqtk.quant', 'lqtk.phases'))]\n"
            "assert not calibration, calibration\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(example, exports, corpus, tmp_path):
    text = ["--calibration", str(corpus["calibration"]), "--evaluation", str(corpus["evaluation"]), "--windows", "8",
            "--seq-len", "64"]
    arguments = {"quantize_gptq.py": ["tiny-llama", *text], "mixed_precision.py": ["tiny-llama", *text],
                 "load_and_generate.py": [str(exports[0])]}
    assert example.name in arguments, f"add the arguments that run {example.name} on the tiny model here"
    proc = subprocess.run([sys.executable, str(example), *arguments[example.name]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

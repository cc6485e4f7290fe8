"""End to end through the command line on the tiny model: the debug recipe, export round trip, `lqtk evaluate`,
and every kind of bad input (one clear message, non-zero exit, nothing overwritten)."""

import json

import pytest
from safetensors.torch import load_file, save_file

from helpers import DEBUG_RECIPE, REPO, corpus_args, fails_with, recipe_args
from lqtk.cli import COMMANDS, main
from lqtk.reference_models import build_tiny_llama


@pytest.mark.slow
def test_debug_recipe_exports_a_verified_model_with_metrics(debug_run):
    metrics = json.loads((debug_run / "metrics.json").read_text())
    for key in ("method", "bits_per_weight", "perplexity", "fp_perplexity", "quantize_time_s", "wall_time_s",
                "peak_rss_bytes"):
        assert key in metrics
    assert metrics["method"] == "gptq"
    # 4-bit codes + fp16 scale and 4-bit zero per group of 48 (groups 48+16 and 3x48+16): a little under 5 bits
    assert 4.5 < metrics["bits_per_weight"] < 5.0
    assert 0.5 < metrics["perplexity"] / metrics["fp_perplexity"] < 2
    config = json.loads((debug_run / "model" / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    assert len(layers) == 2 * 7 and all(layer["method"] == "gptq" for layer in layers.values())
    assert not [p.name for p in debug_run.iterdir() if p.name.startswith(".export")]  # no temp folder left
    assert "weight" not in {k.rsplit(".", 1)[1] for k in load_file(debug_run / "model" / "model.safetensors")
                            if k.startswith("model.layers.0.self_attn.q_proj.")}


@pytest.mark.slow
def test_evaluate_reproduces_the_phase_perplexity(debug_run, corpus, tmp_path):
    out = tmp_path / "eval.json"
    main(["evaluate", "--model", str(debug_run / "model"), "--text", str(corpus["evaluation"]), "--seq-len", "64",
          "--output", str(out)])
    result, metrics = json.loads(out.read_text()), json.loads((debug_run / "metrics.json").read_text())
    assert set(result) >= {"perplexity", "tokens", "seq_len", "bos", "bits_per_weight"}
    assert result["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    assert result["bits_per_weight"] == metrics["bits_per_weight"] and result["tokens"] == metrics["tokens"]


@pytest.mark.slow
def test_finished_export_is_not_overwritten(debug_run, corpus, capsys):
    weights = debug_run / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    fails_with(capsys, recipe_args(corpus, debug_run), "already holds a finished export")
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_checkpoint_of_another_recipe_is_refused(debug_run, corpus, tmp_path, capsys):
    argv = recipe_args(corpus, tmp_path / "other", "--model.init_args.quantizer.init_args.bits", "3",
                       "--ckpt_path", str(debug_run / "checkpoints" / "last.ckpt"))
    fails_with(capsys, argv, "belongs to another run (different quantizer)")
    assert not (tmp_path / "other" / "model").exists()


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEBUG_RECIPE, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: lqtk.quant.GPTQ" in capsys.readouterr().out


@pytest.fixture
def broken_models(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    vision = tmp_path / "vision"
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)) \
        .save_pretrained(vision)
    nan = tmp_path / "nan"
    build_tiny_llama(nan)
    weights = load_file(nan / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    return {"missing": tmp_path / "missing", "corrupt": corrupt, "vision": vision, "nan": nan}


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("corrupt", "is missing or unreadable"),
    ("vision", "not a causal language model"),
    ("nan", "NaN/Inf"),
])
def test_bad_model_is_refused(case, message, broken_models, corpus, tmp_path, capsys):
    fails_with(capsys, recipe_args(corpus, tmp_path / "run", "--model.init_args.model", str(broken_models[case])),
               message)
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--model.init_args.quantizer.init_args.bits", "5", "unsupported bits=5"),
    ("--model.init_args.quantizer.init_args.group_size", "0", "group_size=0 must be >= 1"),
])
def test_unsupported_quantizer_config_is_refused(option, value, message, corpus, tmp_path, capsys):
    fails_with(capsys, recipe_args(corpus, tmp_path / "run", option, value), message)


def test_empty_corpus_is_refused(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    fails_with(capsys, recipe_args(corpus, tmp_path / "run", "--data.evaluation_files", f"[{empty}]"),
               "corpus is empty")


def test_evaluate_refuses_missing_model(tmp_path, capsys):
    fails_with(capsys, ["evaluate", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "x.json")],
               "does not exist")
    assert not (tmp_path / "x.json").exists()


def test_help_lists_every_command_and_only_those(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "\ncommands:\n" in out, out
    section = out.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]  # up to the first blank line
    # one line per command, its name indented by two spaces (a description going on would be indented deeper)
    assert all(line.startswith("  ") for line in section.splitlines()), section
    listed = [line.split()[0] for line in section.splitlines() if not line.startswith("   ")]
    assert sorted(listed) == sorted(COMMANDS), section  # what main() dispatches
    assert not any(word in out for word in ("validate", "predict"))


def test_lightning_commands_a_phase_does_not_support_are_refused(capsys):
    fails_with(capsys, ["validate", "--config", "configs/debug/gptq-tiny.yaml"], "unknown command 'validate'")


@pytest.mark.slow
def test_plain_transformers_loads_the_export_after_import_lqtk(debug_run):
    import torch
    from transformers import AutoModelForCausalLM

    import lqtk  # noqa: F401  (registers the "lqtk" quant_method with transformers)
    from lqtk.models import load_causal_lm
    from lqtk.nn import QuantizedLinear

    loaded = AutoModelForCausalLM.from_pretrained(debug_run / "model", dtype=torch.float32).eval()
    ours = load_causal_lm(debug_run / "model")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantizedLinear)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


@pytest.mark.slow
def test_sweep_runs_each_recipe_once_and_gathers_its_metrics(corpus, tmp_path, capsys, monkeypatch):
    """The sweep itself runs in-process (its phases and evaluations are still `lqtk` subprocesses): what it prints
    is its own, the subprocesses' lines go elsewhere."""
    monkeypatch.chdir(tmp_path)
    mixed = tmp_path / "mixed-tiny.yaml"  # a copy, changed at the end
    mixed.write_text((REPO / "configs" / "debug" / "mixed-tiny.yaml").read_text())
    args = ["sweep", DEBUG_RECIPE, f"{DEBUG_RECIPE}+{mixed}", "--root", str(tmp_path), "--tasks", "last_word",
            "--task-items", "10", *corpus_args(corpus)]
    main(args)
    first = capsys.readouterr().out
    assert first.count("gptq-tiny → ") == 1  # the chain's calibration is the first entry's run
    assert first.count("zero-shot tasks of") == 3  # each export and the fp model
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    results = sweep["runs"]
    assert [(r["name"], r["run_dir"]) for r in results] == [
        ("gptq-tiny", str(tmp_path / "gptq-tiny")), ("gptq-tiny+mixed-tiny", str(tmp_path / "gptq-tiny+mixed-tiny"))]
    for result in results:
        assert result["metrics"] == json.loads((tmp_path / result["name"] / "metrics.json").read_text())
        assert 0 < result["size_mb"] < sweep["fp"]["size_mb"] and 0 <= result["zero_shot"]["last_word"]["acc"] <= 1
    assert sweep["fp"]["bits_per_weight"] == 32 and sweep["fp"]["perplexity"] == results[0]["metrics"]["fp_perplexity"]
    report = (tmp_path / "report.md").read_text()
    assert "| fp | tiny-llama | 32 |" in report and "| gptq | gptq-tiny |" in report and "| mixed gptq |" in report
    assert (tmp_path / "pareto.png").is_file()
    main(args)  # finished runs and scores are not redone
    again = capsys.readouterr().out
    assert "lqtk sweep: 2 runs" in again and "→" not in again and "zero-shot" not in again, again
    assert json.loads((tmp_path / "sweep.json").read_text()) == sweep
    # nor when the root and chain are spelled relative to the working folder
    main(["sweep", DEBUG_RECIPE, f"{DEBUG_RECIPE}+{mixed.name}", "--root", ".", *args[5:]])
    relative = capsys.readouterr().out
    assert "lqtk sweep: 2 runs" in relative and "→" not in relative and "zero-shot" not in relative, relative
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["metrics"] for r in sweep["runs"]] == [r["metrics"] for r in results]
    mixed.write_text(mixed.read_text().replace("budget_bits: 3.5", "budget_bits: 3.0"))
    # the finished run is not passed off as the changed recipe's
    fails_with(capsys, args, "was made from another recipe")
    assert json.loads((tmp_path / "sweep.json").read_text()) == sweep


def test_sweep_with_a_missing_recipe_runs_nothing(capsys, tmp_path):
    fails_with(capsys, ["sweep", DEBUG_RECIPE, "missing.yaml", "--root", str(tmp_path)],
               "recipes not found: missing.yaml")
    assert not any(tmp_path.iterdir())

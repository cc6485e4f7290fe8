"""Every bad input a newcomer can give ends, before any work, in ONE line `lqtk: error: <problem>: <fix>` on stderr,
exit code 2, no traceback, and the run folder as it was (nothing written; a folder that did not exist still does
not). One table of cases (a case is one entry), each run through the command line in its own process; and a run
stopped by SIGTERM, which says how to resume, then resumes to the export of an uninterrupted run.

The cases' processes are forked from one that imported lqtk once (`cli`): a fresh interpreter spends ~15 s of CPU
importing torch, transformers and Lightning, which over 20 cases would be most of this file's time. Each child
runs `lqtk.cli.main` as the `lqtk` entry point does, its stdout and stderr in files. LQTK_FRESH_PROCESSES=1 runs
every case in a fresh interpreter instead (`run_lqtk`)."""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import DEBUG_RECIPE, LQTK, QUICK, REPO, corpus_args, run_lqtk, write_text
from lqtk.cli import main

GGUF_RECIPE = str(REPO / "configs" / "debug" / "gguf-tiny.yaml")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # chmod does not bind root

SERVER = r"""
import importlib, json, os, sys, traceback
from lqtk.cli import main

for name in ("lqtk.fit", "lqtk.phases", "lqtk.export", "lqtk.data", "lqtk.evaluate", "lqtk.zero_shot",
             "lightning.pytorch.cli"):
    try:  # what the commands import when they run (lqtk.cli imports them lazily)
        importlib.import_module(name)
    except ImportError:
        pass

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the case: `lqtk ARGS` in CWD, its output in two files
        os.chdir(request["cwd"])
        for fd, name in ((1, request["stdout"]), (2, request["stderr"])):
            file = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(file, fd)
            os.close(file)
        sys.argv, code = ["lqtk", *request["args"]], 1
        try:
            main()
            code = 0
        except SystemExit as stop:  # as the interpreter ends on one
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class ForkedCLI:
    """`run(*args, cwd)` → CompletedProcess of `lqtk ARGS`, run in a child forked from a process that imported lqtk."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=REPO, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)

    def run(self, *args, cwd) -> subprocess.CompletedProcess:
        if os.environ.get("LQTK_FRESH_PROCESSES") == "1":
            return run_lqtk(*args, cwd=cwd)
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        request = {"args": [str(a) for a in args], "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], 600)
        assert ready, f"lqtk {' '.join(request['args'])} did not end in 600 s"
        returncode = json.loads(self.server.stdout.readline())
        return subprocess.CompletedProcess(args, returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    forked = ForkedCLI(tmp_path_factory.mktemp("forked-cli"))
    yield forked
    forked.close()


# --- the bad inputs

def tiny_llama() -> Path:
    from lqtk.models import prepare_model

    return prepare_model("tiny-llama")


def broken_copy(folder: Path, out: Path, file: str, data: bytes | None) -> Path:
    """A copy of the model `folder` with `file` replaced by `data` (None: removed)."""
    shutil.copytree(folder, out)
    (out / file).unlink()
    if data is not None:
        (out / file).write_bytes(data)
    return out


def gpt2_folder(out: Path) -> Path:
    """A tiny random GPT-2 (Conv1D layers, no nn.Linear in its blocks) with tiny-llama's byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=257, bos_token_id=256,
                        eos_token_id=256)
    GPT2LMHeadModel(config).save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama() / file, out / file)
    return out


def bert_folder(out: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=257)).save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama() / file, out / file)
    return out


def sharded_folder(out: Path) -> Path:
    """tiny-llama saved in 5 shards, the third removed."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama()).save_pretrained(out, max_shard_size="100KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[2].unlink()
    return out


def unknown_type_folder(out: Path) -> Path:
    shutil.copytree(tiny_llama(), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "llamma"}))
    return out


@pytest.fixture(scope="module")
def inputs(cli, corpus, tmp_path_factory) -> dict[str, str]:
    """Paths of the bad inputs (and of a finished run's export), by name, as the cases' arguments name them."""
    root = tmp_path_factory.mktemp("bad-inputs")
    weights = (tiny_llama() / "model.safetensors").read_bytes()
    finished = root / "finished"  # the debug recipe run to its end: a checkpoint and an export
    proc = cli.run(*fit_args(corpus, finished), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = (finished / "model" / "model.safetensors").read_bytes()
    stopped = root / "stopped"  # a run stopped after its last block, before the export: it resumes
    shutil.copytree(finished, stopped, ignore=shutil.ignore_patterns("model", "metrics.json"))
    paths = {
        "truncated": broken_copy(tiny_llama(), root / "truncated", "model.safetensors", weights[: len(weights) // 2]),
        "garbage": broken_copy(tiny_llama(), root / "garbage", "model.safetensors", os.urandom(4096)),
        "missing_shard": sharded_folder(root / "sharded"),
        "export": finished / "model",
        "truncated_export": broken_copy(finished / "model", root / "export", "model.safetensors",
                                        export[: len(export) * 2 // 3]),
        "gpt2": gpt2_folder(root / "gpt2"),
        "bert": bert_folder(root / "bert"),
        "unknown_type": unknown_type_folder(root / "unknown-type"),
        "binary": root / "binary.txt",
        "latin1": root / "latin1.txt",
        "stopped": stopped,
        "calibration": corpus["calibration"],
        "evaluation": corpus["evaluation"],
    }
    paths["binary"].write_bytes(b"\x00\x01" + os.urandom(4000))
    from lqtk.export.gguf import export_gguf

    export_gguf(tiny_llama(), root / "whole.gguf", "Q8_0")
    paths["truncated_gguf"] = root / "truncated.gguf"
    paths["truncated_gguf"].write_bytes((root / "whole.gguf").read_bytes()[:3000])
    write_text(paths["latin1"], 600, 2)
    paths["latin1"].write_bytes(paths["latin1"].read_bytes() + "Cæsar's daughter\n".encode("latin-1"))
    return {name: str(path) for name, path in paths.items()}


def fit_args(corpus, run_dir, *extra) -> list[str]:
    """The debug recipe on the test corpus, without its evaluation and on 4 windows (a run of seconds)."""
    return ["fit", "--config", DEBUG_RECIPE, "--trainer.default_root_dir", str(run_dir), *corpus_args(corpus),
            "--export.evaluate", "false", "--data.num_calibration_windows", "4", *extra]


# --- the table

@dataclass
class Case:
    """`lqtk ARGS` (`args`: `{run}` is the run folder, `{name}` an input of `inputs`) must say every one of `says` in
    its error line. `prepare(run, inputs)` makes the run folder as the case finds it; `run` is where it is in the
    case's folder."""

    args: tuple[str, ...]
    says: tuple[str, ...]
    prepare: Callable[[Path, dict], object] | None = None
    run: str = "run"


def fit(*extra, says, **kwargs) -> Case:
    return Case(("fit", "--config", DEBUG_RECIPE, "--trainer.default_root_dir", "{run}",
                 "--data.calibration_files", "[{calibration}]", "--data.evaluation_files", "[{evaluation}]",
                 "--export.evaluate", "false", "--data.num_calibration_windows", "4", *extra), says, **kwargs)


def model(name: str) -> tuple[str, str]:
    return "--model.init_args.model", f"{{{name}}}"


def read_only(run: Path, inputs: dict) -> None:
    run.parent.mkdir()
    run.parent.chmod(0o555)


def empty(run: Path, inputs: dict) -> None:
    run.mkdir()


def stopped_run(run: Path, inputs: dict) -> None:
    shutil.copytree(inputs["stopped"], run)


CASES = [
    # the model folder
    pytest.param(fit(*model("truncated"), says=("model.safetensors is not a readable safetensors file",
                                                "re-create it")), id="truncated-safetensors"),
    pytest.param(fit(*model("garbage"), says=("model.safetensors is not a readable safetensors file",)),
                 id="garbage-safetensors"),
    pytest.param(fit(*model("missing_shard"), says=("lists shards that do not exist", "model-00003-of")),
                 id="missing-shard"),
    pytest.param(Case(("evaluate", "--model", "{truncated_export}", "--text", "{evaluation}", "--seq-len", "64",
                       "--output", "{run}/eval.json"), says=("model.safetensors is not a readable safetensors file",)),
                 id="evaluate-truncated-export"),
    pytest.param(fit(*model("gpt2"), says=("GPT2LMHeadModel", "not supported", "no nn.Linear", "Conv1D")),
                 id="gpt2-conv1d"),
    pytest.param(fit(*model("bert"), says=("BertModel", "not a causal language model")), id="bert-not-causal"),
    pytest.param(fit(*model("export"), says=("is already quantized", "calibrate the fp model")),
                 id="calibrate-an-export"),
    pytest.param(fit(*model("unknown_type"), says=("model_type 'llamma'", "does not know")),
                 id="unknown-model-type"),
    # the data
    pytest.param(fit("--data.calibration_files", "[{binary}]", says=("binary.txt is binary", "UTF-8")),
                 id="binary-calibration-file"),
    pytest.param(fit("--data.evaluation_files", "[{latin1}]", says=("latin1.txt is not UTF-8", "convert it")),
                 id="latin1-evaluation-file"),
    pytest.param(Case(("evaluate", "--model", "tiny-llama", "--text", "{binary}", "--output", "{run}/eval.json"),
                      says=("binary.txt is binary",)), id="evaluate-binary-text"),
    pytest.param(fit("--data.seq_len", "0", says=("data.seq_len=0 must be at least 1",)), id="seq-len-0"),
    pytest.param(fit("--data.seq_len", "-3", says=("data.seq_len=-3 must be at least 1",)), id="seq-len-negative"),
    pytest.param(fit("--data.seq_len", "1", "--data.bos", "true", says=("data.seq_len=1 must be at least 2",)),
                 id="seq-len-1-with-bos"),
    pytest.param(fit("--data.num_calibration_windows", "0", says=("data.num_calibration_windows=0",)),
                 id="no-calibration-windows"),
    pytest.param(fit("--data.batch_size", "0", says=("data.batch_size=0",)), id="batch-size-0"),
    pytest.param(fit("--data.global_batch_size", "-8", says=("data.global_batch_size=-8",)),
                 id="global-batch-size-negative"),
    pytest.param(fit("--data.max_evaluation_windows", "0", says=("data.max_evaluation_windows=0",)),
                 id="max-evaluation-windows-0"),
    # the run folder
    pytest.param(fit(says=("trainer.default_root_dir",), prepare=read_only, run="read-only/run"),
                 id="read-only-run-folder", marks=pytest.mark.skipif(AS_ROOT, reason="chmod does not bind root")),
    pytest.param(fit(says=("trainer.default_root_dir",), prepare=lambda run, _: run.parent.write_text("file\n"),
                     run="file/run"), id="run-folder-under-a-file"),
    # the command line (lqtk/cli.py, lqtk/fit.py)
    pytest.param(fit("--ckpt_path", "last", says=("--ckpt_path last", "no checkpoint"), prepare=empty),
                 id="resume-without-checkpoint"),
    pytest.param(fit("--ckpt_path", "last", "--model.init_args.quantizer.init_args.bits", "3",
                     says=("belongs to another run", "quantizer"), prepare=stopped_run),
                 id="resume-with-changed-recipe"),
    pytest.param(fit("--model.init_args.quantizer.init_args.bitz", "4", says=("bitz", "bits", "group_size")),
                 id="quantizer-key-typo"),
    pytest.param(fit("--model.init_args.quantizer.class_path", "lqtk.quant.GPTQQ", says=("GPTQQ", "GPTQ", "RTN")),
                 id="quantizer-class-typo"),
    pytest.param(Case(("fit", "--trainer.default_root_dir", "{run}"), says=("--config",)), id="fit-without-config"),
    # GGUF (lqtk/export/gguf.py, lqtk/gguf_file.py)
    pytest.param(fit("--export.gguf", "true", says=("export.gguf", "lqtk.quant.GGML")), id="gguf-from-gptq"),
    pytest.param(Case(("fit", "--config", GGUF_RECIPE, "--trainer.default_root_dir", "{run}",
                       "--model.init_args.quantizer.init_args.type", "Q4_K_M"), says=("unknown GGML type 'Q4_K_M'",
                                                                                       "Q4_K, Q5_K")),
                 id="gguf-file-type-as-tensor-type"),
    pytest.param(Case(("export", "--format", "gguf", "--model", "tiny-qwen2", "--output", "{run}/q.gguf", "--type",
                       "Q4_K"), says=("supports the architectures", "'qwen2'")), id="gguf-unknown-architecture"),
    pytest.param(Case(("evaluate", "--model", "{truncated_gguf}", "--text", "{evaluation}", "--output",
                       "{run}/eval.json"), says=("not a complete GGUF file",)), id="evaluate-truncated-gguf"),
]


def snapshot(folder: Path) -> dict | None:
    """Every path under `folder` (itself included) with its mtime and size; None if it does not exist."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.stat().st_size)
            for path in [folder, *sorted(folder.rglob("*"))]}


def assert_one_error_line(proc: subprocess.CompletedProcess, says=()) -> str:
    """Exit code 2, no traceback, and exactly one `lqtk: error:` line, on stderr, among the output's last three lines
    (stdout, then stderr); returns it."""
    output = proc.stdout + proc.stderr
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("lqtk: error:")]
    assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and errors[0] in lines[-3:] and errors[0] in proc.stderr.splitlines(), output[-3000:]
    for words in says:
        assert words in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_before_any_work(case, cli, inputs, tmp_path):
    run = tmp_path / case.run
    if case.prepare is not None:
        case.prepare(run, inputs)
    before = snapshot(run)
    try:
        proc = cli.run(*[arg.format(run=run, **inputs) for arg in case.args], cwd=tmp_path)
    finally:
        if case.prepare is read_only:
            run.parent.chmod(0o755)  # for pytest's clean-up
    assert_one_error_line(proc, case.says)
    assert snapshot(run) == before, "the run folder changed"


# --- SIGTERM

@pytest.mark.slow
def test_sigterm_stops_at_a_safe_point_and_resumes_to_the_same_export(corpus, deep_model, tmp_path):
    """SIGTERM after the first block's checkpoint: Lightning stops at the end of the batch under way; the run says
    how to resume, and `--ckpt_path last` finishes it with the weights of an uninterrupted run."""
    def args(run_dir, *extra):
        return fit_args(corpus, run_dir, "--model.init_args.model", str(deep_model), "--data.seq_len", "64",
                        "--data.num_calibration_windows", "8", *QUICK["gptq-tiny"], *extra)

    reference = tmp_path / "reference"
    main(args(reference))  # in-process, as the resumed run: only the stopped run needs a process of its own
    stopped = tmp_path / "stopped"
    child = subprocess.Popen([*LQTK, *args(stopped)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 300
    while not (stopped / "checkpoints" / "last.ckpt").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=300)
    stop = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    assert not (stopped / "model").exists(), "SIGTERM came after the walk: the run has too few blocks"
    main(args(stopped, "--ckpt_path", "last"))
    expected = load_file(reference / "model" / "model.safetensors")
    got = load_file(stopped / "model" / "model.safetensors")
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert_one_error_line(stop, ("stopped by SIGTERM", "--ckpt_path last"))

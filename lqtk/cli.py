"""`lqtk`: a thin command line over LightningCLI (phases, lqtk.fit), the runs of several phases (lqtk.runs) and
utilities. Each command imports what it needs when it runs: `lqtk --help` answers without loading torch.

    lqtk fit --config configs/smollm2-135m/gptq-w4g128.yaml [--ckpt_path last] [--overwrite true]
    lqtk fit --config configs/smollm2-135m/gptq-w4g128.yaml --dry_run true [--dry_run_output FILE.json]
    lqtk chain configs/smollm2-135m/aqlm-2x8-g8.yaml configs/smollm2-135m/aqlm-2x8-g8-ft.yaml [--root DIR] [ARGS]
    lqtk sweep configs/smollm2-135m/gptq-w4g128.yaml A.yaml+B.yaml --root DIR [--tasks next_line] [ARGS]
    lqtk prepare-model [smollm2-135m | tiny-llama | tiny-qwen2 | tiny-gemma3 | tiny-phi3 | tiny-qwen2-moe]
    lqtk evaluate --model DIR [--text FILE ...] [--tasks next_line last_word] --output FILE.json
    lqtk generate --model DIR --prompt TEXT [--max-new-tokens N]
    lqtk export --format gguf --model RUN/model --output F.gguf [--type Q4_K] [--file-type Q4_K_M]
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lqtk.console import quiet
from lqtk.errors import LqtkError


def fit_command(args: list[str]) -> None:
    from lqtk.fit import fit

    fit(args)


def prepare_model_command(args: list[str]) -> None:
    from lqtk.models import prepare_model
    from lqtk.reference_models import REFERENCE_MODELS

    parser = argparse.ArgumentParser(prog="lqtk prepare-model", description="Build a reference model in the cache "
                                     "folder as a plain HF directory (safetensors + tokenizer); prints its path last.")
    parser.add_argument("name", nargs="?", default="smollm2-135m", choices=sorted(REFERENCE_MODELS))
    print(prepare_model(parser.parse_args(args).name))


def evaluate_command(args: list[str]) -> None:
    from lqtk.data import TextDataModule, default_split
    from lqtk.evaluate import EVAL_BATCH_SIZE, perplexity
    from lqtk.model_format import bits_per_weight
    from lqtk.models import load_causal_lm, load_tokenizer, resolve_model
    from lqtk.zero_shot import zero_shot

    parser = argparse.ArgumentParser(prog="lqtk evaluate", description="Perplexity (text joined, tokenized once, "
                                     "non-overlapping windows, no BOS) and zero-shot accuracy (--tasks) of an fp or "
                                     "lqtk-quantized model.")
    parser.add_argument("--model", required=True, help="Model folder, .gguf file or reference model name.")
    parser.add_argument("--text", nargs="+", help="Text files (default: the default corpus's evaluation plays).")
    parser.add_argument("--output", required=True, help="JSON file to write.")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    parser.add_argument("--bos", action="store_true", help="Start each window with the BOS token.")
    parser.add_argument("--max-windows", type=int, help="Only the first N windows (a quick check).")
    parser.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                        help="Measure perplexity (--no-perplexity: zero-shot tasks only).")
    add_zero_shot_arguments(parser, "Zero-shot multiple-choice tasks (lm-eval scoring), made from the --text files.")
    opts = parser.parse_args(args)
    text = opts.text or default_split()[1]
    data = TextDataModule(tokenizer=opts.model, evaluation_files=text, seq_len=opts.seq_len, bos=opts.bos,
                          batch_size=opts.batch_size)
    model = load_causal_lm(opts.model, lazy=True)  # blocks loaded one at a time by the streamed evaluation
    result = {"bits_per_weight": bits_per_weight(model), "model": str(resolve_model(opts.model)),
              "text": opts.text or "default evaluation split"}
    start = time.perf_counter()
    if opts.perplexity:
        ppl, tokens = perplexity(model, data.evaluation_windows()[: opts.max_windows], opts.batch_size)
        result.update(perplexity=ppl, tokens=tokens, seq_len=opts.seq_len, bos=opts.bos)
    if opts.tasks:
        tokenizer = load_tokenizer(opts.model)
        result.update(zero_shot=zero_shot(model, tokenizer, opts.tasks, text, opts.task_items),
                      task_items=opts.task_items)
    result["eval_time_s"] = time.perf_counter() - start
    Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def add_zero_shot_arguments(parser: argparse.ArgumentParser, tasks_help: str) -> None:
    from lqtk.zero_shot import TASKS as ZERO_SHOT_TASKS

    parser.add_argument("--tasks", nargs="+", choices=ZERO_SHOT_TASKS, default=[], help=tasks_help)
    parser.add_argument("--task-items", type=int, default=200, help="Items per zero-shot task.")


def chain_command(args: list[str]) -> None:
    from lqtk.runs import run_chain

    parser = argparse.ArgumentParser(
        prog="lqtk chain", description="Run phases one after another (e.g. calibrate, then fine-tune), each phase's "
        "model being the previous phase's export. Finished phases (metrics.json written) are skipped and an "
        "interrupted one resumes from its last checkpoint, so re-running the same command continues the chain.")
    parser.add_argument("configs", nargs="+", help="Recipes, in order.")
    parser.add_argument("--root", help="Put phase <recipe> in ROOT/<recipe> (default: each recipe's "
                        "trainer.default_root_dir).")
    opts, shared = parser.parse_known_args(args)  # the rest goes to every phase, e.g. --data.calibration_files
    configs = [Path(config) for config in opts.configs]
    run_chain(configs, [Path(opts.root) / config.stem if opts.root else None for config in configs], shared)


def sweep_command(args: list[str]) -> None:
    from lqtk.runs import run_sweep

    parser = argparse.ArgumentParser(
        prog="lqtk sweep", description="Run several recipes on one model and corpus, each in ROOT/<name>, and gather "
        "their metrics.json into ROOT/sweep.json, with a table (report.md) and a Pareto plot (pareto.png). An entry "
        "A.yaml+B.yaml is a chain (B on A's export, in ROOT/A+B); A's run in ROOT/A is shared with the entry A and "
        "other chains from A. Finished runs are skipped and an interrupted one resumes, so re-running the same "
        "command continues the sweep.")
    parser.add_argument("entries", nargs="+", help="Recipes, or chains of recipes joined by '+'.")
    parser.add_argument("--root", required=True, help="Folder of the sweep's runs.")
    parser.add_argument("--report-dir", help="Where report.md and pareto.png go (default: ROOT).")
    add_zero_shot_arguments(parser, "Also score every run's export and the fp model on these zero-shot tasks (kept "
                            "in <run>/zero_shot.json and ROOT/fp/zero_shot.json).")
    opts, shared = parser.parse_known_args(args)  # the rest goes to every phase, e.g. --data.calibration_files
    chains = [[Path(config) for config in entry.split("+")] for entry in opts.entries]
    run_sweep(chains, Path(opts.root), opts.report_dir and Path(opts.report_dir), shared, opts.tasks, opts.task_items)


def generate_command(args: list[str]) -> None:
    from lqtk.generate import generate_command

    generate_command(args)


def export_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lqtk export", description="Write a finished lqtk export (or an fp model) as a file for another engine: "
        "gguf, for llama.cpp (Linears calibrated with lqtk.quant.GGML are written as they are; others are rounded to "
        "--type).")
    parser.add_argument("--format", required=True, choices=["gguf"])
    parser.add_argument("--model", required=True, help="An lqtk export (RUN/model), an fp model folder or a reference "
                        "model name.")
    parser.add_argument("--output", required=True, help="The .gguf file to write.")
    parser.add_argument("--type", help="GGML type (e.g. Q4_K) for Linears not calibrated on a GGML grid: rounded to "
                        "nearest on its grid.")
    parser.add_argument("--file-type", help="The llama.cpp file type the file records (e.g. Q4_K_M); default: the "
                        "type of most weights.")
    opts = parser.parse_args(args)
    if not opts.output.endswith(".gguf"):
        raise LqtkError(f"--output {opts.output} does not end in .gguf: name the GGUF file to write")
    from lqtk.export.gguf import export_gguf
    from lqtk.models import resolve_model

    export_gguf(resolve_model(opts.model), Path(opts.output), opts.type, opts.file_type)
    print(opts.output)


COMMANDS = {"fit": fit_command, "chain": chain_command, "sweep": sweep_command, "prepare-model": prepare_model_command,
            "evaluate": evaluate_command, "generate": generate_command, "export": export_command}
USAGE = """usage: lqtk <command> [options]

commands:
  fit            run one phase (calibrate, fine-tune, distill) from a recipe: lqtk fit --config R.yaml
  chain          run recipes one after another, each phase on the previous one's export
  sweep          run several recipes (or chains) on one model and gather their metrics
  prepare-model  build a reference model (smollm2-135m, tiny-llama, tiny-<arch>) into the cache folder
  evaluate       perplexity and zero-shot accuracy of an fp or lqtk-quantized model
  generate       generate text from an fp or lqtk-quantized model (or a .gguf), with tokens/s
  export         write an export as a file for another engine (--format gguf: llama.cpp)

`lqtk <command> --help` lists a command's options; the recipes under configs/ explain theirs in comments.
A stopped `fit` continues with --ckpt_path last, a stopped `chain` or `sweep` with the same command again."""


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` None reads the command line."""
    words = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet()
    if not words or words[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if words else 2)
    try:
        if words[0] not in COMMANDS:
            raise LqtkError(f"unknown command {words[0]!r}: use one of {', '.join(COMMANDS)} (lqtk --help); "
                            "phases only fit, and `lqtk evaluate` measures perplexity")
        COMMANDS[words[0]](words[1:])
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"lqtk: error: {cause}", file=sys.stderr)
        sys.exit(2)


def user_error(err: BaseException | None) -> LqtkError | None:
    """The LqtkError behind `err`, if any (jsonargparse wraps errors raised while it instantiates classes)."""
    while err is not None and not isinstance(err, LqtkError):
        err = err.__cause__ or err.__context__
    return err


if __name__ == "__main__":
    main()

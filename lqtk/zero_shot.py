"""Zero-shot accuracy: log-likelihood multiple choice through lm-eval-harness, offline, on tasks lqtk writes itself
from local text (nothing comes from a hub).

Each task item is a context and 4 continuations, one of them the text's own; the model picks the continuation of
highest log-likelihood (`acc`) or of highest log-likelihood per byte (`acc_norm`), lm-eval's standard scoring. The
tasks are made, seeded, from any text (the default: the evaluation split, which calibration never sees):

    next_line   a few lines of a text as context; its next line against 3 lines drawn from elsewhere in the text
    last_word   a passage whose last line stops before its last word (LAMBADA's cloze); that word against 3 other
                words of the text

They need no world knowledge, so a 135M model scores well above chance (25%) and quantization error shows.
`LqtkLM` is lm-eval's model interface over any model lqtk loads (fp, an lqtk export, streamed block by block).
"""

import hashlib
import json
import random
import re
from pathlib import Path

import datasets
import torch
from torch.nn.functional import log_softmax

from lqtk.errors import LqtkError
from lqtk.evaluate import output_logits
from lqtk.forward import final_hidden_states
from lqtk.models import cache_dir

TASKS = ("next_line", "last_word")
# the metric each task is reported by (lm-eval's convention): per byte where continuations differ in length
PRIMARY_METRIC = {"next_line": "acc_norm", "last_word": "acc"}
CHOICES = 4
SEQUENCES_PER_PASS = 512  # a streamed model's blocks are loaded and decoded once per pass over this many sequences
CONTEXT_LINES = 3
TASK_YAML = """task: lqtk_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: "{delimiter}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


def text_lines(files: list[str]) -> list[str]:
    lines = []
    for file in files:
        if not Path(file).is_file():
            raise LqtkError(f"text file {file} does not exist: check the paths given for the tasks' text")
        lines += [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
    return lines


def next_line_items(lines: list[str], count: int, rng: random.Random) -> list[dict]:
    """Lines of at least 4 words after CONTEXT_LINES lines of context; distractors from anywhere else."""
    long = [i for i, line in enumerate(lines) if i >= CONTEXT_LINES and len(line.split()) >= 4]
    items = []
    for i in rng.sample(long, min(count, len(long))):
        others = rng.sample([j for j in long if abs(j - i) > CONTEXT_LINES], CHOICES - 1)
        items.append(shuffled("\n".join(lines[i - CONTEXT_LINES:i]), lines[i], [lines[j] for j in others], rng))
    return items


def last_word_items(lines: list[str], count: int, rng: random.Random) -> list[dict]:
    """Lines ending in a word of at least 4 letters, cut before it; distractors: other such words of the text."""
    ending = re.compile(r"^(.*\s)([A-Za-z]{4,})[^A-Za-z]*$")
    cut = {i: match for i, line in enumerate(lines) if i >= CONTEXT_LINES - 1 and (match := ending.match(line))}
    words = sorted({match.group(2).lower() for match in cut.values()})
    items = []
    for i in rng.sample(sorted(cut), min(count, len(cut))):
        head, word = cut[i].group(1).rstrip(), cut[i].group(2)
        others = rng.sample([w for w in words if w != word.lower()], CHOICES - 1)
        context = "\n".join([*lines[i - CONTEXT_LINES + 1:i], head])
        items.append(shuffled(context, word, others, rng))
    return items


def shuffled(context: str, answer: str, others: list[str], rng: random.Random) -> dict:
    choices = [answer, *others]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(answer)}


BUILDERS = {"next_line": (next_line_items, "\\n"), "last_word": (last_word_items, " ")}


def write_tasks(text_files: list[str], items: int, seed: int = 0) -> Path:
    """The tasks' JSONL data and lm-eval YAMLs, made from `text_files`, in a cache folder keyed by the text, the
    number of items and the seed (the same items for every model compared)."""
    lines = text_lines(text_files)
    key = hashlib.sha256(json.dumps([lines, items, seed]).encode()).hexdigest()[:16]
    folder = cache_dir() / "zero_shot" / key
    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name, (build, delimiter) in BUILDERS.items():
            data = folder / f"{name}.jsonl"
            try:
                rows = build(lines, items, random.Random(f"{seed}-{name}"))
            except ValueError:  # fewer distinct lines or words than an item's distractors
                rows = []
            if len(rows) < items:
                raise LqtkError(f"the tasks' text makes only {len(rows)} {name} items, fewer than the {items} asked: "
                                "give more text or ask for fewer items")
            data.write_text("".join(json.dumps(row) + "\n" for row in rows))
            (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, delimiter=delimiter))
        (folder / "done").touch()
    return folder


class LqtkLM:
    """lm-eval's `LM` interface (log-likelihoods only) over a model lqtk loaded; made a subclass in `zero_shot`,
    which imports lm-eval."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def encode(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of context + continuation, and how many of them are the continuation's (lm-eval's split: the
        whole encoded at once, so merges across the boundary are as the model would see them)."""
        whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        context_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        start = len(context_ids)
        while start > 0 and whole[:start] != context_ids[:start]:
            start -= 1
        if start == 0:  # no context: the first token is predicted from the end-of-text token
            whole, start = [self.tokenizer.eos_token_id, *whole], 1
        return whole, len(whole) - start

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives it) per request, in order. Sequences of
        similar length are batched (sorted), right-padded: causal attention keeps padding out of the scores. The
        model runs block by block over SEQUENCES_PER_PASS sequences at a time (`final_hidden_states`)."""
        encoded = [self.encode(*request.args) for request in requests]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        for start in range(0, len(order), SEQUENCES_PER_PASS):
            chunk = order[start:start + SEQUENCES_PER_PASS]
            length = max(len(encoded[i][0]) for i in chunk)
            windows = torch.zeros(len(chunk), length, dtype=torch.long)
            for row, i in enumerate(chunk):
                windows[row, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
            for batch, hidden in enumerate(final_hidden_states(self.model, windows, self.batch_size)):
                for row, i in enumerate(chunk[batch * self.batch_size:(batch + 1) * self.batch_size]):
                    ids, count = encoded[i]  # the head runs on the continuation's positions only
                    logits = output_logits(self.model, hidden[row, len(ids) - count - 1:len(ids) - 1])
                    scores, target = log_softmax(logits, dim=-1), torch.tensor(ids[len(ids) - count:])
                    results[i] = (scores.gather(1, target[:, None]).sum().item(),
                                  bool((scores.argmax(-1) == target).all()))
        return results


def zero_shot(model: torch.nn.Module, tokenizer, tasks: list[str], text_files: list[str], items: int,
              batch_size: int = 16) -> dict[str, dict[str, float]]:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr}} of `model` on lqtk's tasks made from `text_files`."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise LqtkError(f"unknown zero-shot tasks {unknown}: choose from {list(TASKS)}")
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # its one network call (a download count) on loading JSON
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class Model(LqtkLM, LM):
        def __init__(self, *args):
            LM.__init__(self)
            LqtkLM.__init__(self, *args)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError("lqtk's tasks are multiple choice")

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("lqtk's tasks are multiple choice")

    folder = write_tasks(text_files, items)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(model=Model(model, tokenizer, batch_size), tasks=[f"lqtk_{t}" for t in tasks],
                                  task_manager=manager, verbosity="WARNING")
    return {task: {metric: out["results"][f"lqtk_{task}"][f"{metric},none"]
                   for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")} for task in tasks}

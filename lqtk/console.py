"""What lqtk prints while it works: `quiet()` switches off the libraries' lines that do not apply to lqtk, and plain
timestamped progress lines (`say`, `Progress`) tell what is happening, also in a log file, where a rich progress bar
would leave a garbled frame:

    [14:02:11] calibrate block 3/30 · done in 0:13 · 0:41 elapsed, ETA 5:52

The phases' progress bars (lqtk.phases.walk) are Lightning's rich bar on a terminal and these lines otherwise
(`terminal()`). Imports nothing of lqtk, nor any heavy library: callable before a command imports torch."""

import logging
import os
import re
import sys
import time
import warnings

# Lightning's info lines that say nothing to an lqtk user, from the loggers `_LOGGERS`
_LIGHTNING_LINES = re.compile("|".join((
    "GPU available:", "TPU available:",  # the accelerator is the recipe's trainer.accelerator
    "💡 Tip:",  # adverts for litlogger and litmodels
    "The following callbacks returned in `LightningModule.configure_callbacks` will override",  # lqtk's own bars
    "`Trainer.fit` stopped: `max_epochs=",  # an epoch is a decoder block: the walk ends after the last one
    "Initializing distributed: .*MEMBER: 1/1$", "-+\ndistributed_backend=.*Starting with 1 processes",  # 1 process
)), re.DOTALL)
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
            "lightning.fabric.utilities.distributed")
_WARNINGS = (
    r"You passed in a `val_dataloader` but have no `validation_step`",  # only distillation validates
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",  # distillation checkpoints after
    r"LightningCLI's args parameter is intended to run from within Python",  # lqtk passes its command line as args
    r".*configure_optimizers` returned `None`",  # the walks need no optimizer
    r"It is recommended to use `self.log\('val_perplexity'",  # distillation's is synced by torchmetrics
)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _LIGHTNING_LINES.match(str(record.msg))


def quiet() -> None:
    """Switch off the noise: the Lightning lines and warnings above, the `gguf` package's info lines, and the
    progress bars of `datasets` (a local text file's "Generating train split") and `transformers` ("Loading
    weights"). Lightning's other lines are printed once, by its own handler (`INFO: ...`), not a second time by a
    root handler such as the CLI's. Idempotent."""
    logging.getLogger("lightning").propagate = False
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the GGUF writer's file listing, its vocabulary's ids
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # read when the libraries are imported; switched off directly where one already is
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def terminal() -> bool:
    """Whether both outputs are a terminal: a rich progress bar then redraws in place; else plain lines."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def say(message: str) -> None:
    """One plain line on stderr, timestamped: `[14:02:11] message`."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """0:41, 19:30, 1:02:03."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A stage of `total` steps, told in plain lines: `<what> k/n[ · detail] · 0:41 elapsed, ETA 19:30`, the ETA
    extrapolated from the steps done since it was created (`done` were done before: a resumed run). `every_s`: at
    most one line per so many seconds (the last step's line always comes)."""

    def __init__(self, what: str, total: int, done: int = 0, every_s: float = 0.0):
        self.what, self.total, self.first, self.done, self.every_s = what, total, done, done, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int, detail: str = "") -> None:
        now, self.done = time.monotonic(), done
        if done < self.total and now - self.last < self.every_s:
            return
        self.last, elapsed = now, now - self.start
        eta = f", ETA {clock(elapsed / (done - self.first) * (self.total - done))}" if self.total > done > self.first \
            else ""
        say(f"{self.what} {done}/{self.total}{' · ' + detail if detail else ''} · {clock(elapsed)} elapsed{eta}")

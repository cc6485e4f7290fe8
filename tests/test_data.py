import pytest
import torch
from transformers import AutoTokenizer

from lqtk.data import TextDataModule, calibration_windows, evaluation_windows
from lqtk.errors import LqtkError
from lqtk.models import resolve_model


def test_evaluation_windows_are_non_overlapping_and_drop_the_remainder():
    tokens = torch.arange(1050)
    windows = evaluation_windows(tokens, 100)
    assert windows.shape == (10, 100) and torch.equal(windows.flatten(), tokens[:1000])


def test_calibration_windows_are_seeded_slices():
    tokens = torch.arange(5000)
    a, b = calibration_windows(tokens, 8, 64, seed=3), calibration_windows(tokens, 8, 64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, calibration_windows(tokens, 8, 64, seed=4))
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous text


def test_too_short_corpus_is_refused():
    with pytest.raises(LqtkError, match="fewer than one window"):
        evaluation_windows(torch.arange(10), 64)
    with pytest.raises(LqtkError, match="fewer than one window"):
        calibration_windows(torch.arange(64), 4, 64, seed=0)


def test_datamodule_tokenizes_files(corpus):
    data = TextDataModule(tokenizer="tiny-llama", calibration_files=[str(corpus["calibration"])],
                          evaluation_files=[str(corpus["evaluation"])], seq_len=32, num_calibration_windows=5,
                          batch_size=2)
    text = corpus["evaluation"].read_text()
    windows = data.evaluation_windows()
    assert windows.shape == (len(text.encode()) // 32, 32)  # the tiny model's tokenizer is byte-level
    assert [b.shape[0] for b in data.train_dataloader()] == [2, 2, 1]


def test_bos_starts_every_window(corpus):
    files = dict(calibration_files=[str(corpus["calibration"])], evaluation_files=[str(corpus["evaluation"])])
    data = TextDataModule(tokenizer="tiny-llama", **files, seq_len=32, num_calibration_windows=5, bos=True)
    text = TextDataModule(tokenizer="tiny-llama", **files, seq_len=31, num_calibration_windows=5)  # same seed
    bos = AutoTokenizer.from_pretrained(resolve_model("tiny-llama")).bos_token_id
    assert bos is not None
    for windows, text_windows in ((data.evaluation_windows(), text.evaluation_windows()),
                                  (data.calibration_windows(), text.calibration_windows())):
        assert windows.shape == (len(text_windows), 32)
        assert (windows[:, 0] == bos).all()
        # then seq_len - 1 tokens of text: the windows of the text alone, none of them BOS
        assert torch.equal(windows[:, 1:], text_windows) and not (windows[:, 1:] == bos).any()


def test_empty_or_missing_files_are_refused(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    data = TextDataModule(tokenizer="tiny-llama", calibration_files=[str(corpus["calibration"])],
                          evaluation_files=[str(empty)])
    with pytest.raises(LqtkError, match="empty"):
        data.evaluation_windows()
    data = TextDataModule(tokenizer="tiny-llama", calibration_files=[str(tmp_path / "nope.txt")],
                          evaluation_files=[str(empty)])
    with pytest.raises(LqtkError, match="does not exist"):
        data.calibration_windows()

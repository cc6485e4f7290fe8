"""Zero-shot tasks: the items lqtk writes are well-formed and seeded, the batched log-likelihoods equal one forward
per request, and `lqtk evaluate --tasks` scores a model through lm-eval offline."""

import json
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from lqtk.cli import main
from lqtk.errors import LqtkError
from lqtk.models import load_causal_lm, prepare_model
from lqtk.zero_shot import CHOICES, LqtkLM, last_word_items, next_line_items, text_lines, write_tasks


@pytest.fixture(scope="module")
def lines(corpus):
    return text_lines([str(corpus["evaluation"])])


def test_items_hold_the_texts_own_continuation_among_distinct_choices(lines):
    for build in (next_line_items, last_word_items):
        items = build(lines, 30, random.Random(0))
        assert len(items) == 30 and items == build(lines, 30, random.Random(0))
        for item in items:
            assert len(item["choices"]) == CHOICES and len(set(item["choices"])) == CHOICES
            answer = item["choices"][item["label"]]
            if build is next_line_items:
                assert item["context"] + "\n" + answer in "\n".join(lines)
            else:
                assert any(line.startswith(item["context"].split("\n")[-1] + " " + answer) for line in lines)
    assert sorted({item["label"] for item in next_line_items(lines, 30, random.Random(0))}) == [0, 1, 2, 3]


def test_too_little_text_is_refused(tmp_path):
    (tmp_path / "short.txt").write_text("Four words in here.\n" * 6)
    with pytest.raises(LqtkError, match="fewer than the 100 asked"):
        write_tasks([str(tmp_path / "short.txt")], 100)


def test_batched_loglikelihoods_equal_one_forward_per_request():
    path = prepare_model("tiny-llama")
    model, tokenizer = load_causal_lm(path), AutoTokenizer.from_pretrained(path)
    requests = [SimpleNamespace(args=(context, continuation)) for context, continuation in
                [("Good morrow, sweet", " prince"), ("What news from", " Rome, my lord?"), ("", "Hence"),
                 ("The king and queen of night shall speak to thee", " now")]]
    scored = LqtkLM(model, tokenizer, batch_size=3).loglikelihood(requests)
    for request, (logprob, greedy) in zip(requests, scored):
        context, continuation = request.args
        ids, count = LqtkLM(model, tokenizer).encode(context, continuation)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -count - 1:-1].log_softmax(-1)
        target = torch.tensor(ids[-count:])
        assert logprob == pytest.approx(logits.gather(1, target[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == target).all())


@pytest.mark.slow
def test_evaluate_scores_tasks_through_lm_eval_offline(corpus, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("zero-shot scoring tried to reach the network")

    monkeypatch.setattr("socket.socket.connect", no_network)
    out = tmp_path / "eval.json"
    main(["evaluate", "--model", "tiny-llama", "--text", str(corpus["evaluation"]), "--no-perplexity",
          "--tasks", "next_line", "last_word", "--task-items", "20", "--output", str(out)])
    result = json.loads(out.read_text())
    assert "perplexity" not in result and set(result["zero_shot"]) == {"next_line", "last_word"}
    for scores in result["zero_shot"].values():
        assert 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1 and scores["acc_stderr"] > 0

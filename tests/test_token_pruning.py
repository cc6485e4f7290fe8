"""Agile-Quant's token pruning: the attention it ranks tokens by, the positions it keeps, and the perplexity of a
pruned model (scored at the kept positions)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lqtk.anatomy import decoder_blocks
from lqtk.errors import LqtkError
from lqtk.evaluate import perplexity
from lqtk.forward import final_hidden_states
from lqtk.reference_models import build_tiny_llama
from lqtk.token_pruning import PruningRun, TokenPruning, kept_positions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_llama(folder, num_hidden_layers=3)
    return folder


def test_kept_positions_hold_the_recent_tokens_and_the_most_important_others():
    importance = torch.rand(3, 40)
    importance[:, 5] = 10  # the most important early token
    kept = kept_positions(importance, keep_ratio=0.25, recent=4)
    assert kept.shape == (3, 10)
    assert all(torch.equal(row, row.unique()) for row in kept)  # ascending, distinct
    assert (kept[:, -4:] == torch.arange(36, 40)).all() and (kept == 5).any(1).all()
    others = importance[:, :36].topk(6, dim=1).indices.sort(1).values
    assert torch.equal(kept[:, :6], others)
    assert torch.equal(kept_positions(importance, 1.0, 4), torch.arange(40).expand(3, -1))


def test_tokens_are_ranked_by_the_attention_they_receive(tiny):
    """The ranking is the eager attention probabilities' column means (over heads and the queries that see each
    position) of the block before start_layer."""
    eager = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager").eval()
    windows = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        probs = eager(windows, output_attentions=True).attentions[1]  # block 1 ranks for start_layer 2
    received = probs.sum((1, 2)) / (torch.arange(24, 0, -1) * probs.shape[1])
    expected = kept_positions(received, keep_ratio=0.5, recent=3)
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()  # sdpa: the ranking observes its query and key
    run = PruningRun(TokenPruning(start_layer=2, keep_ratio=0.5, recent=3))
    with torch.no_grad():
        hidden = final_hidden_states(model, windows, batch_size=2, pruning=run)
    assert torch.equal(run.positions[0], expected)
    assert hidden[0].shape == (2, 12, 64)


def test_keep_ratio_one_changes_nothing(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    windows = torch.randint(0, 200, (4, 30))
    with torch.no_grad():
        plain = final_hidden_states(model, windows, batch_size=2)
        run = PruningRun(TokenPruning(start_layer=1, keep_ratio=1.0))
        pruned = final_hidden_states(model, windows, batch_size=2, pruning=run)
    for a, b in zip(plain, pruned):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pruned_perplexity_scores_the_kept_positions_with_their_next_tokens(tiny):
    """Scored at the kept positions, each against the token that follows it; later blocks see kept tokens only."""
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    windows = torch.randint(0, 200, (3, 41))
    model.lqtk_token_pruning = TokenPruning(start_layer=1, keep_ratio=0.5, recent=4)
    ppl, tokens = perplexity(model, windows, batch_size=3)
    assert tokens == 3 * 20
    run = PruningRun(model.lqtk_token_pruning)
    with torch.no_grad():
        hidden = final_hidden_states(model, windows[:, :-1], batch_size=3, pruning=run)[0]
    logits = model.lm_head(hidden)
    targets = windows[:, 1:].gather(1, run.positions[0])
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert math.isclose(ppl, nll.exp().item(), rel_tol=1e-5)
    del model.lqtk_token_pruning
    assert perplexity(model, windows, batch_size=3)[1] == 3 * 40


def test_bad_pruning_settings_are_refused(tiny):
    with pytest.raises(LqtkError, match="start_layer"):
        TokenPruning(start_layer=0, keep_ratio=0.5)
    with pytest.raises(LqtkError, match="keep_ratio"):
        TokenPruning(start_layer=1, keep_ratio=0)
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    model.lqtk_token_pruning = TokenPruning(start_layer=len(decoder_blocks(model)), keep_ratio=0.5)
    with pytest.raises(LqtkError, match="choose start_layer between 1 and 2"):
        perplexity(model, torch.randint(0, 200, (1, 20)))

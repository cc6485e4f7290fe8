"""Perplexity scored in chunks of positions equals the perplexity of the model's whole logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lqtk.evaluate import logits_in_chunks, perplexity
from lqtk.reference_models import build_tiny_llama


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    if request.param == "llama":
        folder = tmp_path_factory.mktemp("tiny")
        build_tiny_llama(folder)
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)  # Gemma-3 caps its logits (final_logit_softcapping): the chunks must too
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              final_logit_softcapping=5.0)
    return Gemma3ForCausalLM(config).eval()


def test_chunked_logits_are_the_model_logits(tiny):
    windows = torch.randint(0, 200, (2, 40))
    with torch.no_grad():
        expected = tiny(windows).logits
        chunks = list(logits_in_chunks(tiny, windows, positions=16))
    assert [start for start, _ in chunks] == [0, 16, 32]
    torch.testing.assert_close(torch.cat([logits for _, logits in chunks], 1), expected)


def test_perplexity_in_chunks_equals_perplexity_of_whole_logits(tiny):
    windows = torch.randint(0, 200, (5, 300))  # 299 predicted positions: a partial last chunk of 256
    with torch.no_grad():
        logits = tiny(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    ppl, tokens = perplexity(tiny, windows, batch_size=2)
    assert tokens == 5 * 299
    assert math.isclose(ppl, nll.exp().item(), rel_tol=1e-5)

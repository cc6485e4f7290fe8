"""AQLM against references and properties: the format decodes codewords exactly, k-means and every round lower the
objective, the beam search never raises it and equals exhaustive search for one codebook, bad settings are refused."""

import itertools

import pytest
import torch

from helpers import REPO, correlated_problem, fails_with, recipe_args
from lqtk.errors import LqtkError
from lqtk.formats import QuantizedWeight
from lqtk.formats.aqlm import decode, propose
from lqtk.formats.packing import pack_bits
from lqtk.quant import AQLM
from lqtk.quant.aqlm import init_residual_kmeans, proxy_loss, update_codes
from lqtk.quant.gptq import cpu_threads

SMALL = dict(num_codebooks=2, nbits_per_codebook=4, in_group_size=4, max_rounds=4, relative_tolerance=0.0)


def relative(w, h, w_hat):
    return (proxy_loss(w, h, w_hat) / proxy_loss(w, h, torch.zeros_like(w))).item()


def test_a_layer_built_from_codewords_decodes_exactly():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 5, 3), generator=gen)  # O=6, J=5, M=3, B=4
    codebooks = torch.randn(3, 16, 4, generator=gen).half()
    scales = torch.rand(6, 1, generator=gen).half()
    expected = torch.stack([torch.cat([scales[o].float() * sum(codebooks[m, codes[o, j, m]].float() for m in range(3))
                                       for j in range(5)]) for o in range(6)])
    spec = {"num_codebooks": 3, "nbits_per_codebook": 4, "in_group_size": 4, "shape": [6, 20]}
    weight = QuantizedWeight("aqlm", "aqlm", spec, {"codes": pack_bits(codes.view(6, 15), 4),
                                                    "codebooks": codebooks, "scales": scales})
    assert torch.equal(weight.dequantize(), expected)


def test_residual_kmeans_each_codebook_lowers_the_objective():
    w, h, _ = correlated_problem()
    scales = w.norm(dim=1, keepdim=True)
    codes, codebooks = init_residual_kmeans(w / scales, h.diagonal(), AQLM(**SMALL | {"num_codebooks": 3}))
    errors = [relative(w, h, decode(codes[..., :m], codebooks[:m], scales)) for m in range(1, 4)]
    assert errors[0] < 1 and errors[1] < errors[0] and errors[2] < errors[1]


def test_every_round_lowers_the_objective_and_is_reported():
    w, h, _ = correlated_problem()
    seen = []
    result = AQLM(**SMALL).quantize(w, h, progress=seen.append)
    history = result.history["objective"]
    assert len(history) == 5 and len(seen) == 5  # k-means, then 4 rounds
    assert all(later < earlier for earlier, later in itertools.pairwise(history))
    assert relative(w, h, result.dequantize()) == pytest.approx(history[-1], rel=1e-4)


def test_beam_search_never_raises_the_objective():
    w, h, _ = correlated_problem()
    config = AQLM(**SMALL | {"beam_size": 2, "phases": 3})
    scales = w.norm(dim=1, keepdim=True)
    codes, codebooks = init_residual_kmeans(w / scales, h.diagonal(), config)
    codebooks = codebooks + 0.1 * torch.randn_like(codebooks)  # codes no longer fit their codebooks
    before = proxy_loss(w, h, decode(codes, codebooks, scales))
    new_codes = update_codes(w, h, codes, codebooks, scales, config)
    assert proxy_loss(w, h, decode(new_codes, codebooks, scales)) < before


def test_one_codebook_search_equals_exhaustive_search():
    """With one codebook, ICM re-chooses the only code: the best of all K codewords for each group alone."""
    gen = torch.Generator().manual_seed(0)
    G, blocks = torch.randn(5, 3, 4, generator=gen), torch.randn(3, 4, 4, generator=gen)
    blocks = blocks @ blocks.mT  # positive definite H_jj
    codebooks, scales = torch.randn(1, 8, 4, generator=gen), torch.rand(5, 1, generator=gen) + 0.5
    codes = torch.randint(0, 8, (5, 3, 1), generator=gen)
    new_codes, delta = propose(G, blocks, codes, codebooks, scales, beam_size=1)
    for o, j in itertools.product(range(5), range(3)):
        changes = scales[o] * (codebooks[0] - codebooks[0, codes[o, j, 0]])  # (K, g)
        loss = torch.einsum("kd,de,ke->k", changes, blocks[j], changes) - 2 * changes @ G[o, j]
        assert new_codes[o, j, 0] == loss.argmin()
        torch.testing.assert_close(delta[o, j], changes[loss.argmin()])


def test_settings_that_do_not_fit_the_layer_are_refused():
    with pytest.raises(LqtkError, match=r"in_group_size=7 does not divide the input dim 576.*\[4, 8, 16, 32\]"):
        AQLM(in_group_size=7).quantize(torch.randn(8, 576), torch.eye(576))
    with pytest.raises(LqtkError, match="larger than the 576x576 layer they encode; use nbits_per_codebook <= 15"):
        AQLM(num_codebooks=1, nbits_per_codebook=16).check_fits((576, 576))
    with pytest.raises(LqtkError, match="needs num_codebooks >= 1"):
        AQLM(num_codebooks=0)


@pytest.mark.slow  # its second half is a CLI walk of aqlm-tiny (4 to 24 s here, with other jobs running)
def test_a_diverging_adam_stops_with_a_message_naming_the_layer(corpus, tmp_path, capsys):
    w, h, _ = correlated_problem()
    with pytest.raises(LqtkError, match="objective became .* during Adam .*: lower `lr`"):
        AQLM(**SMALL | {"lr": 1e30}).quantize(w, h)
    argv = recipe_args(corpus, tmp_path / "run", "--model.init_args.quantizer.init_args.lr", "1e30",
                       recipe=str(REPO / "configs" / "debug" / "aqlm-tiny.yaml"))
    group = "model.layers.0.self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"  # quantized in one call
    fails_with(capsys, argv, f"{group}: AQLM: the objective became")
    assert not (tmp_path / "run" / "model").exists()


def test_dead_inputs_are_exact_and_harmless():
    w, h, _ = correlated_problem()
    h[:, :4] = 0
    h[:4, :] = 0  # the first group's inputs were always zero
    result = AQLM(**SMALL).quantize(w, h)
    assert torch.isfinite(result.dequantize()).all()
    assert result.history["objective"][-1] < result.history["objective"][0]


def test_a_layer_built_from_codewords_is_found_exactly():
    """Rows of unit norm made of 4 codewords (each of norm 1/2): AQLM 1x2 finds codebook and codes exactly."""
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(4, 4, generator=gen)
    codebook = (codebook / codebook.norm(dim=1, keepdim=True) / 2).half().float()
    codes = torch.randint(0, 4, (8, 4), generator=gen)
    codes[0] = torch.arange(4)  # every codeword is used
    w = codebook[codes].flatten(1)  # (8, 16)
    _, h, _ = correlated_problem(out_features=8, in_features=16)
    result = AQLM(num_codebooks=1, nbits_per_codebook=2, in_group_size=4, max_rounds=2).quantize(w, h)
    assert result.history["objective"][0] < 1e-6
    torch.testing.assert_close(result.dequantize(), w, atol=2e-3, rtol=0)  # scales are stored in fp16


def test_codebook_gradients_are_the_same_on_any_number_of_threads():
    """AQLM's Adam steps give the same codebooks run after run only if the decode's backward sums each codebook
    entry's gradients in one order, whatever the number of threads sharing the work."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (1024, 64, 2), generator=gen)
    codebooks, scales = torch.randn(2, 256, 8, generator=gen), torch.rand(1024, 1, generator=gen)
    upstream = torch.randn(1024, 512, generator=gen)
    gradients = []
    for threads in (1, 2):
        with cpu_threads(threads):
            trained = codebooks.clone().requires_grad_()
            decode(codes, trained, scales).backward(upstream)
        gradients.append(trained.grad)
    assert torch.equal(*gradients)

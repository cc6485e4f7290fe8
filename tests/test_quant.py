"""Quantizers against simple references and properties: packing round trips, RTN equals a naive loop, GPTQ
equals a naive column-by-column GPTQ, error ordering, exactness at high bits, damping, bad configs."""

import pytest
import torch

from helpers import correlated_problem
from lqtk.errors import LqtkError
from lqtk.formats.affine import fake_quantize
from lqtk.formats.packing import pack_bits, unpack_bits
from lqtk.quant import GPTQ, RTN, HessianAccumulator, LeanQuant
from lqtk.quant.primitives import minmax_qparams, mse_qparams


def output_error(w, q, x):
    return ((w - q) @ x.T).pow(2).sum().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 576])
def test_pack_unpack_round_trip(bits, n):
    q = torch.randint(0, 2**bits, (3, n))
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-n * bits // 32))
    assert torch.equal(unpack_bits(packed, bits, n), q)


@pytest.mark.parametrize("features", [1, 7, 80])
def test_hessian_accumulator_is_the_running_mean_of_the_full_product(features):
    x = torch.randn(100, features)
    accumulator = HessianAccumulator(features)
    for chunk in x.split(30):
        accumulator.add(chunk)
    assert accumulator.count == 100
    h = accumulator.hessian()
    torch.testing.assert_close(h, 2 * x.T @ x / 100)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("shares", [[7], [3, 4], [1, 5, 1], [2, 2, 2, 1], [6, 1]])
def test_hessian_of_contiguous_shares_merged_is_bit_for_bit_the_whole(shares):
    """What processes that each take a contiguous share of the batches merge is exactly one process's H, in any
    merge order (the pairwise sums are fixed by the batch indices)."""
    batches = [torch.randn(37, 50) * (i + 1) for i in range(sum(shares))]
    whole = HessianAccumulator(50, sample_rows=5)
    for index, x in enumerate(batches):
        whole.add(x, index)
    parts, start = [], 0
    for size in shares:
        part = HessianAccumulator(50, sample_rows=5)
        for index in range(start, start + size):
            part.add(batches[index], index)
        parts.append(part.partial())
        start += size
    for order in (parts, parts[::-1]):
        merged = HessianAccumulator(50, sample_rows=5)
        for nodes, count, samples in order:
            merged.merge({key: t.clone() for key, t in nodes.items()}, count, samples)
        assert merged.count == whole.count
        assert torch.equal(merged.hessian(), whole.hessian())
        assert torch.equal(merged.sample(), whole.sample())
    assert torch.equal(whole.sample(), torch.cat([x[::7][:5] for x in batches]))  # 5 rows of 37, every 7th


def test_minmax_grid_is_exact_on_grid_values():
    scale = torch.tensor([[0.5], [0.25]])
    codes = torch.randint(0, 16, (2, 40))
    codes[:, :2] = torch.tensor([0, 15])  # the range spans the whole grid
    w = (codes - 3) * scale
    s, z = minmax_qparams(w, 4, symmetric=False)
    torch.testing.assert_close(fake_quantize(w, s, z, 4), w)


def test_mse_search_never_worse_than_minmax():
    w = torch.randn(16, 128) ** 3  # heavy tails: clipping helps
    for sym in (False, True):
        s0, z0 = minmax_qparams(w, 3, sym)
        s1, z1 = mse_qparams(w, 3, sym, norm=2.0)
        err0 = (fake_quantize(w, s0, z0, 3) - w).pow(2).sum(1)
        err1 = (fake_quantize(w, s1, z1, 3) - w).pow(2).sum(1)
        assert (err1 <= err0 + 1e-6).all() and err1.sum() < err0.sum()


def naive_rtn(w, bits, group_size, symmetric):
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group_size):
        g = w[:, start : start + group_size]
        s, z = minmax_qparams(g, bits, symmetric)
        out[:, start : start + group_size] = fake_quantize(g, s.half().float(), z, bits)
    return out


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 48), (2, 16), (8, None)])
def test_rtn_matches_naive_reference(bits, group_size, symmetric):
    w = torch.randn(24, 80)  # 80 = 48 + 32: a shorter last group
    qw = RTN(bits=bits, group_size=group_size, symmetric=symmetric).quantize(w)
    torch.testing.assert_close(qw.dequantize(), naive_rtn(w, bits, group_size or 80, symmetric))
    groups = -(-80 // (group_size or 80))
    assert qw.tensors["scales"].shape == (24, groups) and qw.tensors["scales"].dtype == torch.float16
    assert ("zeros" in qw.tensors) == (not symmetric)


def naive_gptq(w, h, config: GPTQ):
    """Column-by-column GPTQ in float64 with immediate (not lazy) updates of all later columns: the paper's
    Algorithm 1. With act-order, columns go by decreasing diag(H) and a group's grid is fixed, from the weights as
    updated so far, when the walk first reaches one of its columns."""
    w, h = w.clone().double(), h.clone().double()
    order = torch.argsort(h.diagonal(), descending=True) if config.act_order else torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    h += config.damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    grids = {}
    for i in range(w.shape[1]):
        group = order[i].item() // config.group_size
        if group not in grids:
            cols = [j for j in range(w.shape[1]) if order[j] // config.group_size == group]
            s, z = config.qparams(w[:, cols].float())
            grids[group] = (s.double(), z.double())
        q[:, i] = fake_quantize(w[:, i : i + 1], *grids[group], config.bits)[:, 0]
        err = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return q[:, torch.argsort(order)].float()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_naive_reference(act_order):
    w, h, _ = correlated_problem()
    config = GPTQ(bits=3, group_size=32, act_order=act_order, block_size=16)
    torch.testing.assert_close(config.quantize(w, h).dequantize(), naive_gptq(w, h, config), atol=2e-4, rtol=0)


def test_gptq_result_does_not_depend_on_block_size():
    w, h, _ = correlated_problem()
    a = GPTQ(bits=3, group_size=32, block_size=128).quantize(w, h).dequantize()
    b = GPTQ(bits=3, group_size=32, block_size=8).quantize(w, h).dequantize()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantizer", [GPTQ(bits=3, group_size=32), LeanQuant(bits=3, group_size=None, exponent=2)])
def test_linears_sharing_a_hessian_quantize_stacked_as_one_by_one(quantizer):
    w, h, _ = correlated_problem(out_features=48)
    weights = [w[:20], w[20:28], w[28:]]  # q/k/v-like: different output widths, one input
    for alone, stacked in zip([quantizer.quantize(part, h) for part in weights], quantizer.quantize_shared(weights, h)):
        assert alone.spec == stacked.spec
        assert all(torch.equal(alone.tensors[key], stacked.tensors[key]) for key in alone.tensors)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits):
    w, h, x = correlated_problem()
    rtn = output_error(w, RTN(bits=bits, group_size=32).quantize(w).dequantize(), x)
    for act_order in (False, True):
        gptq = output_error(w, GPTQ(bits=bits, group_size=32, act_order=act_order).quantize(w, h).dequantize(), x)
        assert gptq < 0.9 * rtn, (act_order, gptq, rtn)


def test_gptq_mse_observer_lowers_error_at_low_bits():
    w, h, x = correlated_problem()
    minmax = output_error(w, GPTQ(bits=2, group_size=32).quantize(w, h).dequantize(), x)
    mse = output_error(w, GPTQ(bits=2, group_size=32, observer="mse").quantize(w, h).dequantize(), x)
    assert mse < minmax


def test_gptq_high_bits_is_nearly_exact_and_handles_dead_inputs():
    w, h, _ = correlated_problem()
    h[5, :] = h[:, 5] = 0  # an input that is always zero
    deq = GPTQ(bits=8, group_size=16).quantize(w, h).dequantize()
    assert (deq[:, 5] == 0).all()
    keep = torch.arange(80) != 5
    assert ((deq - w)[:, keep].abs().max() / w.abs().max()) < 0.02


def test_gptq_raises_damping_on_singular_hessian_then_gives_up():
    w, h, _ = correlated_problem()
    bad = h - 0.5 * h.diagonal().mean() * torch.eye(len(h))  # indefinite, fixed by enough damping
    with pytest.warns(UserWarning, match="not positive definite"):
        GPTQ(bits=4, group_size=32, damp=0.0, damp_increment=1.0).quantize(w, bad)
    with pytest.raises(LqtkError, match="singular"):
        GPTQ(bits=4, group_size=32, damp=0.0, damp_increment=0.5).quantize(w, -h)


@pytest.mark.parametrize("kwargs", [{"bits": 5}, {"bits": 1}, {"group_size": 0}, {"group_size": -4}])
def test_unsupported_configs_are_refused(kwargs):
    with pytest.raises(LqtkError):
        GPTQ(**kwargs)

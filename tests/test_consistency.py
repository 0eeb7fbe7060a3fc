"""Identities the op must satisfy: splitting a sequence, varlen vs separate calls, grouped heads, views."""

import pytest
import torch

import flashdelta as fd
from flashdelta.testing import make_case, rel_l2

PATHS = {"chunk": fd.chunk_gated_delta_rule, "recurrent": fd.fused_recurrent_gated_delta_rule}


def _slice(case, start, stop):
    return [x[:, start:stop] for x in case.args()]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("split", [1, 30, 63, 64, 65, 128, 129])
def test_two_calls_equal_one(path, split, seed):
    fn = PATHS[path]
    case = make_case("random", seed=seed, seq_len=200, value_heads=4)
    h0 = torch.randn(2, 4, 32, 32)
    o_full, s_full = fn(*case.args(), initial_state=h0, output_final_state=True)
    o1, s1 = fn(*_slice(case, 0, split), initial_state=h0, output_final_state=True)
    o2, s2 = fn(*_slice(case, split, 200), initial_state=s1, output_final_state=True)
    assert rel_l2(torch.cat([o1, o2], 1), o_full) <= 1e-5
    assert rel_l2(s2, s_full) <= 1e-5


@pytest.mark.parametrize("path", list(PATHS))
def test_varlen_equals_separate_calls(path, seed):
    fn = PATHS[path]
    case = make_case("varlen", seed=seed, value_heads=4)
    cu = case.kwargs["cu_seqlens"].tolist()
    h0 = case.kwargs["initial_state"]
    o, s = fn(*case.args(), **case.kwargs, output_final_state=True)
    for i in range(len(cu) - 1):
        oi, si = fn(*_slice(case, cu[i], cu[i + 1]), initial_state=h0[i : i + 1], output_final_state=True)
        assert rel_l2(o[:, cu[i] : cu[i + 1]], oi) <= 1e-5
        assert rel_l2(s[i : i + 1], si) <= 1e-5


def test_varlen_with_empty_sequence(seed):
    """A zero-length sequence passes its initial state through unchanged."""
    case = make_case("random", batch=1, seq_len=70, seed=seed)
    cu = torch.tensor([0, 30, 30, 70])
    h0 = torch.randn(3, 2, 32, 32)
    for fn in PATHS.values():
        _, s = fn(*case.args(), cu_seqlens=cu, initial_state=h0, output_final_state=True)
        assert torch.equal(s[1], h0[1])


@pytest.mark.parametrize("path", list(PATHS))
def test_grouped_value_heads_equal_repeated_heads(path, seed):
    fn = PATHS[path]
    case = make_case("random", seed=seed, heads=2, value_heads=6, seq_len=100)
    o, s = fn(*case.args(), output_final_state=True)
    q_rep, k_rep = (x.repeat_interleave(3, dim=2) for x in (case.q, case.k))
    o_rep, s_rep = fn(q_rep, k_rep, case.v, case.g, case.beta, output_final_state=True)
    assert rel_l2(o, o_rep) <= 1e-6 and rel_l2(s, s_rep) <= 1e-6


@pytest.mark.parametrize("path", list(PATHS))
def test_non_contiguous_views(path, seed):
    fn = PATHS[path]
    case = make_case("random", seed=seed, seq_len=90, value_heads=4)
    o, s = fn(*case.args(), output_final_state=True)
    # [B, H, T, D] storage transposed to [B, T, H, D], and g/beta as views of a wider tensor.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (case.q, case.k, case.v))
    g = torch.stack([case.g, torch.zeros_like(case.g)], -1)[..., 0]
    beta = torch.stack([case.beta, torch.zeros_like(case.beta)], -1)[..., 0]
    assert not q.is_contiguous() and not g.is_contiguous()
    o2, s2 = fn(q, k, v, g, beta, output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(s, s2)


def test_scale_is_applied(seed):
    case = make_case("random", seed=seed, seq_len=70)
    o1, _ = fd.chunk_gated_delta_rule(*case.args())
    o2, _ = fd.chunk_gated_delta_rule(*case.args(), scale=2 * 32**-0.5)
    assert rel_l2(o2, 2 * o1) <= 1e-6

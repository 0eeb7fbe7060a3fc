"""Every path against the float64 token loop, on random and adversarial inputs (CPU, torch backend)."""

import pytest
import torch

import flashdelta as fd
from flashdelta.testing import CASE_KINDS, SEQ_LENS, make_case, oracle, rel_l2

PATHS = {
    "chunk": fd.chunk_gated_delta_rule,
    "recurrent": fd.fused_recurrent_gated_delta_rule,
    "auto": fd.gated_delta_rule,
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [("random", t) for t in SEQ_LENS] + [(kind, 130) for kind in CASE_KINDS[1:]]


def _extra(kind):
    return dict(heads=2, value_heads=4, dv=48) if kind == "gva_k_ne_v" else {}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind,seq_len", CASES, ids=[f"{k}-T{t}" for k, t in CASES])
def test_matches_fp64_oracle(kind, seq_len, dtype, path, seed):
    case = make_case(kind, dtype, seed=seed, seq_len=seq_len, **_extra(kind))
    h0 = case.kwargs.get("initial_state")
    h0_before = None if h0 is None else h0.clone()
    o_ref, s_ref = oracle(case)
    o, s = PATHS[path](*case.args(), output_final_state=True, **case.kwargs)
    assert o.dtype == dtype and o.shape == case.v.shape
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_l2(o, o_ref) <= case.tolerance, rel_l2(o, o_ref)
    assert rel_l2(s, s_ref) <= case.tolerance, rel_l2(s, s_ref)
    # The torch paths accumulate in fp32 from the rounded inputs: only o's rounding is lost.
    assert rel_l2(s, s_ref) <= 1e-5
    if h0 is not None:
        assert torch.equal(h0, h0_before), "initial_state must not be modified"


@pytest.mark.parametrize("path", ["chunk", "recurrent"])
@pytest.mark.parametrize("kind", ["random", "near_identical_keys", "strong_decay", "varlen"])
def test_float64_inputs_are_exact(kind, path, seed):
    """In float64 the chunk form is the token loop's algebra: agreement to ~1e-12."""
    case = make_case(kind, torch.float64, seed=seed)
    o_ref, s_ref = oracle(case)
    o, s = PATHS[path](*case.args(), output_final_state=True, **case.kwargs)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    assert rel_l2(o, o_ref) <= 1e-10 and rel_l2(s, s_ref) <= 1e-10


def test_final_state_is_none_unless_asked(seed):
    case = make_case("random", seed=seed, seq_len=65)
    for fn in PATHS.values():
        o, s = fn(*case.args())
        assert s is None and o.shape == case.v.shape

"""The Triton token-by-token kernel against the float64 oracle."""

import pytest
import torch

import flashdelta as fd
from flashdelta.testing import make_case, oracle, rel_l2

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind,seq_len", [("random", 1), ("random", 9), ("l2norm_in_kernel", 5),
                                          ("near_identical_keys", 40), ("strong_decay", 20), ("gva_k_ne_v", 7),
                                          ("large_initial_state", 3), ("varlen", 0)])
def test_parity(kind, seq_len, dtype, seed, device):
    extra = dict(heads=2, value_heads=4, dv=48) if kind == "gva_k_ne_v" else {}
    case = make_case(kind, dtype, device, seed=seed, seq_len=seq_len, **extra)
    o_ref, s_ref = oracle(case)
    o, s = fd.fused_recurrent_gated_delta_rule(*case.args(), output_final_state=True, backend="triton", **case.kwargs)
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert rel_l2(o, o_ref) <= case.tolerance and rel_l2(s, s_ref) <= case.tolerance


def test_auto_dispatch_on_triton(seed, device):
    case = make_case("random", torch.float32, device, seed=seed, seq_len=1)
    o_ref, s_ref = oracle(case)
    o, s = fd.gated_delta_rule(*case.args(), output_final_state=True, backend="triton")
    assert rel_l2(o, o_ref) <= 1e-5 and rel_l2(s, s_ref) <= 1e-5

"""Property test: over small random shapes the chunked path equals the token loop."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flashdelta as fd
from flashdelta.testing import rel_l2


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2), seq_len=st.integers(1, 150), heads=st.integers(1, 2), group=st.integers(1, 3),
    dk=st.sampled_from([4, 8, 16]), dv=st.sampled_from([4, 8, 12]), decay=st.floats(0.0, 5.0),
    with_state=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_chunk_equals_recurrent(batch, seq_len, heads, group, dk, dv, decay, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    hv = heads * group
    q = torch.randn(batch, seq_len, heads, dk, generator=gen)
    k = F.normalize(torch.randn(batch, seq_len, heads, dk, generator=gen), dim=-1)
    v = torch.randn(batch, seq_len, hv, dv, generator=gen)
    g = -decay * torch.rand(batch, seq_len, hv, generator=gen)
    beta = 2 * torch.rand(batch, seq_len, hv, generator=gen)
    h0 = torch.randn(batch, hv, dk, dv, generator=gen) if with_state else None
    o1, s1 = fd.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o2, s2 = fd.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel_l2(o1, o2) <= 1e-5 and rel_l2(s1, s2) <= 1e-5


def test_l2norm_folds_into_beta_v_and_o():
    """The identity the Gluon prefill uses for `use_qk_l2norm_in_kernel` (chunk_sm90 module doc):
    with n = sqrt(|k|^2 + eps), the normalised run equals the raw-key run with beta / n^2 and v n,
    its outputs divided by sqrt(|q|^2 + eps); in fp64, keys of norms over four decades and zeros."""
    from flashdelta.reference.common import L2NORM_EPS
    from flashdelta.reference.recurrent import recurrent_gated_delta_rule

    gen = torch.Generator().manual_seed(21)
    b, t, h, hv, dk, dv = 2, 150, 2, 4, 16, 8
    q = torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64)
    k = k * 10.0 ** (4 * torch.rand(b, t, h, 1, generator=gen, dtype=torch.float64) - 2)
    k[:, ::37] = 0.0
    q[:, ::41] = 0.0
    v = torch.randn(b, t, hv, dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(b, t, hv, generator=gen, dtype=torch.float64)
    beta = 2 * torch.rand(b, t, hv, generator=gen, dtype=torch.float64)
    h0 = torch.randn(b, hv, dk, dv, generator=gen, dtype=torch.float64)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, 0.25, h0, True, use_qk_l2norm=True)
    n2 = ((k * k).sum(-1) + L2NORM_EPS).repeat_interleave(hv // h, dim=2)  # per value head
    r_q = ((q * q).sum(-1) + L2NORM_EPS).rsqrt().repeat_interleave(hv // h, dim=2)
    o, s = recurrent_gated_delta_rule(q, k, v * n2.sqrt()[..., None], g, beta / n2, 0.25, h0, True)
    assert rel_l2(o * r_q[..., None], o_ref) < 1e-13 and rel_l2(s, s_ref) < 1e-13

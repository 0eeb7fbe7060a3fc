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

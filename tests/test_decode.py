"""The serving decode step (`fused_sigmoid_gating_delta_rule_update`) on a state pool, both backends
(the Triton one through the interpreter on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

import flashdelta as fd
from flashdelta.reference import recurrent_gated_delta_rule
from flashdelta.testing import rel_l2

BACKENDS = ["torch", "triton"]


def make(seed, device, batch=4, tokens=1, heads=2, value_heads=4, dk=32, dv=32, slots=10, dtype=torch.float32,
         pool_dtype=torch.float32, state_v_first=False, lens=None):
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen)

    if lens is not None:
        b_, t_ = 1, sum(lens)
    else:
        b_, t_ = batch, tokens
    n = len(lens) if lens is not None else batch
    inp = dict(
        A_log=torch.log(1 + 15 * torch.rand(value_heads, generator=gen)), dt_bias=0.5 * randn(value_heads),
        q=randn(b_, t_, heads, dk).to(dtype), k=randn(b_, t_, heads, dk).to(dtype), v=randn(b_, t_, value_heads, dv).to(dtype),
        a=randn(b_, t_, value_heads) - 2.0, b=randn(b_, t_, value_heads),
    )
    pool_shape = (slots, value_heads, dv, dk) if state_v_first else (slots, value_heads, dk, dv)
    pool = randn(*pool_shape).to(pool_dtype)
    idx = torch.randperm(slots, generator=gen)[:n]
    inp = {key: x.to(device) for key, x in inp.items()}
    extra = {}
    if lens is not None:
        offs = [0]
        for x in lens:
            offs.append(offs[-1] + x)
        extra["cu_seqlens"] = torch.tensor(offs, device=device)
    return inp, pool.to(device), idx.to(device), extra


def call(inp, pool, idx, backend, **kw):
    return fd.fused_sigmoid_gating_delta_rule_update(
        inp["A_log"], inp["a"], inp["dt_bias"], 1.0, 20.0, inp["q"], inp["k"], inp["v"], inp["b"], pool, idx,
        use_qk_l2norm_in_kernel=True, backend=backend, **kw)


def oracle(inp, pool, idx, state_v_first=False, cu_seqlens=None):
    """fp64: gates by hand, then the token loop from pool[idx] (zeros for negative indices)."""
    d = {k: v.double() for k, v in inp.items()}
    g = -d["A_log"].exp() * F.softplus(d["a"] + d["dt_bias"])
    beta = d["b"].sigmoid()
    h0 = pool.double()[idx.clamp(min=0)]
    if state_v_first:
        h0 = h0.transpose(-1, -2)
    h0 = torch.where((idx >= 0)[:, None, None, None], h0, torch.zeros_like(h0))
    o, ht = recurrent_gated_delta_rule(d["q"], d["k"], d["v"], g, beta, d["q"].shape[-1] ** -0.5, h0, True,
                                       cu_seqlens, use_qk_l2norm=True)
    return o, (ht.transpose(-1, -2) if state_v_first else ht)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_pool_update_matches_oracle(tokens, state_v_first, backend, seed, device):
    inp, pool, idx, _ = make(seed, device, tokens=tokens, state_v_first=state_v_first)
    before = pool.clone()
    o_ref, s_ref = oracle(inp, before, idx, state_v_first)
    o = call(inp, pool, idx, backend, state_v_first=state_v_first)
    assert rel_l2(o, o_ref) <= 1e-5
    assert rel_l2(pool[idx], s_ref) <= 1e-5
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=device)
    untouched[idx] = False
    assert torch.equal(pool[untouched], before[untouched]), "slots not named must be bit-for-bit unchanged"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_and_pool(backend, seed, device):
    inp, pool, idx, _ = make(seed, device, tokens=2, dtype=torch.bfloat16, pool_dtype=torch.bfloat16)
    o_ref, s_ref = oracle(inp, pool.clone(), idx)
    o = call(inp, pool, idx, backend)
    assert o.dtype == torch.bfloat16 and pool.dtype == torch.bfloat16
    assert rel_l2(o, o_ref) <= 1e-2 and rel_l2(pool[idx], s_ref) <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_index_starts_from_zero_and_writes_nothing(backend, seed, device):
    inp, pool, idx, _ = make(seed, device, tokens=2)
    idx[1] = -1
    before = pool.clone()
    o_ref, s_ref = oracle(inp, before, idx)
    o = call(inp, pool, idx, backend)
    assert rel_l2(o, o_ref) <= 1e-5
    keep = idx >= 0
    assert rel_l2(pool[idx[keep]], s_ref[keep]) <= 1e-5
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=device)
    untouched[idx[keep]] = False
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_intermediate_states_are_single_steps(backend, seed, device):
    """State after each token equals running the tokens one call at a time."""
    inp, pool, idx, _ = make(seed, device, batch=3, tokens=4)
    step_pool = pool.clone()
    inter = torch.full((3 * 4,) + tuple(pool.shape[1:]), float("nan"), device=device)
    call(inp, pool, idx, backend, intermediate_states=inter)
    for t in range(4):
        one = {k: (x[:, t:t + 1] if x.dim() == 3 or x.dim() == 4 else x) for k, x in inp.items()}
        call(one, step_pool, idx, backend)
        for n in range(3):
            assert rel_l2(inter[n * 4 + t], step_pool[idx[n]]) <= 1e-5
    assert torch.equal(pool, step_pool) or rel_l2(pool, step_pool) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_speculative_tokens(backend, seed, device):
    inp, pool, idx, extra = make(seed, device, lens=[1, 3, 2, 4])
    o_ref, s_ref = oracle(inp, pool.clone(), idx, cu_seqlens=extra["cu_seqlens"])
    inter = torch.empty((10,) + tuple(pool.shape[1:]), device=device)
    o = call(inp, pool, idx, backend, intermediate_states=inter, **extra)
    assert rel_l2(o, o_ref) <= 1e-5 and rel_l2(pool[idx], s_ref) <= 1e-5
    ends = extra["cu_seqlens"][1:] - 1
    assert rel_l2(inter[ends], s_ref) <= 1e-5  # the last token's intermediate state is the final one


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_after_prefill(backend, seed, device):
    """Chunked prefill of a prompt, then decode steps through the pool == one recurrent pass."""
    gen = torch.Generator().manual_seed(seed)
    b, prompt, steps, h, hv, dk = 2, 100, 3, 2, 4, 32
    total = prompt + steps
    q, k = torch.randn(b, total, h, dk, generator=gen), torch.randn(b, total, h, dk, generator=gen)
    v = torch.randn(b, total, hv, dk, generator=gen)
    a, bb = torch.randn(b, total, hv, generator=gen) - 2, torch.randn(b, total, hv, generator=gen)
    a_log, dt_bias = torch.log(1 + 15 * torch.rand(hv, generator=gen)), torch.randn(hv, generator=gen)
    q, k, v, a, bb, a_log, dt_bias = (x.to(device) for x in (q, k, v, a, bb, a_log, dt_bias))
    g = -a_log.exp() * F.softplus(a + dt_bias)
    beta = bb.sigmoid()
    o_all, s_all = fd.fused_recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                       use_qk_l2norm_in_kernel=True, backend="torch")
    _, s_prompt = fd.chunk_gated_delta_rule(q[:, :prompt], k[:, :prompt], v[:, :prompt], g[:, :prompt],
                                            beta[:, :prompt], output_final_state=True,
                                            use_qk_l2norm_in_kernel=True, backend=backend)
    pool = torch.zeros(5, hv, dk, dk, device=device)
    idx = torch.tensor([3, 0], device=device)
    pool[idx] = s_prompt
    for t in range(prompt, total):
        sl = slice(t, t + 1)
        o = fd.fused_sigmoid_gating_delta_rule_update(a_log, a[:, sl], dt_bias, 1.0, 20.0, q[:, sl], k[:, sl],
                                                      v[:, sl], bb[:, sl], pool, idx, use_qk_l2norm_in_kernel=True,
                                                      backend=backend)
        assert rel_l2(o, o_all[:, sl]) <= 1e-5
    assert rel_l2(pool[idx], s_all) <= 1e-5


BAD = {
    "repeated_index": (dict(idx=[2, 2, 5, 7]), ValueError, "repeat"),
    "index_out_of_range": (dict(idx=[2, 10, 5, 7]), ValueError, "slots"),
    "index_count": (dict(idx=[2, 3]), ValueError, "initial_state_indices"),
    "index_float": (dict(idx=[2.0, 3.0, 4.0, 5.0]), TypeError, "integer"),
    "pool_shape": (dict(pool=(10, 4, 32, 31)), ValueError, "initial_state_source"),
    "pool_dtype": (dict(pool_dtype=torch.float16), TypeError, "initial_state_source"),
    "a_shape": (dict(a=(4, 1, 3)), ValueError, "a must"),
    "A_log_shape": (dict(A_log=(3,)), ValueError, "A_log"),
    "softplus_beta": (dict(softplus_beta=0.0), ValueError, "softplus_beta"),
    "intermediate_shape": (dict(inter=(3, 4, 32, 32)), ValueError, "intermediate_states"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_decode_input(name, device):
    over, exc, words = BAD[name]
    inp, pool, idx, _ = make(0, device)
    if "idx" in over:
        idx = torch.tensor(over["idx"], device=device)
    if "pool" in over:
        pool = torch.zeros(over["pool"], device=device)
    if "pool_dtype" in over:
        pool = pool.to(over["pool_dtype"])
    for key in ("a", "A_log"):
        if key in over:
            inp[key] = torch.zeros(over[key], device=device)
    inter = torch.zeros(over["inter"], device=device) if "inter" in over else None
    with pytest.raises(exc, match=words):
        fd.fused_sigmoid_gating_delta_rule_update(
            inp["A_log"], inp["a"], inp["dt_bias"], over.get("softplus_beta", 1.0), 20.0, inp["q"], inp["k"],
            inp["v"], inp["b"], pool, idx, intermediate_states=inter)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(seed):
    inp, pool, idx, _ = make(seed, "cuda", batch=8, tokens=1, dk=128, dv=128, slots=32)
    static = {k: v.clone() for k, v in inp.items()}
    call(static, pool, idx, "triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(static, pool, idx, "triton")
    for rep in range(2):
        fresh, _, _, _ = make(seed + 1 + rep, "cuda", batch=8, tokens=1, dk=128, dv=128, slots=32)
        for k in static:
            static[k].copy_(fresh[k])
        before = pool.clone()
        o_ref, s_ref = oracle(static, before, idx)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_l2(out, o_ref) <= 1e-5 and rel_l2(pool[idx], s_ref) <= 1e-5

"""GPU-only: element offsets past 2^31 (marker `gpu`; skipped without CUDA or without the memory).

A prompt of 2^20 tokens with 32 heads of 128 holds 2^32 elements per tensor, so every
address a kernel forms from a token index (q, k, v, o, T_u; the decode pool's slots) passes
both 2^31 and, near its end, wraps a 32-bit offset. Each check compares a run on the big
tensors with the same work on small copies (offsets far below 2^31) under the same plan, so
the answers must be bitwise equal: a 32-bit offset anywhere would read or write another
token's rows. Outputs and states are poisoned with NaN first, so a store that landed
elsewhere leaves a NaN behind.
"""

import pytest
import torch
import torch.nn.functional as F

import flashdelta as fd
from flashdelta.triton import chunk as tc
from flashdelta.triton import recurrent as tr

pytestmark = pytest.mark.gpu

T_BIG = 1 << 20  # tokens: T_BIG * HEADS * DIM = 2^32 elements
HEADS = 32
DIM = 128
TAIL = 1000  # the varlen batch's second sequence: its rows all lie past 2^31 elements (partial last chunk)


def _need_gib(gib: int) -> None:
    """Skip where the GPU has less free memory than the test's tensors take (earlier tests'
    cached blocks released first)."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} free")


def _big_inputs(dtype, seed: int):
    """q, k (L2-normalised), v [1, T_BIG, HEADS, DIM] in `dtype`, g (strong gates), beta, drawn
    on the GPU in slices (fp32 temporaries of one slice only)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.empty(1, T_BIG, HEADS, DIM, dtype=dtype, device="cuda") for _ in range(3))
    step = 1 << 16
    for t0 in range(0, T_BIG, step):
        sl = slice(t0, t0 + step)
        for x, norm in ((q, True), (k, True), (v, False)):
            r = torch.randn(1, step, HEADS, DIM, generator=gen, device="cuda")
            x[:, sl] = (F.normalize(r, dim=-1) if norm else r).to(dtype)
    a_log = torch.log(1 + 15 * torch.rand(HEADS, generator=gen, device="cuda"))
    g = -a_log.exp() * F.softplus(torch.randn(1, T_BIG, HEADS, generator=gen, device="cuda") - 4.0)
    beta = torch.sigmoid(torch.randn(1, T_BIG, HEADS, generator=gen, device="cuda"))
    h0 = 0.1 * torch.randn(2, HEADS, DIM, DIM, generator=gen, device="cuda")
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_offsets_past_2_31(dtype, seed, monkeypatch):
    """Varlen [T_BIG - TAIL, TAIL] with an initial state: bf16 takes the Gluon passes (sm_90),
    fp16 the Triton ones. (1) The second sequence, whose every row lies past 2^31 elements,
    equals the same sequence run alone. (2) Head HEADS - 1 of the first sequence (offsets up to
    ~2^32) equals that head run alone. Both bitwise: the same plan (fixed partitions, no lead
    pass) does the same arithmetic per head and sequence."""
    _need_gib(52)
    monkeypatch.setitem(tc.TUNING, "lead_partition", False)
    partition_chunks = 512  # 32 partitions of the long sequence: maps and chain at large offsets too
    q, k, v, g, beta, h0 = _big_inputs(dtype, seed)
    cu = torch.tensor([0, T_BIG - TAIL, T_BIG], dtype=torch.int64, device="cuda")
    o = torch.full_like(v, float("nan"))
    s = torch.full((2, HEADS, DIM, DIM), float("nan"), device="cuda")
    tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, DIM**-0.5, h0, True, cu, False,
                                  partition_chunks=partition_chunks, out=o, final_state_out=s)
    torch.cuda.synchronize()
    assert not torch.isnan(o[0, -TAIL:]).any() and not torch.isnan(s).any()

    tail = slice(T_BIG - TAIL, T_BIG)
    o_t, s_t = tc.chunk_gated_delta_rule_fwd(*(x[:, tail].contiguous() for x in (q, k, v, g, beta)), DIM**-0.5,
                                             h0[1:], True, partition_chunks=partition_chunks)
    assert torch.equal(o[:, tail], o_t) and torch.equal(s[1:], s_t)

    head = slice(HEADS - 1, HEADS)
    body = slice(0, T_BIG - TAIL)
    args = [x[:, body, head].contiguous() for x in (q, k, v, g, beta)]
    del o_t, s_t
    o_h = torch.full_like(args[2], float("nan"))
    s_h = torch.full((1, 1, DIM, DIM), float("nan"), device="cuda")
    tc.chunk_gated_delta_rule_fwd(*args, DIM**-0.5, h0[:1, head].contiguous(), True,
                                  partition_chunks=partition_chunks, out=o_h, final_state_out=s_h)
    assert torch.equal(o[:, body, head], o_h) and torch.equal(s[:1, head], s_h)
    assert not torch.isnan(o).any()


def test_recurrent_offsets_past_2_31(seed):
    """The token-by-token kernel on 8192 sequences of 128 tokens (2^32 elements in q, k, v and
    o; the final states [8192, 32, 128, 128] pass 2^32 too): rows past 2^31 give the outputs and
    states of the same rows run alone, bitwise."""
    _need_gib(60)
    q, k, v, g, beta, _ = _big_inputs(torch.bfloat16, seed)
    batch = T_BIG // 128
    q, k, v, g, beta = (x.view(batch, 128, *x.shape[2:]) for x in (q, k, v, g, beta))
    o = torch.full_like(v, float("nan"))
    s = torch.full((batch, HEADS, DIM, DIM), float("nan"), device="cuda")
    tr.fused_recurrent_gated_delta_rule_fwd(q, k, v, g, beta, DIM**-0.5, None, True, out=o, final_state_out=s)
    for b in (batch // 2 + 3, batch - 1):
        rows = slice(b, b + 1)
        o_b, s_b = fd.fused_recurrent_gated_delta_rule(*(x[rows].clone() for x in (q, k, v, g, beta)),
                                                       output_final_state=True, backend="triton")
        assert torch.equal(o[rows], o_b) and torch.equal(s[rows], s_b)
    assert not torch.isnan(o).any() and not torch.isnan(s).any()


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_pool_offsets_past_2_31(tokens, seed):
    """A pool of 4100 slots of [32, 128, 128] fp32 (2^31 elements end at slot 4096): sequences
    on slots past it give the outputs and states of a small pool holding the same states, and
    the slots around them are not touched."""
    _need_gib(10)
    slots, batch = 4100, 3
    gen = torch.Generator(device="cuda").manual_seed(seed + tokens)
    pool = torch.empty(slots, HEADS, DIM, DIM, device="cuda")
    for i in range(0, slots, 512):
        pool[i:i + 512] = 0.1 * torch.randn(min(512, slots - i), HEADS, DIM, DIM, generator=gen, device="cuda")
    idx = torch.tensor([4099, 17, 4097], dtype=torch.int64, device="cuda")
    q = F.normalize(torch.randn(batch, tokens, 16, DIM, generator=gen, device="cuda"), dim=-1).bfloat16()
    k = F.normalize(torch.randn(batch, tokens, 16, DIM, generator=gen, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(batch, tokens, HEADS, DIM, generator=gen, device="cuda").bfloat16()
    a = torch.randn(batch, tokens, HEADS, generator=gen, device="cuda")
    b = torch.randn(batch, tokens, HEADS, generator=gen, device="cuda")
    a_log = torch.log(1 + 15 * torch.rand(HEADS, generator=gen, device="cuda"))
    dt_bias = torch.randn(HEADS, generator=gen, device="cuda")
    small = pool[idx].clone()
    around = pool[[0, 4096, 4098]].clone()

    def step(states, indices):
        return fd.fused_sigmoid_gating_delta_rule_update(a_log, a, dt_bias, 1.0, 20.0, q, k, v, b, states, indices,
                                                          use_qk_l2norm_in_kernel=True, backend="triton")

    o_big = step(pool, idx)
    o_small = step(small, torch.arange(batch, device="cuda"))
    assert torch.equal(o_big, o_small) and not torch.isnan(o_big).any()
    assert torch.equal(pool[idx], small)
    assert torch.equal(pool[[0, 4096, 4098]], around)

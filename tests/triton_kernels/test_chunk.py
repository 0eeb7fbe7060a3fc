"""The Triton chunked prefill against the float64 oracle (interpreter on the CPU, kernels on a GPU)."""

import pytest
import torch

import flashdelta as fd
from flashdelta.testing import make_case, oracle, raw_norms_case, rel_l2
from flashdelta.triton.chunk import chunk_gated_delta_rule_fwd

pytest.importorskip("triton")

KINDS = ["random", "l2norm_in_kernel", "near_identical_keys", "cyclic_keys", "strong_decay", "zero_decay",
         "beta_0_2", "gva_k_ne_v", "large_initial_state", "varlen", "learned_values"]
DTYPES = [torch.float32, torch.bfloat16]


def _extra(kind):
    return dict(heads=2, value_heads=4, dv=48) if kind == "gva_k_ne_v" else {}


def run(case, partition_chunks=None, poison=True):
    """Call the kernel with NaN-poisoned outputs, so an unwritten element fails."""
    kw = dict(case.kwargs)
    n = kw["cu_seqlens"].numel() - 1 if "cu_seqlens" in kw else case.q.shape[0]
    hv, dk, dv = case.v.shape[2], case.q.shape[3], case.v.shape[3]
    out = torch.full_like(case.v, float("nan"), dtype=case.q.dtype) if poison else None
    fin = torch.full((n, hv, dk, dv), float("nan"), device=case.q.device) if poison else None
    return chunk_gated_delta_rule_fwd(
        *case.args(), kw.get("scale") or dk**-0.5, kw.get("initial_state"), True, kw.get("cu_seqlens"),
        kw.get("use_qk_l2norm_in_kernel", False), partition_chunks=partition_chunks, out=out, final_state_out=fin)


def check(case, o, s):
    o_ref, s_ref = oracle(case)
    assert o.dtype == case.dtype and torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_l2(o, o_ref) <= case.tolerance, rel_l2(o, o_ref)
    assert rel_l2(s, s_ref) <= case.tolerance, rel_l2(s, s_ref)


def assert_same_rounding(case, base, other):
    """Two kernels that compute the same products in another order or blocking agree to their
    rounding. The fp32 state: no farther from the base kernel than the base is from the
    oracle (at least 1e-5 is asked: the interpreter's fp32 products agree to ~1e-7; GPU split
    products on near-identical keys differ by up to ~0.35x their ~5e-5 distance from the
    oracle). o: a quarter of its bf16 rounding (at least 2e-4; the GPU showed 1.3-2.1e-4 on
    near-identical keys). A slip in the reordered math (a decay or scale 0.1% off) fails it
    on the interpreter (NOTES.md, v4.4)."""
    (o0, s0), (o1, s1) = base, other
    o_ref, s_ref = oracle(case)
    bound_o = max(2e-4, 0.25 * rel_l2(o0, o_ref))
    bound_s = max(1e-5, rel_l2(s0, s_ref))
    assert rel_l2(o1, o0) <= bound_o and rel_l2(s1, s0) <= bound_s, (rel_l2(o1, o0), bound_o, rel_l2(s1, s0), bound_s)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", KINDS)
def test_parity(kind, dtype, seed, device):
    case = make_case(kind, dtype, device, seed=seed, seq_len=130, **_extra(kind))
    o, s = run(case)
    check(case, o, s)


@pytest.mark.parametrize("partition_chunks", [None, 1])
@pytest.mark.parametrize("kind", ["random", "l2norm_in_kernel", "near_identical_keys", "cyclic_keys", "strong_decay",
                                  "zero_decay", "beta_0_2", "large_initial_state", "varlen"])
def test_fp16_near_its_floor(kind, partition_chunks, seed, device):
    """fp16 inputs (bf16 split operands on the GPU, the grams as one fp16 product: common.dot_dtype,
    TUNING["gram_fp16"]): o within 2.5x of its fp16 rounding (the floor: the oracle's o rounded
    to fp16), the state within 1e-3, finite and fully written."""
    case = make_case(kind, torch.float16, device, seed=seed + 3, seq_len=130, heads=2, value_heads=4)
    o, s = run(case, partition_chunks)
    o_ref, s_ref = oracle(case)
    floor = rel_l2(o_ref.to(torch.float16), o_ref)
    assert o.dtype == torch.float16 and torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_l2(o, o_ref) <= 2.5 * floor and rel_l2(s, s_ref) <= 1e-3, (rel_l2(o, o_ref), floor, rel_l2(s, s_ref))


@pytest.mark.parametrize("seq_len", [1, 63, 64, 65])
def test_short_and_edge_lengths(seq_len, seed, device):
    case = make_case("random", torch.float32, device, seed=seed, seq_len=seq_len)
    check(case, *run(case))


@pytest.mark.parametrize("partition_chunks", [None, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["random", "near_identical_keys", "cyclic_keys", "strong_decay", "zero_decay",
                                  "beta_0_2", "large_initial_state", "varlen"])
def test_folded_l2norm(kind, dtype, partition_chunks, seed, device):
    """use_qk_l2norm_in_kernel on the Triton passes: the norms folded into beta, v and o (the
    raw q, k are the products' operands; `_inverse_kernel` doc). Rows over four decades of norms
    and some exactly zero, a group of two value heads per key head (each program sums its key
    head's norms), with and without partitions: the dtype's tolerance against the fp64 oracle,
    which normalises in fp64."""
    case = raw_norms_case(make_case(kind, dtype, device, seed=seed + 5, seq_len=130, heads=2, value_heads=4),
                          seed=seed)
    check(case, *run(case, partition_chunks))


@pytest.mark.parametrize("lead", [False, True, "adaptive"])
@pytest.mark.parametrize("partition_chunks", [1, 2])
@pytest.mark.parametrize("kind", ["random", "large_initial_state", "strong_decay", "near_identical_keys",
                                  "learned_values"])
def test_partitioned_is_exact(kind, partition_chunks, lead, seed, device, monkeypatch):
    """P > 1 at T ~ 300: the affine state maps and the chain give the unpartitioned answer,
    with each sequence's first partition in the chain or in the lead pass."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setitem(tc.TUNING, "lead_partition", lead)
    case = make_case(kind, torch.float32, device, seed=seed, seq_len=300)
    o, s = run(case, partition_chunks)
    check(case, o, s)
    o1, s1 = run(case, partition_chunks=10**6)  # one partition
    assert rel_l2(o, o1) <= 1e-5 and rel_l2(s, s1) <= 1e-5


@pytest.mark.parametrize("lead", [False, True, "adaptive"])
@pytest.mark.parametrize("partition_chunks", [1, 2])
def test_partitioned_varlen(partition_chunks, lead, seed, device, monkeypatch):
    """Partitions never cross sequences; empty and 1-token sequences pass through (with the
    lead pass: sequences of one partition stay in the output pass, the others' first
    partitions go to the lead pass, two-partition ones need no map)."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setitem(tc.TUNING, "lead_partition", lead)
    case = make_case("varlen", torch.float32, device, seed=seed, value_heads=4)
    check(case, *run(case, partition_chunks))


class _WarmSpy:
    """Runs `_warm_start_kernel` and keeps each launch's (bounds, map rows, table)."""

    def __init__(self, kernel):
        self.kernel, self.tables = kernel, []

    def __getitem__(self, grid):
        def launch(bound, maps, warm, *args, **kwargs):
            self.kernel[grid](bound, maps, warm, *args, **kwargs)
            self.tables.append((bound.clone(), maps.clone(), warm.clone()))
        return launch


def _map_bounds(case):
    """log2 of each token's map-norm bound, e^{g_t} max(1, |1 - beta_t |k_t|^2|), in fp64:
    [B, T, HV] (k as the kernel reads it: rounded to the input dtype, grouped heads expanded)."""
    hv = case.v.shape[2]
    k = case.k.double().repeat_interleave(hv // case.k.shape[2], dim=2)
    norm2 = (k * k).sum(-1)
    growth = torch.log2(torch.clamp((1.0 - case.beta.double() * norm2).abs(), min=1.0))
    return case.g.double() / torch.log(torch.tensor(2.0, dtype=torch.float64)) + growth


def _expected_warm(token_bounds, maps, limit):
    """The table `_warm_start_kernel` must give, from fp64 bounds: per map row and head, (the
    last chunk j whose suffix of chunk bounds is <= limit, or the start; M negligible?), and a
    margin: how far the deciding suffixes are from the limit (fp32 sums may differ there)."""
    rows = []
    for b, t0, t1, *_ in maps.tolist():
        chunk = torch.stack([token_bounds[b, c:min(c + 64, t1)].sum(0) for c in range(t0, t1, 64)])  # [n, HV]
        suffix = chunk.flip(0).cumsum(0).flip(0)
        heads = []
        for h in range(chunk.shape[1]):
            ok = (suffix[:, h] <= limit).nonzero()
            j = int(ok.max()) if len(ok) else 0
            heads.append((t0 + 64 * j, int(suffix[0, h] <= limit), float((suffix[:, h] - limit).abs().min())))
        rows.append(heads)
    return rows


@pytest.mark.parametrize("kind", ["strong_decay", "mixed_heads", "growing_keys"])
def test_negligible_maps(kind, seed, device, monkeypatch):
    """The map pass skips only what the gates provably damp below fp32: M where the bound on its
    norm (decay and the keys' growth |1 - beta |k|^2|, chunk by chunk) is under 2^-300, D's
    run from the last chunk where that holds. The table matches an fp64 computation of the
    bound; the skips happen (strong decay) and are exact (the oracle, and the full maps);
    keys whose map grows are never skipped, though their decay alone would say so (and
    skipping them everywhere is visibly wrong: the case can tell)."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setitem(tc.TUNING, "lead_partition", False)
    if kind == "growing_keys":
        # |k|^2 = 34, beta = 1: each token's map has the eigenvalue -33 along k, decay e^-3.5
        # (e^-3.5 x 33 = 0.996): the decay alone bounds a chunk by 2^-323 (negligible), with the
        # growth by ~2^0: what enters a partition leaves it almost undamped along k
        case = make_case("random", torch.float32, device, seed=seed, seq_len=256)
        base = torch.nn.functional.normalize(torch.randn(1, 1, 2, 32, generator=torch.Generator().manual_seed(seed)),
                                             dim=-1).to(device)
        case.k = torch.nn.functional.normalize(base + 1e-3 * torch.randn_like(case.k), dim=-1) * 34**0.5
        case.g = torch.full_like(case.g, -3.5)
        case.beta = torch.ones_like(case.beta)
        case.kwargs["initial_state"] = torch.randn(2, 2, 32, 32, device=device)
        partition_chunks = 1
    else:
        case = make_case("strong_decay" if kind == "strong_decay" else "random", torch.float32, device, seed=seed,
                         seq_len=300)
        if kind == "mixed_heads":  # head 0 strong (-6 per token), head 1 moderate: one skips, one does not
            case.g[..., 0] = -6.0 * torch.rand_like(case.g[..., 0]) - 3.0
        partition_chunks = 2
    spy = _WarmSpy(tc._warm_start_kernel)
    monkeypatch.setattr(tc, "_warm_start_kernel", spy)
    monkeypatch.setitem(tc.TUNING, "fast_launch", False)  # every launch through the spy (launch.py)
    o, s = run(case, partition_chunks)
    if kind != "growing_keys":
        check(case, o, s)
    ((bound, maps, warm),) = spy.tables
    expected = _expected_warm(_map_bounds(case), maps.cpu(), tc.NEGLIGIBLE_LOG2)
    got = warm.cpu().tolist()
    for row, want in zip(got, expected):
        for (start, skip), (start_ref, skip_ref, margin) in zip(row, want):
            if margin > 1e-3:  # fp32 against fp64 sums: a tie may go either way (both are exact)
                assert (start, skip) == (start_ref, skip_ref), (row, want)
    skips = warm[..., 1].flatten().tolist()
    if kind == "strong_decay":
        assert all(skips)
    elif kind == "mixed_heads":
        assert all(warm[:, 0, 1].tolist()) and not any(warm[:, 1, 1].tolist())
    else:
        assert not any(skips)
    monkeypatch.setitem(tc.TUNING, "skip_negligible_maps", False)
    o1, s1 = run(case, partition_chunks)
    assert rel_l2(o, o1) <= 1e-5 and rel_l2(s, s1) <= 1e-5
    if kind == "growing_keys":
        # nothing skipped: the very same products as the full maps, bitwise; as exact as they are
        # (this map of eigenvalue ~ -1 under strong decay is ill-conditioned: the GPU's 3xTF32
        # products reach 2.7e-5 on it, the interpreter's fp32 ones < 1e-5; NOTES.md v5.0)
        assert torch.equal(o, o1) and torch.equal(s, s1)
        o_ref, s_ref = oracle(case)
        assert rel_l2(o, o_ref) <= max(case.tolerance, rel_l2(o1, o_ref))
        assert rel_l2(s, s_ref) <= max(case.tolerance, rel_l2(s1, s_ref))
        monkeypatch.setitem(tc.TUNING, "skip_negligible_maps", True)
        monkeypatch.setattr(tc, "NEGLIGIBLE_LOG2", 1e9)  # every map dropped: the answer must change
        o2, s2 = run(case, partition_chunks)
        o_ref, s_ref = oracle(case)
        assert rel_l2(s2, s_ref) > 1e-2, rel_l2(s2, s_ref)


class _ChooseSpy:
    """Runs `_choose_plan_kernel` and keeps the rows it chose."""

    def __init__(self, kernel):
        self.kernel, self.rows = kernel, []

    def __getitem__(self, grid):
        def launch(warm_ab, rows_a, rows_b, rows, *args, **kwargs):
            self.kernel[grid](warm_ab, rows_a, rows_b, rows, *args, **kwargs)
            self.rows.append((rows_a.clone(), rows_b.clone(), rows.clone()))
        return launch


@pytest.mark.parametrize("slots", [0, 16, 10**6])
@pytest.mark.parametrize("kind", ["strong_decay", "random", "varlen"])
def test_adaptive_plan(kind, slots, seed, device, monkeypatch):
    """The lead plan or its empty-lead form (the same grids: the lead rows run no chunk and pass
    the initial state on, the other partitions cover the sequence), chosen on the device: the
    empty leads where the map pass then fits in one round of `slots` programs, counting the M
    programs the gates leave. At T = 300, 64-token partitions, 2 sequences x 2 heads: 6 maps x
    2 heads of D (one column block each) and of M; strong decay leaves no M: 12 <= 16, the
    moderate decay of "random" all 12: 24 > 16. Either plan is exact; outputs poisoned."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setitem(tc.TUNING, "lead_partition", "adaptive")
    monkeypatch.setattr(tc, "map_pass_slots", lambda device: slots)
    spy = _ChooseSpy(tc._choose_plan_kernel)
    monkeypatch.setattr(tc, "_choose_plan_kernel", spy)
    monkeypatch.setitem(tc.TUNING, "fast_launch", False)  # every launch through the spy (launch.py)
    case = make_case(kind, torch.float32, device, seed=seed, seq_len=300, value_heads=2)
    o, s = run(case, 1)
    check(case, o, s)
    ((rows_a, rows_b, rows),) = spy.rows
    assert not torch.equal(rows_a, rows_b)
    # varlen (1 to 130 tokens, 2 value heads): only the 130-token sequence has a map (lead + 2
    # partitions), its M kept by the moderate decay: 2 + 2 programs
    need = {"strong_decay": 12, "random": 24, "varlen": 4}[kind]
    assert torch.equal(rows, rows_b if slots >= need else rows_a), (slots, rows)
    o1, s1 = run(case, partition_chunks=10**6)
    assert rel_l2(o, o1) <= 1e-5 and rel_l2(s, s1) <= 1e-5


def test_adaptive_plan_rows():
    """`_plan(adaptive=True)`: plan B has plan A's row counts, empty leads that pass the
    initial state to the second slot, and near-equal partitions covering each split sequence
    (chunk-aligned); maps cover all its partitions but the last; unsplit sequences keep their row."""
    from flashdelta.triton import chunk as tc

    seqs = ((0, 0, 640), (0, 640, 700), (0, 700, 1213))  # 10, 1 and 9 chunks
    plan = tc._plan(seqs, 4, torch.device("cpu"), True, True)
    n_l, n_m, n_p = plan["num_leads"], plan["num_maps"], plan["num_parts"]
    a, b = plan["rows_a"].tolist(), plan["rows_b"].tolist()
    assert len(a) == len(b) == n_l + n_m + n_p and (n_l, n_m, n_p) == (2, 2, 5)
    leads, maps, parts = b[:n_l], b[n_l:n_l + n_m], b[n_l + n_m:]
    assert sorted(leads) == [[0, 0, 0, 1, 0, 1], [0, 700, 700, 5, 2, 1]]  # empty, end state -> slot 1 / 5
    by_seq = {}
    for r in parts:
        by_seq.setdefault(r[3], []).append(r)
    for n, (_, start, end) in enumerate(seqs):
        rows = sorted(by_seq[n], key=lambda r: r[1])
        assert rows[0][1] == start and rows[-1][2] == end
        assert all(x[2] == y[1] and (x[2] - start) % 64 == 0 for x, y in zip(rows, rows[1:]))
        assert [r[5] for r in rows] == [0] * (len(rows) - 1) + [1]
    # 10 chunks: A's lead + 2 partitions of 4, 2 chunks; B's 2 of 5. 9 chunks: 4, 4, 1; B's 4, 5
    assert sorted((r[1], r[2]) for r in by_seq[0]) == [(0, 320), (320, 640)]
    assert sorted((r[1], r[2]) for r in by_seq[2]) == [(700, 956), (956, 1213)]
    assert sorted((r[1], r[2], r[4]) for r in maps) == [(0, 320, 0), (700, 956, 1)]
    assert plan["maps_ab"].shape == (2 * n_m, 6)


def test_deterministic(seed, device):
    case = make_case("random", torch.bfloat16, device, seed=seed, seq_len=200)
    o1, s1 = run(case, partition_chunks=1)
    o2, s2 = run(case, partition_chunks=1)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)


def test_public_api_and_views(seed, device):
    case = make_case("random", torch.float32, device, seed=seed, seq_len=100, value_heads=4)
    h0 = torch.randn(2, 4, 32, 32, device=device)
    h0_copy = h0.clone()
    o, s = fd.chunk_gated_delta_rule(*case.args(), initial_state=h0, output_final_state=True, backend="triton")
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (case.q, case.k, case.v))
    o2, s2 = fd.chunk_gated_delta_rule(q, k, v, case.g, case.beta, initial_state=h0, output_final_state=True,
                                       backend="triton")
    assert torch.equal(h0, h0_copy)
    assert rel_l2(o, o2) <= 1e-6 and rel_l2(s, s2) <= 1e-6
    o_ref, s_ref = fd.chunk_gated_delta_rule(*case.args(), initial_state=h0, output_final_state=True, backend="torch")
    assert rel_l2(o, o_ref) <= 1e-5 and rel_l2(s, s_ref) <= 1e-5


def test_no_final_state(seed, device):
    case = make_case("random", torch.float32, device, seed=seed, seq_len=70)
    o, s = fd.chunk_gated_delta_rule(*case.args(), backend="triton")
    assert s is None and torch.isfinite(o).all()


def _strided(x):
    """A view of x with a head stride that TMA cannot read ([B, T, H, D] inside [B, T, H, D + 8])."""
    wide = torch.zeros(*x.shape[:3], x.shape[3] + 8, dtype=x.dtype, device=x.device)
    wide[..., : x.shape[3]] = x
    return wide[..., : x.shape[3]]


@pytest.mark.parametrize("tma,tma_t", [(True, True), (True, False), (False, False)],
                         ids=["tma", "tma_but_t", "block_pointers"])
@pytest.mark.parametrize("kind", ["random", "varlen", "strong_decay"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_tile_loaders_agree(kind, dtype, tma, tma_t, seed, device, monkeypatch):
    """Both ways of reading chunk tiles: TMA descriptors (rows past a sequence belong to the
    next one and must be masked; dense B = 2 at T = 130 has a ragged last chunk) and block
    pointers (forced, and taken anyway for a layout TMA cannot read); TMA for all but T_u."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setitem(tc.TUNING, "tma", tma)
    monkeypatch.setitem(tc.TUNING, "tma_t", tma_t)
    case = make_case(kind, dtype, device, seed=seed, seq_len=130)
    check(case, *run(case, partition_chunks=1))
    if not tma:
        case.q, case.k, case.v = (_strided(x) for x in (case.q, case.k, case.v))
        assert tc._tma_view(case.q, case.q.shape[3], 32) is None
        check(case, *run(case, partition_chunks=1))


@pytest.mark.parametrize("dk", [64, 128])
@pytest.mark.parametrize("kind", ["large_initial_state", "zero_decay", "varlen"])
def test_chain_from_registers(kind, dk, seed, device, monkeypatch):
    """TUNING["chain_in_registers"]: the chain cuts S_{p-1} into its row slices in registers
    (one or two of them at K = 64, 128) instead of reading it back: the oracle's answer with
    three partitions per sequence, and the slices in the same order as the read-back."""
    from flashdelta.triton import chunk as tc

    case = make_case(kind, torch.float32, device, seed=seed, seq_len=150, heads=1, dk=dk, dv=16)
    results = []
    for in_registers in (False, True):
        monkeypatch.setitem(tc.TUNING, "chain_in_registers", in_registers)
        assert tc.launch_config(torch.float32, dk, 16, 1, 1, False)["chain"]["IN_REGISTERS"] == in_registers
        results.append(run(case, partition_chunks=1))
    check(case, *results[1])
    assert_same_rounding(case, *results)


@pytest.mark.parametrize("lead", [False, True])
@pytest.mark.parametrize("kind", ["large_initial_state", "strong_decay", "varlen"])
def test_chain_prefetch(kind, lead, seed, device, monkeypatch):
    """TUNING["chain_prefetch"] (K = 128, slices in registers): the chain loads link j + 1's M
    and D before link j's products; the starts are the same numbers (bitwise: the same products
    in the same order), with maps masked past a sequence's last link, three or more partitions
    per sequence, and with the lead pass (its chain starts at the second partition)."""
    from flashdelta.triton import chunk as tc

    case = make_case(kind, torch.float32, device, seed=seed, seq_len=260, heads=1, value_heads=2, dk=128, dv=16)
    monkeypatch.setitem(tc.TUNING, "lead_partition", lead)
    results = []
    for prefetch in (False, True):
        monkeypatch.setitem(tc.TUNING, "chain_prefetch", prefetch)
        assert tc.launch_config(torch.float32, 128, 16, 1, 2, False)["chain"]["PREFETCH"] == prefetch
        results.append(run(case, partition_chunks=1))
    check(case, *results[1])
    (o0, s0), (o1, s1) = results
    assert torch.equal(o0, o1) and torch.equal(s0, s1)


def test_chain_prefetch_only_where_timed():
    """At K = 128 with the slices in registers (8 warps on the GPU; at 4 it spills); elsewhere the
    plain loop."""
    from flashdelta.triton.chunk import launch_config

    for dim, on in [(64, False), (128, True), (256, False)]:
        assert launch_config(torch.bfloat16, dim, dim, 1, 16, False)["chain"]["PREFETCH"] == on, dim


@pytest.mark.parametrize("kind", ["near_identical_keys", "cyclic_keys", "strong_decay", "l2norm_in_kernel",
                                  "varlen", "beta_0_2"])
@pytest.mark.parametrize("blocked,merged", [(True, True), (True, False), (False, False)],
                         ids=["blocked16_merged", "blocked16", "full"])
def test_inverse_on_diagonal_blocks(kind, blocked, merged, seed, device, monkeypatch):
    """TUNING["inverse_blocked16"] (bf16 inputs): the first doubling levels on [4, 16, 16]
    batches, and with TUNING["inverse_block_merge"] the last two on the nonzero blocks only,
    give the oracle's answer, as the full-tile levels do, on the inputs that break inexact
    inverses, ragged chunks included; and the knob-free kernel's answer to rounding."""
    from flashdelta.triton import chunk as tc

    case = make_case(kind, torch.bfloat16, device, seed=seed, seq_len=130)
    results = []
    for setting in ((False, False), (blocked, merged)):
        monkeypatch.setitem(tc.TUNING, "inverse_blocked16", setting[0])
        monkeypatch.setitem(tc.TUNING, "inverse_block_merge", setting[1])
        inverse = tc.launch_config(torch.bfloat16, 64, 64, 1, 4, False)["inverse"]
        assert (inverse["BLOCKED16"], inverse["BLOCK_MERGE"]) == setting
        results.append(run(case))
    (o0, s0), (o1, s1) = results
    check(case, o1, s1)
    assert_same_rounding(case, (o0, s0), (o1, s1))


@pytest.mark.parametrize("knobs", [{"early_qs": True}, {"fused_accumulate": True},
                                   {"early_qs": True, "fused_accumulate": True}],
                         ids=["early_qs", "fused_accumulate", "both"])
@pytest.mark.parametrize("kind", ["near_identical_keys", "zero_decay", "strong_decay", "large_initial_state",
                                  "varlen"])
def test_register_saving_orders_are_exact(kind, knobs, seed, device, monkeypatch):
    """TUNING["early_qs"] / ["fused_accumulate"] reorder and fuse the chunk step's products
    (fewer live registers): the oracle's answer, and the knob-free kernel's answer to rounding
    (the same products summed in another order), in the output pass and, partitioned, the map
    pass. bf16 inputs: the knobs apply there (K <= 128), as the launch rule says."""
    from flashdelta.triton import chunk as tc

    case = make_case(kind, torch.bfloat16, device, seed=seed, seq_len=300)
    results = []
    for setting in ({}, knobs):
        for key in ("early_qs", "fused_accumulate"):
            monkeypatch.setitem(tc.TUNING, key, setting.get(key, False))
        rec = tc.launch_config(torch.bfloat16, 128, 128, 1, 4, False)["recurrence"]
        assert (rec["EARLY_QS"], rec["FUSED_ACC"]) == (setting.get("early_qs", False),
                                                       setting.get("fused_accumulate", False))
        results.append(run(case, partition_chunks=2))
    (o0, s0), (o1, s1) = results
    check(case, o1, s1)
    assert_same_rounding(case, (o0, s0), (o1, s1))


def test_launch_rule_refuses_the_fp32_launch_that_faults(monkeypatch):
    """fp32 inputs at 16-column state blocks and 8 warps read past a shared buffer on the H100
    (Triton 3.6; compute-sanitizer, NOTES.md v5.15): the launch rule refuses them with a clear
    error before any kernel runs, and keeps the neighbours that run clean."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setitem(tc.TUNING, "block_v", 16)
    monkeypatch.setitem(tc.TUNING, "warps_recurrence", 8)
    items = tuple(tc.TUNING.items())
    with pytest.raises(ValueError, match="block_v 16 at 8 warps"):
        tc._launch_config(torch.float32, 256, 256, 1, 16, False, False, items, False)
    tc._launch_config(torch.bfloat16, 256, 256, 1, 16, False, False, items, False)
    tc._launch_config(torch.float32, 256, 256, 1, 16, False, False, items, True)  # (the interpreter: 4 warps)
    for block_v, warps in ((16, 4), (32, 8), (None, 4)):
        monkeypatch.setitem(tc.TUNING, "block_v", block_v)
        monkeypatch.setitem(tc.TUNING, "warps_recurrence", warps)
        tc._launch_config(torch.float32, 256, 256, 1, 16, False, False, tuple(tc.TUNING.items()), False)


def test_register_saving_orders_only_where_timed():
    """On by default for bf16 inputs (K = 64 to 256, each timed faster); off for fp16 inputs
    (+31% at K = 128) and fp32 operands (not timed)."""
    from flashdelta.triton.chunk import launch_config

    for dtype, dim, on in [(torch.bfloat16, 128, True), (torch.bfloat16, 64, True), (torch.bfloat16, 256, True),
                           (torch.float32, 128, False), (torch.float16, 128, False), (torch.float16, 64, False)]:
        rec = launch_config(dtype, dim, dim, 1, 16, False)["recurrence"]
        assert rec["EARLY_QS"] == on and rec["FUSED_ACC"] == on, (dtype, dim)


def test_fp16_operands_and_grams():
    """fp16 inputs take bf16 split operands on the GPU and their grams in one fp16 product
    (q, k exact in fp16); bf16 ones in bf16; fp32 ones split (3xTF32). Under the interpreter
    the split products are fp32 (its bf16 products are wrong), the fp16 gram is kept (its fp16
    products sum in fp32), so the interpreter runs the fp16 path's own gram."""
    import triton.language as tl

    from flashdelta.triton.chunk import launch_config
    from flashdelta.triton.common import interpreting

    for dtype, dot, gram in [(torch.bfloat16, tl.bfloat16, tl.bfloat16), (torch.float16, tl.bfloat16, tl.float16),
                             (torch.float32, tl.float32, None)]:
        cfg = launch_config(dtype, 128, 128, 1, 16, False)
        if interpreting():
            dot = tl.float32
            gram = tl.float32 if dtype == torch.bfloat16 else gram
        for kernel in ("inverse", "recurrence"):
            assert cfg[kernel]["DOT"] == dot and cfg[kernel]["GRAM_DOT"] == gram, (dtype, kernel)
        assert cfg["recurrence"]["K_EXACT"] == (dtype == torch.bfloat16)


def test_chain_in_registers_only_where_timed():
    """On by default at K <= 128, with 16-column programs (v4.9; at K = 256 16 columns spill 24 B
    offline where 32 spilled 560 B); the read-back path at K = 256."""
    from flashdelta.triton.chunk import launch_config

    for dim, on in [(64, True), (128, True), (256, False)]:
        cfg = launch_config(torch.bfloat16, dim, dim, 1, 16, False)
        assert cfg["chain"]["IN_REGISTERS"] == on and cfg["chain"]["BV"] == 16, dim
        assert cfg["nvb_chain"] == dim // 16


def test_gluon_sm90_scoped(monkeypatch, device):
    """The Gluon map and output passes (on by default) are only taken on sm_90 with bf16,
    K = 128 (the in-kernel L2 norm folded, chunk_sm90): elsewhere (here: fp32, K = 32, or the CPU) the Triton
    passes run, and switching the knob off changes nothing there. Partitioned, so the map
    pass is in play."""
    from flashdelta.triton import chunk as tc

    assert tc.TUNING["gluon_sm90"] is True
    case = make_case("random", torch.float32, device, seed=3, seq_len=130, dk=32)
    q, k, v, g, beta = case.args()
    if tc.chunk_sm90 is not None:
        assert not tc.chunk_sm90.may_run(q, v)
        for name in ("output_pass", "map_pass"):
            monkeypatch.setattr(tc.chunk_sm90, name, lambda *a, **k: pytest.fail("Gluon pass on the CPU"))
    on = chunk_gated_delta_rule_fwd(q, k, v, g, beta, 32**-0.5, None, True, partition_chunks=1)
    monkeypatch.setitem(tc.TUNING, "gluon_sm90", False)
    off = chunk_gated_delta_rule_fwd(q, k, v, g, beta, 32**-0.5, None, True, partition_chunks=1)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


def test_inverse_blocked16_only_for_bf16_operands():
    """The batched diagonal blocks were timed with bf16 operands: bf16 inputs, and fp16 ones since
    they take bf16 operands (v5.11: the fp16 inverse 1.07 -> 0.22 ms at 1x32K with the fp16 grams);
    fp32 inputs keep the full tiles."""
    from flashdelta.triton.chunk import launch_config

    for dtype in (torch.bfloat16, torch.float16):
        assert launch_config(dtype, 128, 128, 1, 16, False)["inverse"]["BLOCKED16"]
        assert launch_config(dtype, 128, 128, 1, 16, False)["inverse"]["BLOCK_MERGE"]
    assert not launch_config(torch.float32, 128, 128, 1, 16, False)["inverse"]["BLOCKED16"]
    assert not launch_config(torch.float32, 128, 128, 1, 16, False)["inverse"]["BLOCK_MERGE"]


def test_tma_view_only_where_the_layout_allows():
    """A TMA descriptor views [B, T, heads, D] as [B * T, heads * D]: only for layouts where
    that view is exact and aligned; anything else takes the block-pointer path."""
    from flashdelta.triton.chunk import _tma_view

    x = torch.zeros(2, 130, 3, 64, dtype=torch.bfloat16)
    assert _tma_view(x, 64, 64) is not None
    assert _tma_view(x, 64, 128) is None  # a tile would straddle two heads
    assert _tma_view(x[:, :, :, :32], 32, 32) is None  # heads and D do not merge
    assert _tma_view(x[:, :129], 64, 64) is None  # B and T do not merge
    assert _tma_view(x[:1, :129], 64, 64) is not None  # one sequence: T alone is fine
    flat = torch.zeros(1 + 130 * 3 * 64, dtype=torch.bfloat16)
    assert _tma_view(flat[1:].view(1, 130, 3, 64), 64, 64) is None  # base not 16-byte aligned
    assert _tma_view(x.transpose(2, 3), 3, 3) is None  # inner stride is not 1


def test_output_pass_stages_follow_the_grid(monkeypatch):
    """One pipeline stage for the output pass only where its programs outnumber the SMs (two
    then share an SM) and at BV 64 (the measured case); the map pass keeps two; fp32 operands
    take one stage at any grid (shared memory). The GPU's choices, so outside the interpreter."""
    from flashdelta.triton.chunk import launch_config

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def stages(dtype, dim, per_sm):
        cfg = launch_config(dtype, dim, dim, group=1, hv=16, use_qk_l2norm=False, out_programs_per_sm=per_sm)
        return cfg["recurrence"]["num_stages"], cfg["map_launch"]["num_stages"]

    assert stages(torch.bfloat16, 128, 0.97) == (2, 2)  # 1x8K, 16 heads: one program per SM
    assert stages(torch.bfloat16, 128, 1.94) == (1, 2)  # 1x32K: two waves
    assert stages(torch.bfloat16, 128, 3.9) == (1, 2)  # 8x4K
    assert stages(torch.bfloat16, 256, 3.9) == (2, 2)  # BV 32
    assert stages(torch.float32, 128, 3.9) == (1, 1)


def test_auto_partitions_fill_one_wave(monkeypatch):
    """The auto partition size: the output pass's programs (partitions x heads x column blocks)
    fit in the 2 x SMs that run at once, as few chunks per partition as that allows and
    equal partitions for one sequence (a short straggler or a second wave costs a whole wave:
    NOTES.md); one partition where the sequences fill the GPU; never below the minimum."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setattr(tc, "sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)

    def parts(counts, hv):
        size = tc.auto_partition_chunks(counts, hv, 2, gpu)
        return size, sum(-(-n // size) for n in counts)

    assert parts([2048], 16) == (256, 8)  # 1x128K, 16 heads: 256 programs (9 partitions made 288)
    assert parts([512], 16) == (64, 8)  # 1x32K
    assert parts([512], 32) == (128, 4)  # 1x32K, 32 value heads
    assert parts([2000], 16) == (250, 8)  # equal partitions, not 7 x 286 + 1 x 26
    assert parts([128], 16) == (16, 8)  # 1x8K
    assert parts([64], 16) == (tc.MIN_PARTITION_CHUNKS, 4)  # 1x4K: the minimum size
    assert parts([64] * 8, 32) == (64, 8)  # 8x4K: the sequences fill the GPU
    for counts, hv in [([300, 40, 7], 8), ([1, 1000], 4), ([5000], 2), ([777] * 3, 16)]:
        size, n = parts(counts, hv)
        assert n * hv * 2 <= 264 and (size == tc.MIN_PARTITION_CHUNKS or
                                      sum(-(-c // (size - 1)) for c in counts) * hv * 2 > 264)
    assert tc.auto_partition_chunks([2048], 16, 2, torch.device("cpu")) == 2048


def test_lead_plan_where_the_model_predicts_it_faster(monkeypatch):
    """The lead pass (each sequence's first partition beside the map pass) is chosen where the
    map pass takes two rounds anyway: 1x128K and 1x32K at 16 or 32 value heads get one more
    partition than the plain plan (its output rows still one wave); 1x4K, 1x8K (a tie) and
    8x4K (no partitions) keep the plain plan; forcing either plan gives that plan's size."""
    from flashdelta.triton import chunk as tc

    monkeypatch.setattr(tc, "sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)

    def plan(counts, hv, lead=None):
        size, led = tc.auto_partitions(counts, hv, 2, 2, gpu, 2, lead)
        parts = [-(-n // size) for n in counts]
        rows = sum(p - 1 if led and p > 1 else p for p in parts)
        assert rows * hv * 2 <= 264 or max(parts) == 1
        return size, led, parts

    assert plan([2048], 16) == (228, True, [9])  # 1x128K: 8 output rows of 32 programs
    assert plan([2048], 16, False) == (256, False, [8])
    assert plan([512], 32) == (103, True, [5])  # 1x32K 16/32
    assert plan([2048], 32) == (410, True, [5])  # 1x128K 32/32
    assert plan([128], 16) == (16, False, [8])  # 1x8K: a tie
    assert plan([128], 16, True) == (16, True, [8])
    assert plan([64], 16) == (16, False, [4])  # 1x4K: one map round; the lead would be the longer
    assert plan([64] * 8, 32)[1:] == (False, [1] * 8)  # 8x4K
    size, led, parts = plan([1000, 24, 300], 16)  # varlen: one-partition sequences stay as they are
    assert led and parts[1] == 1
    # the model: with the lead, 1x128K costs 228 x (2 + 2) map steps against 256 x (2 + 2)
    assert tc.predicted_cost([2048], 228, True, 16, 2, 2, 264) == 912
    assert tc.predicted_cost([2048], 256, False, 16, 2, 2, 264) == 1024
    assert tc.auto_partitions([2048], 16, 2, 2, torch.device("cpu")) == (2048, False)


def test_lead_plan_tables():
    """`_plan` with the lead: a sequence of several partitions has its first as a lead row that
    reads h0 at its sequence (slot) and writes its end state at the second partition's start
    (seq), no map for it, and output rows for the rest; one-partition sequences are untouched.
    Rows are sorted longest first."""
    from flashdelta.triton import chunk as tc

    seqs = ((0, 0, 640), (0, 640, 700), (0, 700, 956))  # 10, 1 and 4 chunks
    plain = tc._plan(seqs, 4, torch.device("cpu"), False)
    led = tc._plan(seqs, 4, torch.device("cpu"), True)
    assert plain["num_slots"] == led["num_slots"] == 3 + 1 + 1 and plain["num_leads"] == 0
    assert led["leads"].tolist() == [[0, 0, 256, 1, 0, 1]]
    # rows longest first (the GPU starts them in that order), ties in sequence order
    assert led["parts"].tolist() == [[0, 256, 512, 0, 1, 0], [0, 700, 956, 2, 4, 1], [0, 512, 640, 0, 2, 1],
                                     [0, 640, 700, 1, 3, 1]]
    assert plain["parts"].tolist() == [[0, 0, 256, 0, 0, 0]] + led["parts"].tolist()
    assert led["maps"].tolist() == [[0, 256, 512, 0, 0, 0]]  # the second of three partitions only
    assert plain["maps"].tolist() == [[0, 0, 256, 0, 0, 0], [0, 256, 512, 0, 1, 0]]
    assert led["chains"].tolist() == [[0, 3, 0, 0], [3, 1, 1, 1], [4, 1, 1, 2]]
    assert plain["chains"].tolist() == [[0, 3, 0, 0], [3, 1, 2, 1], [4, 1, 2, 2]]
    assert led["partitioned"] and not tc._plan(seqs, 10, torch.device("cpu"), True)["partitioned"]


@pytest.mark.parametrize("which", ["final_state_out", "out"])
def test_preallocated_outputs_of_the_wrong_size_are_refused(which, device):
    """`out` / `final_state_out` sized for fewer sequences (or tokens) than the call writes: a
    ValueError naming the argument, nothing written (a GPU run once wrote past such a state buffer
    and took the CUDA context down: NOTES.md v5.16)."""
    case = make_case("random", torch.bfloat16, device, seq_len=70, batch=2)
    hv, dk, dv = case.v.shape[2], case.q.shape[3], case.v.shape[3]
    bufs = dict(out=torch.full_like(case.v, float("nan")),
                final_state_out=torch.full((2, hv, dk, dv), float("nan"), device=case.q.device))
    bufs[which] = bufs[which][:1].clone()  # one sequence's worth
    with pytest.raises(ValueError, match=which):
        chunk_gated_delta_rule_fwd(*case.args(), dk**-0.5, None, True, **bufs)
    assert all(torch.isnan(b).all() for b in bufs.values())

"""The Gluon passes' host side, on the CPU. Gluon kernels do not run in the interpreter, so CI
cannot execute them (the GPU tests do, against the Triton passes and the oracle); what CI can
check is that the launch wrappers hand each kernel argument the right tensor, stride and
constant, and that the prefill routes its map and output passes to them with the right
buffers. A swapped argument here would be a wrong answer on every Hopper GPU."""

import inspect
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from flashdelta.testing import make_case  # noqa: E402
from flashdelta.triton import chunk as tc  # noqa: E402
from flashdelta.triton import chunk_sm90, inverse_sm90  # noqa: E402


class _Recorder:
    """Stands in for the Gluon kernel: `kernel[grid](...)` records the grid and the arguments
    bound to the kernel's own parameter names."""

    def __init__(self, kernel=None):
        self.calls = []
        self.params = inspect.signature((kernel or chunk_sm90._recurrence_kernel).fn).parameters

    def __getitem__(self, grid):
        def launch(*args, num_warps, maxnreg=None, **kwargs):
            bound = inspect.Signature(list(self.params.values())).bind(*args, **kwargs)
            self.calls.append((grid, num_warps, dict(bound.arguments, maxnreg=maxnreg)))
        return launch


def _inputs(b=2, t=192, h=2, hv=4, dk=128, dv=128):
    q, k = (torch.randn(b, t, h, dk).bfloat16() for _ in range(2))
    v = torch.randn(b, t, hv, dv).bfloat16()
    tinv = torch.randn(b, t, 2 * hv, chunk_sm90.CHUNK_SIZE).bfloat16()
    gcum = torch.randn(b, t, hv, 2)
    return q, k, v, tinv, gcum


def _check_tiles(a, q, k, v, tinv):
    for name, x, cols in (("q_desc", q, 128), ("k_desc", k, 128), ("v_desc", v, chunk_sm90.BLOCK_V),
                          ("t_desc", tinv, chunk_sm90.CHUNK_SIZE)):
        d = a[name]
        bsz, t_len, heads, dim = x.shape
        assert d.base is x, name
        assert list(d.shape) == [bsz * t_len, heads * dim] and list(d.strides) == [x.stride(1), 1], name
        assert list(d.block_shape) == [chunk_sm90.CHUNK_SIZE, cols], name


@pytest.mark.parametrize("o_tma, wide_ks", [(False, True), (True, True), (True, False)])
def test_output_pass_binds_its_arguments(monkeypatch, o_tma, wide_ks):
    rec = _Recorder()
    monkeypatch.setattr(chunk_sm90, "_recurrence_kernel", rec)
    q, k, v, tinv, gcum = _inputs()
    o = torch.empty_like(v)
    state_in = torch.empty(3, 4, 128, 128)
    final = torch.empty(2, 4, 128, 128)
    parts = torch.zeros(3, 6, dtype=torch.int32)
    o_desc = chunk_sm90.descriptor(o, chunk_sm90.BLOCK_V) if o_tma else None
    chunk_sm90.output_pass(q, k, v, gcum, tinv, o, state_in, final, parts, 3, True, 0.125, 4, 2, False,
                           o_desc=o_desc, wide_ks=wide_ks)
    ((grid, warps, a),) = rec.calls
    assert a["WIDE_KS"] is wide_ks  # K S as one product K [S_hi | S_lo], or two
    # o's full chunks by TMA: [B * T, HV * V] in [64, 64] tiles, the kernel's constant follows
    assert a["o_desc"] is o_desc and a["O_TMA"] is o_tma
    if o_tma:
        assert o_desc.base is o and list(o_desc.shape) == [2 * 192, 4 * 128]
        assert list(o_desc.strides) == [o.stride(1), 1] and list(o_desc.block_shape) == [64, chunk_sm90.BLOCK_V]
    assert a["PACKED_SPLIT"] is False
    assert grid == (3 * 4 * (128 // chunk_sm90.BLOCK_V),) and warps == chunk_sm90.NUM_WARPS  # rows x heads x blocks
    _check_tiles(a, q, k, v, tinv)
    assert a["gcum_ptr"] is gcum and a["o_ptr"] is o and a["part_ptr"] is parts
    assert a["state_in_ptr"] is state_in and a["state_out_ptr"] is final
    assert a["map_d_ptr"] is None and a["map_m_ptr"] is None
    assert (a["s_cb"], a["s_ct"], a["s_ch"]) == gcum.stride()[:3]
    assert (a["s_ob"], a["s_ot"], a["s_oh"]) == o.stride()[:3]
    assert a["scale"] == 0.125 and a["t_total"] == 192
    assert (a["HV"], a["GROUP"], a["K"], a["V"]) == (4, 2, 128, 128)
    assert a["MAP"] is False and a["HAS_STATE_IN"] and a["PARTITIONED"] and a["STORE_FINAL"]


@pytest.mark.parametrize("transposed", [False, True])
def test_map_pass_binds_its_arguments(monkeypatch, transposed):
    """Both map kernels: `_recurrence_kernel` with MAP, `_map_kernel_t` (transposed tiles, the
    default): the same grid (D's column blocks, then M's) and buffers."""
    name = "_map_kernel_t" if transposed else "_recurrence_kernel"
    rec = _Recorder(getattr(chunk_sm90, name))
    monkeypatch.setattr(chunk_sm90, name, rec)
    q, k, v, tinv, gcum = _inputs(dv=64)
    map_d = torch.empty(5, 4, 128, 64)
    map_m = torch.empty(5, 4, 128, 128)
    maps = torch.zeros(5, 6, dtype=torch.int32)
    warm = torch.zeros(5, 4, 2, dtype=torch.int32)
    chunk_sm90.map_pass(q, k, v, gcum, tinv, map_d, map_m, maps, 5, 4, 2, True, transposed=transposed)
    chunk_sm90.map_pass(q, k, v, gcum, tinv, map_d, map_m, maps, 5, 4, 2, True, warm=warm, transposed=transposed)
    ((grid, _, a), (_, _, a_warm)) = rec.calls
    assert a["warm_ptr"] is None and a["WARM"] is False
    assert a_warm["warm_ptr"] is warm and a_warm["WARM"] is True
    assert a["PACKED_SPLIT"] is True
    assert grid == (5 * 4 * (64 // chunk_sm90.BLOCK_V + 128 // chunk_sm90.BLOCK_V),)  # D's column blocks, then M's
    if transposed:  # (it reads no q: its tiles are k, v and T_u's)
        assert "q_desc" not in a
        a = dict(a, q_desc=chunk_sm90.descriptor(q, 128))
    else:
        assert "WIDE_KS" not in a  # the map pass keeps K S as two products (the kernel's default)
        assert a["o_ptr"] is None and a["state_in_ptr"] is None and a["state_out_ptr"] is None
        assert a["MAP"] is True and not a["HAS_STATE_IN"] and not a["STORE_FINAL"]
    _check_tiles(a, q, k, v, tinv)
    assert a["map_d_ptr"] is map_d and a["map_m_ptr"] is map_m and a["part_ptr"] is maps
    assert (a["s_cb"], a["s_ct"], a["s_ch"]) == gcum.stride()[:3] and a["t_total"] == 192
    assert (a["HV"], a["GROUP"], a["K"], a["V"]) == (4, 2, 128, 64)


@pytest.mark.parametrize("decay_bound, t_tma, per_program, programs", [
    (False, False, 1, 7), (True, False, 1, 7), (True, True, 1, 7), (True, True, 3, 3), (False, True, 8, 1)])
def test_inverse_binds_its_arguments(monkeypatch, decay_bound, t_tma, per_program, programs):
    rec = _Recorder(inverse_sm90._inverse_kernel)
    monkeypatch.setattr(inverse_sm90, "_inverse_kernel", rec)
    q, k, v, tinv, gcum = _inputs(t=200)
    g, beta = torch.randn(2, 200, 4), torch.rand(4, 200, 2).permute(2, 1, 0)  # beta: a strided view
    bound = torch.empty(2, 200, 4)
    chunks = torch.zeros(7, 3, dtype=torch.int32)
    k_desc = chunk_sm90.descriptor(k, 128)
    t_desc = chunk_sm90.descriptor(tinv, chunk_sm90.CHUNK_SIZE) if t_tma else None
    inverse_sm90.inverse(k, g, beta, tinv, gcum, chunks, 7, bound, 4, 2, decay_bound, k_desc, t_desc=t_desc,
                         per_program=per_program)
    ((grid, warps, a),) = rec.calls
    # full chunks' T_u by TMA through the output pass's T_u descriptor ([64, 64] tiles of the pair)
    assert a["t_desc"] is t_desc and a["T_TMA"] is t_tma
    # programs of per_program chunk rows (the last one may have fewer) x value heads
    assert grid == (programs, 4) and warps == inverse_sm90.NUM_WARPS
    assert a["num_chunks"] == 7 and a["per_program"] == per_program
    assert a["maxnreg"] == inverse_sm90.MAX_REGISTERS == 128  # four programs per SM
    assert a["k_desc"] is k_desc and a["g_ptr"] is g and a["beta_ptr"] is beta and a["t_ptr"] is tinv
    assert a["gcum_ptr"] is gcum and a["chunk_ptr"] is chunks and a["bound_ptr"] is bound
    assert (a["s_gb"], a["s_gt"], a["s_gh"]) == g.stride() and (a["s_bb"], a["s_bt"], a["s_bh"]) == beta.stride()
    assert (a["s_tb"], a["s_tt"], a["s_th"]) == tinv.stride()[:3] and (a["s_cb"], a["s_ct"], a["s_ch"]) == gcum.stride()[:3]
    assert (a["s_ub"], a["s_ut"], a["s_uh"]) == bound.stride() and a["t_total"] == 200
    assert (a["GROUP"], a["K"], a["DECAY_BOUND"]) == (2, 128, decay_bound)


@pytest.mark.parametrize("partition_chunks, out, l2norm, dtype", [
    (1, None, False, torch.bfloat16), (None, None, False, torch.bfloat16), (None, "misaligned", False, torch.bfloat16),
    (1, None, "output", torch.bfloat16), (1, None, "inverse", torch.bfloat16), (1, None, False, torch.float16),
    (1, None, "output", torch.float16)])
def test_prefill_routes_its_passes_to_gluon(monkeypatch, partition_chunks, out, l2norm, dtype, device):
    """With the Gluon passes taken (forced here, wherever the test runs), the prefill hands them the
    inverse's T_u pair and gate sums, the maps' buffers and the chain's starts, and o's TMA
    descriptor where TMA can write o (not into a caller's `out` 2 bytes off 16-byte alignment).
    With the in-kernel L2 norm (`l2norm`: where q's norms are summed, TUNING["gluon_q_norms"]),
    every Gluon kernel is told to fold it, and the gate sums get the norms' two fields
    (chunk_sm90 module doc); q's norms come from the output and lead passes' q tiles, or from
    the inverse, which then gets q. fp16 inputs (v5.13) take the same kernels, the map pass without
    transposed tiles (`_map_kernel_t` takes bf16 only)."""
    calls = {}

    def map_pass(q, k, v, gcum, tinv, map_d, map_m, maps, num_maps, hv, group, packed_split, descs, warm,
                 sites=None, device_index=0, transposed=False, l2norm=False, single=0):
        assert single == 0  # (the single-product experiment is off unless TUNING asks for it)
        calls["map_l2norm"] = l2norm
        calls["map_descs"] = descs
        calls["map_transposed"] = transposed
        calls["warm"] = None if warm is None else warm.shape
        calls["map"] = dict(gcum=gcum.shape, tinv=(tinv.shape, tinv.dtype), map_d=map_d.shape, map_m=map_m.shape,
                            maps=maps.shape, num_maps=num_maps, hv=hv, group=group)
        map_d.zero_()
        map_m.zero_()

    def output_pass(q, k, v, gcum, tinv, o, state_in, final, parts, num_parts, partitioned, scale, hv, group,
                    packed_split, descs, split_qs, may_be_empty=False, sites=None, device_index=0, site=None,
                    transposed=False, o_desc=None, wide_ks=True, l2norm=False, q_norms=False, single=0):
        assert site == "output pass" and transposed is False
        assert single == 0  # (the single-product experiment is off unless TUNING asks for it)
        calls["out_l2norm"] = l2norm
        calls["out_q_norms"] = q_norms
        calls["out_descs"] = descs
        calls["o_desc"] = o_desc
        calls["split_qs"] = split_qs
        calls["wide_ks"] = wide_ks
        calls["gcum_strides"] = gcum.stride()
        calls["out"] = dict(state_in=None if state_in is None else state_in.shape, final=final.shape,
                            parts=parts.shape, num_parts=num_parts, partitioned=partitioned, scale=scale, hv=hv,
                            group=group, o=o.shape)
        o.zero_()
        final.zero_()

    def inverse(k, g, beta, tinv, gcum, chunks, num_chunks, bound, hv, group, decay_bound, k_desc, sites=None,
                device_index=0, t_desc=None, per_program=1, l2norm=False, q=None):
        calls["inverse_l2norm"] = l2norm
        calls["inverse_q"] = q
        # the Triton inverse on the same buffers, so that what reads them downstream runs as it would
        calls["inverse"] = dict(tinv=(tinv.shape, tinv.dtype), gcum=gcum.shape, chunks=chunks.shape,
                                num_chunks=num_chunks, hv=hv, group=group, decay_bound=decay_bound,
                                bound=bound.shape if decay_bound else None, k_desc=k_desc, t_desc=t_desc,
                                per_program=per_program)
        cfg = tc.launch_config(k.dtype, 128, 128, group, hv, False)["inverse"]
        tc._inverse_kernel[(num_chunks, hv)](k, k, g, beta, tinv, gcum, chunks, bound, *k.stride(), *k.stride(),
                                             *g.stride(),
                                             *beta.stride(), *tinv.stride()[:3], *gcum.stride()[:3],
                                             *bound.stride()[:3], DECAY_BOUND=decay_bound, **cfg)

    monkeypatch.setattr(chunk_sm90, "may_run", lambda q, v: True)
    monkeypatch.setattr(chunk_sm90, "supported", lambda q, v, rec: True)
    if l2norm:
        monkeypatch.setitem(tc.TUNING, "gluon_q_norms", l2norm)
    monkeypatch.setattr(inverse_sm90, "inverse", inverse)
    monkeypatch.setattr(chunk_sm90, "map_pass", map_pass)
    monkeypatch.setattr(chunk_sm90, "output_pass", output_pass)
    case = make_case("random", dtype, device, seed=1, seq_len=200, heads=2, value_heads=4, dk=128)
    q, k, v, g, beta = case.args()
    if out == "misaligned":
        out = torch.empty(v.numel() + 1, dtype=v.dtype, device=device)[1:].view(v.shape)
    o, _ = tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 0.125, None, True, None, bool(l2norm),
                                         partition_chunks=partition_chunks, out=out)
    fields = 4 if l2norm else 2  # (G's hi and lo; with the norm also n_k, 1 / |q|)
    fold = bool(l2norm)
    assert calls["out_l2norm"] is fold and calls.get("map_l2norm", fold) is fold
    assert calls["inverse_l2norm"] is fold
    assert calls["inverse_q"] is (q if l2norm == "inverse" else None)
    assert calls["out_q_norms"] is (l2norm == "output")
    assert out is None or o is out
    bsz, t_len = q.shape[:2]
    if partition_chunks == 1:  # 4 chunks: 4 partitions, 3 maps, the chain's 4 starts
        assert calls["map"] == dict(gcum=(bsz, t_len, 4, fields), tinv=((bsz, t_len, 8, 64), torch.bfloat16),
                                    map_d=(3 * bsz, 4, 128, 128), map_m=(3 * bsz, 4, 128, 128),
                                    maps=(3 * bsz, 6), num_maps=3 * bsz, hv=4, group=2)
        # the warm-start table (skip_negligible_maps): per map row and value head
        assert calls["warm"] == ((3 * bsz, 4, 2) if tc.TUNING["skip_negligible_maps"] else None)
        assert calls["out"]["state_in"] == (4 * bsz, 4, 128, 128) and calls["out"]["partitioned"]
        assert calls["out"]["num_parts"] == 4 * bsz
    else:  # one partition per sequence: no maps, no starts
        assert "map" not in calls
        assert calls["out"]["state_in"] is None and not calls["out"]["partitioned"]
        assert calls["out"]["num_parts"] == bsz
    assert calls["out"]["final"] == (bsz, 4, 128, 128) and calls["out"]["o"] == tuple(v.shape)
    assert calls["out"]["scale"] == 0.125 and (calls["out"]["hv"], calls["out"]["group"]) == (4, 2)
    assert calls["split_qs"] is tc.TUNING["gluon_split_qs"]
    assert calls["wide_ks"] is tc.TUNING["gluon_wide_ks"]
    if partition_chunks:
        assert calls["map_transposed"] is (tc.TUNING["gluon_map_transposed"] and dtype == torch.bfloat16)
    # the gates' prefix sums head-major: a chunk's (hi, lo) pairs of one head are contiguous
    assert calls["gcum_strides"] == (4 * t_len * fields, fields, t_len * fields, 1)
    # o's descriptor for the TMA stores (on by default; o is the prefill's own, TMA-readable)
    if tc.TUNING["gluon_o_tma"] and out is None:
        o_desc = calls["o_desc"]
        assert o_desc.base is o
        assert o_desc.shape[0] == bsz * t_len and o_desc.shape[1] == 4 * 128 and o_desc.base.shape == v.shape
        assert list(o_desc.block_shape) == [64, chunk_sm90.BLOCK_V]
    else:
        assert calls["o_desc"] is None
    # one set of tile descriptors per call, shared by the passes: q, k, v and T_u's pair; the
    # Gluon inverse (on by default) reads k's
    descs = calls["out_descs"]
    assert all(d.base is x for d, x in zip(descs, (q, k, v))) and descs[3].base.shape == (bsz, t_len, 8, 64)
    assert "map" not in calls or calls["map_descs"] is descs
    if tc.TUNING["gluon_inverse"]:
        inv = calls["inverse"]
        assert inv["k_desc"] is descs[1] and inv["tinv"] == ((bsz, t_len, 8, 64), torch.bfloat16)
        # full chunks' T_u by TMA through T_u's descriptor (on by default)
        assert inv["t_desc"] is (descs[3] if tc.TUNING["gluon_inverse_tma"] else None)
        assert inv["gcum"] == (bsz, t_len, 4, fields) and (inv["hv"], inv["group"]) == (4, 2)
        assert inv["num_chunks"] == bsz * 4 and inv["chunks"][0] >= inv["num_chunks"]
        # chunks per program: as many as keep four programs per SM, at most the tuning's limit
        assert inv["per_program"] == inverse_sm90.chunks_per_program(bsz * 4, 4, tc.inverse_slots(q.device),
                                                                     tc.TUNING["inverse_chunks_per_program"])
        # the map-norm bounds where maps may be skipped
        assert inv["decay_bound"] == ("map" in calls and tc.TUNING["skip_negligible_maps"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gluon_scope_by_dtype(monkeypatch, dtype):
    """The Gluon kernels take bf16 and fp16 inputs on sm_90 (fp16: the scaled fp16 pairs, v5.13), at
    K = 128 and 256, with the launch config's recurrence for that dtype (fp16: q, k not exact bf16
    operands, T_u a bf16 pair); fp32 inputs stay on the Triton passes (3xTF32). With
    TUNING["gluon_fp16"] off, fp16 takes the Triton passes too (A/B checks)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    half = dtype in (torch.bfloat16, torch.float16)
    for dk, may_run, supported in ((128, chunk_sm90.may_run, chunk_sm90.supported),
                                   (256, chunk_sm90.may_run_256, chunk_sm90.supported_256)):
        q = SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=dtype, shape=(1, 64, 2, dk))
        v = SimpleNamespace(shape=(1, 64, 4, dk))
        rec = dict(tc.launch_config(dtype, dk, dk, 2, 4, False)["recurrence"], TMA=True, TMA_T=True)
        assert may_run(q, v) is half and supported(q, v, rec) is half, (dk, rec)
    if dtype == torch.float16:  # _setup's choice, on CPU tensors with the predicates forced as on sm_90
        monkeypatch.setattr(chunk_sm90, "may_run", lambda q, v: q.dtype in chunk_sm90.HALF)
        monkeypatch.setattr(chunk_sm90, "supported", lambda q, v, rec: True)
        case = make_case("random", dtype, "cpu", seed=1, seq_len=64, heads=2, value_heads=4, dk=128)
        q, k, v = case.args()[:3]
        seqs = ((0, 0, 64),)
        assert tc._setup(q, k, v, seqs, False, None)[3] is True
        monkeypatch.setitem(tc.TUNING, "gluon_fp16", False)
        assert tc._setup(q, k, v, seqs, False, None)[3] is False


@pytest.mark.parametrize("partition_chunks, l2norm, gluon_inverse", [
    (1, False, True), (None, False, True), (1, True, True), (1, True, False), (None, True, False)])
def test_prefill_routes_k256_to_gluon_passes(monkeypatch, partition_chunks, l2norm, gluon_inverse, device):
    """At K = 256 (forced here, wherever the test runs: chunk_sm90.supported_256) the Gluon output,
    lead and map passes get the inverse's T_u pair and gate sums, column blocks of 32: v's and o's
    descriptors 32 wide, the map pass the same descriptors. The inverse: Gluon (k's descriptor 256
    wide, chunks per program for two programs per SM), or with TUNING["gluon_inverse"] off the
    Triton one. With the norm: all four gcum fields; q's norms written by the inverse, never summed
    by the output pass's column blocks (each would sum them again: 1.76 -> 2.33 ms for FLA's
    K256/V512 layer). With TUNING["gluon_map_256"] off the Triton map pass runs."""
    calls = {"map": 0}

    def map_pass(q, k, v, gcum, tinv, map_d, map_m, maps, num_maps, hv, group, packed_split, descs, warm,
                 sites=None, device_index=0, l2norm=False, block_v=64):
        calls["map"] += 1
        calls["map_args"] = dict(descs=descs, block_v=block_v, l2norm=l2norm, map_d=map_d.shape, map_m=map_m.shape,
                                 tinv=(tinv.shape, tinv.dtype), gcum=gcum.shape)
        map_d.zero_()
        map_m.zero_()

    def output_pass(q, k, v, gcum, tinv, o, state_in, final, parts, num_parts, partitioned, scale, hv, group,
                    packed_split, descs, split_qs, sites=None, device_index=0, site="output pass", o_desc=None,
                    wide_ks=True, l2norm=False, block_v=64, may_be_empty=False, q_norms=False):
        calls.setdefault("sites", []).append(site)
        calls["out"] = dict(descs=descs, o_desc=o_desc, block_v=block_v, l2norm=l2norm, split_qs=split_qs,
                            wide_ks=wide_ks, gcum=gcum.shape, tinv=(tinv.shape, tinv.dtype), partitioned=partitioned,
                            state_in=None if state_in is None else state_in.shape, q_norms=q_norms)
        o.zero_()
        final.zero_()

    def fake_inverse(k, g, beta, tinv, gcum, chunks, num_chunks, bound, hv, group, decay_bound, k_desc, sites=None,
                     device_index=0, t_desc=None, per_program=1, l2norm=False, q=None):
        calls["inverse"] = dict(k_desc=k_desc, t_desc=t_desc, per_program=per_program, l2norm=l2norm, q=q,
                                num_chunks=num_chunks)
        cfg = tc.launch_config(k.dtype, 256, 256, group, hv, l2norm)["inverse"]  # the Triton one on its buffers
        tc._inverse_kernel[(num_chunks, hv)](k if q is None else q, k, g, beta, tinv, gcum, chunks, bound,
                                             *k.stride(), *k.stride(), *g.stride(), *beta.stride(),
                                             *tinv.stride()[:3], *gcum.stride()[:3], *bound.stride()[:3],
                                             DECAY_BOUND=decay_bound, **cfg)

    monkeypatch.setitem(tc.TUNING, "gluon_inverse", gluon_inverse)
    monkeypatch.setattr(chunk_sm90, "may_run_256", lambda q, v: True)
    monkeypatch.setattr(chunk_sm90, "supported_256", lambda q, v, rec: True)
    monkeypatch.setattr(inverse_sm90, "inverse", fake_inverse)
    monkeypatch.setattr(chunk_sm90, "map_pass", map_pass)
    monkeypatch.setattr(chunk_sm90, "output_pass", output_pass)
    case = make_case("random", torch.bfloat16, device, seed=2, seq_len=130, heads=2, value_heads=4, dk=256)
    q, k, v, g, beta = case.args()
    o, s = tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 0.0625, None, True, None, l2norm,
                                         partition_chunks=partition_chunks)
    bsz, t_len = q.shape[:2]
    out = calls["out"]
    assert out["block_v"] == chunk_sm90.BLOCK_V_256 == 32 and out["l2norm"] is l2norm
    q_norms_out = False  # (at K = 256 the inverse sums q's norms: the Gluon one is given q, the Triton one reads it)
    assert out["q_norms"] is q_norms_out
    if gluon_inverse:
        inv = calls["inverse"]
        assert inv["k_desc"] is out["descs"][1] and inv["l2norm"] is l2norm
        assert inv["q"] is (q if l2norm and not q_norms_out else None)
        assert inv["t_desc"] is (out["descs"][3] if tc.TUNING["gluon_inverse_tma"] else None)
        assert inv["per_program"] == inverse_sm90.chunks_per_program(
            inv["num_chunks"], 4, tc.inverse_slots(q.device, 256), tc.TUNING["inverse_chunks_per_program"])
    else:
        assert "inverse" not in calls
    assert out["split_qs"] is tc.TUNING["gluon_split_qs"] and out["wide_ks"] is tc.TUNING["gluon_wide_ks"]
    descs = out["descs"]
    assert [d.base for d in descs[:3]] == [q, k, v] and descs[3].base.shape == (bsz, t_len, 8, 64)
    assert [list(d.block_shape) for d in descs] == [[64, 256], [64, 256], [64, 32], [64, 64]]
    assert out["tinv"] == ((bsz, t_len, 8, 64), torch.bfloat16) and out["gcum"] == (bsz, t_len, 4, 4 if l2norm else 2)
    if tc.TUNING["gluon_o_tma"]:
        assert out["o_desc"].base is o and list(out["o_desc"].block_shape) == [64, 32]
    if partition_chunks == 1:  # 3 partitions per sequence: maps, and the output pass from the chain's starts
        assert calls["map"] == 1 and calls["map_args"]["descs"] is descs and calls["map_args"]["block_v"] == 32
        assert calls["map_args"]["map_m"] == (2 * bsz, 4, 256, 256) and calls["map_args"]["l2norm"] is l2norm
        assert out["partitioned"] and out["state_in"] == (3 * bsz, 4, 256, 256)
        monkeypatch.setitem(tc.TUNING, "gluon_map_256", False)  # the Triton map pass (runs here, interpreted)
        tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 0.0625, None, True, None, l2norm, partition_chunks=1)
        assert calls["map"] == 1
    else:
        assert calls["map"] == 0 and not out["partitioned"] and out["state_in"] is None
    assert set(calls["sites"]) <= {"output pass", "lead pass"}


def test_inverse_chunks_per_program():
    """Each Gluon inverse program runs several chunks in turn, as many as finish the grid first
    in whole waves of `slots` programs (a program's first chunk costing a little more); never
    more than the limit, never fewer than one. The expected counts are the H100's best of
    1 .. 16 in v5.7's timings (NOTES.md)."""
    per = inverse_sm90.chunks_per_program
    assert per(64, 16, 528, 16) == 2  # 1x4K 16/16 on 132 SMs: 512 programs, one wave
    assert per(128, 16, 528, 16) == 4  # 1x8K: one wave of 4 (3 would take two waves of 3)
    assert per(256, 16, 528, 16) == 8  # 1x16K
    assert per(512, 16, 528, 16) == 16 and per(512, 32, 528, 16) == 16  # 1x32K, 8x4K 16/32
    assert per(2048, 16, 528, 16) == 16 and per(2048, 32, 528, 16) == 16  # 1x128K 16/16, 32/32
    assert per(2048, 16, 528, 8) == 8 and per(2048, 16, 528, 12) == 8  # the limit (powers of two)
    assert per(100, 1, 528, 16) == 1 and per(5, 4, 528, 16) == 1  # fewer chunks than slots
    assert per(2048, 16, 528, 1) == 1  # the limit 1: one chunk per program (v5.6's grid)
    assert per(2048, 16, 0, 16) == 1  # no device to fill (CPU)
    for n, hv, slots, limit in [(128, 16, 528, 16), (512, 32, 528, 4), (4096, 32, 264, 8), (1000, 7, 528, 16)]:
        p = per(n, hv, slots, limit)
        assert 1 <= p <= limit and p & (p - 1) == 0
        waves = lambda p: -(-(-(-n // p) * hv) // slots)  # noqa: E731
        assert waves(p) * p <= waves(1) * (1 + inverse_sm90.START_COST)  # never slower than one per program

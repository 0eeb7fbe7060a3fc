"""Compile the kernels for a GPU target without a GPU, with the host's own launch parameters.

    python -m flashdelta.triton.aot [--arch 90]

Prints one JSON line per kernel: name, sizes, shared memory bytes. The tests run it in a
subprocess (the kernels must not have been created under TRITON_INTERPRET=1) to check that
every launch fits in shared memory; it also reads resources before spending GPU time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import chunk as tc
from . import decode as td
from . import recurrent as tr

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _pointers(dtype) -> dict:
    io = "*" + TYPES[dtype]
    types = {n: io for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    types.update({n: "*fp32" for n in ("g_ptr", "beta_ptr", "t_ptr", "gcum_ptr", "state_in_ptr", "state_out_ptr",
                                       "map_d_ptr", "map_m_ptr", "h0_ptr", "starts_ptr", "ht_ptr", "bound_ptr")})
    types.update({n: "*i32" for n in ("chunk_ptr", "part_ptr", "seq_ptr", "cu_ptr", "warm_ptr", "map_ptr",
                                      "warm_ab_ptr", "rows_a_ptr", "rows_b_ptr", "rows_ptr")})
    types.update({"a_ptr": "*fp32", "b_ptr": "*fp32", "a_log_ptr": "*fp32", "dt_bias_ptr": "*fp32", "pool_ptr": "*fp32",
                  "idx_ptr": "*i64", "inter_ptr": "*fp32"})
    for name in ("softplus_beta", "softplus_threshold"):
        types[name] = "fp32"
    return types


def compile_kernel(fn, pointer_types: dict, params: dict, arch: int = 90):
    options = {k: params[k] for k in ("num_warps", "num_stages", "maxnreg") if k in params}
    constexprs = {k: v for k, v in params.items() if k not in options}
    # contiguous tensors: a launch specialises the innermost strides (== 1) as constants,
    # which lets Triton vectorise and pipeline the tile loads (and use more shared memory)
    constexprs.update({name: 1 for name in fn.arg_names if name in ("s_qd", "s_kd", "s_vd")})
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointer_types.get(name, "fp32" if name == "scale" else "i32")
    # A real launch tells the compiler that pointers and strides are multiples of 16 (torch
    # allocations and K, V multiples of 16 are); with it Triton pipelines loads through
    # shared memory (cp.async), which is what can overflow it, so say the same here.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (signature[name].startswith("*") or name.startswith("s_"))}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _descriptors(dtype, rec: dict) -> dict:
    """Signature types of the recurrence's TMA descriptor arguments (as a launch mangles them)."""
    io = TYPES[dtype]
    tile = lambda ty, cols: f"tensordesc<{ty}[{tc.CHUNK_SIZE},{cols}]>"  # noqa: E731
    descs = {"q_ptr": tile(io, rec["BK"]), "k_ptr": tile(io, rec["BK"]), "v_ptr": tile(io, rec["BV"])}
    if rec["TMA_T"]:
        descs["t_ptr"] = tile("bf16" if rec["T_SPLIT"] else "fp32", tc.CHUNK_SIZE)
    return descs


def prefill_kernels(dtype, dk: int, dv: int | None = None, arch: int = 90, l2norm: bool = False):
    """The prefill's Triton kernels at K = dk, V = dv (default dk), as `chunk.launch_config` launches them.
    l2norm: the kernels that differ with the in-kernel L2 norm (inverse, output and map passes), named
    with ", l2norm"."""
    cfg = tc.launch_config(dtype, dk, dv or dk, group=2, hv=32, use_qk_l2norm=l2norm)
    ptrs = _pointers(dtype)
    if cfg["inverse"]["T_SPLIT"]:
        ptrs["t_ptr"] = "*bf16"
    tag = ", l2norm" if l2norm else ""
    if not l2norm:
        yield "inverse", compile_kernel(tc._inverse_kernel, ptrs, dict(cfg["inverse"], DECAY_BOUND=False), arch)
    yield "inverse" + (tag or ", map bounds"), compile_kernel(tc._inverse_kernel, ptrs,
                                                             dict(cfg["inverse"], DECAY_BOUND=True), arch)
    if not l2norm:
        yield "choose plan", compile_kernel(tc._choose_plan_kernel, ptrs,
                                            dict(HV=32, NVB=2, NKB=2, SLOTS=264, BLOCK=256), arch)
        yield "warm start", compile_kernel(tc._warm_start_kernel, ptrs,
                                           dict(HV=32, LIMIT=tc.NEGLIGIBLE_LOG2, BLOCK=64), arch)
    if cfg["recurrence"]["TMA"]:
        ptrs = {**ptrs, **_descriptors(dtype, cfg["recurrence"])}
    yield "output pass" + tag, compile_kernel(tc._recurrence_kernel, ptrs, dict(
        cfg["recurrence"], MAP=False, PARTITIONED=True, HAS_STATE_IN=True, STORE_FINAL=True, WARM=False), arch)
    yield "map pass" + tag, compile_kernel(tc._recurrence_kernel, ptrs, dict(
        cfg["recurrence"], MAP=True, PARTITIONED=True, HAS_STATE_IN=False, STORE_FINAL=False,
        WARM=tc.TUNING["skip_negligible_maps"], **cfg["map_launch"]), arch)
    if not l2norm:
        yield "chain", compile_kernel(tc._chain_kernel, ptrs, dict(cfg["chain"], HAS_H0=True), arch)


def compile_gluon(fn, constexprs: dict, common: bool = True, arch: int = 90, io: str = "bf16", **options):
    """A Gluon kernel of chunk_sm90.py / inverse_sm90.py compiled as a launch specialises
    it: `constexprs` beside the defaults (GROUP 2, K 128; with `common`, the recurrence passes'
    HV, V = K and TUNING's choices; q's and k's tiles K wide, v's and o's BV, default
    chunk_sm90.BLOCK_V); q, k, v and o in `io` ("bf16" or "fp16"), T_u's pair bf16; other
    arguments as a launch types them."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from . import chunk_sm90 as g

    dk, bv = constexprs.get("K", 128), constexprs.get("BV", g.BLOCK_V)
    gl_io = {"bf16": gl.bfloat16, "fp16": gl.float16}
    tile = lambda cols, ty=io: f"tensordesc<{ty}[{g.CHUNK_SIZE},{cols}],{gl.NVMMASharedLayout.get_default_for([g.CHUNK_SIZE, cols], gl_io[ty])!r}>"  # noqa: E731,E501
    signature = {"q_desc": tile(dk), "k_desc": tile(dk), "v_desc": tile(bv),
                 "t_desc": tile(g.CHUNK_SIZE, "bf16"), "gcum_ptr": "*fp32", "o_ptr": "*" + io,
                 "state_in_ptr": "*fp32", "state_out_ptr": "*fp32", "map_d_ptr": "*fp32", "map_m_ptr": "*fp32",
                 "part_ptr": "*i32", "warm_ptr": "*i32", "scale": "fp32", "g_ptr": "*fp32", "beta_ptr": "*fp32",
                 "t_ptr": "*bf16", "chunk_ptr": "*i32", "bound_ptr": "*fp32", "o_desc": tile(bv), "q_ptr": "*" + io}
    signature = {n: t for n, t in signature.items() if n in fn.arg_names}
    if common:  # the recurrence passes' constants
        constexprs = dict(HV=32, V=dk, PARTITIONED=True, PACKED_SPLIT=tc.TUNING["gluon_packed_split"],
                          SPLIT_QS=tc.TUNING["gluon_split_qs"], **constexprs)
    constexprs = {"GROUP": 2, "K": 128, **constexprs}
    # constexpr parameters left out take their defaults, as at a launch (typed i32 they would
    # compile their branches at run time)
    constexprs.update({p.name: p.default for p in fn.params
                       if p.is_constexpr and p.has_default and p.name not in constexprs})
    signature.update({n: "constexpr" for n in constexprs})
    signature.update({n: "i32" for n in fn.arg_names if n not in signature})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n].startswith("*") or n.startswith("s_")}
    src = GluonASTSource(fn=fn, signature=signature,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=g.NUM_WARPS, **options))


def sm90_kernels_256(arch: int = 90, io: str = "bf16"):
    """The Gluon kernels at K = V = 256 (column blocks of chunk_sm90.BLOCK_V_256), as the K = 256
    launches specialise them (with the L2 norm q's norms summed by the inverse, read from gcum by
    the output pass); inputs in `io` ("bf16" or "fp16")."""
    from . import chunk_sm90 as g

    build = functools.partial(compile_gluon, arch=arch, io=io)
    shape = dict(K=256, BV=g.BLOCK_V_256)
    out = dict(shape, MAP=False, HAS_STATE_IN=True, STORE_FINAL=True, WARM=False, warm_ptr=None,
               WIDE_KS=tc.TUNING["gluon_wide_ks"], O_TMA=tc.TUNING["gluon_o_tma"],
               **({} if tc.TUNING["gluon_o_tma"] else {"o_desc": None}))
    yield "gluon output pass 256", build(g._recurrence_kernel, dict(out, MAY_BE_EMPTY=False))
    yield "gluon lead pass 256", build(g._recurrence_kernel, dict(out, MAY_BE_EMPTY=True))
    yield "gluon output pass 256, l2norm", build(g._recurrence_kernel, dict(out, MAY_BE_EMPTY=False, L2NORM=True))
    warm = tc.TUNING["skip_negligible_maps"]
    yield "gluon map pass 256", build(g._recurrence_kernel, dict(
        shape, MAP=True, HAS_STATE_IN=False, STORE_FINAL=False, WARM=warm, MAY_BE_EMPTY=False, o_desc=None,
        **({} if warm else {"warm_ptr": None})))
    yield from _gluon_inverses(arch, 256, " 256", sums_q_norms=True, io=io)


def sm90_kernels(arch: int = 90, io: str = "bf16"):
    """The Gluon kernels (chunk_sm90.py, inverse_sm90.py: K = 128), as a launch specialises them;
    inputs in `io`: "fp16" takes the map pass without transposed tiles and no transposed passes,
    as chunk.py launches it."""
    from . import chunk_sm90 as g

    build = functools.partial(compile_gluon, arch=arch, io=io)
    fp16 = io == "fp16"

    for name, mode in (("gluon output pass", dict(MAP=False, HAS_STATE_IN=True, STORE_FINAL=True, WARM=False,
                                                  MAY_BE_EMPTY=False)),
                       ("gluon lead pass", dict(MAP=False, HAS_STATE_IN=True, STORE_FINAL=True, WARM=False,
                                                MAY_BE_EMPTY=True)),
                       ("gluon map pass", dict(MAP=True, HAS_STATE_IN=False, STORE_FINAL=False,
                                               WARM=tc.TUNING["skip_negligible_maps"], MAY_BE_EMPTY=False)),
                       ("gluon map pass, l2norm", dict(MAP=True, HAS_STATE_IN=False, STORE_FINAL=False,
                                                       WARM=tc.TUNING["skip_negligible_maps"], MAY_BE_EMPTY=False,
                                                       L2NORM=True))):
        if name == "gluon map pass, l2norm" and not fp16:  # (bf16: the transposed one below)
            continue
        if not mode["WARM"]:  # launched with warm_ptr None (a constexpr)
            mode["warm_ptr"] = None
        mode["O_TMA"] = not mode["MAP"] and tc.TUNING["gluon_o_tma"]
        mode["WIDE_KS"] = not mode["MAP"] and tc.TUNING["gluon_wide_ks"]
        if not mode["O_TMA"]:  # launched with o_desc None
            mode["o_desc"] = None
        yield name, build(g._recurrence_kernel, mode)
        if "map pass" not in name:  # with the in-kernel L2 norm, folded (the map pass: the row above, or transposed)
            yield name + ", l2norm", build(g._recurrence_kernel, dict(
                mode, L2NORM=True, Q_NORMS=tc.TUNING["gluon_q_norms"] == "output"))
    if fp16:
        yield from _gluon_inverses(arch, 128, "", sums_q_norms=tc.TUNING["gluon_q_norms"] == "inverse", io=io)
        return
    # the output pass on transposed tiles (TUNING["gluon_transposed"], off by default)
    yield "gluon transposed output pass", build(g._output_kernel_t, dict(
        HAS_STATE_IN=True, STORE_FINAL=True, MAY_BE_EMPTY=False))
    warm = tc.TUNING["skip_negligible_maps"]
    for suffix, l2norm in (("", False), (", l2norm", True)):
        yield "gluon transposed map pass" + suffix, build(g._map_kernel_t, dict(
            HV=32, V=128, PACKED_SPLIT=tc.TUNING["gluon_packed_split"], WARM=warm, L2NORM=l2norm,
            **({} if warm else {"warm_ptr": None})), common=False)
    yield from _gluon_inverses(arch, 128, "", sums_q_norms=tc.TUNING["gluon_q_norms"] == "inverse")


def _gluon_inverses(arch: int, dk: int, suffix: str, sums_q_norms: bool, io: str = "bf16"):
    """The Gluon inverse (inverse_sm90.py) at K = dk, with and without the map-norm bounds and the
    norm (`sums_q_norms`: whether it sums q's norms then, as chunk.py launches it at this K);
    k (and q) in `io`."""
    from . import inverse_sm90 as inv

    for name, bound, l2norm in (("gluon inverse", False, False), ("gluon inverse, map bounds", True, False),
                                ("gluon inverse, map bounds, l2norm", True, True)):
        t_tma = tc.TUNING["gluon_inverse_tma"]
        q_norms = l2norm and sums_q_norms
        name = name.replace("gluon inverse", "gluon inverse" + suffix)
        yield name, compile_gluon(inv._inverse_kernel, dict(
            K=dk, DECAY_BOUND=bound, T_TMA=t_tma, L2NORM=l2norm, Q_NORMS=q_norms, **({} if t_tma else {"t_desc": None}),
            **({} if q_norms else {"q_ptr": None})), common=False, arch=arch, io=io, maxnreg=inv.MAX_REGISTERS)


def registers(kernel) -> dict:
    """Registers per thread and spill stack bytes of a compiled kernel (cuobjdump, shipped with
    Triton's NVIDIA backend), or {} where the tool is missing."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        return {}
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([path, "-res-usage", cubin], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def recurrent_kernels(dim: int, arch: int = 90):
    params = dict(tr.launch_config(dim, dim), HV=32, GROUP=2, K=dim, V=dim, VARLEN=True, HAS_H0=True,
                  STORE_FINAL=True, L2NORM=True, WHILE_LOOPS=False)
    yield "token loop", compile_kernel(tr._recurrent_kernel, _pointers(torch.bfloat16), params, arch)
    params = dict(td.launch_config(dim, dim), GROUP=2, K=dim, V=dim, VARLEN=False, L2NORM=True, STORE_INTER=True,
                  WHILE_LOOPS=False)
    yield "decode", compile_kernel(td._decode_kernel, _pointers(torch.bfloat16), params, arch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dims", default="64,128,256,256x512",
                    help="head dims: K (V = K) or KxV; the Gluon and token-loop kernels at K = V only")
    args = ap.parse_args()
    for spec in args.dims.split(","):
        dim, dv = (int(x) for x in spec.split("x")) if "x" in spec else (int(spec), int(spec))
        for dtype, l2norm in ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True),
                              (torch.float16, True), (torch.float32, True)):
            for name, k in prefill_kernels(dtype, dim, dv, args.arch, l2norm):
                print(json.dumps({"kernel": name, "dtype": TYPES[dtype], "dim": dim, "dim_v": dv,
                                  "shared": k.metadata.shared, "wgmma": k.asm["ptx"].count("wgmma.mma_async")}),
                      flush=True)
        if dv != dim:
            continue
        if dim in (128, 256) and args.arch == 90:
            for name, k in (sm90_kernels if dim == 128 else sm90_kernels_256)(args.arch):
                print(json.dumps({"kernel": name, "dtype": "bf16", "dim": dim, "shared": k.metadata.shared,
                                  "wgmma": k.asm["ptx"].count("wgmma.mma_async"), **registers(k)}), flush=True)
        for name, k in recurrent_kernels(dim, args.arch):
            print(json.dumps({"kernel": name, "dtype": "bf16", "dim": dim, "shared": k.metadata.shared}), flush=True)


if __name__ == "__main__":
    main()

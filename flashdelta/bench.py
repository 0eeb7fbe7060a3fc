"""`flashdelta bench`: time our paths and the peers' side by side, against the hardware floor.

One run measures the two ceilings (device copy bandwidth, read + write; matmul rate on
random data), then per shape and implementation: the median time, the floor
max(bytes / bandwidth, FLOPs / matmul rate) from `prefill_cost` / `decode_cost`, the
fraction of the floor reached, the speed-up against each peer, and the relative L2 error
against a reference output (`reference_output`: the fp64 token loop, or our fp32 torch
chunked path for long inputs), so a fast wrong kernel cannot win.

On a CPU-only machine it times the torch paths at small shapes; on a GPU it times the
Triton backend and every importable peer: flash-linear-attention (`fla`, with
FLA_FLASH_QLA=0 so its own Triton path runs) and FlashQLA (`flash_qla`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import api
from .testing import rel_l2

CHUNK = 64


# ---------------------------------------------------------------------------------------
# cost model: one documented function per op


def prefill_cost(seq_lens: list[int], heads: int, value_heads: int, dk: int, dv: int, in_bytes: int,
                 chunk: int = CHUNK) -> tuple[int, int]:
    """Fewest bytes and FLOPs of a chunked prefill.

    Bytes: read q, k ([T, H, K]) and v ([T, HV, V]) and write o ([T, HV, V]) at the input
    width; g and beta ([T, HV]) as fp32; the fp32 state read and written once per sequence.
    FLOPs per chunk and value head (full C x C products, as shared/design/gdn-math.md):
    K K^T and Q K^T (2 * 2C^2K), W = T K (2C^2K), U' = T V (2C^2V), W S, Q S and K~^T U
    (3 * 2CKV), (Q K^T o L) U (2C^2V), and the triangular inverse (C^3 / 3 * 2).
    At K = V = 128, C = 64 that is 11.72 MFLOP.
    """
    tokens = sum(seq_lens)
    data = tokens * ((2 * heads * dk + 2 * value_heads * dv) * in_bytes + 2 * value_heads * 4)
    state = 2 * len(seq_lens) * value_heads * dk * dv * 4
    c = chunk
    per_chunk = 2 * 2 * c * c * dk + 2 * c * c * dk + 2 * c * c * dv + 3 * 2 * c * dk * dv + 2 * c * c * dv + (
        2 * c**3 // 3)
    chunks = sum(math.ceil(n / c) for n in seq_lens)
    return data + state, chunks * value_heads * per_chunk


def decode_cost(batch: int, tokens: int, heads: int, value_heads: int, dk: int, dv: int, in_bytes: int,
                state_bytes: int) -> tuple[int, int]:
    """Fewest bytes and FLOPs of a decode step of `tokens` tokens per sequence.

    Bytes: the state read and written once per sequence (2 * B * HV * K * V * state_bytes),
    plus q, k, v, o per token at the input width and g, beta as fp32.
    FLOPs per token and value head: decay (KV), S^T k (2KV), the rank-1 update (2KV),
    S^T q (2KV): 7KV.
    """
    state = 2 * batch * value_heads * dk * dv * state_bytes
    data = batch * tokens * ((2 * heads * dk + 2 * value_heads * dv) * in_bytes + 2 * value_heads * 4)
    return state + data, batch * tokens * value_heads * 7 * dk * dv


# ---------------------------------------------------------------------------------------
# shapes


@dataclass
class Shape:
    suite: str  # "prefill" | "decode"
    name: str
    seq_lens: list[int]  # one entry per sequence (prefill); decode: [tokens] * batch
    heads: int
    value_heads: int
    dk: int = 128
    dv: int = 128
    gate: str = "strong"  # strong | weak
    varlen: bool = False
    graph: bool = False  # time a CUDA-graph replay (no host time: what the kernels take)
    l2norm: bool = False  # prefill: raw q, k and use_qk_l2norm_in_kernel=True (how Qwen3-Next calls it)
    dtype: str = "bfloat16"
    pool_dtype: str = "float32"  # decode: the state pool
    slots: int = 1024  # decode: pool size

    @property
    def tokens(self) -> int:
        """decode: tokens per sequence in one step (1, or speculative tokens)."""
        return self.seq_lens[0]

    @property
    def total_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def label(self) -> str:
        if self.suite == "prefill":
            # (inputs other than bf16 named after the rows' name: "1x32K fp16 h16/16 strong")
            tag = "" if self.dtype == "bfloat16" else f" {DTYPE_TAGS[self.dtype]}"
            return (f"{self.name}{tag} h{self.heads}/{self.value_heads} {self.gate}" + (" l2norm" if self.l2norm else "")
                    + (" graph" if self.graph else ""))
        pool = "" if self.pool_dtype == "float32" else f" {self.pool_dtype} pool"
        return f"{self.name} h{self.heads}/{self.value_heads}{pool} {'graph' if self.graph else 'eager'}"


DTYPE_TAGS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _mixed_lengths(total: int, n: int) -> list[int]:
    """n lengths summing to total, mixed: ratios 1:2:...:n shuffled deterministically."""
    weights = [1 + (7 * i) % n for i in range(n)]
    lens = [total * w // sum(weights) for w in weights]
    lens[0] += total - sum(lens)
    return lens


def gpu_shapes(suite: str, quick: bool) -> list[Shape]:
    prefill, decode = [], []
    rows = [("1x4K", [4096], 16, 16), ("1x8K", [8192], 16, 16), ("1x32K", [32768], 16, 16), ("1x128K", [131072], 16, 16),
            ("1x128K", [131072], 32, 32), ("1x32K", [32768], 16, 32), ("8x4K", [4096] * 8, 16, 32)]
    for gate in ("strong", "weak"):
        for name, lens, h, hv in rows:
            prefill.append(Shape("prefill", name, lens, h, hv, gate=gate))
        prefill.append(Shape("prefill", "varlen 64K/8", _mixed_lengths(65536, 8), 16, 32, gate=gate, varlen=True))
    # below ~16K tokens an eager call can take longer on the host than on the GPU (it then times
    # the machine's CPU, which varies between machines: NOTES.md v5.7): the same short rows as a
    # CUDA-graph replay time the kernels alone, for every implementation that captures
    for gate in ("strong", "weak"):
        for name, lens in (("1x4K", [4096]), ("1x8K", [8192])):
            prefill.append(Shape("prefill", name, lens, 16, 16, gate=gate, graph=True))
    # models call the op with raw q, k and the in-kernel L2 norm (Qwen3-Next, Qwen3.5)
    for gate in ("strong", "weak"):
        for name, lens, h, hv in rows[2:4] + rows[5:]:
            prefill.append(Shape("prefill", name, lens, h, hv, gate=gate, l2norm=True))
        prefill.append(Shape("prefill", "varlen 64K/8", _mixed_lengths(65536, 8), 16, 32, gate=gate, varlen=True,
                             l2norm=True))
    # head dims other than 128: K = 64, K = V = 256 (the bounds), and FLA's GatedDeltaNet
    # layer (K = 256, V = 512, 6 heads at hidden size 2048), with the norm as that layer calls it;
    # under both gates (weak gates are where a partitioned call pays its maps)
    for gate in ("strong", "weak"):
        for name, h, dk, dv, l2norm in (("1x32K K64/V64", 16, 64, 64, False),
                                        ("1x32K K256/V256", 16, 256, 256, False),
                                        ("1x32K K256/V512", 6, 256, 512, True)):
            prefill.append(Shape("prefill", name, [32768], h, h, dk, dv, gate=gate, l2norm=l2norm))
    # fp16 inputs (engines that run the model in half precision), K = 128 and FLA's K = 256 layer
    for gate in ("strong", "weak"):
        for name, lens, h, hv, dk, dv, l2norm in (("1x32K", [32768], 16, 16, 128, 128, False),
                                                  ("8x4K", [4096] * 8, 16, 32, 128, 128, False),
                                                  ("1x32K K256/V256", [32768], 16, 16, 256, 256, False),
                                                  ("1x32K K256/V512", [32768], 6, 6, 256, 512, True)):
            prefill.append(Shape("prefill", name, lens, h, hv, dk, dv, gate=gate, l2norm=l2norm, dtype="float16"))
    for graph in (False, True):
        for batch in (1, 16, 64, 256):
            decode.append(Shape("decode", f"B={batch} T=1", [1] * batch, 16, 32, graph=graph))
    decode.append(Shape("decode", "B=256 T=1", [1] * 256, 16, 32, graph=True, pool_dtype="bfloat16"))
    decode.append(Shape("decode", "B=64 T=4", [4] * 64, 16, 32, graph=True))
    if quick:
        prefill = [s for s in prefill if s.label in ("1x8K h16/16 strong", "8x4K h16/32 weak")]
        decode = [s for s in decode if s.name == "B=64 T=1" and s.graph]
    return (prefill if suite in ("prefill", "all") else []) + (decode if suite in ("decode", "all") else [])


def cpu_shapes(suite: str, quick: bool) -> list[Shape]:
    prefill = [Shape("prefill", f"1x{t}", [t], 4, 4, 64, 64, gate=gate, dtype="float32")
               for gate in ("strong", "weak") for t in (256, 1024, 4096)]
    prefill.append(Shape("prefill", "varlen 4K/4", _mixed_lengths(4096, 4), 4, 8, 64, 64, varlen=True,
                         dtype="float32"))
    decode = [Shape("decode", f"B={b} T=1", [1] * b, 4, 8, 64, 64, dtype="float32", slots=128) for b in (1, 16, 64)]
    if quick:
        prefill = [prefill[1], prefill[2]]
        decode = [decode[1]]
    return (prefill if suite in ("prefill", "all") else []) + (decode if suite in ("decode", "all") else [])


def make_decode_inputs(shape: Shape, device, seed: int = 0) -> dict:
    """One serving step: q, k, v and raw gates a, b for B sequences of T tokens; A_log, dt_bias;
    a pool of `slots` states and B distinct random slot indices."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, t, h, hv, dk, dv = len(shape.seq_lens), shape.tokens, shape.heads, shape.value_heads, shape.dk, shape.dv
    dtype = getattr(torch, shape.dtype)

    def randn(*s):
        return torch.randn(*s, generator=gen)

    d = dict(q=randn(b, t, h, dk).to(dtype), k=randn(b, t, h, dk).to(dtype), v=randn(b, t, hv, dv).to(dtype),
             a=randn(b, t, hv) - 4.0, b=randn(b, t, hv), A_log=torch.log(1 + 15 * torch.rand(hv, generator=gen)),
             dt_bias=0.1 * randn(hv), pool=(0.1 * randn(shape.slots, hv, dk, dv)).to(getattr(torch, shape.pool_dtype)),
             idx=torch.randperm(shape.slots, generator=gen)[:b])
    d = {k: x.to(device) for k, x in d.items()}
    d["g"] = -d["A_log"].exp() * F.softplus(d["a"] + d["dt_bias"])  # for paths that take g, beta
    d["beta"] = d["b"].sigmoid()
    d["h0"] = d["pool"][d["idx"]].float()  # dense initial state, for paths without a pool
    return d


def _decode_step(backend):
    def fn(d):
        o = api.fused_sigmoid_gating_delta_rule_update(
            d["A_log"], d["a"], d["dt_bias"], 1.0, 20.0, d["q"], d["k"], d["v"], d["b"], d["pool"], d["idx"],
            use_qk_l2norm_in_kernel=True, backend=backend, check_indices=False)
        return o, None  # the new states are in d["pool"][d["idx"]]
    return fn


def make_inputs(shape: Shape, device, seed: int = 0):
    """A prefill call: bf16/fp32 q, k (L2-normalised; with `shape.l2norm` raw, of norms around
    sqrt(K) as projections give, and the op normalises them), v; fp32 g from the shape's gate
    law; fp32 beta."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_seqs = len(shape.seq_lens)
    if shape.varlen:
        b, t = 1, shape.total_tokens
    else:
        b, t = n_seqs, shape.seq_lens[0]
    h, hv, dk, dv = shape.heads, shape.value_heads, shape.dk, shape.dv
    dtype = getattr(torch, shape.dtype)

    def randn(*s):
        return torch.randn(*s, generator=gen).to(device)

    q = randn(b, t, h, dk).to(dtype)
    k = (randn(b, t, h, dk) if shape.l2norm else F.normalize(randn(b, t, h, dk), dim=-1)).to(dtype)
    v = randn(b, t, hv, dv).to(dtype)
    beta = torch.sigmoid(randn(b, t, hv))
    if shape.gate == "strong":
        # Qwen3-Next's gate: g = -exp(A_log) softplus(a + dt_bias), A_log = log U(1, 16), a ~ N(-4, 1)
        a_log = torch.log(1 + 15 * torch.rand(hv, generator=gen)).to(device)
        g = -a_log.exp() * F.softplus(randn(b, t, hv) - 4.0)
    else:
        g = -1e-3 * (0.5 + torch.rand(b, t, hv, generator=gen).to(device))  # slow heads, plain DeltaNet
    kwargs = {"use_qk_l2norm_in_kernel": True} if shape.l2norm else {}
    if shape.varlen:
        offs = [0]
        for n in shape.seq_lens:
            offs.append(offs[-1] + n)
        kwargs["cu_seqlens"] = torch.tensor(offs, dtype=torch.int64, device=device)
    return (q, k, v, g, beta), kwargs


# ---------------------------------------------------------------------------------------
# implementations


@dataclass
class Impl:
    name: str
    peer: bool
    prefill: object = None  # fn(args, kwargs) -> (o, state)
    decode: object = None
    version: str = ""
    notes: list = field(default_factory=list)


def our_impls(device: torch.device) -> list[Impl]:
    from .backends import triton_unavailable_reason

    impls = []
    if device.type == "cpu":
        impls.append(Impl(
            "flashdelta-torch", False,
            prefill=lambda a, kw: api.chunk_gated_delta_rule(*a, output_final_state=True, backend="torch", **kw),
            decode=_decode_step("torch")))
    reason = triton_unavailable_reason(device)
    if device.type == "cuda" and reason is None:
        impls.append(Impl(
            "flashdelta-triton", False,
            prefill=lambda a, kw: api.chunk_gated_delta_rule(*a, output_final_state=True, backend="triton", **kw),
            decode=_decode_step("triton")))
    elif device.type == "cuda":
        print(f"flashdelta-triton skipped: {reason}", file=sys.stderr)
    return impls


def peer_impls(device: torch.device) -> tuple[list[Impl], list[str]]:
    """Importable peers, and a line for each one that is absent."""
    impls, missing = [], []
    if device.type != "cuda":
        return impls, ["peers skipped: they need a CUDA GPU"]
    os.environ["FLA_FLASH_QLA"] = "0"  # time FLA's own Triton path, not its FlashQLA route
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec

        version = getattr(fla, "__version__", "?")
        impls.append(Impl(
            "fla", True,
            prefill=lambda a, kw: fla_chunk(*a, output_final_state=True, **kw),
            # its fused_recurrent takes gk, gv after g: pass the gates by name
            decode=lambda d: fla_rec(d["q"], d["k"], d["v"], g=d["g"], beta=d["beta"], initial_state=d["h0"],
                                     output_final_state=True, use_qk_l2norm_in_kernel=True),
            version=version))
        impls.append(Impl(
            "fla-fused-gating", True,
            decode=lambda d: fla_rec(d["q"], d["k"], d["v"], g=d["a"], beta=d["b"], initial_state=d["h0"],
                                     output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                     A_log=d["A_log"], dt_bias=d["dt_bias"], use_beta_sigmoid_in_kernel=True),
            version=version))
    except Exception as e:  # noqa: BLE001 -- any import failure means "absent"
        missing.append(f"fla (flash-linear-attention) not importable: {type(e).__name__}: {e}")
    try:
        import flash_qla

        impls.append(Impl(
            "flashqla", True,
            prefill=lambda a, kw: flash_qla.chunk_gated_delta_rule(*a, output_final_state=True,
                                                                   enable_fwd_cp_cache=False, **kw),
            version=getattr(flash_qla, "__version__", "?")))
    except Exception as e:  # noqa: BLE001
        missing.append(f"flashqla (flash_qla) not importable: {type(e).__name__}: {e}")
    return impls, missing


# ---------------------------------------------------------------------------------------
# timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, graph: bool = False) -> float:
    """Median milliseconds. GPU: triton.testing.do_bench (events), optionally a CUDA-graph
    replay; CPU: perf_counter around each call after one warm-up."""
    if device.type == "cuda":
        import triton

        if graph:
            fn()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm up on the side stream before capture
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return float(triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + 2.0
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure_ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense matmul rate on random data."""
    if device.type == "cuda":
        n_bytes, mm_n, mm_dtype = 2 << 30, 8192, torch.bfloat16
    else:
        n_bytes, mm_n, mm_dtype = 256 << 20, 1024, torch.float32  # the CPU paths compute in fp32
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device)
    a = torch.randn(mm_n, mm_n, device=device).to(mm_dtype)
    b = torch.randn(mm_n, mm_n, device=device).to(mm_dtype)
    t_mm = time_fn(lambda: a @ b, device)
    del src, dst
    return {
        "copy_bandwidth_GBps": 2 * n_bytes / (t_copy * 1e-3) / 1e9,
        "matmul_TFLOPs": 2 * mm_n**3 / (t_mm * 1e-3) / 1e12,
        "matmul_dtype": str(mm_dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------
# the run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=("prefill", "decode", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="a three-shape subset (under a minute)")
    p.add_argument("--json", default=None, help="write results here (default: none)")
    p.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--shapes", default=None,
                   help="only shapes whose label contains one of these comma-separated words; a word that "
                        "starts with '=' names one label exactly ('=1x32K h16/16 strong', not its l2norm row)")
    p.add_argument("--no-peers", action="store_true", help="time our paths only")
    p.add_argument("--warm", action="store_true",
                   help="first call every prefill once at a small shape per head configuration (compiles; "
                        "FlashQLA's JIT takes ~40 s per kernel and configuration on a fresh machine)")


def metadata(device) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = props.name
        meta["sm_count"] = props.multi_processor_count
        meta["cuda"] = torch.version.cuda
        try:
            import subprocess

            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            meta["driver"] = None
    else:
        meta["cpu"] = platform.processor() or platform.machine()
        meta["threads"] = torch.get_num_threads()
    return meta


ORACLE_MAX_TOKENS = 8192


def reference_output(shape: Shape, args, kwargs):
    """The fp64 token loop on the same (rounded) inputs up to ORACLE_MAX_TOKENS tokens; beyond,
    our torch chunked path in fp32 (within ~1e-6 of the oracle, see tests/test_parity.py)."""
    q, k, v, g, beta = args
    if shape.total_tokens <= ORACLE_MAX_TOKENS:
        return api.fused_recurrent_gated_delta_rule(*(x.double() for x in args), output_final_state=True,
                                                    backend="torch", **kwargs)
    return api.chunk_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, output_final_state=True,
                                      backend="torch", **kwargs)


def run_shapes(shapes: list[Shape], impls: list[Impl], device, ceilings: dict, log=sys.stderr,
               on_shape=None) -> list[dict]:
    """Time every implementation on every shape; `on_shape(results)` after each shape."""
    results = []
    bw = ceilings["copy_bandwidth_GBps"] * 1e9
    rate = ceilings["matmul_TFLOPs"] * 1e12
    for i, shape in enumerate(shapes, 1):
        in_bytes = torch.finfo(getattr(torch, shape.dtype)).bits // 8
        if shape.suite == "prefill":
            args, kwargs = make_inputs(shape, device)
            n_bytes, flops = prefill_cost(shape.seq_lens, shape.heads, shape.value_heads, shape.dk, shape.dv,
                                          in_bytes)
            o_ref, s_ref = reference_output(shape, args, kwargs)
            call = lambda fn: fn(args, kwargs)  # noqa: E731
        else:
            d = make_decode_inputs(shape, device)
            state_bytes = torch.finfo(getattr(torch, shape.pool_dtype)).bits // 8
            n_bytes, flops = decode_cost(len(shape.seq_lens), shape.tokens, shape.heads, shape.value_heads,
                                         shape.dk, shape.dv, in_bytes, state_bytes)
            # reference: the torch step in fp64 from the same (rounded) inputs, on a copy of the pool
            ref = {k: (x.double() if x.is_floating_point() else x) for k, x in d.items()}
            o_ref = _decode_step("torch")(ref)[0]
            s_ref = ref["pool"][d["idx"]]
            args = kwargs = None
            call = lambda fn: fn(d)  # noqa: E731
        floor_ms = max(n_bytes / bw, flops / rate) * 1e3
        row_times, row = {}, []
        for impl in impls:
            fn = impl.prefill if shape.suite == "prefill" else impl.decode
            if fn is None:
                continue
            rec = {"shape": asdict(shape), "label": shape.label, "impl": impl.name, "peer": impl.peer,
                   "bytes": n_bytes, "flops": flops, "floor_ms": floor_ms}
            try:
                if shape.suite == "decode":
                    pool_before = d["pool"].clone()
                o, s = call(fn)
                if shape.suite == "decode":
                    if s is None:  # in place: read the new states from the pool, then restore it
                        s = d["pool"][d["idx"]].float()
                        d["pool"].copy_(pool_before)
                    del pool_before
                rec["rel_err_o"] = rel_l2(o, o_ref)
                rec["rel_err_state"] = rel_l2(s, s_ref) if s is not None else None
                ms = time_fn(lambda: call(fn), device, graph=shape.graph)
                rec["time_ms"] = ms
                rec["frac_floor"] = floor_ms / ms
                row_times[impl.name] = ms
                msg = f"{ms:.4f} ms ({100 * floor_ms / ms:.0f}% of floor), err {rec['rel_err_o']:.1e}"
            except Exception as e:  # noqa: BLE001 -- a peer that rejects a shape is a row, not a crash
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
                msg = f"failed: {rec['error']}"
            print(f"[{i}/{len(shapes)}] {shape.suite} {shape.label}: {impl.name} {msg}", file=log, flush=True)
            row.append(rec)
            _sync(device)
        peers = {p.name for p in impls if p.peer}
        for rec in row:
            if "time_ms" in rec:
                rec["speedup_vs"] = {name: t / rec["time_ms"] for name, t in row_times.items()
                                     if name != rec["impl"] and name in peers}
        results += row
        if on_shape is not None:
            on_shape(results)
        del args, kwargs, o_ref, s_ref
        if shape.suite == "decode":
            del d, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_table(results: list[dict]) -> str:
    header = ("suite", "shape", "impl", "time_ms", "floor_ms", "%floor", "rel_err(o)", "speed-up vs peers")
    rows = []
    for r in results:
        if "time_ms" not in r:
            rows.append((r["shape"]["suite"], r["label"], r["impl"], "error", f"{r['floor_ms']:.4f}", "", "",
                         r.get("error", "")[:40]))
            continue
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in (r.get("speedup_vs") or {}).items())
        rows.append((r["shape"]["suite"], r["label"], r["impl"], f"{r['time_ms']:.4f}", f"{r['floor_ms']:.4f}",
                     f"{100 * r['frac_floor']:.1f}", f"{r['rel_err_o']:.1e}", sp))
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows)


def plot(results: list[dict], path: str, meta: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    suites = [s for s in ("prefill", "decode") if any(r["shape"]["suite"] == s for r in results)]
    fig, axes = plt.subplots(1, len(suites), figsize=(7 * len(suites), 5), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        rows = [r for r in results if r["shape"]["suite"] == suite and "time_ms" in r]
        xkey = (lambda r: sum(r["shape"]["seq_lens"])) if suite == "prefill" else (
            lambda r: len(r["shape"]["seq_lens"]))
        series = {}
        for r in rows:
            key = f"{r['impl']} ({r['shape']['gate']}" + (", graph" if r["shape"]["graph"] else "") + ")"
            series.setdefault(key, []).append((xkey(r), r["time_ms"]))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="", label=key)
        floor = sorted({(xkey(r), r["floor_ms"]) for r in rows})
        if floor:
            ax.plot([p[0] for p in floor], [p[1] for p in floor], "k--", label="hardware floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("total tokens" if suite == "prefill" else "batch (sequences)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{suite}: {meta.get('gpu') or meta.get('cpu', 'cpu')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def warm_up(shapes: list[Shape], impls: list[Impl], device, log=None) -> float:
    """Call each implementation's prefill once per head configuration of `shapes`, at a
    small length (dense, and varlen where the suite has it), so that compilers (Triton's,
    FlashQLA's TileLang JIT, FLA's autotuning at that shape) run before the timing does.
    Returns the seconds it took."""
    log = log or sys.stderr
    start = time.perf_counter()
    configs = {(sh.heads, sh.value_heads, sh.dk, sh.dv, sh.dtype, sh.varlen, sh.l2norm)
               for sh in shapes if sh.suite == "prefill"}
    for h, hv, dk, dv, dtype, varlen, l2norm in sorted(configs):
        lens = _mixed_lengths(4 * CHUNK_WARM, 4) if varlen else [CHUNK_WARM]
        small = Shape("prefill", "warm-up", lens, h, hv, dk, dv, varlen=varlen, dtype=dtype, l2norm=l2norm)
        args, kwargs = make_inputs(small, device)
        for impl in impls:
            if impl.prefill is not None:
                t0 = time.perf_counter()
                impl.prefill(args, kwargs)
                _sync(device)
                print(f"warm-up h{h}/{hv} K={dk} V={dv}{' varlen' if varlen else ''}{' l2norm' if l2norm else ''}: "
                      f"{impl.name} "
                      f"{time.perf_counter() - t0:.1f} s", file=log, flush=True)
    return time.perf_counter() - start


CHUNK_WARM = 2048  # tokens of a warm-up sequence


def select_shapes(shapes: list[Shape], spec: str) -> list[Shape]:
    """The shapes `--shapes` names: comma-separated words, each a substring of "suite label",
    or "=label" for that label alone."""
    words = spec.split(",")
    return [sh for sh in shapes
            if any(sh.label == w[1:] if w.startswith("=") else w in f"{sh.suite} {sh.label}" for w in words)]


def run_bench(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = metadata(device)
    print(f"flashdelta bench on {meta.get('gpu', meta.get('cpu'))}: measuring ceilings...", file=sys.stderr)
    ceilings = measure_ceilings(device)
    print(f"copy {ceilings['copy_bandwidth_GBps']:.0f} GB/s, {ceilings['matmul_dtype']} matmul "
          f"{ceilings['matmul_TFLOPs']:.1f} TFLOP/s", file=sys.stderr)
    impls = our_impls(device)
    peers, missing = ([], ["peers skipped: --no-peers"]) if args.no_peers else peer_impls(device)
    for line in missing:
        print(line, file=sys.stderr)
    meta["peers"] = {p.name: p.version for p in peers}
    meta["peers_missing"] = missing
    impls += peers
    shapes = (gpu_shapes if device.type == "cuda" else cpu_shapes)(args.suite, args.quick)
    if args.shapes:
        shapes = select_shapes(shapes, args.shapes)

    if args.warm:
        meta["warm_up_s"] = round(warm_up(shapes, impls, device), 1)

    def write_json(results):  # after every shape, so a run cut short keeps what it measured
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "ceilings": ceilings, "results": results}, f, indent=1)

    results = run_shapes(shapes, impls, device, ceilings, on_shape=write_json)
    print(format_table(results))
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        if plot(results, args.plot, meta):
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0

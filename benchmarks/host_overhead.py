"""Host (CPU) time per eager call, split into its parts, beside FLA's:

    python benchmarks/host_overhead.py

Each row enqueues N calls back to back and divides the wall time by N (the GPU work of a
B = 1 decode step, ~3 us, is shorter than any row, so the host is what is timed). Decode
rows: the public entry point; its validation alone; the Triton wrapper without validation
(allocation, launch config, launch); the entry point with every launch through Triton
(`fast_launch` off: launch.py); the bare kernel launch with its arguments prepared;
`torch.empty` of o; FLA's calls on the same inputs where FLA is installed. The bare launch
repeats the wrapper's argument list (a signature change breaks it loudly). Prefill rows
(1x2K and 1x8K, 16 heads), with `fast_launch` off and on: the entry point's host time per call
beside its do_bench time: where the first is the larger, the eager call is host-bound.

`--prefill-profile`: only the prefill, split further: each Triton launch's host time (the
jit function's `run`, timed around the call), and cProfile's top functions over many calls.
"""

import argparse
import cProfile
import pstats
import time

import torch
import triton
import triton.testing

from flashdelta import api
from flashdelta.bench import Shape, _decode_step, make_decode_inputs, make_inputs, peer_impls
from flashdelta.triton import chunk as tc
from flashdelta.triton import decode as td


def per_call_us(fn, n=3000):
    """Host microseconds per call over n calls (n small enough that the launch queue never fills)."""
    for _ in range(min(n, 100)):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return host * 1e6


def main():
    for batch in (1, 16):
        d = make_decode_inputs(Shape("decode", f"B={batch}", [1] * batch, 16, 32), "cuda")
        q, k, v, a, b, pool, idx = (d[n] for n in ("q", "k", "v", "a", "b", "pool", "idx"))
        scale = q.shape[-1] ** -0.5
        o = torch.empty(batch, 1, 32, 128, dtype=q.dtype, device="cuda")
        cfg = td.launch_config(128, 128)
        grid = (batch, 32, triton.cdiv(128, cfg["BV"]))
        args = (q, k, v, a, b, d["A_log"], d["dt_bias"], o, pool, idx, pool, None,
                *q.stride(), *k.stride(), *v.stride(), *a.stride(), *b.stride(), *o.stride()[:3],
                *pool.stride(), 0, 0, 0, 0, scale, 1.0, 20.0, 1, pool.shape[0])
        const = dict(GROUP=2, K=128, V=128, VARLEN=False, L2NORM=True, STORE_INTER=False, WHILE_LOOPS=False, **cfg)
        def through_triton(fn):  # TUNING["fast_launch"] off for one call
            def call():
                td.TUNING["fast_launch"] = False
                try:
                    return fn()
                finally:
                    td.TUNING["fast_launch"] = True
            return call
        rows = {
            "flashdelta entry point (check_indices=False)": lambda: _decode_step("triton")(d),
            "  the same, fast_launch off": through_triton(lambda: _decode_step("triton")(d)),
            "  validation only": lambda: api.validate(q, k, v, a, b, None, None, None, gate_names=("a", "b")),
            "  Triton wrapper (no validation)": lambda: td.sigmoid_gating_delta_rule_update(
                d["A_log"], a, d["dt_bias"], 1.0, 20.0, q, k, v, b, pool, idx, scale, True, None, False, None),
            "  bare kernel launch": lambda: td._decode_kernel[grid](*args, **const),
            "  torch.empty (o)": lambda: torch.empty(batch, 1, 32, 128, dtype=q.dtype, device="cuda"),
        }
        peers, _ = peer_impls(torch.device("cuda"))
        rows.update({f"{p.name} (peer)": (lambda p=p: p.decode(d)) for p in peers if p.decode is not None})
        for name, fn in rows.items():
            print(f"B={batch:<4} {name:48} {per_call_us(fn):7.1f} us", flush=True)
    for name, lens in (("1x2K", [2048]), ("1x8K", [8192])):
        args, kw = make_inputs(Shape("prefill", name, lens, 16, 16), "cuda")
        prefill = lambda: api.chunk_gated_delta_rule(*args, output_final_state=True, backend="triton", **kw)  # noqa: E731,E501
        for fast in (False, True):
            tc.TUNING["fast_launch"] = fast
            print(f"{name} prefill entry point, fast_launch {fast!s:5}: host per call {per_call_us(prefill, 50):7.1f} us; "
                  f"do_bench {1e3 * triton.testing.do_bench(prefill, return_mode='median'):7.1f} us", flush=True)


def launch_parts(call, n=300):
    """Each launch of one call split into Triton's steps: the binder (argument specialisation),
    the cache key, and the compiled kernel's launcher (argument packing, TMA descriptor
    encoding, cuLaunchKernelEx), each repeated n times on the launch's own arguments."""
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key
    launches = []
    fns = (tc._inverse_kernel, tc._recurrence_kernel, tc._chain_kernel)
    runs = {f: f.run for f in fns}

    def capture(f):
        def wrapper(*a, **k):
            kernel = runs[f](*a, **k)
            launches.append((f, kernel, a, k))
            return kernel
        f.run = wrapper
    for f in fns:
        capture(f)
    call()
    for f in fns:
        f.run = runs[f]
    torch.cuda.synchronize()
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)

    def us(fn):  # host time only: the queue (n < its depth) is drained before and after
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        return host / n * 1e6
    print("per launch, us: binder / cache key / compiled kernel's launcher / whole jit run")
    for f, kernel, a, k in launches:
        kw = {key: val for key, val in k.items() if key not in ("grid", "warmup")}
        kw["debug"] = kw.get("debug", f.debug)
        kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        kernel_cache, key_cache, _, _, binder = f.device_caches[device]
        bound, spec, options = binder(*a, **kw)
        grid = k["grid"]
        g = tuple(grid) + (1,) * (3 - len(grid))
        values = list(bound.values())
        t_bind = us(lambda: binder(*a, **kw))
        t_key = us(lambda: compute_cache_key(key_cache, spec, options))
        t_launch = us(lambda: kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None,
                                         None, None, *values))
        t_all = us(lambda: f.run(*a, **k))
        print(f"  {f.__name__:22} grid {str(grid):16} {t_bind:6.1f} {t_key:6.1f} {t_launch:6.1f} {t_all:6.1f}")


def prefill_profile(n=200):
    """Host microseconds of one 1x8K prefill call, per Triton launch and per Python function
    (every launch through Triton: TUNING["fast_launch"] off, so that its parts can be timed)."""
    tc.TUNING["fast_launch"] = False
    args, kw = make_inputs(Shape("prefill", "1x8K", [8192], 16, 16), "cuda")
    prefill = lambda: api.chunk_gated_delta_rule(*args, output_final_state=True, backend="triton", **kw)  # noqa: E731
    spent = {}

    def timed(jit_fn):
        run = jit_fn.run

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = run(*a, **k)
            spent[jit_fn.__name__] = spent.get(jit_fn.__name__, 0.0) + time.perf_counter() - t0
            return out
        jit_fn.run = wrapper
        return run

    originals = {f: timed(f) for f in (tc._inverse_kernel, tc._recurrence_kernel, tc._chain_kernel)}
    per_call_us(prefill, 20)
    spent.clear()
    total = per_call_us(prefill, n)
    for f, run in originals.items():
        f.run = run
    print(f"1x8K prefill: {total:.1f} us of host time per call; inside Triton's launches (per call):")
    for name, s in spent.items():
        print(f"  {name:24} {1e6 * s / n:7.1f} us")
    launch_parts(prefill)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        prefill()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill-profile", action="store_true")
    if ap.parse_args().prefill_profile:
        prefill_profile()
    else:
        main()

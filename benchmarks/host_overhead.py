"""Host (CPU) time per eager call, split into its parts, beside FLA's:

    python benchmarks/host_overhead.py

Each row enqueues N calls back to back and divides the wall time by N (the GPU work of a
B = 1 decode step, ~3 us, is shorter than any row, so the host is what is timed). Decode
rows: the public entry point; its validation alone; the Triton wrapper without validation
(allocation, launch config, launch); the bare kernel launch with its arguments prepared;
`torch.empty` of o; FLA's calls on the same inputs where FLA is installed. The bare launch
repeats the wrapper's argument list (a signature change breaks it loudly). One prefill row
(1x8K, 16 heads): the entry point's host time per call beside its do_bench time: where the
first is the larger, the eager call is host-bound.
"""

import time

import torch
import triton
import triton.testing

from flashdelta import api
from flashdelta.bench import Shape, _decode_step, make_decode_inputs, make_inputs, peer_impls
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
        rows = {
            "flashdelta entry point (check_indices=False)": lambda: _decode_step("triton")(d),
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
    args, kw = make_inputs(Shape("prefill", "1x8K", [8192], 16, 16), "cuda")
    prefill = lambda: api.chunk_gated_delta_rule(*args, output_final_state=True, backend="triton", **kw)  # noqa: E731
    print(f"1x8K prefill entry point, host per call {per_call_us(prefill, 20):7.1f} us; "
          f"do_bench {1e3 * triton.testing.do_bench(prefill, return_mode='median'):7.1f} us", flush=True)


if __name__ == "__main__":
    main()

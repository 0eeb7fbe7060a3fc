"""Run every Triton kernel at a small shape, for compute-sanitizer on a GPU:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_kernels.py
    (options: --dim 256: on sm_90 the Gluon inverse and map, lead and output passes at column
     blocks of 32 (else the Triton ones), the in-kernel L2 norm folded there too;
     --dtype float16: the prefill's fp16 launches (on sm_90 the Gluon kernels' scaled fp16 pairs, else
     split bf16 products and fp16 grams);
     --tuning block_v=32,stages=1)

Covers the inverse (in Gluon on sm_90, bf16, K = 128: the default), map, chain, output and lead passes of the prefill (partitioned varlen, with
an initial state and a ragged last chunk, with and without the lead pass, and with the in-kernel L2 norm folded;
a dense batch of two sequences in one partition each), the token loop, and the decode kernel on a pool
with a negative index; the first prefill and the decode step twice (the second launches the
compiled kernels directly, launch.py). Exits non-zero if an output is not finite or the
repeated prefill differs.
"""

import argparse
import ast

import torch

import flashdelta as fd
from flashdelta.triton import chunk as tc
from flashdelta.triton.chunk import chunk_gated_delta_rule_fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tuning", default="", help="prefill TUNING overrides, e.g. block_v=32,gluon_transposed=True")
    ap.add_argument("--dim", type=int, default=128, help="K = V (256: the prefill's BV 32 launch)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="q, k, v of the prefill and the token loop")
    opts = ap.parse_args()
    for item in filter(None, opts.tuning.split(",")):
        key, value = item.split("=")
        try:  # Python literals (bool("False") would be True); other words as strings (precision=bf16)
            tc.TUNING[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            tc.TUNING[key] = value
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: run under TRITON_INTERPRET=1
    dt = getattr(torch, opts.dtype)
    h, hv, d = 2, 4, opts.dim
    lens = [1, 70, 200]
    total = sum(lens)
    cu = torch.tensor([0, 1, 71, 271], device=dev)
    q, k = (torch.randn(1, total, h, d, device=dev, dtype=dt) for _ in range(2))
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dt)
    v = torch.randn(1, total, hv, d, device=dev, dtype=dt)
    g = -torch.rand(1, total, hv, device=dev)
    beta = torch.rand(1, total, hv, device=dev)
    h0 = torch.randn(len(lens), hv, d, d, device=dev)
    o, s = chunk_gated_delta_rule_fwd(q, k, v, g, beta, d**-0.5, h0, True, cu, False, partition_chunks=1)
    # the same layout again: its compiled kernels launched directly (launch.py)
    o_again, s_again = chunk_gated_delta_rule_fwd(q, k, v, g, beta, d**-0.5, h0, True, cu, False, partition_chunks=1)
    lead = tc.TUNING["lead_partition"]
    tc.TUNING["lead_partition"] = True  # the same with the lead pass beside the map pass (two streams)
    ol, sl = chunk_gated_delta_rule_fwd(q, k, v, g, beta, d**-0.5, h0, True, cu, False, partition_chunks=1)
    # strong decay: negligible maps skipped, and the device's plan choice (empty lead rows)
    tc.TUNING["lead_partition"] = "adaptive"
    gs = -4.0 - 8.0 * torch.rand(1, total, hv, device=dev)
    oa, sa = chunk_gated_delta_rule_fwd(q, k, v, gs, beta, d**-0.5, h0, True, cu, False, partition_chunks=1)
    # the in-kernel L2 norm, folded (raw q, k; with the lead pass): the inverse sums k's norms, the
    # output and lead passes q's from their q tiles (the next q fetched at the step's end)
    tc.TUNING["lead_partition"] = True
    kr = torch.randn(1, total, h, d, device=dev, dtype=dt)
    on, sn = chunk_gated_delta_rule_fwd(q, kr, v, g, beta, d**-0.5, h0, True, cu, True, partition_chunks=1)
    tc.TUNING["lead_partition"] = lead
    on2, sn2 = fd.fused_recurrent_gated_delta_rule(q, kr, v, g, beta, initial_state=h0, output_final_state=True,
                                                   cu_seqlens=cu, use_qk_l2norm_in_kernel=True, backend="triton")
    oa2, sa2 = fd.fused_recurrent_gated_delta_rule(q, k, v, gs, beta, initial_state=h0, output_final_state=True,
                                                   cu_seqlens=cu, backend="triton")
    o2, s2 = fd.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                 cu_seqlens=cu, backend="triton")
    qd, kd = (torch.randn(2, 200, h, d, device=dev, dtype=dt) for _ in range(2))
    kd = torch.nn.functional.normalize(kd.float(), dim=-1).to(dt)
    vd = torch.randn(2, 200, hv, d, device=dev, dtype=dt)
    gd, bd = -torch.rand(2, 200, hv, device=dev), torch.rand(2, 200, hv, device=dev)
    od, sd = chunk_gated_delta_rule_fwd(qd, kd, vd, gd, bd, d**-0.5, None, True, None, False, partition_chunks=100)
    od2, sd2 = fd.fused_recurrent_gated_delta_rule(qd, kd, vd, gd, bd, output_final_state=True, backend="triton")
    slots, bsz = 8, 3
    pool = torch.randn(slots, hv, d, d, device=dev)
    idx = torch.tensor([5, -1, 2], device=dev)
    args = (torch.zeros(hv, device=dev), torch.randn(bsz, 1, hv, device=dev), torch.zeros(hv, device=dev), 1.0, 20.0,
            torch.randn(bsz, 1, h, d, device=dev, dtype=torch.bfloat16),
            torch.randn(bsz, 1, h, d, device=dev, dtype=torch.bfloat16),
            torch.randn(bsz, 1, hv, d, device=dev, dtype=torch.bfloat16), torch.randn(bsz, 1, hv, device=dev),
            pool, idx)
    o3 = fd.fused_sigmoid_gating_delta_rule_update(*args, use_qk_l2norm_in_kernel=True, backend="triton")
    o3 = fd.fused_sigmoid_gating_delta_rule_update(*args, use_qk_l2norm_in_kernel=True, backend="triton")  # (direct)
    if dev == "cuda":
        torch.cuda.synchronize()
    repeat = torch.equal(o, o_again) and torch.equal(s, s_again)
    ok = repeat and all(torch.isfinite(x).all() for x in (o, s, ol, sl, o2, s2, od, sd, od2, sd2, o3, pool, oa, sa,
                                                          on, sn))
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print("outputs finite:", ok, "| repeated layout bitwise:", repeat, "| prefill vs token loop rel diff: varlen", rel(o, o2), "dense", rel(od, od2),
          "states", rel(s, s2), rel(sd, sd2), "| lead vs plain", rel(ol, o), rel(sl, s),
          "| strong decay, adaptive vs token loop", rel(oa, oa2), rel(sa, sa2),
          "| l2norm vs token loop", rel(on, on2), rel(sn, sn2))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

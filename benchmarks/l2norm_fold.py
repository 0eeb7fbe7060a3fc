"""The in-kernel L2 norm, folded on the Gluon path (chunk_sm90 module doc): time and error of a call
with raw q, k and use_qk_l2norm_in_kernel, against the same call on pre-normalised q, k without the
flag, and against the Triton passes (TUNING["gluon_sm90"] off: they normalise in fp32 in-kernel).
Errors against our fp32 torch chunked path. GPU (sm_90):

    python benchmarks/l2norm_fold.py
"""
import torch.nn.functional as F
import triton

import flashdelta as fd
from flashdelta import bench
from flashdelta.testing import rel_l2
from flashdelta.triton import chunk as tc

rows = [("1x8K", [8192], 16, 16), ("1x32K", [32768], 16, 16), ("1x128K", [131072], 16, 16),
        ("1x32K", [32768], 16, 32), ("8x4K", [4096] * 8, 16, 32)]
print("| row | fold ms | plain ms | Triton passes l2norm ms | err o fold / triton | err s fold / triton |")
for name, lens, h, hv in rows:
    for gate in ("strong", "weak"):
        sh = bench.Shape("prefill", name, lens, h, hv, gate=gate, l2norm=True)
        args, kw = bench.make_inputs(sh, "cuda", seed=1)
        q, k, v, g, beta = args
        call = lambda a, kw=kw: fd.chunk_gated_delta_rule(*a, output_final_state=True, backend="triton", **kw)
        o, s = call(args)
        t_fold = triton.testing.do_bench(lambda: call(args), warmup=25, rep=200, return_mode="median")
        qn, kn = (F.normalize(x.float(), dim=-1, eps=0).to(x.dtype) for x in (q, k))
        kw2 = {x: y for x, y in kw.items() if x != "use_qk_l2norm_in_kernel"}
        t_plain = triton.testing.do_bench(lambda: fd.chunk_gated_delta_rule(qn, kn, v, g, beta, output_final_state=True,
                                          backend="triton", **kw2), warmup=25, rep=200, return_mode="median")
        o_ref, s_ref = fd.chunk_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, output_final_state=True,
                                                 backend="torch", **kw)
        tc.TUNING["gluon_sm90"] = False
        try:
            o_t, s_t = call(args)
            t_tri = triton.testing.do_bench(lambda: call(args), warmup=5, rep=50, return_mode="median") \
                if sum(lens) <= 32768 else float("nan")
        finally:
            tc.TUNING["gluon_sm90"] = True
        print(f"| {name} {h}/{hv} {gate} | {t_fold:.3f} | {t_plain:.3f} | {t_tri:.3f} | "
              f"{rel_l2(o, o_ref):.1e} / {rel_l2(o_t, o_ref):.1e} | {rel_l2(s, s_ref):.1e} / {rel_l2(s_t, s_ref):.1e} |",
              flush=True)
        del o_ref, s_ref, o_t, s_t

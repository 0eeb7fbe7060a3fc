"""Which products of the chunk step need the hi + lo bf16 split? A CPU emulation.

    python benchmarks/precision_study.py [--seq-len 512] [--kinds random,zero_decay,...]

Runs the Triton kernel's chunk recurrence in fp64 with each product's operands rounded as
the GPU would (bf16 inputs; fp32 intermediates; "split": fp32 operands as bf16 hi + lo,
lo x lo dropped; "bf16": one product of bf16-rounded operands; "fp16": one product of fp16
operands, each tile scaled by a power of two into fp16's range; "fp16_a_b_pair": a as one such
fp16 tile, b as an fp16 hi + lo pair (two products); "a_hi" / "b_hi": the split
with one operand rounded, two products) and prints the relative
L2 error of o and of the final state against the fp64 token loop, for the all-split
kernel and for each product given one bf16 product. Products (per chunk and head):
P1 K S, P23 T_u (V - e^G K S), P5 Q S, P6 (Q K^T o L) U, P7 K^T (e^{G_C - G} U).
NOTES.md ("v4") keeps a reading; the GPU tests have the last word.
"""

import argparse

import torch

from flashdelta.testing import CASE_KINDS, make_case, oracle, rel_l2

PRODUCTS = ("P1", "P23", "P5", "P6", "P7")


def bf(x):
    return x.to(torch.bfloat16).double()


def f32(x):
    return x.float().double()


def fp16(x):
    """x as one fp16 tile scaled by a power of two (max |x| in [2^14, 2^15)), then unscaled:
    11 significant bits with fp32's range; entries more than ~2^28 below the tile's largest are
    subnormal (fewer bits)."""
    big = x.abs().max()
    if big == 0:
        return x
    e = 14 - torch.floor(torch.log2(big))
    return (x * 2.0**e).to(torch.float16).double() * 2.0**-e


def product(a, b, a_fp32: bool, b_fp32: bool, mode: str):
    """a @ b as the GPU computes it; a_fp32/b_fp32: the operand is an fp32 quantity."""
    if mode == "bf16":
        return f32(bf(a) @ bf(b))
    if mode == "fp16":  # one product of scaled fp16 operands (a bf16 input converts exactly)
        return f32(fp16(a) @ fp16(b))
    if mode == "fp16_a_b_pair":  # a as one scaled fp16 tile, b as a scaled fp16 hi + lo pair: 2 products
        a_16, b_hi = fp16(a), fp16(b)
        return f32(a_16 @ b_hi + a_16 @ fp16(f32(b) - b_hi))
    a_hi, b_hi = bf(a), bf(b)
    a_lo = bf(f32(a) - a_hi) if a_fp32 and mode != "a_hi" else torch.zeros_like(a_hi)
    b_lo = bf(f32(b) - b_hi) if b_fp32 and mode != "b_hi" else torch.zeros_like(b_hi)
    return f32(a_hi @ b_hi + a_lo @ b_hi + a_hi @ b_lo)


def run(case, modes: dict, chunk: int = 64):
    q, k, v, g, beta = (x.double() for x in case.args())
    bsz, t_len, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    o = torch.zeros(bsz, t_len, hv, dv, dtype=torch.float64)
    states = torch.zeros(bsz, hv, dk, dv, dtype=torch.float64)
    for b in range(bsz):
        for i_h in range(hv):
            hk = i_h // (hv // h)
            s = torch.zeros(dk, dv, dtype=torch.float64)
            if "initial_state" in case.kwargs:
                s = case.kwargs["initial_state"][b, i_h].double()
            for t0 in range(0, t_len, chunk):
                sl = slice(t0, min(t0 + chunk, t_len))
                n = sl.stop - t0
                kc, qc, vc = k[b, sl, hk], q[b, sl, hk], v[b, sl, i_h]
                gc = torch.cumsum(g[b, sl, i_h], 0)
                be = beta[b, sl, i_h]
                a = torch.tril((kc @ kc.T) * torch.exp(gc[:, None] - gc[None, :]), -1) * be[:, None]
                t_u = f32(torch.linalg.inv(torch.eye(n, dtype=torch.float64) + a) * be[None, :])
                ks = product(kc, s, False, True, modes["P1"])
                u = f32(product(t_u, f32(vc - torch.exp(gc)[:, None] * ks), True, True, modes["P23"]))
                causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
                a_qk = f32((qc @ kc.T) * torch.exp(torch.where(causal, gc[:, None] - gc[None, :], -torch.inf)))
                oc = product(qc, s, False, True, modes["P5"]) * torch.exp(gc)[:, None]
                o[b, sl, i_h] = (oc + product(a_qk, u, True, True, modes["P6"])) * dk**-0.5
                u_t = f32(u * torch.exp(gc[-1] - gc)[:, None])
                s = f32(s * torch.exp(gc[-1]) + product(kc.T, u_t, False, True, modes["P7"]))
            states[b, i_h] = s
    return o.to(case.dtype), states


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--kinds", default="random,near_identical_keys,cyclic_keys,strong_decay,zero_decay,beta_0_2")
    opts = ap.parse_args()
    kinds = opts.kinds.split(",")
    assert all(kd in CASE_KINDS for kd in kinds), CASE_KINDS
    cases = {kd: make_case(kd, torch.bfloat16, "cpu", seed=3, seq_len=opts.seq_len, heads=1, value_heads=2, dk=128)
             for kd in kinds}
    refs = {kd: oracle(c) for kd, c in cases.items()}
    variants = {"all split": dict.fromkeys(PRODUCTS, "split")}
    for p in PRODUCTS:
        variants[f"{p} bf16"] = {**dict.fromkeys(PRODUCTS, "split"), p: "bf16"}
    for p in ("P23", "P6"):  # both operands fp32: drop one cross product
        for m in ("a_hi", "b_hi"):
            variants[f"{p} {m}"] = {**dict.fromkeys(PRODUCTS, "split"), p: m}
    variants["P5 bf16 P6 a_hi"] = {**dict.fromkeys(PRODUCTS, "split"), "P5": "bf16", "P6": "a_hi"}
    variants["P5 bf16 P6 b_hi"] = {**dict.fromkeys(PRODUCTS, "split"), "P5": "bf16", "P6": "b_hi"}
    for p in PRODUCTS:
        variants[f"{p} fp16"] = {**dict.fromkeys(PRODUCTS, "split"), p: "fp16"}
    variants["P5 P6 fp16"] = {**dict.fromkeys(PRODUCTS, "split"), "P5": "fp16", "P6": "fp16"}
    variants["all fp16"] = dict.fromkeys(PRODUCTS, "fp16")
    variants["P23 fp16 T_u, X pair"] = {**dict.fromkeys(PRODUCTS, "split"), "P23": "fp16_a_b_pair"}
    print("relative L2 error, o / state, against the fp64 token loop")
    print(f"{'variant':16}" + "".join(f"{kd[:19]:>22}" for kd in kinds))
    for name, modes in variants.items():
        row = f"{name:16}"
        for kd in kinds:
            o, s = run(cases[kd], modes)
            row += f"{rel_l2(o, refs[kd][0]):>11.1e}{rel_l2(s, refs[kd][1]):>11.1e}"
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""Tune and explain the Triton prefill on a GPU: launch/precision variants and partition sizes.

    python benchmarks/prefill_variants.py [--partitions]

For each variant of `flashdelta.triton.chunk.TUNING` it prints the time at a few shapes
(bf16, K = V = 128, final state returned) and the relative L2 error against the fp64 token
loop on adversarial inputs, so each precision choice has its cost in time next to it.
`--partitions` also sweeps `partition_chunks` with the default variant. NOTES.md keeps the
readings.
"""

import argparse
import itertools

import torch
import triton

from flashdelta.bench import Shape, _mixed_lengths, make_inputs
from flashdelta.testing import make_case, oracle, rel_l2
from flashdelta.triton import chunk as tc

# Each variant: overrides of `flashdelta.triton.chunk.TUNING` (the rest as committed).
VARIANTS = [
    {},
    {"stages": 2, "stages_map": 2},
    {"stages": 1, "stages_map": 1},
    {"stages": 1, "stages_map": 2},
    {"block_v": 32, "stages": 1, "stages_map": 1},
    {"block_v": 32, "stages": 2, "stages_map": 2},
    {"stages": 3, "stages_map": 3},
    {"precision": "bf16"},
    {"stages": 1, "stages_map": 1, "maxnreg_map": 168},
    {"block_v": 32, "stages": 1, "stages_map": 1, "maxnreg": 128, "maxnreg_map": 168},
    {"block_v": 32, "stages": 1, "stages_map": 1, "maxnreg": 168, "maxnreg_map": 168},
    {"maxnreg_inverse": 168},  # committed since v4.2 (the same as {} at K <= 128)
    {"maxnreg_inverse": 128},
    {"block_v": 32, "stages": 1, "stages_map": 1, "maxnreg": 128, "maxnreg_map": 168, "tma": False},
    {"warp_specialize": True},
    {"warp_specialize": True, "stages": 2},
    {"inverse_blocked16": True},  # committed since v4.3
    {"inverse_blocked16": False},
    {"early_qs": True, "fused_accumulate": False},  # output-pass spill 368 -> 248 B offline
    {"early_qs": True, "fused_accumulate": True},  # 368 -> 224 B offline; committed since v4.4
    {"early_qs": False, "fused_accumulate": True},  # 368 -> 360 B; map pass 232 -> 221 registers
    {"early_qs": False, "fused_accumulate": False},  # v4.3's output pass
    {"inverse_block_merge": True},  # inverse levels 16, 32 on nonzero blocks (4 M -> 1.2 M MACs); committed since v4.4
    {"inverse_block_merge": True, "maxnreg_inverse": 128},  # the same at 4 programs per SM (208 B spill)
    {"inverse_block_merge": False},  # v4.3's inverse
    # 25-29 were timed against v4.4's chain (variant 32)
    {"tma_t": False},  # T_u tiles by block pointers: waited at first use, not at once (+112 B spill offline)
    {"chain_in_registers": True, "block_v_chain": None},  # chain: S_{p-1} sliced in registers (168 B spill)
    {"chain_in_registers": True, "block_v_chain": None, "warps_chain": 8},  # at 8 warps (178 registers, no spill)
    {"chain_in_registers": False, "block_v_chain": None, "warps_chain": 8},
    {"chain_in_registers": True, "block_v_chain": 32},  # twice the chain programs (40 B spill); committed since v4.5
    {"block_v_chain": 16},  # four times its v4.4 programs; committed since v4.9
    {"warps_chain": 8},  # with the committed chain
    {"chain_in_registers": False, "block_v_chain": None},  # v4.4's chain
    {"gluon_sm90": False},  # 33: the Triton map and output passes (the Gluon ones off)
    {"gluon_packed_split": False},  # 34: the Gluon passes' hi + lo splits as ptxas writes them
    {"lead_partition": False},  # 35: the plain plan at its own size (the model's choice otherwise)
    {"lead_partition": True},  # 36: the lead plan at its own size where the model declines
    {"gluon_split_qs": False},  # 37: Q S from the state's hi alone (one product less per output step)
    {"block_v_chain": 32},  # 38: v4.5-v4.8's chain programs (16 columns since v4.9)
    {"skip_negligible_maps": False},  # 39: every map in full (v4.9)
    {"skip_negligible_maps": False, "lead_partition": False},  # 40: v4.9 on the plain plan
    {"fast_launch": False},  # 41: every launch through Triton's binder (host time; launch.py)
    {"gluon_transposed": True},  # 42: the output pass on transposed tiles (chunk_sm90._output_kernel_t)
    {"gluon_transposed": True, "gluon_split_qs": False},  # 43: the same, Q S from the state's hi alone
    {"gluon_split_qs": False},  # 44: (37 again, to compare with 43 in one run)
    {"gluon_inverse": False},  # 45: the Triton inverse (the default before v5.3; inverse_sm90.py since)
    {"gluon_o_tma": False},  # 46: o stored from the registers (the default before v5.4)
    {"gluon_inverse_tma": False},  # 47: the Gluon inverse's T_u stored by rows (the default before v5.4)
    {"gluon_wide_ks": False},  # 48: output pass K S as two products (the default before v5.5)
    {"gluon_map_transposed": False},  # 49: the map pass on the state's own tiles (the default before v5.6)
    {"chain_prefetch": True},  # 50: the chain loads link j + 1's map during link j's products
    {"chain_prefetch": True, "warps_chain": 8},  # 51: the same at 8 warps
    {"inverse_chunks_per_program": 1},  # 52: one chunk per inverse program (v5.6's grid)
    {"inverse_chunks_per_program": 2},  # 53: at most two chunks per inverse program
    {"inverse_chunks_per_program": 4},  # 54: at most four
    {"inverse_chunks_per_program": 16},  # 55: at most sixteen
    {"gluon_q_norms": "output"},  # 56: the folded L2 norm's 1 / |q| from the output pass's q tiles (v5.9)
    {"gluon_q_norms": "inverse"},  # 57: the same from plain loads in the inverse (v5.8)
    # 58-60: single bf16 products in the output pass (chunk_sm90 SINGLE, an experiment: v5.15)
    {"gluon_single": 1},  # 58: K S and Q S
    {"gluon_single": 2},  # 59: also A U and K^T U~ (only T_u X split)
    {"gluon_single": 3},  # 60: every product single (FLA's precision)
    # 61-63: single bf16 products in the transposed map pass (chunk_sm90._map_kernel_t SINGLE: v5.16)
    {"gluon_map_single": 1},  # 61: the maps' K S (fails the state goal on learned_values: 1.4e-3)
    {"gluon_single": 2, "gluon_map_single": 2},  # 62: both passes under FLA's error
    {"gluon_single": 3, "gluon_map_single": 3},  # 63: every product single in both
]
SHAPES = [("1x8K 16/16", [8192], 16, 16), ("1x32K 16/16", [32768], 16, 16), ("8x4K 16/32", [4096] * 8, 16, 32)]
ERROR_KINDS = ["random", "near_identical_keys", "strong_decay", "zero_decay", "large_initial_state"]


def run(args, kw, pc=None):
    q, k, v, g, beta = args
    return tc.chunk_gated_delta_rule_fwd(q, k, v, g, beta, 128**-0.5, kw.get("initial_state"), True,
                                         kw.get("cu_seqlens"), kw.get("use_qk_l2norm_in_kernel", False),
                                         partition_chunks=pc)


def bench(args, kw, pc=None):
    return triton.testing.do_bench(lambda: run(args, kw, pc), warmup=10, rep=60, return_mode="median")


def breakdown(args, kw, pc=None, reps=10):
    """Milliseconds per call of each kernel (torch profiler), and "wall": the GPU time of a
    call between events (the lead pass runs beside the map pass, so the kernels overlap). The
    recurrence kernel runs twice per call when the sequence is partitioned (map pass, then
    output), three times with the lead pass (lead, map, output)."""
    run(args, kw, pc)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run(args, kw, pc)
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / reps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run(args, kw, pc)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.name.startswith("_") and e.device_time_total > 0),
                     key=lambda e: e.time_range.start)
    return {**split_by_kernel([(e.name, e.device_time_total / 1e3) for e in kernels], reps), "wall": wall}


def split_by_kernel(launches, reps):
    """[(kernel name, ms)] of `reps` identical calls, in launch order -> {name: ms per call};
    the last recurrence launch in a call is the output pass, the one before it the map pass,
    and a third (started first) the lead pass."""
    per_call = len(launches) // reps
    # (chunk_sm90._output_kernel_t, _map_kernel_t: the transposed passes)
    launches = [(n.replace("output_kernel_t", "recurrence_kernel").replace("map_kernel_t", "recurrence_kernel"), ms)
                for n, ms in launches]
    n_rec = sum("recurrence" in name for name, _ in launches[:per_call])
    out = {}
    for i, (name, ms) in enumerate(launches):
        name = name.strip("_").replace("_kernel", "")
        if name == "recurrence":
            before = sum("recurrence" in n for n, _ in launches[i - i % per_call:i])
            name = ["lead pass", "map pass", "output pass"][3 - n_rec + before]
        out[name] = out.get(name, 0.0) + ms / reps
    return out


DEFAULT = dict(tc.TUNING)


def use(variant: dict) -> None:
    tc.TUNING.clear()
    tc.TUNING.update(DEFAULT, **variant)


def label(variant: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in variant.items()) or "committed TUNING"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--partitions", action="store_true")
    ap.add_argument("--best", type=int, default=None,
                    help="index of the variant the partition sweep uses (default: the fastest timed one)")
    ap.add_argument("--variants", default=None, help="comma-separated indices of VARIANTS to time")
    ap.add_argument("--breakdown", action="store_true",
                    help="only print each kernel's time per shape for each variant, then exit")
    ap.add_argument("--gate", default="strong", choices=["strong", "weak"], help="the breakdown's gates")
    ap.add_argument("--l2norm", action="store_true",
                    help="the breakdown's inputs raw, with use_qk_l2norm_in_kernel (the Gluon passes fold it)")
    ap.add_argument("--shapes", default=None, help="comma-separated names of the breakdown's shapes (all if unset)")
    opts = ap.parse_args()
    chosen = [VARIANTS[int(i)] for i in opts.variants.split(",")] if opts.variants else VARIANTS
    if opts.breakdown:
        extra = [("1x4K 16/16", [4096], 16, 16), ("1x128K 16/16", [131072], 16, 16), ("1x32K 16/32", [32768], 16, 32),
                 ("varlen 64K/8", _mixed_lengths(65536, 8), 16, 32)]
        extra.append(("1x128K 32/32", [131072], 32, 32))
        wanted = opts.shapes.split(",") if opts.shapes else None
        shapes = [(name, make_inputs(Shape("prefill", name, lens, h, hv, gate=opts.gate,
                                           varlen=name.startswith("varlen"), l2norm=opts.l2norm), "cuda"))
                  for name, lens, h, hv in itertools.chain(SHAPES, extra) if wanted is None or name in wanted]
        for variant in chosen:
            use(variant)
            print(label(variant), flush=True)
            for name, (args, kw) in shapes:
                parts = breakdown(args, kw)
                wall = parts.pop("wall")
                kernels = ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
                print(f"  {name:14} wall {wall:.3f} ms, kernels {sum(parts.values()):.3f}: {kernels}", flush=True)
        return
    inputs = {name: make_inputs(Shape("prefill", name, lens, h, hv, gate="strong"), "cuda")
              for name, lens, h, hv in SHAPES}
    cases = [make_case(kind, torch.bfloat16, "cuda", seed=11, seq_len=2048, heads=2, value_heads=4, dk=128)
             for kind in ERROR_KINDS]
    refs = [oracle(c) for c in cases]
    head = f"{'variant':34}" + "".join(f"{n:>13}" for n, *_ in SHAPES) + "".join(
        f"{k[:9] + ' o/s':>20}" for k in ERROR_KINDS)
    print(head)
    totals = {}
    for i, variant in enumerate(chosen):
        use(variant)
        times = [bench(*inputs[name]) for name, *_ in SHAPES]
        if tc.TUNING["precision"] == "split":  # the partition sweep uses an exact variant
            totals[i] = sum(times)
        errs = []
        for case, (o_ref, s_ref) in zip(cases, refs):
            o, s = run(case.args(), case.kwargs)
            errs.append(f"{rel_l2(o, o_ref):.1e}/{rel_l2(s, s_ref):.1e}")
        print(f"{label(variant)[:34]:34}" + "".join(f"{t:13.3f}" for t in times) + "".join(f"{e:>20}" for e in errs), flush=True)
        parts = breakdown(*inputs[SHAPES[0][0]])
        print(f"{'':34}{SHAPES[0][0]} per kernel, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()),
              flush=True)
    if opts.partitions:
        best = VARIANTS[opts.best] if opts.best is not None else chosen[min(totals, key=totals.get)]
        use(best)
        print(f"\npartition sweep with {label(best)}")
        choices = [None, 10**9, 8, 16, 32, 64, 128]
        print("\npartition_chunks (None = auto, one = one partition per sequence), ms")
        print(f"{'shape':16}" + "".join(f"{str(c if c != 10**9 else 'one'):>9}" for c in choices))
        extra = [("1x128K 16/16", [131072], 16, 16), ("1x128K 32/32", [131072], 32, 32),
                 ("1x32K 16/32", [32768], 16, 32)]
        for name, lens, h, hv in itertools.chain(SHAPES, extra):
            args, kw = inputs.get(name) or make_inputs(Shape("prefill", name, lens, h, hv), "cuda")
            print(f"{name:16}" + "".join(f"{bench(args, kw, pc):9.3f}" for pc in choices), flush=True)


if __name__ == "__main__":
    main()

"""Kernel durations of one decode step, ours and FLA's, for ncu to read (no launch overhead):

    ncu --clock-control none --metrics gpu__time_duration.sum --print-units base --csv \
        python benchmarks/decode_kernel_times.py > ncu.csv
    python benchmarks/decode_kernel_times.py --parse ncu.csv

The same inputs as `flashdelta bench`'s decode suite (H = 16, HV = 32, K = V = 128, T = 1,
fp32 pool of 1024 slots); each step runs REPEATS times per batch, in a fixed order, so the
parser can name the launches. FLA's path (absent: skipped) takes the gathered dense states.
"""

import argparse
import csv
import statistics
import sys

BATCHES = (1, 16, 64, 256)
REPEATS = 5


def run(batches, block_v=None, peers=True):
    import torch

    from flashdelta.bench import Shape, _decode_step, make_decode_inputs, peer_impls
    from flashdelta.triton import decode as td

    td.TUNING["block_v"] = block_v
    impls = [("flashdelta", _decode_step("triton"))]
    if peers:
        found, missing = peer_impls(torch.device("cuda"))
        impls += [(p.name, p.decode) for p in found if p.decode is not None]
        for line in missing:
            print(line, file=sys.stderr)
    for batch in batches:
        d = make_decode_inputs(Shape("decode", f"B={batch}", [1] * batch, 16, 32), "cuda")
        for name, fn in impls:
            fn(d)  # compile outside the counted launches
            torch.cuda.synchronize()
            print(f"MARK {name} B={batch}", file=sys.stderr, flush=True)
            for _ in range(REPEATS):
                fn(d)
            torch.cuda.synchronize()


def parse(path):
    """Median duration per (kernel name, grid) in launch order: one row per kernel kind."""
    with open(path) as f:
        rows = [r for r in csv.reader(f) if len(r) > 10]
    head = rows[0]
    rows = [dict(zip(head, r)) for r in rows[1:] if r[head.index("Metric Name")] == "gpu__time_duration.sum"]
    groups = {}
    for r in rows:
        key = (r["Kernel Name"][:60], r["Grid Size"] if "Grid Size" in r else "")
        groups.setdefault(key, []).append(float(r["Metric Value"].replace(",", "")) / 1e3)  # ns -> us
    print(f"{'kernel':62} {'grid':>16} {'launches':>8} {'median us':>10}")
    for (name, grid), times in groups.items():
        print(f"{name:62} {grid:>16} {len(times):8} {statistics.median(times):10.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--parse", help="an ncu --csv output to summarise")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--block-v", type=int, default=None, help="our decode kernel's column block (TUNING)")
    ap.add_argument("--no-peers", action="store_true")
    opts = ap.parse_args()
    if opts.parse:
        parse(opts.parse)
    else:
        run([int(b) for b in opts.batches.split(",")], opts.block_v, not opts.no_peers)

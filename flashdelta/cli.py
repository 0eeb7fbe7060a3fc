"""`flashdelta check` (parity table against the float64 oracle) and `flashdelta bench`."""

from __future__ import annotations

import argparse
import sys

import torch

from . import api
from .backends import triton_unavailable_reason
from .testing import oracle, parity_cases, rel_l2

PATHS = {
    "chunk": api.chunk_gated_delta_rule,
    "recurrent": api.fused_recurrent_gated_delta_rule,
    "auto": api.gated_delta_rule,
}


def targets() -> list[tuple[str, str]]:
    """(device, backend) pairs to check on this machine, plus a line for each one skipped."""
    found = [("cpu", "torch")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            dev = f"cuda:{i}"
            found.append((dev, "torch"))
            reason = triton_unavailable_reason(torch.device(dev))
            if reason is None:
                found.append((dev, "triton"))
            else:
                print(f"skipping triton on {dev}: {reason}", file=sys.stderr)
    return found


def run_check(seed: int = 0, out=None) -> int:
    """Print the parity table; return the number of failing rows."""
    out = out or sys.stdout
    rows, failures = [], 0
    for device, backend in targets():
        for case in parity_cases(device=device, seed=seed):
            o_ref, s_ref = oracle(case)
            for path, fn in PATHS.items():
                o, s = fn(*case.args(), output_final_state=True, backend=backend, **case.kwargs)
                err_o, err_s = rel_l2(o, o_ref), rel_l2(s, s_ref)
                ok = err_o <= case.tolerance and err_s <= case.tolerance and o.dtype == case.dtype
                failures += not ok
                rows.append((case.name, f"{device}/{backend}", path, f"{err_o:.2e}", f"{err_s:.2e}",
                             f"{case.tolerance:.0e}", "pass" if ok else "FAIL"))
            print(f"checked {case.name} on {device}/{backend}", file=sys.stderr)
    header = ("case", "backend", "path", "rel_err(o)", "rel_err(state)", "tol", "result")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=out)
    print(f"{len(rows) - failures} passed, {failures} failed", file=out)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashdelta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="parity of every path against the float64 token loop")
    check.add_argument("--seed", type=int, default=0)
    from .bench import add_arguments, run_bench

    add_arguments(sub.add_parser("bench", help="time every path (and the peers) against the hardware floor"))
    args = parser.parse_args(argv)
    if args.command == "check":
        return 1 if run_check(args.seed) else 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())

"""Before and after in one run: each benchmark's summary rows from two checkouts, interleaved.

`--base DIR` is another checkout (protos generated, BPF built), or `--base-rev REV` exports
that revision of this repository into a temporary directory and builds its BPF objects
(the generated protobuf code of this checkout is reused: protos must not differ). Each
round runs every module's `summary_rows` once from each checkout, alternating which goes
first, each in a process of its own (as `bench.all` does), so a burst of load on the
shared machine hits both sides alike. Prints, per measure, the median over rounds of the
Weir figure and of its ratio, before and after, and after / before.

    sudo .venv/bin/python -m bench.ab --base-rev main --only chain_cost,prefilter_cost [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.all import ROW_MARK, Row

HERE = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def exported(rev: str) -> Iterator[Path]:
    """This repository at `rev` in a temporary directory, its BPF objects built."""
    tmp = Path(tempfile.mkdtemp(prefix="weir-ab-"))
    try:
        archive = subprocess.run(["git", "-C", str(HERE), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        subprocess.run(["make", "-s", "-C", str(tmp / "bpf"), f"PYTHON={sys.executable}"], check=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_rows(tree: Path, name: str, quick: bool, timeout: float) -> list[Row]:
    """One module's summary rows, run from `tree` (its code first on the path)."""
    env = dict(os.environ, PYTHONPATH=f"{tree}:{HERE / 'build' / 'python'}")
    argv = [sys.executable, "-m", "bench.all", "--child", name, *(["--quick"] if quick else [])]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    marked = [line for line in done.stdout.splitlines() if line.startswith(ROW_MARK)]
    if done.returncode != 0 or not marked:
        tail = done.stderr.strip().splitlines()[-3:] or [f"exit status {done.returncode}"]
        raise RuntimeError(f"{name} from {tree} failed: {' / '.join(tail)}")
    return [(m, w, r, q) for m, w, r, q in json.loads(marked[-1][len(ROW_MARK) :])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base", type=Path, help="the 'before' checkout (protos generated, BPF built)")
    where.add_argument("--base-rev", help="the 'before' revision of this repository, exported and built")
    parser.add_argument("--only", required=True, help="comma-separated module names with summary_rows")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both sides once")
    parser.add_argument("--quick", action="store_true", help="the modules' smaller sizes")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one module may take")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        base = args.base.resolve() if args.base else stack.enter_context(exported(args.base_rev))
        sides = {"before": base, "after": HERE}
        got: dict[tuple[str, str], list[Row]] = {}
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in args.only.split(","):
                for side in order:
                    rows = run_rows(sides[side], name, args.quick, args.timeout)
                    shown = "; ".join(f"{m}: {w:.4g} ({q:.2f})" for m, w, _, q in rows)
                    print(f"round {round_ + 1} {side:<6} {shown}")
                    for row in rows:
                        got.setdefault((side, row[0]), []).append(row)
                    sys.stdout.flush()
    measures = list(dict.fromkeys(m for _, m in got))
    width = max(len(m) for m in measures)
    print(f"\nmedian of {args.rounds} interleaved rounds; ratio = Weir / reference as each measure says")
    print(f"{'measure':<{width}}  {'before':>9} {'ratio':>6}  {'after':>9} {'ratio':>6}  {'after/before':>12}")
    for m in measures:
        before, after = got.get(("before", m), []), got.get(("after", m), [])
        if not before or not after:
            print(f"{m:<{width}}  (only {'before' if before else 'after'} has this measure)")
            continue
        wb, qb = statistics.median(r[1] for r in before), statistics.median(r[3] for r in before)
        wa, qa = statistics.median(r[1] for r in after), statistics.median(r[3] for r in after)
        print(f"{m:<{width}}  {wb:>9.4g} {qb:>6.2f}  {wa:>9.4g} {qa:>6.2f}  {wa / wb:>12.2f}")


if __name__ == "__main__":
    main()

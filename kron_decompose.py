"""
Kronecker factor shapes and model decomposition.

  python kron_decompose.py --list 3072 768 --factors 1            every factorization of a 3072x768 matrix
  python kron_decompose.py --list 3072 768 --budget 600000        those at or under 600k parameters
  python kron_decompose.py --list 3072 768 --json                 machine-readable rows
  python kron_decompose.py 768 768 1                              Krony-PT's form: decompose a whole model

Shapes are in nn.Linear orientation: a matrix is (out, in), A is (m1, n1), B is (m2, n2).
"""

import argparse
import json
import sys

import kron


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    return v


def format_table(rows):
    head = ["A (m1 x n1)", "B (m2 x n2)", "r", "params", "compression", "term rank", "kron rank",
            "MACs/token", "vs dense", "order"]
    body = [[f"{s.m1} x {s.n1}", f"{s.m2} x {s.n2}", str(s.r), f"{s.params:,}", f"{s.compression:.1f}x",
             f"{s.term_rank:,}", f"{s.kron_rank:,}", f"{s.macs:,}", f"{s.macs / s.dense_macs:.3f}",
             "B first" if s.order == "b" else "A first"] for s in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def list_shapes(m, n, factors, budget=None, as_json=False):
    rows = kron.factor_shapes(m, n, factors)
    if budget is not None:
        rows = [s for s in rows if s.params <= budget]
    if as_json:
        return json.dumps([s.asdict() for s in rows], indent=1)
    title = (f"{len(rows)} factorizations of a {m} x {n} matrix ({m * n:,} dense parameters, "
             f"{m * n:,} MACs/token) with r = {factors} term{'s' if factors > 1 else ''}"
             + (f", at most {budget:,} parameters" if budget is not None else "")
             + "; parameters exclude the bias")
    return title + "\n" + format_table(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dims", nargs="*", type=positive_int, metavar="DIM1 DIM2 N_FACTORS",
                   help="Krony-PT's form: decompose every MLP matrix of the teacher")
    p.add_argument("--list", nargs=2, type=positive_int, metavar=("M", "N"),
                   help="list every factorization of an M x N matrix (out x in)")
    p.add_argument("--factors", type=positive_int, default=1, help="number of Kronecker terms r (default 1)")
    p.add_argument("--budget", type=positive_int, default=None, help="keep shapes with at most this many parameters")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args(argv)
    if args.list:
        if args.dims:
            p.error("give either --list M N or the positional DIM1 DIM2 N_FACTORS, not both")
        print(list_shapes(args.list[0], args.list[1], args.factors, args.budget, args.json))
        return 0
    if not args.dims:
        p.error("nothing to do: give --list M N, or DIM1 DIM2 N_FACTORS")
    if len(args.dims) != 3:
        p.error(f"the positional form takes exactly DIM1 DIM2 N_FACTORS, got {len(args.dims)} numbers")
    print("kron_decompose.py: decomposing a whole model (DIM1 DIM2 N_FACTORS) needs the GPT model, "
          "which is not built yet; only --list works for now.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

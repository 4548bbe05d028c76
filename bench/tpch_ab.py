#!/usr/bin/env python3
"""Two weir builds (or two settings) on TPC-H, run by turns: the A/B comparison for a change
to the query path on a noisy machine, where two separate runs of bench/tpch.py differ by
more than most changes.

Loads SF1 into a lake once (as bench/tpch.py does), then for each query runs A and B one
after the other, --runs times, and keeps each one's best. Prints per-query times, B/A, and
the geometric mean of both. Answers are not checked here: bench/tpch.py does that.

Usage:
  python3 bench/tpch_ab.py --a OLD_WEIR --b NEW_WEIR
  python3 bench/tpch_ab.py --set-b datafusion.execution.batch_size=32768
  python3 bench/tpch_ab.py --env-b MIMALLOC_ALLOW_THP=0
"""
import argparse, math, os, shutil, subprocess, tempfile, time

import tpch


def main():
    ap = argparse.ArgumentParser()
    default = os.path.expanduser("~/.cache/weir-target/release/weir")
    ap.add_argument("--a", default=default, help="weir executable A")
    ap.add_argument("--b", default=default, help="weir executable B")
    ap.add_argument("--set-a", action="append", default=[], help="KEY=VALUE for A's queries")
    ap.add_argument("--set-b", action="append", default=[], help="KEY=VALUE for B's queries")
    ap.add_argument("--env-a", action="append", default=[], help="KEY=VALUE in A's environment")
    ap.add_argument("--env-b", action="append", default=[], help="KEY=VALUE in B's environment")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--queries", default="")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/weir-bench"))
    args = ap.parse_args()

    src = tpch.data("1", args.cache)
    work = tempfile.mkdtemp(prefix="weir-tpch-ab-")
    try:
        proj = tpch.load(args.a, work, src)
        def side(weir, sets, envs):
            env = dict(os.environ, **dict(kv.split("=", 1) for kv in envs))
            return weir, [x for kv in sets for x in ("--set", kv)], env

        sides = [side(args.a, args.set_a, args.env_a), side(args.b, args.set_b, args.env_b)]

        def once(weir, extra, env, sql):
            t = time.perf_counter()
            subprocess.run([weir, "--project", proj, "query", sql, "--format", "csv", *extra],
                           capture_output=True, check=True, env=env)
            return time.perf_counter() - t

        wanted = [int(q) for q in args.queries.split(",") if q] or list(range(1, 23))
        best_a, best_b = [], []
        for n in wanted:
            sql = open(os.path.join(tpch.HERE, "tpch", f"q{n:02}.sql")).read()
            a = b = math.inf
            for _ in range(args.runs):
                a = min(a, once(*sides[0], sql))
                b = min(b, once(*sides[1], sql))
            best_a.append(a)
            best_b.append(b)
            print(f"q{n:02}  A {a:6.3f}  B {b:6.3f}  B/A {b / a:5.2f}", flush=True)

        def gmean(xs):
            return math.exp(sum(math.log(x) for x in xs) / len(xs))

        ga, gb = gmean(best_a), gmean(best_b)
        print(f"\ngeometric mean: A {ga:.4f} s, B {gb:.4f} s, B/A {gb / ga:.3f} "
              f"(best of {args.runs}, by turns)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""TPC-H through `weir query`, against DuckDB and Polars on the same Parquet files, and the
time to compact a table of 10,000 small files against delta-rs (Python).

1. tpchgen-cli generates scale factor SF as Parquet (cached between runs).
2. `weir run` loads the eight tables into weir's lake (`tpch.*`, Delta).
3. The 22 queries (bench/tpch/qNN.sql: the specification's queries with its validation
   parameters) run through `weir query`, DuckDB and Polars' SQL, each engine reading the
   data files of weir's Delta tables. weir's time is the whole `weir query` process
   (start, open the tables, plan, run, print as CSV); DuckDB and Polars run in this
   process. Best of --runs. DataFusion's Python package (the engine weir embeds, built
   with LTO, in this process, two partitions) runs them too when it is installed: the
   floor for weir's engine, so weir/DataFusion is what weir itself adds.
4. weir's answers are checked against DuckDB's (same rows, numbers within 1e-6).
5. A Delta table of 10,000 small files is compacted by `weir table optimize` and by
   `deltalake.DeltaTable.optimize.compact()` on identical copies.

Usage: python3 bench/tpch.py [--sf 1] [--runs 3] [--weir PATH] [--queries 1,6]
"""
import argparse, csv, glob, io, math, os, shutil, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
TABLES = ["lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region"]


def sh(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def timed(fn, runs):
    best, out = math.inf, None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def norm(rows):
    """Rows as tuples of floats (numbers, rounded) or strings, for comparison."""
    out = []
    for r in rows:
        vals = []
        for v in r:
            if v is None or v == "":
                vals.append(None)
                continue
            try:
                vals.append(float(v))
            except (TypeError, ValueError):
                vals.append(str(v))
        out.append(tuple(vals))
    return out


def same(a, b):
    if len(a) != len(b):
        return f"{len(a)} rows vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y):
            return f"row {i}: {len(x)} columns vs {len(y)}"
        for u, v in zip(x, y):
            if isinstance(u, float) and isinstance(v, float):
                if abs(u - v) > 1e-6 * max(1.0, abs(u), abs(v)) and abs(u - v) > 0.01:
                    return f"row {i}: {u} vs {v}"
            elif u != v:
                return f"row {i}: {u!r} vs {v!r}"
    return None


def data(sf, cache):
    out = os.path.join(cache, f"tpch-sf{sf}")
    if not all(os.path.exists(os.path.join(out, f"{t}.parquet")) for t in TABLES):
        shutil.rmtree(out, ignore_errors=True)
        if shutil.which("tpchgen-cli") is None:
            sh([sys.executable, "-m", "pip", "install", "--quiet", "tpchgen-cli"])
        t = time.perf_counter()
        sh(["tpchgen-cli", "parquet", "-s", str(sf), f"--output-dir={out}"])
        print(f"generated SF{sf} in {time.perf_counter() - t:.1f} s")
    return out


def load(weir, work, src):
    proj = os.path.join(work, "weir")
    os.makedirs(os.path.join(proj, "pipelines"), exist_ok=True)
    with open(os.path.join(proj, "weir.yaml"), "w") as f:
        f.write("name: tpch\n")
    for t in TABLES:
        with open(os.path.join(proj, "pipelines", f"{t}.yaml"), "w") as f:
            f.write(f"source:\n  type: files\n  path: {src}/{t}.parquet\n"
                    f"sink:\n  table: tpch.{t}\n  mode: overwrite\n")
    t = time.perf_counter()
    sh([weir, "--project", proj, "run", "--quiet"])
    print(f"weir run loaded the 8 tables in {time.perf_counter() - t:.1f} s")
    return proj


def small_files(weir, work, files):
    import json, deltalake, pyarrow as pa, pyarrow.parquet as pq
    from deltalake.transaction import AddAction, create_table_with_add_actions
    rows_per_file = 100
    n = files * rows_per_file
    base = os.path.join(work, "small", "lake", "bench", "events")
    os.makedirs(base, exist_ok=True)
    # One commit of `files` files of 100 rows: what many small appends leave behind.
    adds, now = [], int(time.time() * 1000)
    for i in range(files):
        lo = i * rows_per_file
        part = pa.table({"id": pa.array(range(lo, lo + rows_per_file), pa.int64()),
                         "v": pa.array([j % 97 for j in range(lo, lo + rows_per_file)], pa.int64())})
        name = f"part-{i:05}.parquet"
        pq.write_table(part, os.path.join(base, name), compression="zstd")
        stats = {"numRecords": rows_per_file,
                 "minValues": {"id": lo, "v": 0}, "maxValues": {"id": lo + rows_per_file - 1, "v": 96},
                 "nullCount": {"id": 0, "v": 0}}
        adds.append(AddAction(name, os.path.getsize(os.path.join(base, name)), {}, now, True,
                              json.dumps(stats)))
    schema = deltalake.Schema.from_arrow(part.schema)
    create_table_with_add_actions(base, schema, adds, mode="error")
    got = len(deltalake.DeltaTable(base).file_uris())
    other = os.path.join(work, "small-copy")
    shutil.copytree(base, other)
    proj = os.path.join(work, "small")
    with open(os.path.join(proj, "weir.yaml"), "w") as f:
        f.write("name: small\n")
    tw, _ = timed(lambda: sh([weir, "--project", proj, "table", "optimize", "bench.events"]), 1)
    td, _ = timed(lambda: deltalake.DeltaTable(other).optimize.compact(), 1)
    after_w = len(deltalake.DeltaTable(base).file_uris())
    after_d = len(deltalake.DeltaTable(other).file_uris())
    rows = int(sh([weir, "--project", proj, "query", "select count(*) from bench.events",
                   "--format", "csv"]).splitlines()[1])
    assert rows == n, f"optimize lost rows: {rows} of {n}"
    print(f"\noptimize {got} small files ({n:,} rows): weir {tw:.2f} s -> {after_w} files, "
          f"delta-rs {td:.2f} s -> {after_d} files, ratio {tw / td:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sf", default="1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weir", default=os.path.expanduser("~/.cache/weir-target/release/weir"))
    ap.add_argument("--queries", default="")
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/weir-bench"))
    args = ap.parse_args()
    import duckdb, polars as pl

    src = data(args.sf, args.cache)
    work = tempfile.mkdtemp(prefix="weir-tpch-")
    try:
        proj = load(args.weir, work, src)
        lake = os.path.join(proj, "lake", "tpch")
        files = {t: sorted(glob.glob(os.path.join(lake, t, "*.parquet"))) for t in TABLES}
        con = duckdb.connect()
        con.execute("create schema tpch")
        for t in TABLES:
            con.execute(f"create view tpch.{t} as select * from read_parquet({files[t]!r})")
        ctx = pl.SQLContext({t: pl.scan_parquet(files[t]) for t in TABLES})
        try:
            import datafusion
            dfx = datafusion.SessionContext(datafusion.SessionConfig().with_target_partitions(2))
            dfx.sql("create schema tpch")
            for t in TABLES:
                dfx.register_parquet(f"tpch.{t}", os.path.join(lake, t) + "/", file_extension=".parquet")
        except ImportError:
            dfx = None

        startup, _ = timed(lambda: sh([args.weir, "--project", proj, "query", "select 1"]), args.runs)
        wanted = [int(q) for q in args.queries.split(",") if q] or list(range(1, 23))
        rows = []
        for n in wanted:
            sql = open(os.path.join(HERE, "tpch", f"q{n:02}.sql")).read()
            tw, out = timed(lambda: sh([args.weir, "--project", proj, "query", sql,
                                        "--format", "csv"]), args.runs)
            weir_rows = norm(list(csv.reader(io.StringIO(out)))[1:])
            td, duck = timed(lambda: con.execute(sql).fetchall(), args.runs)
            diff = same(weir_rows, norm(duck))
            if diff:
                sys.exit(f"q{n}: weir's answer differs from DuckDB's: {diff}")
            try:
                tp, _ = timed(lambda: ctx.execute(sql.replace("tpch.", ""), eager=True), args.runs)
            except Exception as e:  # Polars' SQL lacks some constructs (correlated subqueries)
                tp = None
                print(f"q{n}: Polars SQL cannot run it: {str(e).splitlines()[0][:100]}")
            tf = timed(lambda: dfx.sql(sql).collect(), args.runs)[0] if dfx else None
            rows.append((n, tw, td, tp, tf))
            print(f"q{n:02}  weir {tw:6.3f}  duckdb {td:6.3f}  "
                  f"polars {'n/a' if tp is None else f'{tp:6.3f}'}  "
                  f"datafusion {'n/a' if tf is None else f'{tf:6.3f}'}  ratio {tw / td:5.2f}", flush=True)

        def gmean(xs):
            return math.exp(sum(math.log(x) for x in xs) / len(xs))

        print(f"\nSF{args.sf}, best of {args.runs}; weir includes process start "
              f"(`weir query \"select 1\"` takes {startup:.3f} s)")
        na = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)
        print("| query | weir s | DuckDB s | Polars s | DataFusion s | weir/DuckDB | weir/Polars "
              "| DataFusion/DuckDB |")
        print("|---|---|---|---|---|---|---|---|")
        for n, tw, td, tp, tf in rows:
            print(f"| q{n} | {tw:.3f} | {td:.3f} | {na(tp)} | {na(tf)} | {tw / td:.2f} | "
                  f"{na(tp and tw / tp, '{:.2f}')} | {na(tf and tf / td, '{:.2f}')} |")
        g = gmean([r[1] / r[2] for r in rows])
        polars = [(r[1], r[3]) for r in rows if r[3] is not None]
        fusion = [r[4] / r[2] for r in rows if r[4] is not None]
        print(f"| geometric mean | {gmean([r[1] for r in rows]):.3f} | {gmean([r[2] for r in rows]):.3f} | "
              f"| | {g:.2f} | {gmean([w / p for w, p in polars]):.2f} ({len(polars)} queries) | "
              f"{na(fusion and gmean(fusion), '{:.2f}')} |")
        print(f"weir/DuckDB geometric mean {g:.2f} (target: within 1.5)")
        if args.small_files:
            small_files(args.weir, work, args.small_files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

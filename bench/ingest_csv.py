#!/usr/bin/env python3
"""CSV ingestion benchmark: weir (CSV -> Delta) against DuckDB and Polars (CSV -> Parquet)
and delta-rs from Python (CSV -> Delta), on the same file in the same run.

Usage: python3 bench/ingest_csv.py [--rows N] [--weir PATH]
Prints rows/s per tool and weir's time as a ratio of the fastest peer.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time

def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", 3_000_000)))
    ap.add_argument("--weir", default=os.path.expanduser("~/.cache/weir-target/release/weir"))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    import duckdb, polars as pl, pyarrow.csv as pacsv, deltalake

    work = tempfile.mkdtemp(prefix="weir-bench-")
    csv = os.path.join(work, "events.csv")
    duckdb.sql(f"""copy (select i as event_id, 'user_' || (i % 100000) as user_id,
        ['click','view','buy','share'][1 + i % 4] as kind,
        round((i % 10000) / 7.0, 2) as amount,
        timestamp '2024-01-01' + to_seconds(i % 8640000) as ts
        from range({a.rows}) t(i)) to '{csv}' (header, delimiter ',')""")
    size = os.path.getsize(csv)
    print(f"input: {a.rows:,} rows, {size / 2**20:.0f} MiB CSV; {os.cpu_count()} cores")

    proj = os.path.join(work, "proj")
    os.makedirs(os.path.join(proj, "pipelines"))
    open(os.path.join(proj, "weir.yaml"), "w").write("name: bench\n")
    open(os.path.join(proj, "pipelines", "events.yaml"), "w").write(
        f"source:\n  type: files\n  path: {csv}\nsink:\n  table: raw.events\n  mode: overwrite\n")

    def weir():
        subprocess.run([a.weir, "--project", proj, "run", "--quiet", "--full-refresh"], check=True,
                       stdout=subprocess.DEVNULL)
    def duck():
        duckdb.sql(f"copy (select * from read_csv_auto('{csv}')) to '{work}/duck.parquet' (format parquet, compression zstd)")
    def polars():
        pl.scan_csv(csv, try_parse_dates=True).sink_parquet(f"{work}/polars.parquet", compression="zstd")
    def delta_rs():
        t = pacsv.read_csv(csv)
        deltalake.write_deltalake(f"{work}/delta_py", t, mode="overwrite")

    tools = {"weir (CSV->Delta)": weir, "duckdb (CSV->Parquet)": duck,
             "polars (CSV->Parquet)": polars, "delta-rs python (CSV->Delta)": delta_rs}
    best = {}
    for name, fn in tools.items():
        times = [timed(fn) for _ in range(a.repeat)]
        best[name] = min(times)
        print(f"{name:32s} {best[name]:7.2f} s  {a.rows / best[name] / 1e6:6.2f} M rows/s")
    # Same rows: the Delta table (its current version, as another engine reads it) holds the input rows.
    got = deltalake.DeltaTable(f"{proj}/lake/raw/events").to_pyarrow_dataset().count_rows()
    assert got == a.rows, f"weir wrote {got} rows, expected {a.rows}"
    peers = {k: v for k, v in best.items() if not k.startswith("weir")}
    fastest = min(peers, key=peers.get)
    ratio = best["weir (CSV->Delta)"] / peers[fastest]
    print(f"weir / fastest peer ({fastest}): {ratio:.2f}x  (target <= 1.5x)")
    shutil.rmtree(work)

if __name__ == "__main__":
    sys.exit(main())

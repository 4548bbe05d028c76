#!/usr/bin/env python3
"""PostgreSQL benchmark: extract a table into Delta with weir against `psql \\copy ... to`
(the physical baseline) and connectorx (Rust, binary protocol, what Polars uses), then load
it back with weir against `psql \\copy ... from`, all in the same run on a throwaway
cluster on loopback.

Usage: python3 bench/pg.py [--rows N] [--weir PATH] [--repeat K]
"""
import argparse, os, shutil, socket, subprocess, sys, tempfile, time

def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def pg_bin():
    out = subprocess.run(["sh", "-c", "readlink -f $(command -v initdb)"], capture_output=True, text=True).stdout.strip()
    return os.path.dirname(out) if out else "/usr/lib/postgresql/15/bin"

def start_cluster(work, conf):
    """A throwaway cluster in `work` on a free loopback port, with `conf` appended to its
    postgresql.conf; returns (url, port, bin dir, stop function)."""
    port, binp = free_port(), pg_bin()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = os.path.join(work, "data")
    sh(*as_pg, f"{binp}/initdb", "-D", data, "-U", "bench", "-A", "trust", "--no-sync", stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"listen_addresses='127.0.0.1'\nport={port}\nunix_socket_directories='{work}'\n{conf}")
    sh(*as_pg, f"{binp}/pg_ctl", "-D", data, "-l", os.path.join(work, "log"), "-w", "start", stdout=subprocess.DEVNULL)
    stop = lambda: subprocess.run([*as_pg, f"{binp}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
                                  stdout=subprocess.DEVNULL)
    return f"postgresql://bench@127.0.0.1:{port}/postgres", port, binp, stop

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", 5_000_000)))
    ap.add_argument("--weir", default=os.path.expanduser("~/.cache/weir-target/release/weir"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=2)
    a = ap.parse_args()
    import connectorx as cx

    work = tempfile.mkdtemp(prefix="weir-pgbench-")
    os.chmod(work, 0o777)
    url, _, binp, stop = start_cluster(
        work, "fsync=off\nsynchronous_commit=off\nfull_page_writes=off\nshared_buffers=512MB\n")
    psql = lambda sql: sh(f"{binp}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql, stdout=subprocess.DEVNULL)
    try:
        psql(f"""create table events as select g::bigint as id, (g % 100000)::int as customer_id,
                 round((g % 10000) / 7.0, 2)::numeric(12,2) as amount,
                 (array['new','paid','shipped','returned'])[1 + g % 4] as status,
                 timestamptz '2024-01-01' + g * interval '1 second' as created_at
                 from generate_series(1, {a.rows}) g;
                 alter table events add primary key (id);""")
        psql("vacuum analyze events")
        print(f"input: {a.rows:,} rows in PostgreSQL 15 on loopback; {os.cpu_count()} cores; "
              f"weir and connectorx read {a.partitions} key ranges in parallel")

        proj = os.path.join(work, "proj"); os.makedirs(os.path.join(proj, "pipelines"))
        open(os.path.join(proj, "weir.yaml"), "w").write(
            f"name: bench\nconnections:\n  db:\n    type: postgres\n    url: {url}\n    sslmode: disable\n")
        open(os.path.join(proj, "pipelines", "extract.yaml"), "w").write(
            f"source:\n  type: postgres\n  connection: db\n  table: events\n  partitions: {a.partitions}\n"
            "sink:\n  table: raw.events\n  mode: overwrite\n")
        open(os.path.join(proj, "pipelines", "load.yaml"), "w").write(
            "source:\n  type: lake\n  table: raw.events\n"
            "sink:\n  type: postgres\n  connection: db\n  table: public.events_back\n  mode: overwrite\n")
        csv = os.path.join(work, "events.csv")
        weir = lambda sel: sh(a.weir, "--project", proj, "run", sel, "--quiet", "--full-refresh",
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        extract = {
            "psql \\copy to CSV": lambda: psql(f"\\copy events to '{csv}' csv"),
            "weir (PostgreSQL->Delta)": lambda: weir("extract"),
            "connectorx (->Arrow)": lambda: cx.read_sql(url, "select * from events", return_type="arrow",
                                                        partition_on="id", partition_num=a.partitions),
        }
        best = {}
        for name, fn in extract.items():
            best[name] = min(timed(fn) for _ in range(a.repeat))
            print(f"extract {name:28s} {best[name]:7.2f} s  {a.rows / best[name] / 1e6:6.2f} M rows/s")
        ratio = best["psql \\copy to CSV"] / best["weir (PostgreSQL->Delta)"]
        print(f"weir extraction speed / psql \\copy: {ratio:.2f}  (target >= 0.5)")

        psql("create table events_csv (like events)")
        load = {
            "psql \\copy from CSV": lambda: (psql("truncate events_csv"), psql(f"\\copy events_csv from '{csv}' csv")),
            "weir (Delta->PostgreSQL)": lambda: weir("load"),
        }
        lbest = {}
        for name, fn in load.items():
            lbest[name] = min(timed(fn) for _ in range(a.repeat))
            print(f"load    {name:28s} {lbest[name]:7.2f} s  {a.rows / lbest[name] / 1e6:6.2f} M rows/s")
        lratio = lbest["psql \\copy from CSV"] / lbest["weir (Delta->PostgreSQL)"]
        print(f"weir load speed / psql \\copy from: {lratio:.2f}")
        n = subprocess.run([f"{binp}/psql", "-X", "-A", "-t", "-d", url, "-c",
                            "select count(*) from events_back"], capture_output=True, text=True).stdout.strip()
        assert n == str(a.rows), f"weir loaded {n} rows, expected {a.rows}"
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())

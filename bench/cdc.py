#!/usr/bin/env python3
"""Change data capture benchmark: pgbench's tables mirrored into Delta by `weir cdc run`,
against `pg_recvlogical` reading the same kind of slot (pgoutput) alone, in the same run
on a throwaway cluster on loopback.

1. Snapshot: `pgbench -i` tables copied into the lake.
2. Throughput: a pgbench backlog (weir stopped) is drained by weir and, from a second slot
   created at the same position, by pg_recvlogical (which decodes and discards).
3. Latency: weir runs while pgbench commits at a fixed rate; weir reports, per source
   transaction, the time from its commit to the Delta commit holding it (p50, p99).

Usage: python3 bench/cdc.py [--weir PATH] [--scale S] [--backlog SECONDS] [--rate TPS]
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(__file__))
from pg import sh, start_cluster  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weir", default=os.path.expanduser("~/.cache/weir-target/release/weir"))
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--backlog", type=int, default=30, help="seconds of pgbench load to drain")
    ap.add_argument("--rate", type=int, default=1000, help="pgbench transactions/s in the latency run")
    ap.add_argument("--latency-secs", type=int, default=30)
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="weir-cdcbench-")
    os.chmod(work, 0o777)
    url, port, binp, stop = start_cluster(work, "wal_level=logical\nmax_wal_senders=10\nmax_replication_slots=10\n"
                                          "shared_buffers=512MB\nmax_wal_size=4GB\n")

    def q(sql):
        return subprocess.run([f"{binp}/psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
                              check=True, capture_output=True, text=True).stdout.strip()

    def pgbench(*args):
        return [f"{binp}/pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "bench", *args, "postgres"]

    try:
        sh(*pgbench("-i", "-s", str(a.scale), "-q"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proj = os.path.join(work, "proj")
        os.makedirs(os.path.join(proj, "cdc"))
        open(os.path.join(proj, "weir.yaml"), "w").write(
            f"name: bench\nconnections:\n  db:\n    type: postgres\n    url: {url}\n    sslmode: disable\n")
        open(os.path.join(proj, "cdc", "bench.yaml"), "w").write(
            "source:\n  type: postgres_cdc\n  connection: db\n"
            "  tables: [pgbench_accounts, pgbench_branches, pgbench_tellers]\n"
            "sink:\n  schema: mirror\nbatch:\n  poll: 50ms\n")
        weir = [a.weir, "--project", proj, "cdc", "run", "bench", "--format", "json"]
        print(f"PostgreSQL 15 on loopback, pgbench scale {a.scale} "
              f"({100_000 * a.scale:,} accounts); {os.cpu_count()} cores; pgbench_history has no key and is not captured")

        t = time.perf_counter()
        s = json.loads(subprocess.run(weir + ["--until-idle", "1s"], check=True, capture_output=True, text=True).stdout)
        secs = time.perf_counter() - t - 1
        print(f"snapshot: {s['snapshot_rows']:,} rows in {secs:.2f} s ({s['snapshot_rows'] / secs:,.0f} rows/s)")

        # A second slot at the same position, for pg_recvlogical.
        q("select pg_create_logical_replication_slot('recv', 'pgoutput')")
        sh(*pgbench("-n", "-c", "4", "-j", "2", "-T", str(a.backlog)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = q("select pg_current_wal_lsn()")
        txns = int(q("select count(*) from pgbench_history"))
        print(f"backlog: {txns:,} pgbench transactions ({3 * txns:,} captured row changes) in {a.backlog} s of load")

        t = time.perf_counter()
        sh(f"{binp}/pg_recvlogical", "-d", url, "--slot", "recv", "--start", "--endpos", end, "--no-loop",
           "-o", "proto_version=1", "-o", "publication_names=weir_bench", "-f", "/dev/null")
        recv = time.perf_counter() - t
        t = time.perf_counter()
        s = json.loads(subprocess.run(weir + ["--until-idle", "1s"], check=True, capture_output=True, text=True).stdout)
        wsecs = time.perf_counter() - t - 1
        changes = s["changes"]
        print(f"pg_recvlogical (decode, discard): {recv:6.2f} s  {3 * txns / recv:10,.0f} changes/s")
        print(f"weir cdc run (-> Delta merges):   {wsecs:6.2f} s  {changes / wsecs:10,.0f} changes/s  "
              f"({changes:,} changes, {s['transactions']:,} transactions, {s['batches']} batches)")
        print(f"weir / pg_recvlogical: {recv / wsecs:.2f}   (target: >= 40,000 changes/s)")
        q("select pg_drop_replication_slot('recv')")

        # Latency under a steady load.
        p = subprocess.Popen(weir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(2)
        sh(*pgbench("-n", "-c", "2", "-R", str(a.rate), "-T", str(a.latency_secs)),
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        s = json.loads(out)
        print(f"latency at {a.rate} transactions/s ({3 * a.rate:,} changes/s), source commit -> Delta commit: "
              f"p50 {s['latency_p50_ms']:.0f} ms, p99 {s['latency_p99_ms']:.0f} ms "
              f"over {s['transactions']:,} transactions in {s['batches']} batches  (target: p50 < 1000 ms)")

        # The mirrors equal the tables.
        mine = subprocess.run([a.weir, "--project", proj, "query", "--format", "json",
                               "select sum(abalance) as s, count(*) as n from mirror.pgbench_accounts"],
                              check=True, capture_output=True, text=True).stdout
        got = json.loads(mine)[0]
        want = q("select sum(abalance) || ' ' || count(*) from pgbench_accounts").split()
        assert [str(got["s"]), str(got["n"])] == want, (got, want)
        print("mirror check: sum(abalance) and count equal the source")
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

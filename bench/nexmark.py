#!/usr/bin/env python3
"""Nexmark: weir's streaming SQL against Apache Flink (PyPI's apache-flink) on the same
pre-generated bid events, in the same run.

1. bench/nexmark-gen (the `nexmark` crate, built from an explicit config) writes the bids
   among the first --events Nexmark events as JSON lines (cached between runs).
2. Each query runs as a weir stream over that file (`source.type: file`, event time
   `date_time` with a 4 s allowed delay, as in Nexmark's Flink setup), into a Delta
   table, and as a Flink SQL job (streaming mode, parallelism 1, filesystem JSON source
   with the same watermark, blackhole sink: Nexmark's usual setup, so Flink writes
   nothing while weir writes Parquet).
3. Each engine's CPU time (user + system, all its processes and threads) is measured on
   the full file and on a file of 1,000 bids; the difference is the cost of the events,
   without start-up. Events per second per core = events / that CPU time.
4. weir's results are checked: q0/q1 row counts, q2 against the file, q5/q7 one result
   per window.

q3, q4 and q8 read every event (persons, auctions and bids in one flat file, as Nexmark's
Flink setup reads them). q3 joins persons with their auctions, without a window (weir's
incremental join of the stream with itself). q4 joins auctions with their bids until each
auction expires, takes each closed auction's winning bid and keeps the average per
category up to date (weir: a running aggregate, its rows updated in place by `sink.key`).
q8 joins two aggregates of the same tumbling window.

Each query runs --runs times (default 3) in each engine, by turns, and each engine counts
its fewest CPU seconds: single runs of either moved by up to 40% on this machine.

Usage: python3 bench/nexmark.py [--events 2000000] [--weir PATH] [--queries q0,q5] [--runs 3]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.expanduser("~/.cache/weir-bench")
FLINK_VENV = os.path.expanduser("~/.cache/weir-tools/flink-venv")

COLUMNS = [("auction", "bigint"), ("bidder", "bigint"), ("price", "bigint"),
           ("channel", "string"), ("url", "string"), ("date_time", "bigint"),
           ("extra", "string")]
# Every event, flat (`nexmark-gen ... all`): what q3 and q8 read. (The `nexmark` crate
# writes US states in lower case, where Nexmark's Java generator writes them in upper.)
ALL_COLUMNS = [("event_type", "int"), ("date_time", "bigint"),
               ("p_id", "bigint"), ("p_name", "string"), ("p_email_address", "string"),
               ("p_credit_card", "string"), ("p_city", "string"), ("p_state", "string"),
               ("p_extra", "string"), ("a_id", "bigint"), ("a_item_name", "string"),
               ("a_description", "string"), ("a_initial_bid", "bigint"), ("a_reserve", "bigint"),
               ("a_expires", "bigint"), ("a_seller", "bigint"), ("a_category", "bigint"),
               ("a_extra", "string"), ("b_auction", "bigint"), ("b_bidder", "bigint"),
               ("b_price", "bigint"), ("b_channel", "string"), ("b_url", "string"),
               ("b_extra", "string")]
ALL_EVENTS = {"q3", "q4", "q8"}

WEIR = {
    "q0": "SELECT auction, bidder, price, date_time, extra FROM bid",
    "q1": "SELECT auction, bidder, 0.908 * price AS price, date_time, extra FROM bid",
    "q2": "SELECT auction, price FROM bid WHERE auction % 123 = 0",
    "q3": """SELECT p.p_name AS name, p.p_city AS city, p.p_state AS state, a.a_id AS id
FROM events a JOIN events p ON a.a_seller = p.p_id
WHERE a.event_type = 1 AND a.a_category = 10
  AND p.event_type = 0 AND p.p_state IN ('or', 'id', 'ca')""",
    # Each auction's winning bid once it has closed (the watermark passed a_expires), and
    # the running average per category of those, updated in place (`sink.key`).
    "q4": """SELECT category, avg(final) AS average FROM (
  SELECT a.a_id AS id, a.a_category AS category, max(b.b_price) AS final
  FROM events a JOIN events b
    ON a.a_id = b.b_auction AND b.date_time BETWEEN a.date_time AND a.a_expires
  WHERE a.event_type = 1 AND b.event_type = 2
  GROUP BY a.a_id, a.a_category, a.a_expires) q
GROUP BY category""",
    "q5": """WITH counts AS (
  SELECT window_start, window_end, auction, count(*) AS num
  FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
  GROUP BY window_start, window_end, auction)
SELECT auction, num, window_start, window_end FROM (
  SELECT *, row_number() OVER (PARTITION BY window_start ORDER BY num DESC) AS r FROM counts)
WHERE r = 1""",
    "q7": """SELECT window_start, window_end, max(price) AS price,
  first_value(auction ORDER BY price DESC) AS auction,
  first_value(bidder ORDER BY price DESC) AS bidder
FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND)
GROUP BY window_start, window_end""",
    "q8": """SELECT p.id, p.name, p.window_start FROM
  (SELECT p_id AS id, p_name AS name, window_start, window_end
   FROM TUMBLE(events, date_time, INTERVAL '10' SECOND) WHERE event_type = 0
   GROUP BY p_id, p_name, window_start, window_end) p
JOIN
  (SELECT a_seller AS seller, window_start, window_end
   FROM TUMBLE(events, date_time, INTERVAL '10' SECOND) WHERE event_type = 1
   GROUP BY a_seller, window_start, window_end) a
ON p.id = a.seller AND p.window_start = a.window_start AND p.window_end = a.window_end""",
}

# Queries whose result is updated in place: the sink's key.
SINK_KEY = {"q4": "category"}

FLINK = {
    "q0": "SELECT auction, bidder, price, date_time, extra FROM bid",
    "q1": "SELECT auction, bidder, 0.908 * price AS price, date_time, extra FROM bid",
    "q2": "SELECT auction, price FROM bid WHERE MOD(auction, 123) = 0",
    "q3": """SELECT P.p_name AS name, P.p_city AS city, P.p_state AS state, A.a_id AS id
FROM events AS A INNER JOIN events AS P ON A.a_seller = P.p_id
WHERE A.event_type = 1 AND A.a_category = 10
  AND P.event_type = 0 AND P.p_state IN ('or', 'id', 'ca')""",
    "q4": """SELECT Q.category, AVG(Q.final) AS average FROM (
  SELECT MAX(B.b_price) AS final, A.a_category AS category
  FROM events A, events B
  WHERE A.event_type = 1 AND B.event_type = 2 AND A.a_id = B.b_auction
    AND B.date_time BETWEEN A.date_time AND A.a_expires
  GROUP BY A.a_id, A.a_category) Q
GROUP BY Q.category""",
    "q5": """SELECT auction, num, window_start, window_end FROM (
  SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY num DESC) AS r FROM (
    SELECT window_start, window_end, auction, COUNT(*) AS num
    FROM TABLE(HOP(TABLE bid, DESCRIPTOR(ts), INTERVAL '2' SECOND, INTERVAL '10' SECOND))
    GROUP BY window_start, window_end, auction))
WHERE r = 1""",
    "q7": """SELECT window_start, window_end, price, auction, bidder FROM (
  SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY price DESC) AS r
  FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(ts), INTERVAL '10' SECOND)))
WHERE r = 1""",
    "q8": """SELECT P.id, P.name, P.starttime FROM (
  SELECT p_id AS id, p_name AS name, window_start AS starttime, window_end AS endtime
  FROM TABLE(TUMBLE(TABLE events, DESCRIPTOR(ts), INTERVAL '10' SECOND)) WHERE event_type = 0
  GROUP BY p_id, p_name, window_start, window_end) P
JOIN (
  SELECT a_seller AS seller, window_start AS starttime, window_end AS endtime
  FROM TABLE(TUMBLE(TABLE events, DESCRIPTOR(ts), INTERVAL '10' SECOND)) WHERE event_type = 1
  GROUP BY a_seller, window_start, window_end) A
ON P.id = A.seller AND P.starttime = A.starttime AND P.endtime = A.endtime""",
}


def sh(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def proc_tree_cpu(root):
    """CPU seconds (user + system) so far of `root` and its descendants, per pid."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12).
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def cpu_of(cmd, **kw):
    """Runs cmd; returns (CPU seconds of it and every process it starts, wall, stdout).

    The process tree is sampled every 50 ms and each process counts with its last sample:
    a JVM that its parent does not wait for is counted too (rusage would miss it)."""
    t = time.perf_counter()
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, **kw)
    seen = {}
    while p.poll() is None:
        seen.update(proc_tree_cpu(p.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-2000:]}\n{err[-3000:]}")
    return sum(seen.values()), wall, out


def events_file(n, kind="bids"):
    path = os.path.join(CACHE, f"nexmark-{kind}-{n}-10k.jsonl")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        manifest = os.path.join(HERE, "nexmark-gen", "Cargo.toml")
        sh(["cargo", "build", "--release", "--quiet", "--manifest-path", manifest])
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "nexmark-gen", "target"))
        # (cargo puts it in CARGO_TARGET_DIR when that is set, else beside its Cargo.toml)
        sh([os.path.join(target, "release", "nexmark-gen"), str(n), path + ".tmp", kind])
        os.rename(path + ".tmp", path)
    return path


def small_file(path, lines=1000):
    out = path + f".first{lines}"
    if not os.path.exists(out):
        with open(path) as f, open(out, "w") as o:
            for i, line in enumerate(f):
                if i >= lines:
                    break
                o.write(line)
    return out


def weir_project(dir, q, path):
    os.makedirs(os.path.join(dir, "streams"), exist_ok=True)
    with open(os.path.join(dir, "weir.yaml"), "w") as f:
        f.write("name: nexmark\n")
    columns, source = (ALL_COLUMNS, "events") if q in ALL_EVENTS else (COLUMNS, "bid")
    cols = "".join(f"    - {{name: {c}, type: {t}}}\n" for c, t in columns)
    sql = "\n".join("  " + l for l in WEIR[q].splitlines())
    with open(os.path.join(dir, "streams", f"{q}.yaml"), "w") as f:
        f.write(f"source:\n  type: file\n  path: {path}\n  name: {source}\n  columns:\n{cols}"
                f"event_time:\n  column: date_time\n  allowed_delay: 4s\n"
                f"sql: |\n{sql}\nsink:\n  table: nexmark.{q}\n"
                + (f"  key: [{SINK_KEY[q]}]\n" if q in SINK_KEY else "") +
                f"flush:\n  rows: 200000\n  bytes: 256MiB\n")


def run_weir(weir, q, path):
    d = tempfile.mkdtemp(prefix=f"nexmark-{q}-")
    try:
        weir_project(d, q, path)
        cpu, wall, out = cpu_of([weir, "--project", d, "stream", "run", q, "--format", "json"])
        summary = json.loads(out)
        summary["table"] = json.loads(sh([weir, "--project", d, "query",
                                          f"select * from nexmark.{q}", "--format", "json"])
                                      or "[]") if q in SINK_KEY else None
        rows = int(sh([weir, "--project", d, "query", f"select count(*) from nexmark.{q}",
                       "--format", "csv"]).split()[-1])
        return cpu, wall, summary, rows
    finally:
        shutil.rmtree(d, ignore_errors=True)


FLINK_JOB = r'''
import sys
from pyflink.table import EnvironmentSettings, TableEnvironment
q, path, sql, table, columns = sys.argv[1:6]
t = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
t.get_config().set("parallelism.default", "1")
t.execute_sql(f"""CREATE TABLE {table} (
  {columns},
  ts AS TO_TIMESTAMP_LTZ(date_time, 3),
  WATERMARK FOR ts AS ts - INTERVAL '4' SECOND
) WITH ('connector' = 'filesystem', 'path' = '{path}', 'format' = 'json')""")
result = t.sql_query(sql)
cols = ", ".join(f"`{n}` {str(ty)}" for n, ty in zip(result.get_schema().get_field_names(),
                                                     result.get_schema().get_field_data_types()))
t.execute_sql(f"CREATE TABLE sink ({cols}) WITH ('connector' = 'blackhole')")
result.execute_insert("sink").wait()
'''


def flink_python():
    py = os.path.join(FLINK_VENV, "bin", "python")
    if not os.path.exists(py):
        sh([sys.executable, "-m", "venv", FLINK_VENV])
        sh([os.path.join(FLINK_VENV, "bin", "pip"), "install", "--quiet", "apache-flink==2.3.0"])
    return py


def run_flink(py, q, path):
    job = os.path.join(tempfile.gettempdir(), "weir-nexmark-flink.py")
    with open(job, "w") as f:
        f.write(FLINK_JOB)
    columns, table = (ALL_COLUMNS, "events") if q in ALL_EVENTS else (COLUMNS, "bid")
    ddl = ", ".join(f"{c} {t.upper().replace('STRING', 'STRING')}" for c, t in columns)
    cpu, wall, _ = cpu_of([py, job, q, path, FLINK[q], table, ddl])
    return cpu, wall


def check(q, rows, path, summary):
    events = summary["records"]
    if q in ("q0", "q1"):
        return None if rows == events else f"{rows} rows for {events} events"
    if q == "q2":
        want = 0
        with open(path) as f:
            for line in f:
                if json.loads(line)["auction"] % 123 == 0:
                    want += 1
        return None if rows == want else f"{rows} rows, {want} expected"
    if q == "q8":
        # Persons and sellers per 10 s window (events are in order: none is late), for the
        # windows the final watermark (newest time - 4 s) has closed.
        persons, sellers, newest = set(), set(), 0
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                w = e["date_time"] // 10_000
                newest = max(newest, e["date_time"])
                if e["event_type"] == 0:
                    persons.add((w, e["p_id"], e["p_name"]))
                elif e["event_type"] == 1:
                    sellers.add((w, e["a_seller"]))
        closed = lambda w: (w + 1) * 10_000 <= newest - 4_000
        want = sum(1 for (w, pid, _) in persons if closed(w) and (w, pid) in sellers)
        return None if rows == want else f"{rows} rows, {want} expected"
    if q == "q3":
        # Every (person, auction) pair: events are in order, none is late, and the join
        # has no time bound.
        persons, sellers = {}, []
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                if e["event_type"] == 0 and e["p_state"] in ("or", "id", "ca"):
                    persons[e["p_id"]] = persons.get(e["p_id"], 0) + 1
                elif e["event_type"] == 1 and e["a_category"] == 10:
                    sellers.append(e["a_seller"])
        want = sum(persons.get(s, 0) for s in sellers)
        if want == 0:
            return "no pairs in the reference: check the query's filter values"
        return None if rows == want else f"{rows} rows, {want} expected"
    if q == "q4":
        # Each auction closed by the final watermark (newest time - 4 s; events are in
        # order, none is late) with a bid between its start and its expiry: its highest
        # bid, then the average per category.
        # (A bid may come just before its auction, in the same millisecond.)
        auctions, bids, best, newest = {}, [], {}, 0
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                newest = max(newest, e["date_time"])
                if e["event_type"] == 1:
                    auctions[e["a_id"]] = (e["date_time"], e["a_expires"], e["a_category"])
                elif e["event_type"] == 2:
                    bids.append((e["b_auction"], e["date_time"], e["b_price"]))
        for k, t, price in bids:
            if k in auctions and auctions[k][0] <= t <= auctions[k][1]:
                best[k] = max(best.get(k, price), price)
        closed = {k: v for k, v in best.items() if auctions[k][1] < newest - 4_000}
        per = {}
        for k, v in closed.items():
            per.setdefault(auctions[k][2], []).append(v)
        want = {c: sum(v) / len(v) for c, v in per.items()}
        if not want:
            return "no closed auction in the reference"
        got = {r["category"]: r["average"] for r in summary["table"]}
        if rows != len(want):
            return f"{rows} categories, {len(want)} expected"
        bad = [c for c in want if abs(got.get(c, -1) - want[c]) > 1e-6 * want[c]]
        return f"averages differ for {bad}: {got} vs {want}" if bad or len(got) != len(want) else None
    if q in ("q5", "q7"):
        return None if rows > 0 else "no windows emitted"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--weir", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/weir-target")),
        "release", "weir"))
    ap.add_argument("--queries", default="q0,q1,q2,q3,q4,q5,q7,q8")
    ap.add_argument("--no-flink", action="store_true")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of each engine per query, by turns; each counts its fewest "
                         "CPU seconds, on the full file and on the small one")
    a = ap.parse_args()
    files = {}
    for kind in ("bids", "all"):
        path = events_file(a.events, kind)
        with open(path) as f:
            files[kind] = (path, small_file(path), sum(1 for _ in f))
    print(f"{files['bids'][2]:,} bids of {a.events:,} Nexmark events: {files['bids'][0]}")
    py = None if a.no_flink else flink_python()
    print(f"{'query':<6}{'weir ev/s/core':>16}{'flink ev/s/core':>17}{'weir/flink':>12}"
          f"{'weir cpu s':>12}{'flink cpu s':>13}  check")
    for q in a.queries.split(","):
        path, small, bids = files["all" if q in ALL_EVENTS else "bids"]
        # Best of --runs for each engine, by turns (the machine's noise moves both); the
        # first run's output is checked.
        weir_base, weir_full, flink_base, flink_full = [], [], [], []
        problem = None
        for run in range(a.runs):
            weir_base.append(run_weir(a.weir, q, small)[0])
            cpu, wall, summary, rows = run_weir(a.weir, q, path)
            weir_full.append(cpu)
            if run == 0:
                problem = check(q, rows, path, summary)
            if py:
                flink_base.append(run_flink(py, q, small)[0])
                flink_full.append(run_flink(py, q, path)[0])
        cpu = min(weir_full)
        weir_rate = (bids - 1000) / max(cpu - min(weir_base), 1e-9)
        flink_rate, fcpu = None, None
        if py:
            fcpu = min(flink_full)
            flink_rate = (bids - 1000) / max(fcpu - min(flink_base), 1e-9)
        ratio = f"{weir_rate / flink_rate:>12.2f}" if flink_rate else f"{'-':>12}"
        print(f"{q:<6}{weir_rate:>16,.0f}{(f'{flink_rate:,.0f}' if flink_rate else '-'):>17}{ratio}"
              f"{cpu:>12.2f}{(f'{fcpu:.2f}' if fcpu else '-'):>13}  "
              f"{problem or f'ok ({rows:,} rows)'}", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Data quality benchmark: 20 checks over a table of several million rows with `weir test`
(checks combined into shared scans) against the same checks as plain SQL in DuckDB, one
query per check as people write them, on the same data in the same run.

Usage: python3 bench/checks.py [--rows N] [--weir PATH] [--repeat K]
"""
import argparse, os, shutil, subprocess, sys, tempfile, time

def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

# (weir check, the same check as a DuckDB query counting failing rows)
CHECKS = [
    ("{ check: not_null, column: order_id }", "select count(*) from t where order_id is null"),
    ("{ check: not_null, column: customer_id }", "select count(*) from t where customer_id is null"),
    ("{ check: not_null, column: status }", "select count(*) from t where status is null"),
    ("{ check: not_null, column: amount }", "select count(*) from t where amount is null"),
    ("{ check: not_null, column: created_at }", "select count(*) from t where created_at is null"),
    ("{ check: unique, column: order_id }", "select count(order_id) - count(distinct order_id) from t"),
    ("{ check: unique, columns: [customer_id, order_id] }",
     "select coalesce(sum(n - 1), 0) from (select count(*) n from t group by customer_id, order_id having count(*) > 1)"),
    ("{ check: accepted_values, column: status, values: [new, paid, shipped, returned] }",
     "select count(*) from t where status not in ('new', 'paid', 'shipped', 'returned')"),
    ("{ check: accepted_values, column: channel, values: [web, app, store] }",
     "select count(*) from t where channel not in ('web', 'app', 'store')"),
    ("{ check: range, column: amount, min: 0, max: 100000 }",
     "select count(*) from t where amount < 0 or amount > 100000"),
    ("{ check: range, column: quantity, min: 1, max: 100 }",
     "select count(*) from t where quantity < 1 or quantity > 100"),
    ("{ check: range, column: discount, min: 0, max: 1 }",
     "select count(*) from t where discount < 0 or discount > 1"),
    ("{ check: pattern, column: sku, regex: 'SKU-[0-9]+' }",
     "select count(*) from t where not regexp_full_match(sku, 'SKU-[0-9]+')"),
    ("{ check: pattern, column: email, regex: '[^@ ]+@[^@ ]+' }",
     "select count(*) from t where not regexp_full_match(email, '[^@ ]+@[^@ ]+')"),
    ("{ check: expression, sql: 'quantity * 0 = 0' }", "select count(*) from t where not (quantity * 0 = 0)"),
    ("{ check: expression, sql: 'amount >= discount' }", "select count(*) from t where not (amount >= discount)"),
    ("{ check: row_count, min: 1 }", "select count(*) from t"),
    ("{ check: not_null, column: sku }", "select count(*) from t where sku is null"),
    ("{ check: not_null, column: email }", "select count(*) from t where email is null"),
    ("{ check: range, column: customer_id, min: 0 }", "select count(*) from t where customer_id < 0"),
]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", 5_000_000)))
    ap.add_argument("--weir", default=os.path.expanduser("~/.cache/weir-target/release/weir"))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    import duckdb
    assert len(CHECKS) == 20

    work = tempfile.mkdtemp(prefix="weir-checkbench-")
    data = os.path.join(work, "orders.parquet")
    duckdb.sql(f"""copy (select i as order_id, i % 100000 as customer_id,
        ['new','paid','shipped','returned'][1 + i % 4] as status,
        ['web','app','store'][1 + i % 3] as channel,
        round((i % 10000) / 7.0, 2) as amount, 1 + i % 20 as quantity,
        (i % 10) / 100.0 as discount, 'SKU-' || (i % 5000) as sku,
        'user' || (i % 100000) || '@example.com' as email,
        timestamp '2024-01-01' + to_seconds(i % 8640000) as created_at
        from range({a.rows}) t(i)) to '{data}' (format parquet, compression zstd)""")
    proj = os.path.join(work, "proj")
    os.makedirs(os.path.join(proj, "pipelines"))
    open(os.path.join(proj, "weir.yaml"), "w").write("name: bench\n")
    pipe = os.path.join(proj, "pipelines", "orders.yaml")
    open(pipe, "w").write(f"source:\n  type: files\n  path: {data}\nsink:\n  table: raw.orders\n  mode: overwrite\n")
    subprocess.run([a.weir, "--project", proj, "run", "--quiet"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(pipe, "a") as f:
        f.write("checks:\n" + "".join(f"  - {c}\n" for c, _ in CHECKS))
    print(f"input: {a.rows:,} rows, 10 columns; 20 checks; {os.cpu_count()} cores")

    def weir():
        r = subprocess.run([a.weir, "--project", proj, "test", "--format", "json"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout[:2000]
    con = duckdb.connect()
    con.sql(f"create view t as select * from read_parquet('{data}')")
    def duck():
        for _, q in CHECKS:
            con.sql(q).fetchall()
    best = {}
    for name, fn in {"weir test (Delta)": weir, "duckdb, one query per check (Parquet)": duck}.items():
        best[name] = min(timed(fn) for _ in range(a.repeat))
        print(f"{name:40s} {best[name]:7.2f} s  {a.rows / best[name] / 1e6:6.2f} M rows/s")
    ratio = best["weir test (Delta)"] / best["duckdb, one query per check (Parquet)"]
    print(f"weir / duckdb: {ratio:.2f}x  (target <= 1.0x)")
    shutil.rmtree(work)

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""SCD type 2 benchmark: apply one day of changes (1% of keys changed, 0.1% new keys) to a
type 2 dimension of N rows, with weir (`sink.mode: scd2`) and with the same logic as
DuckDB SQL over Parquet, on the same data in the same run.

"The same logic" is weir's: every change is kept in a change log, and the history of each
key the batch touches is recomputed from all of that key's changes (so late changes land
in place), then the dimension is rewritten with the untouched rows. A second DuckDB
variant is the classic in-order SCD2 (close the current row, insert the new version),
which ignores late changes; it is shown for reference.

Both engines keep their state in Parquet (zstd) files and rewrite the dimension; peak
resident memory is measured per process (wait4).

Usage: python3 bench/scd2.py [--rows N] [--weir PATH]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time


def run(cmd, **kw):
    """Runs cmd; returns (seconds, peak RSS in MiB)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    took = time.perf_counter() - t
    if status != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.decode(errors='replace')[-3000:]}")
    return took, usage.ru_maxrss / 1024


HASH = ("md5(concat(coalesce(cast(length(name) as varchar) || ':' || name, '-'), '|', "
        "coalesce(cast(length(city) as varchar) || ':' || city, '-'), '|', "
        "coalesce(cast(length(segment) as varchar) || ':' || segment, '-'), '|', "
        "coalesce(cast(length(cast(score as varchar)) as varchar) || ':' || cast(score as varchar), '-')))")
COLS = "id, name, city, segment, score"

# weir's algorithm in DuckDB SQL: the batch joins the change log, the touched keys'
# history is recomputed from all their changes, the other rows are kept.
SAME_LOGIC = f"""
copy (select *, {{seq}} + row_number() over () as seq from read_parquet('{{batch}}'))
  to '{{log_next}}' (format parquet, compression zstd);
copy (
  with touched as (select distinct id from read_parquet('{{batch}}')),
  scoped as (select l.* from read_parquet([{{logs}}]) l semi join touched using (id)),
  hashed as (select {COLS}, updated_at, seq, {HASH} as h from scoped),
  walked as (select *, lag(h) over w as prev_h from hashed
             window w as (partition by id order by updated_at, seq)),
  effective as (select *, lead(updated_at) over w as next_ts from walked
                where prev_h is null or prev_h <> h
                window w as (partition by id order by updated_at, seq)),
  hist as (select md5(concat(cast(length(cast(id as varchar)) as varchar), ':', cast(id as varchar), '|',
                  cast(length(cast(updated_at as varchar)) as varchar), ':', cast(updated_at as varchar))) as sk,
                  {COLS}, updated_at as valid_from, next_ts as valid_to, next_ts is null as is_current,
                  row_number() over (partition by id order by updated_at, seq) as version, h as row_hash
           from effective)
  select * from hist
  {{kept}}
) to '{{dim_next}}' (format parquet, compression zstd);
"""

# The classic in-order SCD2: close the current row of a changed key, add a version.
IN_ORDER = f"""
copy (
  with b as (select *, {HASH} as h from read_parquet('{{batch}}')),
  dim as (select * from read_parquet('{{dim}}')),
  cur as (select * from dim where is_current),
  changed as (select b.* from b left join cur c using (id) where c.id is null or c.row_hash <> b.h)
  select d.sk, d.id, d.name, d.city, d.segment, d.score, d.valid_from,
         case when ch.id is not null and d.is_current then ch.updated_at else d.valid_to end as valid_to,
         d.is_current and ch.id is null as is_current, d.version, d.row_hash
  from dim d left join changed ch on d.id = ch.id and d.is_current
  union all
  select md5(concat(cast(length(cast(ch.id as varchar)) as varchar), ':', cast(ch.id as varchar), '|',
             cast(length(cast(ch.updated_at as varchar)) as varchar), ':', cast(ch.updated_at as varchar))),
         ch.id, ch.name, ch.city, ch.segment, ch.score, ch.updated_at, null, true,
         coalesce(c.version, 0) + 1, ch.h
  from changed ch left join cur c using (id)
) to '{{dim_next}}' (format parquet, compression zstd);
"""


def duck(sql, work):
    path = os.path.join(work, "q.sql")
    open(path, "w").write(sql)
    return run([sys.executable, "-c", f"import duckdb; duckdb.connect().execute(open({path!r}).read())"])


def duck_scalar(sql):
    import duckdb
    return duckdb.sql(sql).fetchall()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", 10_000_000)))
    ap.add_argument("--weir", default=os.path.expanduser("~/.cache/weir-target/release/weir"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    import duckdb
    n = a.rows
    work = tempfile.mkdtemp(prefix="weir-scdbench-")
    data = os.path.join(work, "data")
    os.makedirs(data)
    initial = os.path.join(work, "initial.parquet")
    batch = os.path.join(work, "batch.parquet")
    duckdb.sql(f"""copy (select i as id, 'name ' || i as name, 'city ' || (i % 5000) as city,
        ['retail', 'smb', 'enterprise'][1 + i % 3] as segment, cast(i % 1000 as integer) as score,
        timestamp '2024-01-01' + to_seconds(i % 86400) as updated_at
        from range({n}) t(i)) to '{initial}' (format parquet, compression zstd)""")
    changed, new = n // 100, n // 1000
    duckdb.sql(f"""copy (
        select id, name, 'moved ' || (id % 977) as city, segment, score,
               timestamp '2024-06-01' + to_seconds(id % 86400) as updated_at
        from (select i * 97 % {n} as id, 'name ' || (i * 97 % {n}) as name,
                     ['retail', 'smb', 'enterprise'][1 + (i * 97 % {n}) % 3] as segment,
                     cast((i * 97 % {n}) % 1000 as integer) as score
              from range({changed}) t(i))
        union all
        select i, 'name ' || i, 'city ' || (i % 5000), 'smb', 1, timestamp '2024-06-01 12:00:00'
        from range({n}, {n + new}) t(i)
    ) to '{batch}' (format parquet, compression zstd)""")
    # A late batch: 0.1% of the changed keys get a change dated between their two versions.
    late = os.path.join(work, "late.parquet")
    late_n = n // 1000
    duckdb.sql(f"""copy (
        select i * 97 % {n} as id, 'name ' || (i * 97 % {n}) as name, 'late ' || (i % 13) as city,
               ['retail', 'smb', 'enterprise'][1 + (i * 97 % {n}) % 3] as segment,
               cast((i * 97 % {n}) % 1000 as integer) as score,
               timestamp '2024-03-01' + to_seconds(i % 86400) as updated_at
        from range({late_n}) t(i)
    ) to '{late}' (format parquet, compression zstd)""")
    print(f"dimension: {n:,} keys; batch: {changed:,} changed + {new:,} new keys; "
          f"late batch: {late_n:,} keys; {os.cpu_count()} cores")

    # weir: a pipeline loads the files into a type 2 dimension.
    proj = os.path.join(work, "proj")
    os.makedirs(os.path.join(proj, "pipelines"))
    open(os.path.join(proj, "weir.yaml"), "w").write("name: scdbench\n")
    open(os.path.join(proj, "pipelines", "customers.yaml"), "w").write(
        f"source:\n  type: files\n  path: {data}/*.parquet\n"
        "sink:\n  table: dim.customers\n  mode: scd2\n  key: [id]\n  change_ts: updated_at\n")
    shutil.copy(initial, os.path.join(data, "0.parquet"))
    weir_cmd = [a.weir, "--project", proj, "run", "--quiet"]
    w0, w0_rss = run(weir_cmd)
    shutil.copy(batch, os.path.join(data, "1.parquet"))
    w1, w1_rss = run(weir_cmd)
    shutil.copy(late, os.path.join(data, "2.parquet"))
    w2, w2_rss = run(weir_cmd)

    # DuckDB: the initial state (log and dimension) in Parquet, then the batch.
    log0 = os.path.join(work, "log0.parquet")
    dim0 = os.path.join(work, "dim0.parquet")
    d0, d0_rss = duck(SAME_LOGIC.format(seq=0, batch=initial, logs=f"'{log0}'", log_next=log0,
                                        kept="", dim_next=dim0), work)
    dim1 = os.path.join(work, "dim1.parquet")
    log1 = os.path.join(work, "log1.parquet")
    kept = f"union all select d.* from read_parquet('{dim0}') d anti join touched using (id)"
    d1, d1_rss = duck(SAME_LOGIC.format(seq=1 << 32, batch=batch, logs=f"'{log0}', '{log1}'",
                                        log_next=log1, kept=kept, dim_next=dim1), work)
    dim2 = os.path.join(work, "dim2.parquet")
    log2 = os.path.join(work, "log2.parquet")
    kept2 = f"union all select d.* from read_parquet('{dim1}') d anti join touched using (id)"
    d3, d3_rss = duck(SAME_LOGIC.format(seq=2 << 32, batch=late, logs=f"'{log0}', '{log1}', '{log2}'",
                                        log_next=log2, kept=kept2, dim_next=dim2), work)
    dim1b = os.path.join(work, "dim1b.parquet")
    d2, d2_rss = duck(IN_ORDER.format(batch=batch, dim=dim0, dim_next=dim1b), work)

    expect = (n + changed + new, n + new)
    expect_late = (n + changed + new + late_n, n + new)
    got_duck = duck_scalar(f"select count(*), count(*) filter (where is_current) from '{dim1}'")
    got_duck_b = duck_scalar(f"select count(*), count(*) filter (where is_current) from '{dim1b}'")
    got_duck_late = duck_scalar(f"select count(*), count(*) filter (where is_current) from '{dim2}'")
    out = subprocess.run([a.weir, "--project", proj, "query", "--format", "json",
                          "select count(*) as n, sum(case when is_current then 1 else 0 end) as c from dim.customers"],
                         stdout=subprocess.PIPE, check=True).stdout.decode()
    r = json.loads(out)[0]
    got_weir = (int(r["n"]), int(r["c"]))
    checks = [("weir, both batches", got_weir, expect_late), ("duckdb", got_duck, expect),
              ("duckdb in-order", got_duck_b, expect), ("duckdb, late batch", got_duck_late, expect_late)]
    for name, got, want in checks:
        if tuple(got) != want:
            sys.exit(f"{name}: {got} rows/current, expected {want}")
    # The late versions sit between the two versions of their key, in both engines.
    wrong = duck_scalar(f"""select count(*) from (
        select id, city, lead(city) over (partition by id order by valid_from) as next_city,
               valid_to = lead(valid_from) over (partition by id order by valid_from) as joined
        from '{dim2}') where city like 'late %' and (next_city not like 'moved %' or not joined)""")[0]
    out = subprocess.run([a.weir, "--project", proj, "query", "--format", "json",
                          "select count(*) as n from (select id, city, lead(city) over (partition by id order by valid_from) as next_city, "
                          "valid_to = lead(valid_from) over (partition by id order by valid_from) as joined from dim.customers) "
                          "where city like 'late %' and (next_city not like 'moved %' or not joined)"],
                         stdout=subprocess.PIPE, check=True).stdout.decode()
    wrong_weir = int(json.loads(out)[0]["n"])
    if wrong or wrong_weir:
        sys.exit(f"late versions out of place: duckdb {wrong}, weir {wrong_weir}")
    print(f"results checked: {expect[0]:,} rows and {expect[1]:,} current after the batch (DuckDB), "
          f"{expect_late[0]:,} rows after the late batch (weir, DuckDB), late versions in place")
    print()
    print(f"{'':34} {'weir':>9} {'duckdb':>9} {'ratio':>7}")
    print(f"{'initial load (s)':34} {w0:9.2f} {d0:9.2f} {w0 / d0:7.2f}")
    print(f"{'apply the batch, same logic (s)':34} {w1:9.2f} {d1:9.2f} {w1 / d1:7.2f}")
    print(f"{'  peak RSS (MiB)':34} {w1_rss:9.0f} {d1_rss:9.0f} {w1_rss / d1_rss:7.2f}")
    print(f"{'apply a late batch (s)':34} {w2:9.2f} {d3:9.2f} {w2 / d3:7.2f}")
    print(f"{'  peak RSS (MiB)':34} {w2_rss:9.0f} {d3_rss:9.0f} {w2_rss / d3_rss:7.2f}")
    print(f"{'duckdb in-order SCD2 (s)':34} {'':9} {d2:9.2f} {w1 / d2:7.2f}")
    print(f"{'  peak RSS (MiB)':34} {'':9} {d2_rss:9.0f}")
    print(f"{'initial load peak RSS (MiB)':34} {w0_rss:9.0f} {d0_rss:9.0f}")
    if a.keep:
        print(f"work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

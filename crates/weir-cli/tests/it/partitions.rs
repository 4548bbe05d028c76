//! Partitioned pipelines through the real binary: each run loads one partition and replaces
//! exactly its rows; backfills fill ranges; rows outside the partition are quarantined.

use std::path::Path;

use serde_json::{json, Value};
use weir_test::PgServer;

use crate::{ok, pg_connection, query, scalar, weir, write};

/// `day,id,amount` rows: `n` of them on `day`, ids starting at `first`.
fn day_file(day: &str, first: u32, n: u32, amount: u32) -> String {
    let mut s = String::from("day,id,amount\n");
    for i in first..first + n {
        s.push_str(&format!("{day},{i},{amount}\n"));
    }
    s
}

fn err(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn per_day(d: &Path, table: &str) -> Vec<(String, i64, i64)> {
    query(
        d,
        &format!("select cast(day as varchar) as day, count(*) as n, sum(amount) as s from {table} group by day order by day"),
    )
    .iter()
    .map(|r| {
        (
            r["day"].as_str().unwrap().to_string(),
            r["n"].as_i64().unwrap(),
            r["s"].as_i64().unwrap(),
        )
    })
    .collect()
}

const BACKFILL: [&str; 6] = [
    "backfill",
    "events",
    "--from",
    "2024-01-01",
    "--to",
    "2024-01-04",
];

#[test]
fn a_partitioned_file_pipeline_loads_replaces_and_backfills_one_day_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: parts\n");
    write(
        d,
        "pipelines/events.yaml",
        "source:\n  type: files\n  path: data/events/{{ partition_key }}.csv\n\
         partitions: {every: daily, start: 2024-01-01, column: day}\n\
         sink: {table: raw.events}\n",
    );
    for (i, day) in ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
        .iter()
        .enumerate()
    {
        write(
            d,
            &format!("data/events/{day}.csv"),
            &day_file(day, i as u32 * 100, 10 + i as u32, 1),
        );
    }
    // A late event in the 3rd's file belongs to the 2nd: loading it with the 3rd would put
    // it in the wrong partition (and the 2nd's next load would not replace it).
    let mut third = day_file("2024-01-03", 200, 12, 1);
    third.push_str("2024-01-02,999,1\n");
    write(d, "data/events/2024-01-03.csv", &third);

    // One partition by name.
    let out = weir(
        d,
        &[
            "run",
            "events",
            "--partition",
            "2024-01-02",
            "--format",
            "json",
        ],
    );
    let summary: Value = serde_json::from_str(&ok(&out)).unwrap();
    let a = &summary["assets"][0];
    assert_eq!(a["partition"], "2024-01-02", "{summary:#}");
    assert_eq!(a["rows_written"], 11, "{summary:#}");
    assert_eq!(
        per_day(d, "raw.events"),
        vec![("2024-01-02".into(), 11, 11)]
    );

    // A backfill of the range builds what is missing and skips what was built.
    let out = weir(d, &BACKFILL);
    ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("1 built before"), "{log}");
    assert!(log.contains("3 queued now"), "{log}");
    assert!(log.contains("4 of 4 partitions built"), "{log}");
    assert_eq!(
        per_day(d, "raw.events"),
        vec![
            ("2024-01-01".into(), 10, 10),
            ("2024-01-02".into(), 11, 11),
            ("2024-01-03".into(), 12, 12),
            ("2024-01-04".into(), 13, 13),
        ]
    );
    // The late row is quarantined with its reason and partition, not lost.
    let q = query(
        d,
        "select pipeline, partition_key, reason, raw from raw.events__quarantine",
    );
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["partition_key"], "2024-01-03");
    assert!(
        q[0]["reason"]
            .as_str()
            .unwrap()
            .contains("in_partition_day"),
        "{q:?}"
    );
    assert!(q[0]["raw"].as_str().unwrap().contains("999"), "{q:?}");

    // The 3rd's file is corrected (the late row removed, amounts changed): loading the
    // partition again replaces its rows and its quarantined rows, and nothing else.
    write(
        d,
        "data/events/2024-01-03.csv",
        &day_file("2024-01-03", 200, 5, 7),
    );
    for _ in 0..2 {
        ok(&weir(d, &["run", "events", "--partition", "2024-01-03"]));
        assert_eq!(
            per_day(d, "raw.events"),
            vec![
                ("2024-01-01".into(), 10, 10),
                ("2024-01-02".into(), 11, 11),
                ("2024-01-03".into(), 5, 35),
                ("2024-01-04".into(), 13, 13),
            ]
        );
        assert_eq!(
            scalar(d, "select count(*) from raw.events__quarantine"),
            json!(0)
        );
    }

    // Partition state is tracked: a second backfill has nothing to do.
    let out = weir(d, &BACKFILL);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    assert!(log.contains("0 queued now"), "{log}");

    // A missing partition's file fails that partition only, with the path in the error.
    let out = weir(d, &["run", "events", "--partition", "2024-01-05"]);
    let e = err(&out);
    assert!(e.contains("2024-01-05.csv"), "{e}");
    assert_eq!(scalar(d, "select count(*) from raw.events"), json!(39));

    // Wrong keys and unpartitioned assets are refused before anything runs.
    let e = err(&weir(d, &["run", "events", "--partition", "2024-13-01"]));
    assert!(e.contains("not a daily partition key"), "{e}");
    write(
        d,
        "pipelines/plain.yaml",
        "source: {type: files, path: data/events/2024-01-01.csv}\nsink: {table: raw.plain}\n",
    );
    let e = err(&weir(d, &["run", "plain", "--partition", "2024-01-01"]));
    assert!(
        e.contains("none of the selected assets is partitioned"),
        "{e}"
    );
    let e = err(&weir(d, &["backfill", "plain", "--to", "2024-01-01"]));
    assert!(e.contains("`plain` is not partitioned"), "{e}");
}

#[test]
fn a_partitioned_pipeline_must_select_its_partition_and_replace_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: parts\n");
    write(
        d,
        "pipelines/events.yaml",
        "source: {type: files, path: data/events/*.csv}\n\
         sink: {table: raw.events}\n\
         partitions: {every: daily, start: 2024-01-01, column: day}\n",
    );
    let e = err(&weir(d, &["validate"]));
    assert!(e.contains("pipelines/events.yaml:3"), "{e}");
    assert!(e.contains("{{ partition_key }}"), "{e}");

    write(
        d,
        "pipelines/events.yaml",
        "source: {type: files, path: 'data/{{ partition_key }}.csv'}\n\
         sink: {table: raw.events, mode: merge, key: [id]}\n\
         partitions: {every: daily, start: 2024-01-01, column: day}\n",
    );
    let e = err(&weir(d, &["validate"]));
    assert!(e.contains("replaces its partition"), "{e}");

    write(
        d,
        "pipelines/events.yaml",
        "source: {type: files, path: 'data/{{ partition_key }}/{{ day }}.csv'}\n\
         sink: {table: raw.events}\n\
         partitions: {values: [eu, us], column: region}\n",
    );
    let e = err(&weir(d, &["validate"]));
    assert!(e.contains("unknown placeholder `{{ day }}`"), "{e}");
    assert!(e.contains("pipelines/events.yaml"), "{e}");
}

#[test]
fn a_partitioned_postgres_pipeline_replaces_hours_in_a_postgres_table() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("parts").unwrap();
    pg.psql(
        &db,
        "create table clicks (id bigint primary key, at timestamp not null, n int not null);
         insert into clicks select g, timestamp '2024-03-01 00:00' + g * interval '1 minute', 1
           from generate_series(0, 239) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "weir.yaml",
        &format!("name: parts\nconnections:\n{}", pg_connection("shop", &db)),
    );
    write(
        d,
        "pipelines/clicks.yaml",
        "source:\n  type: postgres\n  connection: shop\n  query: >-\n    select id, at, n from clicks\n    where at >= '{{ partition_start }}' and at < '{{ partition_end }}'\n\
         partitions: {every: hourly, start: 2024-03-01T00, column: at}\n\
         sink: {type: postgres, connection: shop, table: public.clicks_copy}\n",
    );
    let out = weir(
        d,
        &[
            "backfill",
            "clicks",
            "--from",
            "2024-03-01T00",
            "--to",
            "2024-03-01T03",
        ],
    );
    ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("4 of 4 partitions built"), "{log}");
    let hours = |db: &str| {
        pg.psql(
            db,
            "select h || ':' || count(*) || ':' || sum(n) from (select extract(hour from at)::int as h, n from clicks_copy) t group by h order by h",
        )
        .unwrap()
    };
    let before = hours(&db);
    assert_eq!(
        before.split_whitespace().collect::<Vec<_>>(),
        vec!["0:60:60", "1:60:60", "2:60:60", "3:60:60"],
        "{before}"
    );

    // The source changes in hour 2 (rows updated, some deleted): reloading that hour
    // replaces it, the other hours stay as they were.
    pg.psql(
        &db,
        "update clicks set n = 5 where at >= '2024-03-01 02:00' and at < '2024-03-01 03:00';
         delete from clicks where at >= '2024-03-01 02:30' and at < '2024-03-01 03:00';
         update clicks set n = 9 where at < '2024-03-01 01:00';",
    )
    .unwrap();
    ok(&weir(d, &["run", "clicks", "--partition", "2024-03-01T02"]));
    let after = hours(&db);
    assert_eq!(
        after.split_whitespace().collect::<Vec<_>>(),
        vec!["0:60:60", "1:60:60", "2:30:150", "3:60:60"],
        "{after}"
    );
}

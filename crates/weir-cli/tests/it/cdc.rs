//! Change data capture groundwork: a `pgoutput` slot on the test server, read without
//! moving it, decoded, then advanced.

use weir_connectors::postgres::cdc::{self, Message, Value};

#[test]
fn pgoutput_changes_are_decoded_and_the_slot_moves_only_when_told() {
    let pg = weir_test::PgServer::shared();
    let db = pg.fresh_database("cdc").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={} password={} dbname={db}",
                pg.port(),
                pg.user(),
                weir_test::PgServer::PASSWORD
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "CREATE TABLE public.items (id bigint PRIMARY KEY, name text, body text);
                 ALTER TABLE public.items ALTER COLUMN body SET STORAGE EXTERNAL;",
            )
            .await
            .unwrap();
        let slot = format!("weir_{db}");
        let start = cdc::ensure_slot(&client, "weir_pub", &slot, &["public.items".into()])
            .await
            .unwrap();
        assert!(start > 0);
        // Again: both exist, nothing changes.
        assert_eq!(
            cdc::ensure_slot(&client, "weir_pub", &slot, &["public.items".into()])
                .await
                .unwrap(),
            start
        );
        let big = "x".repeat(100_000); // TOASTed, out of line
        client
            .execute(
                "INSERT INTO items VALUES (1, 'one', $1), (2, 'two', NULL)",
                &[&big],
            )
            .await
            .unwrap();
        client
            .batch_execute(
                "BEGIN; UPDATE items SET name = 'uno' WHERE id = 1; DELETE FROM items WHERE id = 2; COMMIT;
                 TRUNCATE items;",
            )
            .await
            .unwrap();
        let changes = cdc::peek(&client, &slot, "weir_pub", 1_000, false).await.unwrap();
        let kinds: Vec<&str> = changes
            .iter()
            .map(|(_, m)| match m {
                Message::Begin { .. } => "B",
                Message::Commit { .. } => "C",
                Message::Relation(_) => "R",
                Message::Insert { .. } => "I",
                Message::Update { .. } => "U",
                Message::Delete { .. } => "D",
                Message::Truncate { .. } => "T",
                Message::Other(_) => "?",
            })
            .collect();
        assert_eq!(kinds.join(""), "BRIICBUDCBRTC", "{changes:?}");
        let rel = changes
            .iter()
            .find_map(|(_, m)| match m {
                Message::Relation(r) => Some(r.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!((rel.schema.as_str(), rel.name.as_str()), ("public", "items"));
        let cols: Vec<(&str, bool)> = rel.columns.iter().map(|c| (c.name.as_str(), c.key)).collect();
        assert_eq!(cols, [("id", true), ("name", false), ("body", false)]);
        match &changes[2].1 {
            Message::Insert { new, .. } => {
                assert_eq!(new[0], Value::Text("1".into()));
                assert_eq!(new[2], Value::Text(big.clone()));
            }
            other => panic!("{other:?}"),
        }
        match &changes[6].1 {
            // The unchanged TOASTed body is not sent: the previous row's value stands.
            Message::Update { new, .. } => {
                assert_eq!(new[1], Value::Text("uno".into()));
                assert_eq!(new[2], Value::Unchanged);
            }
            other => panic!("{other:?}"),
        }
        match &changes[7].1 {
            Message::Delete { old, .. } => assert_eq!(old[0], Value::Text("2".into())),
            other => panic!("{other:?}"),
        }
        // Peeking again reads the same; after advancing past the first transaction, only
        // the later ones remain.
        let again = cdc::peek(&client, &slot, "weir_pub", 1_000, false).await.unwrap();
        assert_eq!(again.len(), changes.len());
        let Message::Commit { end_lsn, .. } = changes[4].1 else {
            panic!("{:?}", changes[4]);
        };
        cdc::advance(&client, &slot, end_lsn).await.unwrap();
        let rest = cdc::peek(&client, &slot, "weir_pub", 1_000, false).await.unwrap();
        // A new decoding session sends the table's Relation again before its first change.
        assert!(matches!(rest[0].1, Message::Begin { .. }), "{rest:?}");
        assert!(matches!(rest[1].1, Message::Relation(_)), "{rest:?}");
        assert!(matches!(rest[2].1, Message::Update { .. }), "{rest:?}");
        assert_eq!(rest.len(), changes.len() - 5 + 1);
        client
            .query("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .unwrap();
    });
}

use std::path::Path;

use crate::{ok, pg_connection, query, weir};

/// A project with connection `app` to `db` and CDC job `app` over `tables`.
fn cdc_project(dir: &Path, db: &str, tables: &[&str], extra: &str) {
    std::fs::create_dir_all(dir.join("cdc")).unwrap();
    std::fs::write(
        dir.join("weir.yaml"),
        format!("name: t\nconnections:\n{}", pg_connection("app", db)),
    )
    .unwrap();
    std::fs::write(
        dir.join("cdc/app.yaml"),
        format!(
            "source:\n  type: postgres_cdc\n  connection: app\n  tables: [{}]\n  slot: weir_{db}\n\
             sink:\n  schema: mirror\n{extra}",
            tables.join(", ")
        ),
    )
    .unwrap();
}

/// `weir cdc run app` in the background, until killed.
fn spawn_run(dir: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--project")
        .arg(dir)
        .args(["cdc", "run", "app"])
        .env("WEIR_TEST_PG_PASSWORD", weir_test::PgServer::PASSWORD)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn cdc_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["cdc"];
    all.extend(args);
    all.extend(["--format", "json"]);
    serde_json::from_str(ok(&weir(dir, &all)).trim()).unwrap()
}

/// The source table as sorted lines of `cols` (psql's unaligned output).
fn source_rows(db: &str, table: &str, cols: &str, key: &str) -> Vec<String> {
    let pg = weir_test::PgServer::shared();
    let out = pg
        .psql(
            db,
            &format!("select concat_ws('|', {cols}) from {table} order by {key}"),
        )
        .unwrap();
    out.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The mirror as the same lines.
fn mirror_rows(dir: &Path, table: &str, cols: &str, key: &str) -> Vec<String> {
    query(
        dir,
        &format!("select concat_ws('|', {cols}) as r from {table} order by {key}"),
    )
    .iter()
    .map(|r| r["r"].as_str().unwrap_or_default().to_string())
    .collect()
}

#[test]
fn every_kind_of_change_reaches_the_mirrors_exactly() {
    let pg = weir_test::PgServer::shared();
    let db = pg.fresh_database("cdcdml").unwrap();
    pg.psql(
        &db,
        "create table customers (id bigint primary key, name text, body text);
         alter table customers alter column body set storage external;
         create table orders (id integer primary key, customer_id bigint, amount numeric(12,2),
                              placed timestamptz, tags text[]);
         create table nokey (a int, b text);
         insert into customers select g, 'c' || g, repeat('b' || g, 30000) from generate_series(1, 5) g;
         insert into orders select g, g % 5 + 1, g * 1.5, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',
                                   array['t' || g] from generate_series(1, 7) g;
         update orders set placed = 'infinity' where id = 7;",
    )
    .unwrap();
    pg.psql(&db, super::postgres::ALL_TYPES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cdc_project(
        d,
        &db,
        &["public.customers", "orders", "all_types"],
        "  change_log: true\n  history: true\nsnapshot:\n  chunk_rows: 2\n",
    );
    // First run: the snapshot, in chunks of two rows.
    let s = cdc_json(d, &["run", "app", "--until-idle", "1s"]);
    assert_eq!(s["snapshot_rows"], 14, "{s}");
    let cust = "id, name, md5(body)";
    assert_eq!(
        mirror_rows(d, "mirror.customers", cust, "id"),
        source_rows(&db, "customers", cust, "id")
    );

    // Every kind of change, a transaction over two tables, an unchanged TOASTed value,
    // a key change, a truncate and new rows after it, and a column added.
    pg.psql(
        &db,
        "insert into customers values (6, 'c6', repeat('x', 50000));
         update customers set name = 'renamed' where id = 1;
         update customers set body = 'short' where id = 2;
         update customers set id = 100 where id = 3;
         delete from customers where id = 4;
         begin;
           insert into orders values (8, 6, 99.99, now(), '{a,b}');
           update customers set name = 'in txn' where id = 5;
           delete from orders where id = 1;
         commit;
         begin;
           insert into customers values (7, 'seven', 'v7');
           update customers set name = 'seven again' where id = 7;
           update customers set name = 'toast kept' where id = 6;
         commit;
         truncate orders;
         insert into orders values (20, 1, 1.25, '2024-06-01 12:00:00+00', null);
         insert into orders values (21, 2, 3.5, 'infinity', null);
         alter table orders drop column tags;
         insert into orders values (22, 3, 4.5, '2024-07-01 00:00:00+00');
         alter table customers add column tier text;
         update customers set tier = 'gold' where id = 1;
         insert into customers values (8, 'eight', 'b8', 'silver');
         insert into all_types select 3, b, i2, i4, r, d, n, nu, t, v, c, dt, ts, tz, tm, iv, u, j, jb, by, ai, at, o
           from all_types where id = 1;
         update all_types set t = 'changed' where id = 2;",
    )
    .unwrap();
    let s = cdc_json(d, &["run", "app", "--until-idle", "1s"]);
    assert_eq!(s["snapshot_rows"], 0, "{s}");
    assert_eq!(s["changes"], 19, "{s}");
    let cust = "id, name, md5(body), coalesce(tier, '-')";
    let want = source_rows(&db, "customers", cust, "id");
    assert_eq!(mirror_rows(d, "mirror.customers", cust, "id"), want);
    assert!(want.iter().any(|r| r.starts_with("6|toast kept|")));
    assert_eq!(
        mirror_rows(d, "mirror.orders", "id, customer_id, amount", "id"),
        source_rows(&db, "orders", "id, customer_id, amount", "id")
    );
    // Row 3 of all_types came through the change stream, row 1 through the snapshot: every
    // type decodes the same both ways.
    let rows = query(d, "select * from mirror.all_types order by id");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut one = rows[0].as_object().unwrap().clone();
    let mut three = rows[2].as_object().unwrap().clone();
    one.remove("id");
    three.remove("id");
    assert_eq!(one, three);
    assert_eq!(rows[1]["t"], "changed");

    // The change log holds each change with its operation.
    let ops = query(
        d,
        "select _op, count(*) as n from mirror.customers__changes group by _op order by _op",
    );
    let ops: Vec<(String, i64)> = ops
        .iter()
        .map(|r| {
            (
                r["_op"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("delete".to_string(), 1),
            ("insert".to_string(), 3),
            ("update".to_string(), 7)
        ]
    );
    let unchanged = query(
        d,
        "select _unchanged from mirror.customers__changes where id = 6 and _op = 'update'",
    );
    assert_eq!(unchanged[0]["_unchanged"], "body");

    // A dropped column stays in the mirror, empty in new rows.
    let dropped = query(
        d,
        "select id, tags from mirror.orders where id in (20, 22) order by id",
    );
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(dropped.iter().all(|r| r["tags"].is_null()), "{dropped:?}");
    // Infinite timestamps (one copied, one changed) land as null and are quarantined
    // with the reason and the row.
    let q = query(
        d,
        "select reason, source, raw from mirror.orders__quarantine order by source",
    );
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(q
        .iter()
        .all(|r| r["reason"].as_str().unwrap().contains("infinite timestamp")));
    assert!(
        q[0]["source"].as_str().unwrap().contains("the change at"),
        "{q:?}"
    );
    assert!(
        q[1]["source"].as_str().unwrap().contains("the snapshot"),
        "{q:?}"
    );
    assert_eq!(
        query(d, "select placed from mirror.orders where id = 21")[0]["placed"],
        serde_json::Value::Null
    );
    // The history's current versions are the mirror; earlier versions stay, closed.
    assert_eq!(
        mirror_rows(
            d,
            "mirror.customers__history where is_current",
            "id, name, md5(body)",
            "id"
        ),
        mirror_rows(d, "mirror.customers", "id, name, md5(body)", "id")
    );
    let versions = |sql: &str| query(d, sql).len();
    assert_eq!(
        versions("select * from mirror.customers__history where id = 4 and is_current"),
        0
    );
    assert_eq!(
        versions("select * from mirror.customers__history where id = 4"),
        1
    );
    assert!(versions("select * from mirror.customers__history where id = 1") >= 2);
    assert_eq!(
        mirror_rows(d, "mirror.orders__history where is_current", "id", "id"),
        ["20", "21", "22"]
    );
    assert_eq!(
        versions("select * from mirror.orders__history where not is_current"),
        8
    );

    // The slot is where the mirrors are, never past them.
    let st = cdc_json(d, &["status", "app"]);
    let confirmed = cdc::parse_lsn(st["confirmed_lsn"].as_str().unwrap()).unwrap();
    let held = st["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| cdc::parse_lsn(t["lsn"].as_str().unwrap()).unwrap())
        .max()
        .unwrap();
    assert!(confirmed <= held, "{st}");
    assert!(st["problem"].is_null(), "{st}");

    // A table without a primary key is refused, with the way out.
    std::fs::write(
        d.join("cdc/bad.yaml"),
        "source:\n  type: postgres_cdc\n  connection: app\n  tables: [nokey]\nsink:\n  schema: bad\n",
    )
    .unwrap();
    let out = weir(d, &["cdc", "run", "bad", "--until-idle", "1s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no primary key") && err.contains("REPLICA IDENTITY"),
        "{err}"
    );
    pg.psql(
        &db,
        &format!("select pg_drop_replication_slot('weir_{db}')"),
    )
    .unwrap();
}

/// The slot's confirmed position, if the slot exists.
fn slot_lsn(db: &str) -> Option<u64> {
    let pg = weir_test::PgServer::shared();
    let out = pg
        .psql(
            db,
            &format!("select confirmed_flush_lsn from pg_replication_slots where slot_name = 'weir_{db}'"),
        )
        .unwrap();
    (!out.is_empty()).then(|| cdc::parse_lsn(out.trim()).unwrap())
}

/// The highest LSN any mirror holds, from `weir cdc status`.
fn held_lsn(dir: &Path) -> Option<u64> {
    // Status exits 1 when lagging, which other tests' writes to the server can cause.
    let out = weir(dir, &["cdc", "status", "app", "--format", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    st["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["lsn"].as_str().map(|l| cdc::parse_lsn(l).unwrap()))
        .max()
}

fn pgbench(db: &str, args: &[&str]) -> std::process::Command {
    let pg = weir_test::PgServer::shared();
    let mut c = std::process::Command::new(pg.bin_dir().join("pgbench"));
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port().to_string(),
        "-U",
        pg.user(),
    ])
    .args(args)
    .arg(db)
    .env("PGPASSWORD", weir_test::PgServer::PASSWORD)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    c
}

#[test]
fn mirrors_equal_their_tables_after_sigkills_during_a_pgbench_load() {
    let db = weir_test::PgServer::shared()
        .fresh_database("cdckill")
        .unwrap();
    let init = pgbench(&db, &["-i", "-s", "1", "-q"]).output().unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cdc_project(
        d,
        &db,
        &["pgbench_accounts", "pgbench_branches", "pgbench_tellers"],
        "  change_log: true\nsnapshot:\n  chunk_rows: 20000\nbatch:\n  max_changes: 3000\n  poll: 50ms\n",
    );
    // The load runs from before the snapshot to after the last kill.
    // (Rate-limited, so that the debug build's catch-up stays short.)
    let load = pgbench(&db, &["-n", "-c", "2", "-T", "14", "-R", "400"])
        .spawn()
        .unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = crate::stream::Lcg(seed);
    let mut kills = 0;
    let started = std::time::Instant::now();
    while (started.elapsed() < std::time::Duration::from_secs(12) || kills < 4) && kills < 8 {
        let mut child = spawn_run(d);
        std::thread::sleep(std::time::Duration::from_millis(700 + rng.next(2_500)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // The slot never confirms what the lake does not hold.
        if let (Some(slot), Some(held)) = (slot_lsn(&db), held_lsn(d)) {
            assert!(
                slot <= held,
                "slot at {} past the lake's {}",
                cdc::format_lsn(slot),
                cdc::format_lsn(held)
            );
        }
    }
    assert!(kills >= 4, "only {kills} kills");
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = cdc_json(d, &["run", "app", "--until-idle", "2s"]);
    eprintln!("{kills} kills; last run {s}");
    let pg = weir_test::PgServer::shared();
    let txns: u64 = pg
        .psql(&db, "select count(*) from pgbench_history")
        .unwrap()
        .parse()
        .unwrap();
    assert!(txns > 200, "the load ran only {txns} transactions");
    for (table, cols, key) in [
        ("pgbench_accounts", "aid, bid, abalance", "aid"),
        ("pgbench_branches", "bid, bbalance", "bid"),
        ("pgbench_tellers", "tid, bid, tbalance", "tid"),
    ] {
        let want = source_rows(&db, table, cols, key);
        let mirror = format!("mirror.{table}");
        let got = mirror_rows(d, &mirror, cols, key);
        assert_eq!(got.len(), want.len(), "{table}");
        let diff: Vec<_> = got.iter().zip(&want).filter(|(a, b)| a != b).collect();
        assert!(
            diff.is_empty(),
            "{table}: {} rows differ, first {:?}, last {:?}",
            diff.len(),
            &diff[..diff.len().min(5)],
            diff.last()
        );
    }
    // The change log holds each change once: one account update per source transaction.
    let twice = query(
        d,
        "select _lsn, aid, count(*) as n from mirror.pgbench_accounts__changes \
         group by _lsn, aid having count(*) > 1",
    );
    assert!(twice.is_empty(), "logged twice: {twice:?}");
    let slot = slot_lsn(&db).unwrap();
    assert!(slot <= held_lsn(d).unwrap());
    pg.psql(
        &db,
        &format!("select pg_drop_replication_slot('weir_{db}')"),
    )
    .unwrap();
}

/// Commits in table `table`'s Delta log so far.
fn commits(dir: &Path, table: &str) -> usize {
    std::fs::read_dir(
        dir.join("lake")
            .join(table.replace('.', "/"))
            .join("_delta_log"),
    )
    .map(|r| {
        r.filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .unwrap_or(false)
        })
        .count()
    })
    .unwrap_or(0)
}

#[test]
fn a_snapshot_killed_midway_resumes_and_hands_over_exactly_under_writes() {
    let pg = weir_test::PgServer::shared();
    let db = pg.fresh_database("cdcsnap").unwrap();
    pg.psql(
        &db,
        "create table items (id bigint primary key, v int, note text);
         insert into items select g, 0, 'n' || g from generate_series(1, 30000) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cdc_project(
        d,
        &db,
        &["items"],
        "snapshot:\n  chunk_rows: 1000\nbatch:\n  poll: 50ms\n",
    );
    // Upserts and deletes all over the key range, while the snapshot runs.
    let script = d.join("load.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 40000)\n\
         insert into items values (:id, 1, 'new') on conflict (id) do update set v = items.v + 1;\n\
         \\set gone random(1, 40000)\n\
         delete from items where id = :gone;\n\
         begin;\n\
         update items set v = v + 10 where id = :id;\n\
         update items set note = 'moved' where id = :gone + 1;\n\
         commit;\n",
    )
    .unwrap();
    let load = pgbench(
        &db,
        &[
            "-n",
            "-c",
            "2",
            "-T",
            "10",
            "-R",
            "300",
            "-f",
            script.to_str().unwrap(),
        ],
    )
    .spawn()
    .unwrap();
    // Two runs killed in the middle of the snapshot, a few chunks in each.
    let mut seen = 0;
    for _ in 0..2 {
        let mut child = spawn_run(d);
        let t = std::time::Instant::now();
        while commits(d, "mirror.items") < seen + 4
            && t.elapsed() < std::time::Duration::from_secs(30)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        seen = commits(d, "mirror.items");
    }
    let st = cdc_json(d, &["status", "app"]);
    assert!(
        st["tables"][0]["snapshot"]
            .as_str()
            .unwrap()
            .starts_with("in progress"),
        "{st}"
    );
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = cdc_json(d, &["run", "app", "--until-idle", "2s"]);
    // It went on after the chunks the killed runs committed (at least four each).
    let rest = s["snapshot_rows"].as_u64().unwrap();
    assert!(rest > 0 && rest < 25_000, "{s}");
    // Changes the snapshot already held were recognized as such.
    assert!(s["skipped"].as_u64().unwrap() > 0, "{s}");
    let cols = "id, v, note";
    let want = source_rows(&db, "items", cols, "id");
    assert_eq!(mirror_rows(d, "mirror.items", cols, "id"), want);
    assert_eq!(
        cdc_json(d, &["status", "app"])["tables"][0]["snapshot"],
        "done"
    );

    // A re-snapshot on demand copies the table again, and changes go on from there.
    ok(&weir(d, &["cdc", "resnapshot", "app", "items"]));
    pg.psql(
        &db,
        "update items set v = -1 where id % 7 = 0; delete from items where id % 11 = 0;",
    )
    .unwrap();
    let s = cdc_json(d, &["run", "app", "--until-idle", "1s"]);
    let rows: u64 = pg
        .psql(&db, "select count(*) from items")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(s["snapshot_rows"].as_u64().unwrap(), rows, "{s}");
    pg.psql(&db, "update items set note = 'after' where id % 5 = 0")
        .unwrap();
    cdc_json(d, &["run", "app", "--until-idle", "1s"]);
    assert_eq!(
        mirror_rows(d, "mirror.items", cols, "id"),
        source_rows(&db, "items", cols, "id")
    );
    // A re-snapshot on demand while the job runs: chunk by chunk between batches, each
    // chunk replacing its key range, under the same writes.
    let mut child = spawn_run(d);
    std::thread::sleep(std::time::Duration::from_secs(2));
    ok(&weir(d, &["cdc", "resnapshot", "app", "items"]));
    let load = pgbench(
        &db,
        &[
            "-n",
            "-c",
            "2",
            "-T",
            "6",
            "-R",
            "200",
            "-f",
            script.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let t = std::time::Instant::now();
    loop {
        let out = weir(d, &["cdc", "status", "app", "--format", "json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let table = &st["tables"][0];
        if table["snapshot"] == "done" && table["resnapshot_requested"] == false {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "the re-snapshot did not finish: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    pg.psql(&db, "update items set note = 'last' where id % 3 = 0")
        .unwrap();
    cdc_json(d, &["run", "app", "--until-idle", "1s"]);
    assert_eq!(
        mirror_rows(d, "mirror.items", cols, "id"),
        source_rows(&db, "items", cols, "id")
    );
    pg.psql(
        &db,
        &format!("select pg_drop_replication_slot('weir_{db}')"),
    )
    .unwrap();
}

#[test]
fn heartbeats_lag_limits_and_a_dropped_slot_are_handled() {
    let pg = weir_test::PgServer::shared();
    let db = pg.fresh_database("cdcbeat").unwrap();
    pg.psql(
        &db,
        "create table quiet (id int primary key, v text);
         create table busy (id serial primary key, v text);
         insert into quiet values (1, 'a');",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cdc_project(
        d,
        &db,
        &["quiet"],
        "heartbeat: 1s\nlag_limit:\n  bytes: 1000\nbatch:\n  poll: 50ms\n",
    );
    let (hook, alerts) = crate::orchestration::webhook();
    let yaml = std::fs::read_to_string(d.join("weir.yaml")).unwrap();
    std::fs::write(
        d.join("weir.yaml"),
        format!("{yaml}alerts: {{webhook: '{hook}'}}\n"),
    )
    .unwrap();
    cdc_json(d, &["run", "app", "--until-idle", "1s"]);
    let before = slot_lsn(&db).unwrap();
    // Writes elsewhere in the database: nothing to capture, but WAL the slot would keep.
    pg.psql(
        &db,
        "insert into busy (v) select repeat('x', 100) from generate_series(1, 2000)",
    )
    .unwrap();
    // Lagging: the slot holds the WAL of those writes.
    let out = weir(d, &["cdc", "status", "app", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(st["lag_bytes"].as_u64().unwrap() > 1000, "{st}");
    assert!(st["problem"].as_str().unwrap().contains("lagging"), "{st}");
    // A run with nothing to apply moves the slot on, recording the position in the lake
    // first.
    cdc_json(d, &["run", "app", "--until-idle", "3s"]);
    let after = slot_lsn(&db).unwrap();
    assert!(after > before, "the heartbeat did not move the slot");
    assert!(after <= held_lsn(d).unwrap());
    // The run alerted on the lag before the heartbeat caught up.
    let got = alerts.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|a| a["kind"] == "cdc_lag" && a["lag_bytes"].as_u64().unwrap() > 1000),
        "{got:?}"
    );
    // (Other tests write to the same server, so the lag may be back over the limit here.)

    // A dropped slot is reported, not silently recreated at a later position.
    pg.psql(
        &db,
        "insert into quiet values (2, 'lost unless resnapshotted')",
    )
    .unwrap();
    pg.psql(
        &db,
        &format!("select pg_drop_replication_slot('weir_{db}')"),
    )
    .unwrap();
    let out = weir(d, &["cdc", "run", "app", "--until-idle", "1s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is gone") && err.contains("weir cdc resnapshot app"),
        "{err}"
    );
    let out = weir(d, &["cdc", "status", "app"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("MISSING"));
    // The way out: copy again from a new slot.
    ok(&weir(d, &["cdc", "resnapshot", "app"]));
    let s = cdc_json(d, &["run", "app", "--until-idle", "1s"]);
    assert_eq!(s["snapshot_rows"], 2, "{s}");
    assert_eq!(
        mirror_rows(d, "mirror.quiet", "id, v", "id"),
        source_rows(&db, "quiet", "id, v", "id")
    );
    pg.psql(
        &db,
        &format!("select pg_drop_replication_slot('weir_{db}')"),
    )
    .unwrap();
}

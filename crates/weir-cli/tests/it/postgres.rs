//! The postgres source against a real PostgreSQL server (weir-test starts one).

use std::path::Path;

use weir_test::PgServer;

use crate::{ok, pg_connection, query, scalar, weir};

fn project(dir: &Path, db: &str, pipelines: &[(&str, &str)]) {
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::write(
        dir.join("weir.yaml"),
        format!("name: t\nconnections:\n{}", pg_connection("shop", db)),
    )
    .unwrap();
    for (name, text) in pipelines {
        std::fs::write(dir.join("pipelines").join(format!("{name}.yaml")), text).unwrap();
    }
}

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--project")
        .arg(dir)
        .args(args)
        .env("NO_COLOR", "1")
        .env("WEIR_TEST_PG_PASSWORD", PgServer::PASSWORD)
        .output()
        .expect("weir runs")
}

fn run_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&run(dir, &["run", "--format", "json"]))).unwrap()
}

fn first_asset(s: &serde_json::Value) -> &serde_json::Value {
    &s["assets"][0]
}

pub const ALL_TYPES: &str = "create table all_types (
            id bigint primary key, b boolean, i2 smallint, i4 integer, r real,
            d double precision, n numeric(12,2), nu numeric, t text, v varchar(20), c char(3),
            dt date, ts timestamp, tz timestamptz, tm time, iv interval, u uuid,
            j json, jb jsonb, by bytea, ai integer[], at text[], o oid);
         insert into all_types values
           (1, true, 7, 70000, 1.5, 2.25, 12345.67, 0.000000000000000001, 'héllo', 'v', 'ab',
            '2024-02-29', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+02', '13:14:15.5',
            '1 year 2 mons 3 days 04:05:06', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{\"a\": 1}', '{\"b\": [1, 2]}', '\\x00ff10', '{1,NULL,3}', '{x,y}', 42),
           (2, null, null, null, null, null, null, null, null, null, null, null, null, null,
            null, null, null, null, null, null, null, null, null);";

#[test]
fn every_mapped_type_lands_in_delta_with_its_value() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("types").unwrap();
    pg.psql(&db, ALL_TYPES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    project(
        d,
        &db,
        &[(
            "all_types",
            "source:\n  type: postgres\n  connection: shop\n  table: public.all_types\nsink:\n  table: raw.all_types\n  mode: overwrite\n",
        )],
    );
    let s = run_json(d);
    assert_eq!(first_asset(&s)["rows_written"], 2, "{s}");
    let rows = query(
        d,
        "select id, b, i2, i4, r, d, cast(n as varchar) as n, cast(nu as varchar) as nu, t, v, c,
                cast(dt as varchar) as dt, cast(ts as varchar) as ts, cast(tz as varchar) as tz,
                tm, iv, u, j, jb, encode(by, 'hex') as by, ai, at, o
         from raw.all_types order by id",
    );
    let expected = serde_json::json!({
        "id": 1, "b": true, "i2": 7, "i4": 70000, "r": 1.5, "d": 2.25, "n": "12345.67",
        "nu": "0.000000000000000001", "t": "héllo", "v": "v", "c": "ab ",
        "dt": "2024-02-29", "ts": "2024-01-02T03:04:05.123456",
        "tz": "2024-01-02T01:04:05Z", "tm": "13:14:15.500000",
        "iv": "1 year 2 mons 3 days 04:05:06", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": "{\"a\": 1}", "jb": "{\"b\": [1, 2]}", "by": "00ff10", "ai": [1, null, 3],
        "at": ["x", "y"], "o": 42
    });
    assert_eq!(rows[0], expected);
    assert_eq!(rows[1]["id"], 2);
    assert_eq!(rows[1]["n"], serde_json::Value::Null);
}

#[test]
fn incremental_cursor_reads_new_and_updated_rows_once() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("incr").unwrap();
    pg.psql(
        &db,
        "create table orders (id bigint primary key, amount numeric(10,2), updated_at timestamptz not null);
         insert into orders select g, g * 1.5, timestamptz '2024-01-01' + g * interval '1 minute'
           from generate_series(1, 1000) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    project(
        d,
        &db,
        &[(
            "orders",
            "source:\n  type: postgres\n  connection: shop\n  table: orders\n  cursor: updated_at\n  lookback: 5m\n  partitions: 3\nsink:\n  table: raw.orders\n  mode: merge\n  key: [id]\n",
        )],
    );
    let s = run_json(d);
    assert_eq!(first_asset(&s)["rows_written"], 1000, "{s}");
    assert_eq!(scalar(d, "select count(*) from raw.orders"), 1000);

    // Nothing new: the lookback re-reads the last 5 minutes, the merge absorbs them.
    let s = run_json(d);
    assert!(first_asset(&s)["rows_read"].as_u64().unwrap() <= 6, "{s}");
    assert_eq!(scalar(d, "select count(*) from raw.orders"), 1000);

    // An update and two inserts.
    pg.psql(
        &db,
        "update orders set amount = 0, updated_at = timestamptz '2024-02-01' where id = 10;
         insert into orders values (1001, 1, timestamptz '2024-02-01 00:01'), (1002, 2, timestamptz '2024-02-01 00:02');",
    )
    .unwrap();
    run_json(d);
    assert_eq!(scalar(d, "select count(*) from raw.orders"), 1002);
    assert_eq!(
        scalar(
            d,
            "select cast(amount as double) from raw.orders where id = 10"
        ),
        0.0
    );
    assert_eq!(scalar(d, "select count(distinct id) from raw.orders"), 1002);
}

#[test]
fn wrong_password_and_missing_table_fail_at_once_without_leaking_the_password() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("errs").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    project(
        d,
        &db,
        &[(
            "nope",
            "source:\n  type: postgres\n  connection: shop\n  table: public.nope\nsink:\n  table: raw.nope\n  mode: overwrite\n",
        )],
    );
    let out = run(d, &["run"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("relation \"public.nope\" does not exist"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--project")
        .arg(d)
        .arg("run")
        .env("WEIR_TEST_PG_PASSWORD", "wrong-secret-xyz")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(err.contains("check the user and password"), "{err}");
    assert!(!err.contains("wrong-secret-xyz"), "{err}");
    // A user error is not retried.
    assert!(!err.contains("attempt"), "{err}");
    // The lake is untouched by failed runs, and queries need no database.
    assert!(weir(d, &["tables"]).status.success());
}

/// Rows of `table` as one text, for comparing tables whose types lack equality (json).
fn fingerprint(pg: &PgServer, db: &str, table: &str) -> String {
    pg.psql(
        db,
        &format!(
            "select string_agg(row_to_json(x_row)::text, E'\\n' order by id) from {table} x_row"
        ),
    )
    .unwrap()
}

fn column_types(pg: &PgServer, db: &str, table: &str) -> String {
    pg.psql(
        db,
        &format!(
            "select string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' order by attnum) \
             from pg_attribute where attrelid = '{table}'::regclass and attnum > 0 and not attisdropped"
        ),
    )
    .unwrap()
}

#[test]
fn round_trip_postgres_delta_postgres_and_idempotent_upserts() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("trip").unwrap();
    pg.psql(&db, ALL_TYPES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    project(
        d,
        &db,
        &[
            (
                "extract",
                "source:\n  type: postgres\n  connection: shop\n  table: public.all_types\nsink:\n  table: raw.all_types\n  mode: merge\n  key: [id]\n",
            ),
            (
                "publish",
                "source:\n  type: lake\n  table: raw.all_types\nsink:\n  type: postgres\n  connection: shop\n  table: copy.all_types\n  mode: merge\n  key: [id]\n",
            ),
        ],
    );
    let s = run_json(d);
    assert_eq!(s["ok"], true, "{s}");
    let original = fingerprint(pg, &db, "public.all_types");
    assert_eq!(fingerprint(pg, &db, "copy.all_types"), original);
    // The recreated table has the original column types.
    assert_eq!(
        column_types(pg, &db, "copy.all_types"),
        column_types(pg, &db, "public.all_types")
    );

    // The lake table has not changed since: publishing again is skipped.
    let s: serde_json::Value =
        serde_json::from_str(&ok(&run(d, &["run", "publish", "--format", "json"]))).unwrap();
    assert_eq!(first_asset(&s)["units"], 0, "{s}");
    assert_eq!(fingerprint(pg, &db, "copy.all_types"), original);

    // An update flows through both steps.
    pg.psql(
        &db,
        "update all_types set t = 'changed', n = 1.01 where id = 1",
    )
    .unwrap();
    run_json(d);
    assert_eq!(
        pg.psql(&db, "select t || ' ' || n from copy.all_types where id = 1")
            .unwrap(),
        "changed 1.01"
    );
    assert_eq!(
        pg.psql(&db, "select count(*) from copy.all_types").unwrap(),
        "2"
    );

    // The same upsert applied again (its position forgotten) changes nothing.
    let before = fingerprint(pg, &db, "copy.all_types");
    pg.psql(
        &db,
        "delete from weir.positions where pipeline = 'weir.pipeline.publish'",
    )
    .unwrap();
    let s = run_json(d);
    let publish = s["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "publish")
        .unwrap();
    assert_eq!(publish["rows_written"], 2, "{s}");
    assert_eq!(fingerprint(pg, &db, "copy.all_types"), before);
    assert_eq!(
        pg.psql(
            &db,
            "select version from weir.positions where pipeline = 'weir.pipeline.publish'"
        )
        .unwrap(),
        "1"
    );
}

#[test]
fn connections_test_reports_each_connection() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("conn").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    project(d, &db, &[]);
    let out = run(d, &["connections", "test"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("ok      shop: PostgreSQL 15"), "{err}");
    assert!(err.contains(&format!("database {db} as weir")), "{err}");

    // A second connection to a port nobody listens on fails, and the command says so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = std::fs::read_to_string(d.join("weir.yaml")).unwrap();
    std::fs::write(
        d.join("weir.yaml"),
        format!("{yaml}  down:\n    type: postgres\n    url: postgresql://weir:hunter2-secret@127.0.0.1:{closed}/x\n    connect_timeout: 2s\n"),
    )
    .unwrap();
    let out = run(d, &["connections", "test"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("FAILED  down: error: postgres `down`: connecting:"),
        "{err}"
    );
    assert!(err.contains("ok      shop"), "{err}");
    assert!(!err.contains("hunter2-secret"), "{err}");
    let out = run(d, &["connections", "test", "shp"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("did you mean `shop`?"), "{err}");
}

#[test]
fn a_connection_killed_mid_extract_is_retried_and_the_result_is_exact() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("kill").unwrap();
    pg.psql(
        &db,
        "create table events (id bigint primary key, payload text not null);
         insert into events select g, repeat(md5(g::text), 4) from generate_series(1, 1500000) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    project(
        d,
        &db,
        &[(
            "events",
            "source:\n  type: postgres\n  connection: shop\n  table: events\n  partitions: 2\nsink:\n  table: raw.events\n  mode: overwrite\nretry:\n  max_attempts: 3\n  initial_backoff: 200ms\n",
        )],
    );
    // Terminate weir's first COPY backend as soon as it is streaming.
    let killer = {
        let db = db.clone();
        std::thread::spawn(move || {
            let pg = PgServer::shared();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                let killed = pg
                    .psql(
                        &db,
                        "select count(pg_terminate_backend(pid)) from pg_stat_activity \
                         where application_name = 'weir' and query ilike 'copy (select%' and state = 'active'",
                    )
                    .unwrap_or_default();
                if killed.trim() != "0" && !killed.trim().is_empty() {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            false
        })
    };
    let s = run_json(d);
    assert!(killer.join().unwrap(), "no COPY was running to kill");
    let a = first_asset(&s);
    assert_eq!(a["attempts"], 2, "{s}");
    assert_eq!(a["rows_written"], 1_500_000, "{s}");
    assert_eq!(scalar(d, "select count(*) from raw.events"), 1_500_000);
    assert_eq!(
        scalar(d, "select count(distinct id) from raw.events"),
        1_500_000
    );
    assert_eq!(
        scalar(d, "select sum(id) from raw.events"),
        1_500_000i64 * 1_500_001 / 2
    );
}

#[test]
fn the_demo_publishes_its_revenue_mart_to_postgres() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("demo").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("demo")
        .arg(&d)
        .args(["--postgres", &pg.url(&db), "--format", "json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains(PgServer::PASSWORD),
        "the password leaked: {text}"
    );
    let marts = scalar(&d, "select count(*) from marts.daily_revenue");
    assert_eq!(
        pg.psql(&db, "select count(*) from analytics.daily_revenue")
            .unwrap(),
        marts.to_string()
    );
    let lake_sum = scalar(
        &d,
        "select cast(sum(revenue) as double) from marts.daily_revenue",
    )
    .as_f64()
    .unwrap();
    let pg_sum: f64 = pg
        .psql(
            &db,
            "select sum(revenue)::float8 from analytics.daily_revenue",
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        lake_sum > 0.0 && (lake_sum - pg_sum).abs() < 1e-6,
        "{lake_sum} vs {pg_sum}"
    );
}

#[test]
fn an_unmapped_type_is_an_error_naming_the_column_or_text_when_asked() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("unmapped").unwrap();
    pg.psql(
        &db,
        "create table shapes (id int primary key, p point, r int4range);
         insert into shapes values (1, point(1, 2), int4range(1, 5));",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pipe = "source:\n  type: postgres\n  connection: shop\n  table: shapes\nsink:\n  table: raw.shapes\n  mode: overwrite\n";
    project(d, &db, &[("shapes", pipe)]);
    let out = run(d, &["run"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "column `p` of postgres:shop/shapes has type `point`, which weir does not map"
        ),
        "{err}"
    );
    assert!(err.contains("unsupported_types: text"), "{err}");

    let pipe = pipe.replace(
        "  table: shapes\n",
        "  table: shapes\n  unsupported_types: text\n",
    );
    project(d, &db, &[("shapes", &pipe)]);
    ok(&run(d, &["run"]));
    assert_eq!(
        query(d, "select p, r from raw.shapes"),
        vec![serde_json::json!({"p": "(1,2)", "r": "[1,5)"})]
    );
}

#[test]
fn sslmode_require_encrypts_the_session() {
    let pg = PgServer::shared();
    if !pg.has_tls() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have openssl for the TLS test"
        );
        eprintln!("skipping: no openssl to make a server certificate");
        return;
    }
    let db = pg.fresh_database("tls").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    project(
        d,
        &db,
        &[(
            "session",
            "source:\n  type: postgres\n  connection: shop\n  query: select ssl, version as tls_version from pg_stat_ssl where pid = pg_backend_pid()\nsink:\n  table: raw.session\n  mode: overwrite\n",
        )],
    );
    let yaml = std::fs::read_to_string(d.join("weir.yaml")).unwrap();
    std::fs::write(
        d.join("weir.yaml"),
        yaml.replace("sslmode: disable", "sslmode: require"),
    )
    .unwrap();
    ok(&run(d, &["run"]));
    let rows = query(d, "select ssl, tls_version from raw.session");
    assert_eq!(rows[0]["ssl"], true, "{rows:?}");
    assert!(
        rows[0]["tls_version"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1."),
        "{rows:?}"
    );
    let out = run(d, &["connections", "test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

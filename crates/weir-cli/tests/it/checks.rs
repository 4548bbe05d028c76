//! `weir test`: each check on passing and failing data, tolerance edges, nulls, an empty table.

use std::path::Path;

use crate::weir;

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

const ORDERS_PIPELINE: &str = "source:\n  type: files\n  path: data/orders.csv\nsink:\n  table: raw.orders\n  mode: overwrite\nchecks:\n";

const CHECKS: &str = "  - { check: not_null, column: customer_id }
  - { check: not_null, column: customer_id, name: nn_tolerated, tolerance: 1 }
  - { check: not_null, column: email, name: email_share, tolerance: 25% }
  - { check: unique, column: id }
  - { check: unique, columns: [id, status] }
  - { check: accepted_values, column: status, values: [new, paid, shipped] }
  - { check: range, column: amount, min: 0 }
  - { check: range, column: amount, min: 10, max: 40, name: range_incl }
  - { check: range, column: amount, min: 10, max: 40, inclusive: false, name: range_excl }
  - { check: pattern, column: email, regex: '[^@ ]+@[^@ ]+', severity: warn }
  - { check: relationships, column: customer_id, to: raw.customers, field: customer_id }
  - { check: row_count, min: 1, max: 10 }
  - { check: row_count, min: 6, name: too_few }
  - { check: expression, sql: \"amount >= 0 or status = 'bogus'\" }
  - { check: sql, sql: 'select * from {{ this }} where amount > 35', name: big_amounts }
";

fn results(out: &std::process::Output) -> Vec<serde_json::Value> {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn by_name<'a>(rs: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rs.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {rs:?}"))
}

#[test]
fn each_check_passes_and_fails_where_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            ("pipelines/orders.yaml", ORDERS_PIPELINE.trim_end_matches("checks:\n")),
            (
                "pipelines/customers.yaml",
                "source:\n  type: files\n  path: data/customers.csv\nsink:\n  table: raw.customers\n  mode: overwrite\n",
            ),
            (
                "data/orders.csv",
                "id,customer_id,status,amount,email\n1,1,new,10,a@x.com\n2,2,paid,20,b@x.com\n3,9,bogus,-5,not-an-email\n4,,paid,30,\n4,2,shipped,40,c@x.com\n",
            ),
            ("data/customers.csv", "customer_id,name\n1,Ada\n2,Ben\n"),
        ],
    );
    // Load without checks (a gate would refuse this data), then declare them and test.
    crate::ok(&weir(d, &["run"]));
    write(
        d,
        &[(
            "pipelines/orders.yaml",
            &format!("{ORDERS_PIPELINE}{CHECKS}"),
        )],
    );
    let out = weir(d, &["test", "--format", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rs = results(&out);
    let expect = [
        ("not_null_customer_id", "fail", 1),
        ("nn_tolerated", "pass", 1),
        ("email_share", "pass", 1),
        ("unique_id", "fail", 1),
        ("unique_id_status", "pass", 0),
        ("accepted_values_status", "fail", 1),
        ("range_amount", "fail", 1),
        ("range_incl", "fail", 1),
        ("range_excl", "fail", 3),
        ("pattern_email", "warn", 1),
        ("relationships_customer_id", "fail", 1),
        ("row_count", "pass", 0),
        ("too_few", "fail", 1),
        ("expression", "pass", 0),
        ("big_amounts", "fail", 1),
    ];
    assert_eq!(rs.len(), expect.len(), "{rs:?}");
    for (name, status, failing) in expect {
        let r = by_name(&rs, name);
        assert_eq!(
            (
                r["status"].as_str().unwrap(),
                r["failing"].as_u64().unwrap()
            ),
            (status, failing),
            "{name}: {r}"
        );
    }
    // Failing rows are shown.
    let rel = by_name(&rs, "relationships_customer_id");
    assert_eq!(rel["sample"][0]["customer_id"], 9, "{rel}");
    assert_eq!(by_name(&rs, "unique_id")["sample"][0]["rows"], 2);

    // The readable report names the checks and shows failing rows.
    let out = weir(d, &["test", "orders"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("relationships_customer_id  FAIL"), "{text}");
    assert!(
        text.contains("orders / accepted_values_status: failing rows"),
        "{text}"
    );
    assert!(text.contains("\"status\":\"bogus\""), "{text}");
    assert!(
        text.contains("15 checks: 5 passed, 1 warned, 9 failed"),
        "{text}"
    );
}

#[test]
fn checks_on_an_empty_table_and_a_clean_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/orders.yaml",
                ORDERS_PIPELINE.trim_end_matches("checks:\n"),
            ),
            ("data/orders.csv", "id,status\n"),
        ],
    );
    crate::ok(&weir(d, &["run"]));
    let checks = format!("{ORDERS_PIPELINE}  - {{ check: not_null, column: id }}\n  - {{ check: unique, column: id }}\n  - {{ check: row_count, min: 1 }}\n  - {{ check: accepted_values, column: status, values: [new] }}\n");
    write(d, &[("pipelines/orders.yaml", &checks)]);
    let out = weir(d, &["test", "--format", "json"]);
    let rs = results(&out);
    assert_eq!(by_name(&rs, "not_null_id")["status"], "pass");
    assert_eq!(by_name(&rs, "unique_id")["status"], "pass");
    assert_eq!(by_name(&rs, "accepted_values_status")["status"], "pass");
    assert_eq!(by_name(&rs, "row_count")["status"], "fail");
    assert_eq!(out.status.code(), Some(1));

    // Data that passes everything: exit 0.
    write(d, &[("data/orders.csv", "id,status\n1,new\n2,new\n")]);
    crate::ok(&weir(d, &["run", "--full-refresh"]));
    let out = weir(d, &["test"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 checks: 4 passed, 0 warned, 0 failed"));
}

#[test]
fn a_check_missing_its_keys_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/orders.yaml",
                &format!("{ORDERS_PIPELINE}  - {{ check: accepted_values, column: status }}\n"),
            ),
            ("data/orders.csv", "id,status\n"),
        ],
    );
    let out = weir(d, &["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("check `accepted_values_status` of `pipelines/orders.yaml`: needs `values`"),
        "{err}"
    );
}

#[test]
fn a_failing_error_check_blocks_publishing_and_skips_downstream() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/orders.yaml",
                "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.orders\nchecks:\n  - { check: accepted_values, column: status, values: [new, paid] }\n  - { check: not_null, column: note, severity: warn }\n",
            ),
            ("models/marts/order_count.sql", "select count(*) as n from {{ source('raw', 'orders') }}"),
            ("data/1.csv", "id,status,note\n1,new,x\n2,paid,\n"),
        ],
    );
    let s: serde_json::Value =
        serde_json::from_str(&crate::ok(&weir(d, &["run", "--format", "json"]))).unwrap();
    let orders = &s["assets"][0];
    assert_eq!(orders["checks"][1]["status"], "warn", "{s}");
    let history_before = String::from_utf8_lossy(
        &weir(d, &["table", "history", "raw.orders", "--format", "json"]).stdout,
    )
    .into_owned();

    write(d, &[("data/2.csv", "id,status,note\n3,lost,y\n4,new,z\n")]);
    let out = weir(d, &["run", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by = |n: &str| {
        s["assets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == n)
            .unwrap()
            .clone()
    };
    let err = by("orders")["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("1 check(s) failed on the new data; nothing was published to `raw.orders`"),
        "{err}"
    );
    assert!(
        err.contains("accepted_values_status: 1 of 2 rows fail"),
        "{err}"
    );
    assert!(err.contains("\"status\":\"lost\""), "{err}");
    assert_eq!(by("order_count")["status"], "skipped", "{s}");
    // The table did not move.
    let history_after = String::from_utf8_lossy(
        &weir(d, &["table", "history", "raw.orders", "--format", "json"]).stdout,
    )
    .into_owned();
    assert_eq!(history_before, history_after);
    assert_eq!(crate::scalar(d, "select count(*) from raw.orders"), 2);
    assert_eq!(crate::scalar(d, "select n from marts.order_count"), 2);

    // Fixed data loads, and the rerun picks up the file that failed.
    write(d, &[("data/2.csv", "id,status,note\n3,paid,y\n4,new,z\n")]);
    crate::ok(&weir(d, &["run"]));
    assert_eq!(crate::scalar(d, "select n from marts.order_count"), 4);
}

#[test]
fn a_retried_load_replaces_the_quarantine_of_its_failed_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/orders.yaml",
                "source:\n  type: files\n  path: data/*.csv\n  schema:\n    - { name: id, type: bigint }\nsink:\n  table: raw.orders\nchecks:\n  - { check: accepted_values, column: status, values: [new, paid] }\n",
            ),
            // A malformed id (quarantined) and a status the gate refuses.
            ("data/1.csv", "id,status\n1,new\nx2,new\n3,lost\n"),
        ],
    );
    assert_eq!(weir(d, &["run"]).status.code(), Some(1));
    // The failed attempt's quarantine commit landed before the gate refused the rows.
    assert_eq!(
        crate::scalar(d, "select raw from raw.orders__quarantine"),
        "x2,new"
    );

    // Corrected input with a different malformed row: the quarantine holds only it.
    write(d, &[("data/1.csv", "id,status\n1,new\ny9,paid\n3,paid\n")]);
    crate::ok(&weir(d, &["run"]));
    assert_eq!(
        crate::query(d, "select raw, load from raw.orders__quarantine"),
        vec![serde_json::json!({"raw": "y9,paid", "load": 1})]
    );
    assert_eq!(crate::scalar(d, "select count(*) from raw.orders"), 2);

    // The next load with no bad rows leaves load 1's quarantine alone.
    write(d, &[("data/2.csv", "id,status\n4,new\n")]);
    crate::ok(&weir(d, &["run"]));
    assert_eq!(
        crate::scalar(d, "select count(*) from raw.orders__quarantine"),
        1
    );
    assert_eq!(crate::scalar(d, "select count(*) from raw.orders"), 3);
}

#[test]
fn quarantining_checks_move_failing_rows_aside_and_publish_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/orders.yaml",
                "source:\n  type: files\n  path: data/*.csv\n  schema:\n    - { name: id, type: bigint }\nsink:\n  table: raw.orders\nchecks:\n  - { check: accepted_values, column: status, values: [new, paid], on_fail: quarantine }\n  - { check: range, column: amount, min: 0, on_fail: quarantine, name: no_refunds }\n  - { check: not_null, column: id }\n",
            ),
            (
                "data/1.csv",
                "id,status,amount\n1,new,5\n2,lost,5\n3,paid,-1\n4,paid,7\nx5,new,1\n6,gone,-2\n7,new,3\n",
            ),
        ],
    );
    let s: serde_json::Value =
        serde_json::from_str(&crate::ok(&weir(d, &["run", "--format", "json"]))).unwrap();
    let a = &s["assets"][0];
    // 7 rows read: 1 malformed, 3 refused by checks (row 6 fails both), 3 published.
    assert_eq!(a["rows_read"], 7, "{a}");
    assert_eq!(a["rows_written"], 3, "{a}");
    assert_eq!(a["rows_quarantined"], 4, "{a}");
    assert_eq!(crate::scalar(d, "select count(*) from raw.orders"), 3);
    let q = crate::query(
        d,
        "select source, reason, raw from raw.orders__quarantine order by source, raw",
    );
    assert_eq!(q.len(), 4, "{q:?}");
    let checks: Vec<&serde_json::Value> = q.iter().filter(|r| r["source"] == "checks").collect();
    assert_eq!(checks.len(), 3);
    assert!(checks.iter().any(|r| r["reason"]
        .as_str()
        .unwrap()
        .starts_with("check `accepted_values_status`")
        && r["raw"].as_str().unwrap().contains("\"id\":2")));
    assert!(checks.iter().any(|r| r["reason"]
        .as_str()
        .unwrap()
        .starts_with("check `no_refunds`")
        && r["raw"].as_str().unwrap().contains("\"id\":3")));
    // A row failing two checks is quarantined once, under the first.
    assert!(checks.iter().any(|r| r["reason"]
        .as_str()
        .unwrap()
        .starts_with("check `accepted_values_status`")
        && r["raw"].as_str().unwrap().contains("\"id\":6")));
    assert!(q.iter().any(|r| r["raw"] == "x5,new,1"));
}

#[test]
fn on_fail_quarantine_needs_a_row_level_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/orders.yaml",
                &format!(
                    "{ORDERS_PIPELINE}  - {{ check: unique, column: id, on_fail: quarantine }}\n"
                ),
            ),
            ("data/orders.csv", "id\n1\n"),
        ],
    );
    let out = weir(d, &["validate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("`on_fail: quarantine` applies to row-level checks"));
}

#[test]
fn freshness_and_schema_checks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let two_hours_ago = (chrono_like_now() - 2 * 3600).to_string();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/orders.yaml",
                ORDERS_PIPELINE.trim_end_matches("checks:\n"),
            ),
            (
                "data/orders.csv",
                &format!(
                    "id,status,updated_at\n1,new,{}\n",
                    iso(two_hours_ago.parse().unwrap())
                ),
            ),
        ],
    );
    crate::ok(&weir(d, &["run"]));
    let checks = format!(
        "{ORDERS_PIPELINE}  - {{ check: freshness, column: updated_at, warn_after: 1h, name: stale_warn }}
  - {{ check: freshness, column: updated_at, warn_after: 1h, error_after: 90m, name: stale_error }}
  - {{ check: freshness, column: updated_at, warn_after: 3h, name: fresh }}
  - {{ check: freshness, warn_after: 1h, name: loaded_recently }}
  - {{ check: schema, expect: {{ id: bigint, status: text, updated_at: timestamp }} }}
  - {{ check: schema, expect: {{ id: int, note: text }}, mode: freeze, name: frozen }}
"
    );
    write(d, &[("pipelines/orders.yaml", &checks)]);
    let out = weir(d, &["test", "--format", "json"]);
    let rs = results(&out);
    assert_eq!(by_name(&rs, "stale_warn")["status"], "warn", "{rs:?}");
    assert_eq!(by_name(&rs, "stale_error")["status"], "fail");
    assert!(
        by_name(&rs, "stale_error")["message"]
            .as_str()
            .unwrap()
            .starts_with("newest `updated_at` is 2h"),
        "{rs:?}"
    );
    assert_eq!(by_name(&rs, "fresh")["status"], "pass");
    let loaded = by_name(&rs, "loaded_recently");
    assert_eq!(loaded["status"], "pass", "{loaded}");
    assert!(
        loaded["message"]
            .as_str()
            .unwrap()
            .starts_with("last load "),
        "{loaded}"
    );
    assert_eq!(by_name(&rs, "schema")["status"], "pass", "{rs:?}");
    let frozen = by_name(&rs, "frozen");
    assert_eq!(frozen["status"], "fail");
    assert_eq!(
        frozen["message"],
        "column `id` is bigint, expected int; column `note` is missing; unexpected column `status` (schema is frozen); unexpected column `updated_at` (schema is frozen)"
    );
}

/// Seconds since the epoch.
fn chrono_like_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `YYYY-MM-DDTHH:MM:SSZ` for epoch seconds (civil-from-days, proleptic Gregorian).
fn iso(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[test]
fn a_collapsed_load_is_flagged_after_a_stable_history() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/events.yaml",
                "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.events\nchecks:\n  - { check: anomaly, metric: row_count, min_history: 4 }\n  - { check: anomaly, metric: null_count, column: kind, min_history: 4, severity: warn }\n",
            ),
        ],
    );
    let file = |n: usize, rows: usize| {
        let mut t = String::from("id,kind\n");
        for i in 0..rows {
            t.push_str(&format!("{},k{}\n", n * 1000 + i, i % 3));
        }
        t
    };
    // Five loads of about 200 rows: quiet at first, then judged, and fine.
    for (n, rows) in [(1, 200), (2, 205), (3, 198), (4, 202), (5, 201)] {
        write(d, &[(&format!("data/{n}.csv"), &file(n, rows))]);
        let s: serde_json::Value =
            serde_json::from_str(&crate::ok(&weir(d, &["run", "--format", "json"]))).unwrap();
        let r = &s["assets"][0]["checks"][0];
        assert_eq!(r["status"], "pass", "{s}");
        if n <= 4 {
            assert!(r["message"].as_str().unwrap().starts_with("quiet"), "{r}");
        }
    }
    assert_eq!(
        crate::scalar(
            d,
            "select count(*) from _weir.metrics where metric = 'row_count'"
        ),
        5
    );
    // A load of 7 rows: flagged, nothing published.
    write(d, &[("data/6.csv", &file(6, 7))]);
    let out = weir(d, &["run", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = s["assets"][0]["error"].as_str().unwrap();
    assert!(err.contains("anomaly: row_count = 7"), "{err}");
    assert!(
        err.contains("row_count = 7 against a median of 201"),
        "{err}"
    );
    assert_eq!(crate::scalar(d, "select count(*) from raw.events"), 1006);
}

#[test]
fn nulls_are_only_failures_for_not_null_and_empty_tables_pass_row_checks() {
    let all = "  - { check: not_null, column: v }
  - { check: unique, column: v }
  - { check: unique, columns: [id, v] }
  - { check: accepted_values, column: v, values: [a] }
  - { check: range, column: n, min: 0, max: 1 }
  - { check: pattern, column: v, regex: 'a' }
  - { check: relationships, column: v, to: raw.parents, field: v }
  - { check: expression, sql: 'n is null or n >= 0' }
  - { check: sql, sql: 'select * from {{ this }} where n < 0', name: negative }
  - { check: schema, expect: { id: bigint } }
";
    for (data, nulls) in [("id,v,n\n1,,\n2,,\n", true), ("id,v,n\n", false)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            &[
                ("weir.yaml", "name: t\n"),
                (
                    "pipelines/t.yaml",
                    "source:\n  type: files\n  path: data/t.csv\n  schema:\n    - { name: id, type: bigint }\n    - { name: v, type: text }\n    - { name: n, type: double }\nsink:\n  table: raw.t\n  mode: overwrite\n",
                ),
                (
                    "pipelines/parents.yaml",
                    "source:\n  type: files\n  path: data/p.csv\nsink:\n  table: raw.parents\n  mode: overwrite\n",
                ),
                ("data/t.csv", data),
                ("data/p.csv", "v\na\n"),
            ],
        );
        crate::ok(&weir(d, &["run"]));
        let yaml = std::fs::read_to_string(d.join("pipelines/t.yaml")).unwrap();
        write(d, &[("pipelines/t.yaml", &format!("{yaml}checks:\n{all}"))]);
        let out = weir(d, &["test", "t", "--format", "json"]);
        let rs = results(&out);
        assert_eq!(rs.len(), 10, "{rs:?}");
        for r in &rs {
            let expected = if nulls && r["name"] == "not_null_v" {
                "fail"
            } else {
                "pass"
            };
            assert_eq!(r["status"], expected, "nulls={nulls}: {r}");
        }
        if nulls {
            assert_eq!(by_name(&rs, "not_null_v")["failing"], 2);
        }
    }
}

#[test]
fn every_run_records_metrics_even_without_checks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n"),
            (
                "pipelines/e.yaml",
                "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.e\n",
            ),
            (
                "models/m.sql",
                "select count(*) as n from {{ source('raw', 'e') }}",
            ),
            ("data/1.csv", "id,v\n1,a\n2,\n3,c\n"),
        ],
    );
    crate::ok(&weir(d, &["run"]));
    write(d, &[("data/2.csv", "id,v\n4,\n5,\n")]);
    crate::ok(&weir(d, &["run"]));
    let rows = crate::query(
        d,
        "select value from _weir.metrics where asset = 'e' and metric = 'row_count' order by recorded_at",
    );
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"value": 3.0}),
            serde_json::json!({"value": 2.0})
        ]
    );
    let nulls = crate::query(
        d,
        "select value from _weir.metrics where asset = 'e' and metric = 'null_count' and \"column\" = 'v' order by recorded_at",
    );
    assert_eq!(
        nulls,
        vec![
            serde_json::json!({"value": 1.0}),
            serde_json::json!({"value": 2.0})
        ]
    );
    let maxes = crate::query(
        d,
        "select value from _weir.metrics where asset = 'e' and metric = 'max' and \"column\" = 'id' order by recorded_at",
    );
    assert_eq!(
        maxes,
        vec![
            serde_json::json!({"value": 3.0}),
            serde_json::json!({"value": 5.0})
        ]
    );
    // The model's runs are recorded too.
    assert_eq!(
        crate::scalar(
            d,
            "select count(*) from _weir.metrics where asset = 'm' and metric = 'row_count'"
        ),
        2
    );
}

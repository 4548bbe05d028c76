//! File loads that stream through the writer: merges into an existing table (staged),
//! bad-row budgets checked after the last of many batches, and a transform.

use std::path::Path;

use crate::{ok, scalar, weir};

fn write(dir: &Path, files: &[(&str, String)]) {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

fn run_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&weir(dir, &["run", "--format", "json"]))).unwrap()
}

fn asset<'a>(summary: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    summary["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap()
}

#[test]
fn merge_into_an_existing_table_updates_inserts_and_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n".into()),
            (
                "pipelines/accounts.yaml",
                "source:\n  type: files\n  path: data/*.csv\n  batch_rows: 100\nsink:\n  table: raw.accounts\n  mode: merge\n  key: [id]\n  delete_flag: gone\n".into(),
            ),
            (
                "data/1.csv",
                std::iter::once("id,balance,gone".to_string())
                    .chain((1..=1000).map(|i| format!("{i},{i}.50,false")))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        ],
    );
    let s = run_json(d);
    assert_eq!(asset(&s, "accounts")["rows_written"], 1000);
    // Updates for 1..=10, inserts 1001..=1005, deletes 11 and 12, one bad row.
    let mut second = vec!["id,balance,gone".to_string()];
    second.extend((1..=10).map(|i| format!("{i},0,false")));
    second.extend((1001..=1005).map(|i| format!("{i},7,false")));
    second.extend(["11,,true".into(), "12,,true".into(), "x13,1,false".into()]);
    write(d, &[("data/2.csv", second.join("\n"))]);
    let s = run_json(d);
    let a = asset(&s, "accounts");
    assert_eq!(a["rows_read"], 18);
    assert_eq!(a["rows_quarantined"], 1);
    assert_eq!(a["rows_deleted"], 2);
    assert_eq!(scalar(d, "select count(*) from raw.accounts"), 1003);
    assert_eq!(
        scalar(d, "select sum(balance) from raw.accounts where id <= 10"),
        0.0
    );
    assert_eq!(
        scalar(d, "select count(*) from raw.accounts where id in (11, 12)"),
        0
    );
    assert_eq!(
        scalar(d, "select raw from raw.accounts__quarantine"),
        "x13,1,false"
    );
    // Nothing new: nothing happens.
    let s = run_json(d);
    assert_eq!(asset(&s, "accounts")["rows_read"], 0);
    assert_eq!(scalar(d, "select count(*) from raw.accounts"), 1003);
}

#[test]
fn a_ratio_budget_is_checked_after_the_last_batch_and_then_nothing_commits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 5,000 rows in batches of 100; every 10th row is bad: 10% > 5%.
    let mut rows = vec!["id,amount".to_string()];
    rows.extend((0..5000).map(|i| {
        if i % 10 == 0 {
            format!("{i},not-a-number")
        } else {
            format!("{i},{i}")
        }
    }));
    write(
        d,
        &[
            ("weir.yaml", "name: t\n".into()),
            (
                "pipelines/x.yaml",
                "source:\n  type: files\n  path: data/x.csv\n  batch_rows: 100\n  schema:\n    - { name: amount, type: bigint }\nsink:\n  table: raw.x\nmax_bad_rows: 5%\n".into(),
            ),
            ("data/x.csv", rows.join("\n")),
        ],
    );
    let out = weir(d, &["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("500 of 5000 rows are malformed, more than max_bad_rows (5%)"),
        "{err}"
    );
    assert!(
        !d.join("lake/raw/x/_delta_log").exists(),
        "nothing may commit"
    );
    assert!(!d.join("lake/raw/x__quarantine/_delta_log").exists());

    // Under budget (the same file with a looser limit): all rows land, the bad ones aside.
    write(
        d,
        &[(
            "pipelines/x.yaml",
            "source:\n  type: files\n  path: data/x.csv\n  batch_rows: 100\n  schema:\n    - { name: amount, type: bigint }\nsink:\n  table: raw.x\nmax_bad_rows: 20%\ntransform: select id, amount * 2 as doubled from source\n".into(),
        )],
    );
    let s = run_json(d);
    assert_eq!(asset(&s, "x")["rows_written"], 4500);
    assert_eq!(scalar(d, "select count(*) from raw.x__quarantine"), 500);
    assert_eq!(
        scalar(d, "select sum(doubled) from raw.x"),
        2 * (12_497_500 - 1_247_500)
    );
}

#[test]
fn merge_keeps_the_last_row_of_a_key_by_file_then_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        &[
            ("weir.yaml", "name: t\n".into()),
            (
                "pipelines/c.yaml",
                "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.c\n  mode: merge\n  key: [id]\n  delete_flag: gone\n".into(),
            ),
            // Two days land together; within a file the later line wins, across files the
            // later file (by name) wins; a key deleted on day 2 is gone.
            ("data/day1.csv", "id,v,gone\n1,a,false\n2,b,false\n1,c,false\n3,x,false\n".into()),
            ("data/day2.csv", "id,v,gone\n2,d,false\n3,,true\n4,e,false\n4,f,false\n".into()),
        ],
    );
    let check = |d: &Path| {
        assert_eq!(
            crate::query(d, "select id, v from raw.c order by id"),
            vec![
                serde_json::json!({"id": 1, "v": "c"}),
                serde_json::json!({"id": 2, "v": "d"}),
                serde_json::json!({"id": 4, "v": "f"}),
            ]
        );
    };
    ok(&weir(d, &["run"]));
    check(d);
    // A later file updates a key again, in a merge into the existing table.
    write(
        d,
        &[("data/day3.csv", "id,v,gone\n1,g,false\n1,h,false\n".into())],
    );
    ok(&weir(d, &["run"]));
    assert_eq!(scalar(d, "select v from raw.c where id = 1"), "h");
    // A full refresh rebuilds the same table from all files, without the flag column.
    ok(&weir(d, &["run", "--full-refresh"]));
    assert_eq!(scalar(d, "select v from raw.c where id = 1"), "h");
    assert_eq!(scalar(d, "select count(*) from raw.c"), 3);
    let cols = crate::query(d, "select * from raw.c limit 1");
    assert!(cols[0].get("gone").is_none(), "{cols:?}");
    assert!(cols[0].get("__weir_seq").is_none(), "{cols:?}");
}

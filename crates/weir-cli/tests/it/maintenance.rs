//! Table maintenance through the CLI: optimize compacts and keeps every row, restore
//! brings back an earlier version, vacuum deletes only unreferenced files older than the
//! retention (and its dry run lists exactly those).

use std::path::Path;

use crate::{ok, query, weir, write, LakeAt};

/// `weir table COMMAND raw.events ARGS --format json`, parsed.
fn table_json(d: &Path, command: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["table", command, "raw.events"];
    all.extend_from_slice(args);
    all.extend(["--format", "json"]);
    serde_json::from_str(ok(&weir(d, &all)).trim()).unwrap()
}

fn rows(d: &Path) -> Vec<serde_json::Value> {
    query(d, "select * from raw.events order by id")
}

#[test]
fn optimize_restore_time_travel_and_vacuum() {
    maintenance_on(LakeAt::local());
}

#[test]
fn optimize_restore_time_travel_and_vacuum_on_s3() {
    maintenance_on(LakeAt::s3("maintenance"));
}

fn maintenance_on(lake: LakeAt) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data_files = |d: &Path| lake.data_files(d, "raw.events");
    write(d, "weir.yaml", &format!("name: t\n{}", lake.yaml()));
    write(
        d,
        "pipelines/events.yaml",
        "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.events\n  mode: append\n",
    );
    // Six loads, one small file each: versions 0 to 5.
    for f in 0..6 {
        let csv: Vec<String> = std::iter::once("id,kind".to_string())
            .chain((0..50).map(|i| format!("{},k{}", f * 50 + i, i % 7)))
            .collect();
        write(d, &format!("data/{f}.csv"), &csv.join("\n"));
        ok(&weir(d, &["run", "--quiet"]));
    }
    let before = rows(d);
    assert_eq!(before.len(), 300);
    assert_eq!(data_files(d).len(), 6);

    // The health report sees six small files and suggests compacting them.
    let s = &table_json(d, "stats", &[])[0];
    assert_eq!(
        (&s["files"], &s["rows"], &s["versions"]),
        (&6.into(), &300.into(), &6.into()),
        "{s}"
    );
    assert_eq!(s["small_file_share"], 1.0, "{s}");
    assert!(s["compression_ratio"].as_f64().unwrap() > 1.0, "{s}");
    assert!(
        s["suggestions"][0]
            .as_str()
            .unwrap()
            .contains("weir table optimize raw.events"),
        "{s}"
    );

    let m = table_json(d, "optimize", &[]);
    assert_eq!(m["files_before"], 6, "{m}");
    assert_eq!(m["files_after"], 1, "{m}");
    assert_eq!(m["files_removed"], 6, "{m}");
    assert_eq!(m["version"], 6, "{m}");
    assert_eq!(rows(d), before, "optimize changed the rows");
    let s = &table_json(d, "stats", &[])[0];
    assert_eq!((&s["files"], &s["rows"]), (&1.into(), &300.into()), "{s}");
    // The six compacted files stay for time travel until a vacuum.
    assert_eq!(
        (&s["retained_files"], &s["reclaimable_files"]),
        (&6.into(), &0.into()),
        "{s}"
    );
    assert_eq!(s["suggestions"].as_array().unwrap().len(), 0, "{s}");
    assert_eq!(s["last_checkpoint"], serde_json::Value::Null);
    let c = table_json(d, "checkpoint", &[]);
    assert_eq!(c["version"], 6, "{c}");
    assert_eq!(table_json(d, "stats", &[])[0]["last_checkpoint"], 6);
    assert_eq!(rows(d), before, "the checkpoint changed what readers see");

    // History: what each version changed, and the table after it.
    let h: serde_json::Value = serde_json::from_str(&ok(&weir(
        d,
        &["table", "history", "raw.events", "--format", "json"],
    )))
    .unwrap();
    let v6 = &h[0];
    assert_eq!(
        (&v6["version"], &v6["operation"]),
        (&6.into(), &"OPTIMIZE".into()),
        "{v6}"
    );
    assert_eq!(
        (&v6["files_added"], &v6["files_removed"], &v6["files"]),
        (&1.into(), &6.into(), &1.into()),
        "{v6}"
    );
    assert_eq!(
        (&v6["rows"], &v6["rows_removed"]),
        (&300.into(), &300.into())
    );
    assert_eq!((&h[4]["version"], &h[4]["rows"]), (&2.into(), &150.into()));

    // Time travel: by version in SQL or for the whole query, and by time.
    let count = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["query"];
        all.extend_from_slice(args);
        all.extend(["--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(ok(&weir(d, &all)).trim()).unwrap();
        v[0]["n"].clone()
    };
    assert_eq!(count(&["select count(*) n from raw.events@v2"]), 150);
    assert_eq!(
        count(&["select count(*) n from raw.events", "--as-of", "2"]),
        150
    );
    let v3_time = h[3]["timestamp"].as_str().unwrap();
    assert_eq!(
        count(&["select count(*) n from raw.events", "--as-of", v3_time]),
        200
    );
    assert_eq!(
        count(&[&format!("select count(*) n from raw.events@'{v3_time}'")]),
        200
    );
    // Two versions of one table in one query: the rows version 4 added.
    assert_eq!(
        count(&["select count(*) n from raw.events@v4 a \
                 left join raw.events@v3 b on a.id = b.id where b.id is null"]),
        50
    );
    let out = weir(d, &["query", "select * from raw.events@v60"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no version 60") && err.contains("history"),
        "{err}"
    );
    let out = weir(d, &["query", "select 1", "--as-of", "last tuesday"]);
    assert_eq!(out.status.code(), Some(2));
    // Engine settings per query: applied, and a wrong key named.
    assert_eq!(
        count(&[
            "select count(*) n from raw.events",
            "--set",
            "datafusion.execution.batch_size=7"
        ]),
        300
    );
    let out = weir(d, &["query", "select 1", "--set", "datafusion.nope=1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("datafusion.nope"));

    // Version 2 held the first three files.
    let r = table_json(d, "restore", &["--version", "2"]);
    assert_eq!(r["version"], 7, "{r}");
    assert_eq!(rows(d), before[..150].to_vec());
    ok(&weir(
        d,
        &["table", "restore", "raw.events", "--version", "6"],
    ));
    assert_eq!(rows(d), before);

    // Nothing was removed an hour ago: a 1h retention deletes nothing.
    let v = table_json(d, "vacuum", &["--retain", "1h", "--force", "--dry-run"]);
    assert_eq!(v["files"].as_array().unwrap().len(), 0, "{v}");
    // With no retention, the six small files (the current version reads only the
    // compacted one) would go; the dry run deletes nothing.
    let on_disk = data_files(d);
    assert_eq!(on_disk.len(), 7);
    let dry = table_json(d, "vacuum", &["--retain", "0s", "--force", "--dry-run"]);
    let listed: Vec<String> = dry["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), 6, "{dry}");
    assert!(listed.iter().all(|f| on_disk.contains(f)), "{dry}");
    assert_eq!(data_files(d), on_disk, "a dry run deleted files");
    let real = table_json(d, "vacuum", &["--retain", "0s", "--force"]);
    assert_eq!(
        real["files"], dry["files"],
        "the dry run and the real run differ"
    );
    let left = data_files(d);
    assert_eq!(left.len(), 1);
    assert!(!listed.contains(&left[0]), "vacuum deleted the live file");
    assert_eq!(rows(d), before);

    // Versions whose files are gone cannot come back, and say why.
    let out = weir(d, &["table", "restore", "raw.events", "--version", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vacuum"), "{err}");
    assert_eq!(rows(d), before);

    // A short retention needs --force.
    let out = weir(d, &["table", "vacuum", "raw.events", "--retain", "1d"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("below the safe minimum of 7 days") && err.contains("--force"),
        "{err}"
    );
}

/// `weir query --explain --format json`: how many of `raw.points`' files the query reads.
fn files_scanned(d: &Path, sql: &str) -> (u64, u64) {
    let e: serde_json::Value =
        serde_json::from_str(ok(&weir(d, &["query", sql, "--explain", "--format", "json"])).trim())
            .unwrap();
    let t = &e["tables"][0];
    assert_eq!(t["table"], "raw.points", "{e}");
    (
        t["files_scanned"].as_u64().unwrap(),
        t["files_total"].as_u64().unwrap(),
    )
}

#[test]
fn zorder_keeps_rows_and_skips_files() {
    zorder_on(LakeAt::local());
}

#[test]
fn zorder_keeps_rows_and_skips_files_on_s3() {
    zorder_on(LakeAt::s3("zorder"));
}

fn zorder_on(lake: LakeAt) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", &format!("name: t\n{}", lake.yaml()));
    write(
        d,
        "pipelines/points.yaml",
        "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.points\n  mode: append\n",
    );
    // Eight files of points scattered over a 1000 x 1000 square: each file's x and y
    // span the whole range, so statistics cannot skip any of them.
    let mut seed: u64 = 7;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % 1000
    };
    for f in 0..8 {
        let mut csv = vec!["id,x,y".to_string()];
        for i in 0..4000 {
            csv.push(format!("{},{},{}", f * 4000 + i, next(), next()));
        }
        write(d, &format!("data/{f}.csv"), &csv.join("\n"));
        ok(&weir(d, &["run", "--quiet"]));
    }
    let corner = "select count(*) n from raw.points where x < 100 and y < 100";
    let all = "select * from raw.points order by id";
    let before = query(d, all);
    assert_eq!(before.len(), 32_000);
    let expected = query(d, corner);
    let (scanned, total) = files_scanned(d, corner);
    assert_eq!((scanned, total), (8, 8), "every file spans the corner");

    let m: serde_json::Value = serde_json::from_str(
        ok(&weir(
            d,
            &[
                "table",
                "optimize",
                "raw.points",
                "--zorder",
                "x,y",
                "--target-size",
                "64KiB",
                "--format",
                "json",
            ],
        ))
        .trim(),
    )
    .unwrap();
    let files_after = m["files_after"].as_u64().unwrap();
    assert!(files_after >= 4, "{m}");
    assert_eq!(query(d, all), before, "z-order changed the rows");
    assert_eq!(query(d, corner), expected);
    let (scanned, total) = files_scanned(d, corner);
    assert_eq!(total, files_after);
    // The corner is 1% of the square: clustered files mostly lie elsewhere.
    assert!(
        scanned * 2 < total,
        "z-order should let the filter skip most files: {scanned} of {total} scanned"
    );
}

/// `weir run --format json`, parsed; the summary of asset `name`.
fn run_asset(d: &Path, name: &str) -> serde_json::Value {
    let s: serde_json::Value =
        serde_json::from_str(&ok(&weir(d, &["run", "--format", "json"]))).unwrap();
    s["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
        .unwrap()
}

#[test]
fn maintenance_policies_retain_compact_and_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let project = "name: t\n";
    write(d, "weir.yaml", project);
    write(
        d,
        "pipelines/events.yaml",
        "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.events\n  mode: append\n  partition_by: [day]\n",
    );
    let today = chrono::Utc::now().date_naive();
    let day = |ago: i64| (today - chrono::Duration::days(ago)).to_string();
    // Five loads, each with rows of a recent day and of a day 100 days back: two
    // partitions with five small files each.
    for f in 0..5 {
        let mut csv = vec!["id,day".to_string()];
        for i in 0..20 {
            let ago = if i % 4 == 0 { 100 } else { 1 };
            csv.push(format!("{},{}", f * 20 + i, day(ago)));
        }
        write(d, &format!("data/{f}.csv"), &csv.join("\n"));
        ok(&weir(d, &["run", "--quiet"]));
    }
    assert_eq!(query(d, "select * from raw.events").len(), 100);
    // One partition at a time: the old day's five files become one; the recent day's stay.
    let old = format!("day={}", day(100));
    let one: serde_json::Value = serde_json::from_str(
        ok(&weir(
            d,
            &[
                "table",
                "optimize",
                "raw.events",
                "--partition",
                &old,
                "--format",
                "json",
            ],
        ))
        .trim(),
    )
    .unwrap();
    assert_eq!(
        (&one["files_removed"], &one["files_added"]),
        (&5.into(), &1.into()),
        "{one}"
    );
    assert_eq!(one["files_after"], 6, "{one}");
    let out = weir(
        d,
        &["table", "optimize", "raw.events", "--partition", "id=3"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("partition columns: day"));
    assert_eq!(query(d, "select * from raw.events").len(), 100);

    let policy = "maintenance:\n  - tables: [\"raw.*\"]\n    retention: {column: day, keep: 30d}\n    optimize: {min_small_files: 3}\n    vacuum: {every: 7d}\n";
    write(d, "weir.yaml", &format!("{project}{policy}"));
    let maintain = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["table", "maintain"];
        all.extend_from_slice(args);
        all.extend(["--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(ok(&weir(d, &all)).trim()).unwrap();
        v[0].clone()
    };
    // The dry run predicts; nothing changes.
    let dry = maintain(&["--dry-run"]);
    assert_eq!(dry["retention"]["rows"], 25, "{dry}");
    assert_eq!(dry["retention"]["files"], 1, "{dry}");
    assert_eq!(dry["optimize"]["files_removed"], 5, "{dry}");
    assert_eq!(dry["vacuum"]["files"].as_array().unwrap().len(), 0, "{dry}");
    assert_eq!(query(d, "select * from raw.events").len(), 100);

    // The real run does what the dry run said.
    let real = maintain(&[]);
    assert_eq!(real["retention"], dry["retention"], "{real}");
    assert_eq!(real["optimize"]["files_removed"], 5, "{real}");
    assert_eq!(real["optimize"]["files_added"], 1, "{real}");
    let left = query(d, "select id, day from raw.events order by id");
    assert_eq!(left.len(), 75);
    assert!(left.iter().all(|r| r["day"] == day(1)), "old rows left");
    // Vacuum ran (nothing old enough to delete) and is not due again for a week.
    assert!(real["vacuum"].is_object(), "{real}");
    let again = maintain(&[]);
    assert!(again["vacuum"].is_null(), "{again}");
    assert!(
        again["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("vacuum: last one")),
        "{again}"
    );

    // After a write, the policy runs by itself: one more load brings an old row and a
    // third small file to the recent day... which is not yet enough to compact.
    let csv = format!("id,day\n500,{}\n501,{}\n", day(200), day(1));
    write(d, "data/5.csv", &csv);
    let a = run_asset(d, "events");
    let m = &a["maintenance"];
    assert_eq!(m["retention"]["rows"], 1, "{a}");
    assert!(m["optimize"].is_null(), "{a}");
    assert_eq!(query(d, "select * from raw.events").len(), 76);

    // A table without a policy, named: a clear error.
    write(d, "weir.yaml", project);
    let out = weir(d, &["table", "maintain", "raw.events"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no maintenance policy"));
}

#[test]
fn tiering_moves_old_partitions_and_keeps_every_row_readable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cold = d.join("cold");
    write(
        d,
        "pipelines/events.yaml",
        "source:\n  type: files\n  path: data/*.csv\nsink:\n  table: raw.events\n  mode: append\n  partition_by: [day]\n",
    );
    write(d, "weir.yaml", "name: t\n");
    let today = chrono::Utc::now().date_naive();
    let day = |ago: i64| (today - chrono::Duration::days(ago)).to_string();
    let load = |f: usize| {
        let mut csv = vec!["id,day".to_string()];
        for i in 0..10 {
            let ago = if i % 2 == 0 { 100 } else { 1 };
            csv.push(format!("{},{}", f * 10 + i, day(ago)));
        }
        write(d, &format!("data/{f}.csv"), &csv.join("\n"));
        ok(&weir(d, &["run", "--quiet"]));
    };
    for f in 0..3 {
        load(f);
    }
    let all = "select id, day from raw.events order by id";
    let before = query(d, all);
    assert_eq!(before.len(), 30);
    write(
        d,
        "weir.yaml",
        &format!(
            "name: t\nmaintenance:\n  - tables: [raw.events]\n    tiering: {{column: day, after: 30d, to: '{}'}}\n    optimize: {{min_small_files: 2}}\n",
            cold.display()
        ),
    );
    let maintain = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["table", "maintain", "raw.events"];
        all.extend_from_slice(args);
        all.extend(["--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(ok(&weir(d, &all)).trim()).unwrap();
        v[0].clone()
    };
    let dry = maintain(&["--dry-run"]);
    let old_dir = format!("day={}/", day(100));
    let moved = dry["tiering"]["files"].as_array().unwrap().clone();
    assert_eq!(moved.len(), 3, "{dry}");
    assert!(
        moved
            .iter()
            .all(|f| f.as_str().unwrap().starts_with(&old_dir)),
        "{dry}"
    );
    // Only the recent partition is compacted: the old one is going cold.
    assert_eq!(dry["optimize"]["files_removed"], 3, "{dry}");
    assert!(!cold.exists() || std::fs::read_dir(&cold).unwrap().count() == 0);

    let real = maintain(&[]);
    assert_eq!(real["tiering"]["files"], dry["tiering"]["files"], "{real}");
    assert_eq!(real["optimize"]["files_removed"], 3, "{real}");
    assert_eq!(real["optimize"]["files_added"], 1, "{real}");
    // The cold copies exist, and the table reads every row through them.
    let cold_dir = cold.join("raw/events").join(old_dir.trim_end_matches('/'));
    assert_eq!(std::fs::read_dir(&cold_dir).unwrap().count(), 3);
    assert_eq!(query(d, all), before);
    // The plan reads the three cold files for the old day and skips the hot one.
    let old_day = format!("select * from raw.events where day = '{}'", day(100));
    let e: serde_json::Value = serde_json::from_str(
        ok(&weir(
            d,
            &["query", &old_day, "--explain", "--format", "json"],
        ))
        .trim(),
    )
    .unwrap();
    let t = &e["tables"][0];
    assert_eq!(
        (&t["files_scanned"], &t["files_total"]),
        (&3.into(), &4.into()),
        "{e}"
    );
    assert!(
        e["plan"].as_str().unwrap().contains("cold/raw/events"),
        "{e}"
    );
    // The move is in the history, and versions before it still read.
    let h: serde_json::Value = serde_json::from_str(&ok(&weir(
        d,
        &["table", "history", "raw.events", "--format", "json"],
    )))
    .unwrap();
    let tier = h
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["operation"] == "TIER")
        .unwrap_or_else(|| panic!("no TIER commit: {h}"));
    assert_eq!(
        (&tier["files_added"], &tier["files_removed"]),
        (&3.into(), &3.into())
    );
    assert_eq!(query(d, "select * from raw.events@v2").len(), 30);

    // Nothing more is old enough; compacting by hand leaves the cold partition cold.
    let again = maintain(&[]);
    assert_eq!(
        again["tiering"]["files"].as_array().unwrap().len(),
        0,
        "{again}"
    );
    write(d, "weir.yaml", "name: t\n");
    for f in 3..5 {
        load(f);
    }
    let m: serde_json::Value = serde_json::from_str(
        ok(&weir(
            d,
            &["table", "optimize", "raw.events", "--format", "json"],
        ))
        .trim(),
    )
    .unwrap();
    // The recent partition's three files merge; the old partition's new two stay with
    // the cold ones rather than pulling them back.
    assert_eq!(m["files_removed"], 3, "{m}");
    assert_eq!(std::fs::read_dir(&cold_dir).unwrap().count(), 3);
    assert_eq!(query(d, all).len(), 50);
}

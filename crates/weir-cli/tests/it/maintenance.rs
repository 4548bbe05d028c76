//! Table maintenance through the CLI: optimize compacts and keeps every row, restore
//! brings back an earlier version, vacuum deletes only unreferenced files older than the
//! retention (and its dry run lists exactly those).

use std::path::Path;

use crate::{ok, query, weir, write};

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

fn data_files(d: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(d.join("lake/raw/events"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    files.sort();
    files
}

#[test]
fn optimize_restore_and_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: t\n");
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

    let m = table_json(d, "optimize", &[]);
    assert_eq!(m["files_before"], 6, "{m}");
    assert_eq!(m["files_after"], 1, "{m}");
    assert_eq!(m["files_removed"], 6, "{m}");
    assert_eq!(m["version"], 6, "{m}");
    assert_eq!(rows(d), before, "optimize changed the rows");

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

//! The wording of the main user errors, pinned by snapshots, and their exit code (2).

use std::path::Path;

use crate::weir;

fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for (rel, text) in files {
        let p = tmp.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    tmp
}

/// The error part of a run report (the summary table holds timings).
fn error_part(err: &str) -> String {
    let start = err
        .find("(user):")
        .map(|i| err[..i].rfind('\n').map(|j| j + 1).unwrap_or(0))
        .unwrap_or(0);
    err[start..].trim_end().to_string()
}

/// stderr with the temp dir replaced, and the exit code.
fn fails(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = weir(dir, args);
    let text =
        String::from_utf8_lossy(&out.stderr).replace(&dir.display().to_string(), "<project>");
    (out.status.code().unwrap_or(-1), text)
}

const PIPE: &str = "source:\n  type: files\n  path: data/x.csv\nsink:\n  table: raw.x\n";

#[test]
fn unknown_key() {
    let p = project(&[
        ("weir.yaml", "name: t\n"),
        (
            "pipelines/x.yaml",
            "source:\n  type: files\n  path: data/x.csv\n  delimeter: ';'\nsink:\n  table: raw.x\n",
        ),
    ]);
    let (code, err) = fails(p.path(), &["validate"]);
    assert_eq!(code, 2);
    insta::assert_snapshot!("unknown_key", err);
}

#[test]
fn unknown_ref() {
    let p = project(&[
        ("weir.yaml", "name: t\n"),
        ("models/a.sql", "select 1 as x\n"),
        ("models/b.sql", "select * from {{ ref('aa') }}\n"),
    ]);
    let (code, err) = fails(p.path(), &["validate"]);
    assert_eq!(code, 2);
    insta::assert_snapshot!("unknown_ref", err);
}

#[test]
fn cycle() {
    let p = project(&[
        ("weir.yaml", "name: t\n"),
        ("models/a.sql", "select * from {{ ref('c') }}\n"),
        ("models/b.sql", "select * from {{ ref('a') }}\n"),
        ("models/c.sql", "select * from {{ ref('b') }}\n"),
    ]);
    let (code, err) = fails(p.path(), &["validate"]);
    assert_eq!(code, 2);
    insta::assert_snapshot!("cycle", err);
}

#[test]
fn missing_file() {
    let p = project(&[("weir.yaml", "name: t\n"), ("pipelines/x.yaml", PIPE)]);
    let (code, err) = fails(p.path(), &["run"]);
    assert_eq!(code, 1, "a failed run exits 1");
    insta::assert_snapshot!("missing_file", error_part(&err));
}

#[test]
fn bad_csv_rows_over_budget_commit_nothing() {
    let p = project(&[
        ("weir.yaml", "name: t\n"),
        ("pipelines/x.yaml", &format!("{PIPE}max_bad_rows: 1\n")),
        ("data/x.csv", "id,amount\n1,2\n2,3,4\n3\n4,5\n"),
    ]);
    let (code, err) = fails(p.path(), &["run"]);
    assert_eq!(code, 1);
    insta::assert_snapshot!("bad_csv_rows", error_part(&err));
    assert!(
        !p.path().join("lake/raw/x/_delta_log").exists(),
        "nothing may be committed"
    );
}

#[test]
fn env_secret_is_redacted() {
    let p = project(&[
        ("weir.yaml", "name: t\n"),
        ("pipelines/x.yaml", "source:\n  type: files\n  path: data/${env:WEIR_TEST_DIR_SECRET}.csv\nsink:\n  table: raw.x\n"),
    ]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--project")
        .arg(p.path())
        .arg("run")
        .env("WEIR_TEST_DIR_SECRET", "hunter2-topsecret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data/***.csv"), "{err}");
    assert!(!err.contains("hunter2-topsecret"), "{err}");
}

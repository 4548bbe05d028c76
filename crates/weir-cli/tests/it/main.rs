//! End-to-end tests through the real `weir` binary.

mod checks;
mod crash;
mod demo;
mod dimensions;
mod errors;
mod loads;
mod maintenance;
mod orchestration;
mod partitions;
mod postgres;
mod progress;

use std::path::Path;
use std::process::{Command, Output};

pub fn weir(project: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--project")
        .arg(project)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("WEIR_LOG")
        // Projects with a PostgreSQL connection read its password from here.
        .env("WEIR_TEST_PG_PASSWORD", weir_test::PgServer::PASSWORD)
        .output()
        .expect("weir runs")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "weir failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a query and returns the rows as JSON objects.
pub fn query(project: &Path, sql: &str) -> Vec<serde_json::Value> {
    let text = ok(&weir(project, &["query", sql, "--format", "json"]));
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Array(vec![]));
    v.as_array().cloned().unwrap_or_default()
}

pub fn scalar(project: &Path, sql: &str) -> serde_json::Value {
    let rows = query(project, sql);
    let row = rows
        .first()
        .and_then(|r| r.as_object())
        .cloned()
        .unwrap_or_default();
    row.values()
        .next()
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Writes `text` to `rel` under `dir`, creating folders.
pub fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A `connections:` entry (YAML, indented under `connections:`) named `name` for database
/// `db` of the shared test server.
pub fn pg_connection(name: &str, db: &str) -> String {
    let pg = weir_test::PgServer::shared();
    format!(
        "  {name}:\n    type: postgres\n    host: 127.0.0.1\n    port: {}\n    database: {db}\n    user: {}\n    password: ${{env:WEIR_TEST_PG_PASSWORD}}\n    sslmode: disable\n",
        pg.port(),
        pg.user()
    )
}

//! End-to-end tests through the real `weir` binary.

mod cdc;
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
mod stream;

use std::cell::RefCell;
use std::path::Path;
use std::process::{Command, Output};

thread_local! {
    /// Environment every `weir` of this test gets: the S3 server's endpoint and keys when
    /// the test's lake is on it.
    static ENV: RefCell<Vec<(&'static str, String)>> = const { RefCell::new(Vec::new()) };
}

/// Where a test's lake lives: the project's `lake` directory, or a fresh prefix of the
/// S3-compatible test server's bucket. The same test runs on both.
pub struct LakeAt {
    url: Option<String>,
}

impl LakeAt {
    pub fn local() -> Self {
        Self { url: None }
    }

    /// A new prefix on the shared S3 server; this thread's `weir` calls get its options.
    pub fn s3(test: &str) -> Self {
        let server = weir_test::S3Server::shared();
        ENV.with(|e| *e.borrow_mut() = server.options());
        Self {
            url: Some(format!(
                "s3://{}/{test}-{}/lake",
                weir_test::S3Server::BUCKET,
                uuid::Uuid::new_v4().simple()
            )),
        }
    }

    /// The `lake:` line of weir.yaml (none for the default local lake).
    pub fn yaml(&self) -> String {
        self.url
            .as_ref()
            .map(|u| format!("lake: {u}\n"))
            .unwrap_or_default()
    }

    /// `weir demo` arguments that put the lake here.
    pub fn demo_args(&self) -> Vec<String> {
        self.url
            .iter()
            .flat_map(|u| ["--lake".to_string(), u.clone()])
            .collect()
    }

    /// Table `schema.table`'s location and the storage options to read it with.
    pub fn table_uri(&self, project: &Path, table: &str) -> (String, Vec<(&'static str, String)>) {
        let rel = table.replace('.', "/");
        match &self.url {
            Some(u) => (format!("{u}/{rel}"), ENV.with(|e| e.borrow().clone())),
            None => (
                project
                    .join("lake")
                    .join(rel)
                    .to_string_lossy()
                    .into_owned(),
                vec![],
            ),
        }
    }

    /// The Parquet files directly under table `schema.table`, sorted.
    pub fn data_files(&self, project: &Path, table: &str) -> Vec<String> {
        let (uri, options) = self.table_uri(project, table);
        let mut files: Vec<String> = match &self.url {
            None => std::fs::read_dir(&uri)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect(),
            Some(_) => {
                let (bucket, prefix) = uri
                    .strip_prefix("s3://")
                    .and_then(|r| r.split_once('/'))
                    .unwrap();
                let script = "import sys, boto3\n\
                    s3 = boto3.client('s3')\n\
                    pages = s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[1], Prefix=sys.argv[2] + '/', Delimiter='/')\n\
                    for p in pages:\n    for o in p.get('Contents', []): print(o['Key'].rsplit('/', 1)[1])\n";
                String::from_utf8_lossy(&python(script, &[bucket, prefix], options))
                    .lines()
                    .map(str::to_string)
                    .collect()
            }
        };
        files.retain(|n| n.ends_with(".parquet"));
        files.sort();
        files
    }
}

/// Runs a Python script with `args` and `envs`; its standard output (it must succeed).
pub fn python(script: &str, args: &[&str], envs: Vec<(&str, String)>) -> Vec<u8> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .envs(envs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn weir(project: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .envs(ENV.with(|e| e.borrow().clone()))
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

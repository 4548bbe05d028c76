//! Orchestration through the real binary: run history, retries of what failed, workers
//! sharing a PostgreSQL queue, recovery after SIGKILL, and `weir serve` with its API.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_test::PgServer;

use crate::{ok, pg_connection, weir, write};

fn weir_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
    c.arg("--project")
        .arg(dir)
        .args(args)
        .env("NO_COLOR", "1")
        .env("WEIR_LOG", "warn,weir_orchestrator=info")
        .env("WEIR_TEST_PG_PASSWORD", PgServer::PASSWORD);
    c
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn runs(dir: &Path) -> Vec<Value> {
    json(&ok(&weir(
        dir,
        &["runs", "--format", "json", "--limit", "500"],
    )))
    .as_array()
    .cloned()
    .unwrap()
}

fn show(dir: &Path, id: &str) -> Value {
    json(&ok(&weir(dir, &["runs", "show", id, "--format", "json"])))
}

/// `asset` -> status of a `runs show` answer.
fn statuses(detail: &Value) -> BTreeMap<String, String> {
    detail["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["asset"].as_str().unwrap().to_string(),
                a["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (run, asset) of every "asset attempt started" log line.
fn attempts(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter(|l| l.contains("asset attempt started"))
        .map(|l| {
            let field = |k: &str| {
                l.split(&format!("{k}="))
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or_default()
                    .to_string()
            };
            (field("run"), field("asset"))
        })
        .collect()
}

#[test]
fn runs_are_recorded_and_retry_failed_reruns_only_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: t\nretry: {max_attempts: 1}\n");
    write(d, "data/a.csv", "id,n\n1,10\n2,x\n");
    write(
        d,
        "pipelines/nums.yaml",
        "source:\n  type: files\n  path: data/*.csv\n  schema:\n    - { name: n, type: bigint }\nsink:\n  table: raw.nums\nmax_bad_rows: 0\n",
    );
    write(
        d,
        "pipelines/other.yaml",
        "source:\n  type: files\n  path: other/*.csv\nsink:\n  table: raw.other\n",
    );
    write(d, "other/o.csv", "k\n1\n");
    write(
        d,
        "models/total.sql",
        "select sum(n) as total from {{ source('raw', 'nums') }}",
    );

    let out = weir(d, &["run"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("weir run --retry-failed"), "{stderr}");
    let first = runs(d);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["status"], "failed");
    let id = first[0]["id"].as_str().unwrap().to_string();
    let detail = show(d, &id[..8]);
    let st = statuses(&detail);
    assert_eq!(st["nums"], "failed");
    assert_eq!(st["total"], "skipped");
    assert_eq!(st["other"], "succeeded");
    let nums = detail["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["asset"] == "nums")
        .unwrap();
    assert_eq!(nums["attempts"], 1);
    assert_eq!(nums["error_domain"], "user");
    let text = ok(&weir(d, &["runs", "show", &id]));
    assert!(
        text.contains("rerun what failed: weir run --retry-failed"),
        "{text}"
    );

    // Fix the data; rerun what failed: `nums` and the `total` it blocked, not `other`.
    write(d, "data/a.csv", "id,n\n1,10\n2,20\n");
    let summary = json(&ok(&weir(
        d,
        &["run", "--retry-failed", &id[..8], "--format", "json"],
    )));
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["trigger"], format!("retry:{id}"));
    let names: BTreeSet<&str> = summary["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["nums", "total"]));
    assert_eq!(
        crate::scalar(d, "select total from analytics.total"),
        serde_json::json!(30)
    );
    let all = runs(d);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["retry_of"], id.as_str());
    // Nothing left to retry.
    let again = weir(
        d,
        &[
            "run",
            "--retry-failed",
            &all[0]["id"].as_str().unwrap()[..8],
        ],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to retry"));
}

#[test]
fn an_external_failure_is_retried_with_backoff_and_a_timeout_fails_the_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A PostgreSQL source on a port nobody listens on: connection refused is external.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    write(
        d,
        "weir.yaml",
        &format!(
            "name: t\nconnections:\n  gone:\n    type: postgres\n    url: postgresql://u:p@127.0.0.1:{port}/db\n    sslmode: disable\n    connect_timeout: 2s\n"
        ),
    );
    write(
        d,
        "pipelines/pg.yaml",
        "source: {type: postgres, connection: gone, table: t}\nsink: {table: raw.t, mode: overwrite}\nretry: {max_attempts: 3, initial_backoff: 50ms, max_backoff: 100ms}\n",
    );
    let out = weir(d, &["run", "pg", "--format", "json"]);
    let s = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["assets"][0]["status"], "failed");
    assert_eq!(s["assets"][0]["attempts"], 3, "retried twice");
    assert_eq!(s["assets"][0]["error_domain"], "external");

    // A server that accepts connections and never answers: the pipeline's timeout ends
    // each attempt, and the timeout is retried like any external failure.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    write(
        d,
        "weir.yaml",
        &format!(
            "name: t\nconnections:\n  gone:\n    type: postgres\n    url: postgresql://u:p@127.0.0.1:{port}/db\n    sslmode: disable\n    connect_timeout: 60s\n"
        ),
    );
    write(
        d,
        "pipelines/pg.yaml",
        "source: {type: postgres, connection: gone, table: t}\nsink: {table: raw.t, mode: overwrite}\nretry: {max_attempts: 2, initial_backoff: 10ms}\ntimeout: 1s\n",
    );
    let started = Instant::now();
    let out = weir(d, &["run", "pg", "--format", "json"]);
    let s = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["assets"][0]["status"], "failed");
    assert_eq!(s["assets"][0]["attempts"], 2);
    assert!(
        s["assets"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{s}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    // A model's own timeout and retry policy: a query far too long for its 1s is stopped,
    // once per attempt.
    write(d, "weir.yaml", "name: t\n");
    std::fs::remove_file(d.join("pipelines/pg.yaml")).unwrap();
    write(
        d,
        "models/long.sql",
        "select sum(value % 7) as s from range(0, 100000000000)",
    );
    write(
        d,
        "models/long.yaml",
        "models:\n  - name: long\n    timeout: 1s\n    retry: {max_attempts: 2, initial_backoff: 10ms}\n",
    );
    let started = Instant::now();
    let out = weir(d, &["run", "long", "--format", "json"]);
    let s = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["assets"][0]["status"], "failed", "{s}");
    assert_eq!(s["assets"][0]["attempts"], 2, "{s}");
    assert!(
        s["assets"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{s}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A project whose `slow` model takes a few seconds, between a pipeline and a model.
fn slow_project(d: &Path, extra: &str) {
    write(
        d,
        "weir.yaml",
        &format!("name: crashy\nstate: {{lease: 1s}}\n{extra}"),
    );
    write(d, "data/a.csv", "id\n1\n2\n3\n");
    write(
        d,
        "pipelines/src.yaml",
        "source: {type: files, path: data/*.csv}\nsink: {table: raw.src}\n",
    );
    write(
        d,
        "models/slow.sql",
        "select (select count(*) from {{ source('raw', 'src') }}) as n, sum(value) as s from range(0, 40000000)",
    );
    write(d, "models/after.sql", "select n from {{ ref('slow') }}");
}

/// Starts `weir run` and SIGKILLs it once `asset`'s attempt has started.
fn kill_during(d: &Path, asset: &str) -> String {
    let mut child = weir_cmd(d, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
            panic!("the run ended before `{asset}` started:\n{log}");
        }
        log.push_str(&line);
        if line.contains("asset attempt started") && line.contains(&format!("asset={asset}")) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    log
}

#[test]
fn sigkill_mid_run_then_a_worker_settles_it_without_rerunning_an_asset_with_no_retries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    slow_project(d, "retry: {max_attempts: 1}\n");
    let mut log = kill_during(d, "slow");
    let run = runs(d).remove(0);
    assert_eq!(run["status"], "running", "the killed run still looks alive");
    let id = run["id"].as_str().unwrap().to_string();

    std::thread::sleep(Duration::from_millis(1500)); // the 1s lease runs out
    let out = weir_cmd(d, &["worker", "--drain"]).output().unwrap();
    log.push_str(&String::from_utf8_lossy(&out.stderr));

    let detail = show(d, &id);
    assert_eq!(detail["run"]["status"], "failed");
    assert_eq!(detail["run"]["recoveries"], 1);
    let st = statuses(&detail);
    assert_eq!(st["src"], "succeeded");
    assert_eq!(st["slow"], "failed");
    assert_eq!(st["after"], "skipped");
    let slow = detail["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["asset"] == "slow")
        .unwrap();
    assert_eq!(slow["attempts"], 1);
    assert!(slow["error"].as_str().unwrap().contains("not run again"));
    // Every asset started at most once across both processes.
    let started = attempts(&log);
    let mut seen = BTreeSet::new();
    for a in &started {
        assert!(seen.insert(a.clone()), "{a:?} started twice:\n{log}");
    }
    assert!(seen.contains(&(id.clone(), "slow".to_string())));
    assert!(!seen.contains(&(id.clone(), "after".to_string())));
}

#[test]
fn sigkill_mid_run_then_a_worker_resumes_and_retries_the_interrupted_asset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    slow_project(d, "retry: {max_attempts: 2, initial_backoff: 10ms}\n");
    let mut log = kill_during(d, "slow");
    let id = runs(d)[0]["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1500));
    let out = weir_cmd(d, &["worker", "--drain"]).output().unwrap();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{log}");

    let detail = show(d, &id);
    assert_eq!(detail["run"]["status"], "succeeded", "{log}");
    let st = statuses(&detail);
    assert!(st.values().all(|s| s == "succeeded"), "{st:?}");
    let started = attempts(&log);
    let count = |asset: &str| started.iter().filter(|(_, a)| a == asset).count();
    assert_eq!(count("src"), 1, "the finished pipeline is not run again");
    assert_eq!(count("slow"), 2, "the interrupted attempt and its retry");
    assert_eq!(count("after"), 1);
    assert_eq!(
        crate::scalar(d, "select n from analytics.after"),
        serde_json::json!(3)
    );
}

#[test]
fn two_workers_on_one_postgres_store_run_each_of_50_queued_runs_once() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("queue").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "weir.yaml",
        &format!(
            "name: q\nstate: {{connection: state}}\nconnections:\n{}",
            pg_connection("state", &db)
        ),
    );
    write(d, "models/a.sql", "select 1 as x");
    write(d, "models/b.sql", "select x + 1 as y from {{ ref('a') }}");
    let mut ids = BTreeSet::new();
    for i in 0..50 {
        let out = weir_cmd(d, &["run", "--queue", "--run-key", &format!("k{i}")])
            .output()
            .unwrap();
        ids.insert(ok(&out).trim().to_string());
    }
    assert_eq!(ids.len(), 50);
    // The same run key again adds nothing.
    let dup = weir_cmd(d, &["run", "--queue", "--run-key", "k7"])
        .output()
        .unwrap();
    assert!(ok(&dup).trim().is_empty());

    let spawn = || -> Child {
        weir_cmd(d, &["worker", "--drain"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut w1, mut w2) = (spawn(), spawn());
    let collect = |c: &mut Child| {
        let mut s = String::new();
        c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
        assert!(c.wait().unwrap().success(), "{s}");
        s
    };
    let (log1, log2) = (collect(&mut w1), collect(&mut w2));
    let claimed = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("run claimed"))
            .map(|l| {
                l.split("run=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let (c1, c2) = (claimed(&log1), claimed(&log2));
    assert!(
        !c1.is_empty() && !c2.is_empty(),
        "both workers took runs: {} and {}",
        c1.len(),
        c2.len()
    );
    let mut all: Vec<String> = c1.iter().chain(&c2).cloned().collect();
    assert_eq!(all.len(), 50, "50 claims in all");
    all.sort();
    all.dedup();
    assert_eq!(
        all.into_iter().collect::<BTreeSet<_>>(),
        ids,
        "each run claimed once"
    );
    // Each asset of each run had exactly one first attempt. (Two runs overwriting the same
    // table at once conflict in Delta; the loser's commit is retried as a second attempt.)
    let firsts: String = format!("{log1}\n{log2}")
        .lines()
        .filter(|l| l.ends_with("attempt=1"))
        .collect::<Vec<_>>()
        .join("\n");
    let started = attempts(&firsts);
    assert_eq!(started.len(), 100);
    assert_eq!(started.iter().collect::<BTreeSet<_>>().len(), 100);
    let history = runs(d);
    assert_eq!(history.len(), 50);
    assert!(history.iter().all(|r| r["status"] == "succeeded"));
}

/// A minimal HTTP/1.1 exchange; returns (status, body).
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    // Chunked bodies: keep the JSON between the size lines.
    let body = if resp
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines()
            .filter(|l| !l.chars().all(|c| c.is_ascii_hexdigit()) || l.is_empty())
            .collect::<Vec<_>>()
            .join("")
    } else {
        body.to_string()
    };
    (status, body)
}

#[test]
fn serve_schedules_a_pipeline_runs_api_requests_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: served\n");
    write(d, "data/a.csv", "id\n1\n2\n");
    // Every two seconds (a seconds field), in a time zone.
    write(
        d,
        "pipelines/ticks.yaml",
        "source: {type: files, path: data/*.csv}\nsink: {table: raw.ticks}\nschedule:\n  cron: '*/2 * * * * *'\n  timezone: Europe/Berlin\n",
    );
    write(
        d,
        "models/count.sql",
        "select count(*) as n from {{ source('raw', 'ticks') }}",
    );
    let mut child = weir_cmd(d, &["serve", "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut addr = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line.split("http://").nth(1) {
            addr = rest.split_whitespace().next().unwrap().to_string();
            break;
        }
    }
    assert!(!addr.is_empty(), "serve printed its address");
    std::thread::spawn(move || for _ in reader.lines() {});

    let (code, body) = http(&addr, "GET", "/health", None);
    assert_eq!(code, 200, "{body}");
    let health = json(&body);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["schedules"], 1);

    let (code, body) = http(&addr, "GET", "/api/schedules", None);
    assert_eq!(code, 200);
    assert_eq!(json(&body)[0]["timezone"], "Europe/Berlin");

    // The schedule queues runs and the worker executes them.
    let deadline = Instant::now() + Duration::from_secs(90);
    let scheduled = loop {
        let (_, body) = http(&addr, "GET", "/api/runs?status=succeeded", None);
        let list = json(&body);
        if let Some(r) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["trigger"] == "schedule:ticks")
        {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no scheduled run succeeded: {body}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(scheduled["run_key"]
        .as_str()
        .unwrap()
        .starts_with("schedule:ticks:"));

    // A run asked for over the API.
    let (code, body) = http(&addr, "POST", "/api/runs", Some(r#"{"select": "count"}"#));
    assert_eq!(code, 202, "{body}");
    let id = json(&body)["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, body) = http(&addr, "GET", &format!("/api/runs/{id}"), None);
        assert_eq!(code, 200);
        let v = json(&body);
        if v["run"]["status"] == "succeeded" {
            assert_eq!(v["assets"][0]["asset"], "count");
            break;
        }
        assert!(Instant::now() < deadline, "API run did not finish: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = http(&addr, "POST", "/api/runs", Some(r#"{"select": "nope"}"#));
    assert_eq!(code, 400);
    assert!(body.contains("no pipeline or model named `nope`"), "{body}");
    let (code, body) = http(
        &addr,
        "POST",
        "/api/runs",
        Some(r#"{"select": "ticks", "partition": "2024-01-01"}"#),
    );
    assert_eq!(code, 400);
    assert!(
        body.contains("none of the selected assets is partitioned"),
        "{body}"
    );
    let (code, _) = http(&addr, "GET", "/api/runs/ffffffff", None);
    assert_eq!(code, 404);

    let (_, body) = http(&addr, "GET", "/api/assets", None);
    let assets = json(&body);
    let count = assets
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "count")
        .unwrap();
    assert_eq!(count["deps"], serde_json::json!(["ticks"]));
    assert_eq!(count["last_status"], "succeeded");

    // SIGINT: the server stops cleanly.
    unsafe_sigint(child.id());
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "serve exits 0 on Ctrl-C"
    );
    // History outlives the server.
    let text = ok(&weir(d, &["runs"]));
    assert!(
        text.contains("schedule:ticks") && text.contains("api"),
        "{text}"
    );
}

fn unsafe_sigint(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    None
}

#[test]
fn a_backfill_of_30_daily_partitions_interrupted_and_resumed_builds_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "weir.yaml",
        "name: bf\nstate: {lease: 1s}\nretry: {max_attempts: 5, initial_backoff: 20ms}\n",
    );
    write(
        d,
        "models/daily.sql",
        "select cast('{{ partition_start }}' as date) as day, '{{ partition_key }}' as k, sum(value) as s from range(0, 3000000)",
    );
    write(
        d,
        "models/daily.yaml",
        "models:\n  - name: daily\n    partition_by: day\n    partitions: {every: daily, start: 2024-01-01, column: day}\n",
    );
    let args = [
        "backfill",
        "daily",
        "--from",
        "2024-01-01",
        "--to",
        "2024-01-30",
        "--parallel",
        "2",
    ];
    let mut child = weir_cmd(d, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let mut built = 0;
    while built < 10 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("the backfill ended early:\n{log}");
        }
        if line.contains(": built (run") {
            built += 1;
        }
        log.push_str(&line);
    }
    child.kill().unwrap();
    child.wait().unwrap();

    std::thread::sleep(Duration::from_millis(1500));
    let out = weir_cmd(d, &args).output().unwrap();
    let second = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}\n---\n{second}");
    assert!(second.contains("30 of 30 partitions built"), "{second}");
    let before: usize = second
        .split(" built before")
        .next()
        .unwrap()
        .rsplit(", ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(before >= 10, "{second}");

    // One succeeded run per partition, and no partition queued twice.
    let history = runs(d);
    let mut per_partition: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &history {
        let key = r["partition"].as_str().unwrap().to_string();
        per_partition
            .entry(key)
            .or_default()
            .push(r["status"].as_str().unwrap().to_string());
    }
    assert_eq!(per_partition.len(), 30);
    for (k, statuses) in &per_partition {
        let failed: Vec<Value> = history
            .iter()
            .filter(|r| r["partition"] == k.as_str() && r["status"] != "succeeded")
            .map(|r| show(d, r["id"].as_str().unwrap()))
            .collect();
        assert_eq!(
            statuses,
            &vec!["succeeded".to_string()],
            "partition {k}: {failed:#?}\n{log}\n---\n{second}"
        );
    }
    let rows = crate::query(
        d,
        "select k, count(*) as n from analytics.daily group by k order by k",
    );
    assert_eq!(rows.len(), 30);
    assert!(rows.iter().all(|r| r["n"] == 1), "{rows:?}");

    // Nothing is missing now: a third call queues nothing; --all rebuilds one partition.
    let out = weir_cmd(d, &args).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 queued now"));
    let out = weir_cmd(
        d,
        &[
            "backfill",
            "daily",
            "--from",
            "2024-01-05",
            "--to",
            "2024-01-05",
            "--all",
        ],
    )
    .output()
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 1 partitions built"));
    assert_eq!(
        crate::scalar(d, "select count(*) from analytics.daily"),
        serde_json::json!(30)
    );
}

/// A webhook receiver on loopback: collects the JSON bodies POSTed to it.
pub(crate) fn webhook() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn);
            let mut len = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(v) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push(v);
                }
            }
            let mut conn = reader.into_inner();
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, got)
}

#[test]
fn failed_runs_and_missed_freshness_slas_are_alerted_and_shown_in_status() {
    let (url, got) = webhook();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "weir.yaml",
        &format!("name: alerting\nretry: {{max_attempts: 1}}\nalerts: {{webhook: '{url}'}}\n"),
    );
    write(d, "good/a.csv", "id\n1\n");
    write(
        d,
        "pipelines/good.yaml",
        "source: {type: files, path: good/*.csv}\nsink: {table: raw.good}\nfreshness_sla: 2s\n",
    );
    write(d, "bad/a.csv", "n\n1\nx\n");
    write(
        d,
        "pipelines/bad.yaml",
        "source:\n  type: files\n  path: bad/*.csv\n  schema:\n    - { name: n, type: bigint }\nsink: {table: raw.bad}\nmax_bad_rows: 0\n",
    );
    let out = weir(d, &["run"]);
    assert_eq!(out.status.code(), Some(1));
    let alerts = got.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["event"], "run_failed");
    assert_eq!(alerts[0]["project"], "alerting");
    assert_eq!(alerts[0]["failed"][0]["asset"], "bad");
    assert_eq!(alerts[0]["failed"][0]["domain"], "user");

    let status = |d: &Path| {
        let out = weir(d, &["status", "--format", "json"]);
        let v = json(&String::from_utf8_lossy(&out.stdout));
        let by: BTreeMap<String, String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().into(),
                    s["state"].as_str().unwrap().into(),
                )
            })
            .collect();
        (out.status.code(), by)
    };
    let (code, st) = status(d);
    assert_eq!(code, Some(0));
    assert_eq!(st["good"], "ok");
    assert_eq!(st["bad"], "failing");
    std::thread::sleep(Duration::from_millis(2500));
    let (code, st) = status(d);
    assert_eq!(code, Some(1), "a late asset fails `weir status`");
    assert_eq!(st["good"], "late");
    let table = ok(&weir(d, &["runs"]));
    assert!(table.contains("failed"));
    let text = String::from_utf8_lossy(&weir(d, &["status"]).stdout).to_string();
    assert!(text.contains("LATE") && text.contains("FAILING"), "{text}");

    // `weir serve` sends the freshness alert once.
    let mut child = weir_cmd(d, &["serve", "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = got
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a["event"] == "freshness_missed")
            .count();
        if n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no freshness alert");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(11)); // a second check must not repeat it
    unsafe_sigint(child.id());
    wait_timeout(&mut child, Duration::from_secs(30));
    let fresh: Vec<Value> = got
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a["event"] == "freshness_missed")
        .cloned()
        .collect();
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert_eq!(fresh[0]["asset"], "good");
    assert_eq!(fresh[0]["freshness_sla_secs"], 2);
}

#[test]
fn a_connections_max_concurrency_keeps_its_assets_apart() {
    let pg = PgServer::shared();
    let db = pg.fresh_database("limits").unwrap();
    pg.psql(
        &db,
        "create table t as select g as id, md5(g::text) as v from generate_series(1, 20000) g",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "weir.yaml",
        &format!(
            "name: lim\nconcurrency: 4\nconnections:\n{}    max_concurrency: 1\n",
            pg_connection("shop", &db)
        ),
    );
    for name in ["a", "b", "c"] {
        write(
            d,
            &format!("pipelines/{name}.yaml"),
            &format!("source: {{type: postgres, connection: shop, table: t}}\nsink: {{table: raw.{name}, mode: overwrite}}\n"),
        );
    }
    let summary = json(&ok(&weir_cmd(d, &["run", "--format", "json"])
        .output()
        .unwrap()));
    assert_eq!(summary["ok"], true);
    let id = summary["run_id"].as_str().unwrap();
    let detail = show(d, id);
    let mut spans: Vec<(i64, i64)> = detail["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["started_at"].as_i64().unwrap(),
                a["ended_at"].as_i64().unwrap(),
            )
        })
        .collect();
    spans.sort();
    assert_eq!(spans.len(), 3);
    for w in spans.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "assets on one connection overlapped: {spans:?}"
        );
    }
}

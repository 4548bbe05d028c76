//! Crash safety: SIGKILL `weir run` mid-write, rerun, and every input row is in the table
//! exactly once.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ok, scalar, weir};

const ROWS: u64 = 300_000;

fn project(dir: &Path) {
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("weir.yaml"), "name: crash\n").unwrap();
    std::fs::write(
        dir.join("pipelines/events.yaml"),
        "source:\n  type: files\n  path: data/*.csv\n  batch_rows: 10000\nsink:\n  table: raw.events\n",
    )
    .unwrap();
    for part in 0..3u64 {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(dir.join(format!("data/part-{part}.csv"))).unwrap(),
        );
        writeln!(f, "id,kind,amount,note").unwrap();
        for i in 0..ROWS / 3 {
            let id = part * (ROWS / 3) + i;
            writeln!(
                f,
                "{id},k{},{}.{:02},some text for row {id}",
                id % 7,
                id % 1000,
                id % 100
            )
            .unwrap();
        }
    }
}

fn parquet_files(dir: &Path) -> usize {
    fn walk(d: &Path, n: &mut usize) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, n);
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    *n += 1;
                }
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

#[test]
fn sigkill_during_write_then_rerun_loads_each_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    project(dir);
    let table_dir = dir.join("lake/raw/events");
    let mut killed_mid_write = 0;
    // Kill at the first data file written, then (if the table already committed) again
    // at later points; every attempt must leave a table that a rerun completes exactly.
    for attempt in 0..3 {
        let files_before = parquet_files(&table_dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("--project")
            .arg(dir)
            .args(["run", "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut was_running = false;
        while start.elapsed() < Duration::from_secs(120) {
            if parquet_files(&table_dir) > files_before {
                was_running = child.try_wait().unwrap().is_none();
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        if was_running {
            killed_mid_write += 1;
        }
        eprintln!("attempt {attempt}: killed while writing = {was_running}");
        if !was_running {
            break;
        }
    }
    assert!(
        killed_mid_write > 0,
        "the process was never killed while writing; the test proved nothing"
    );
    // Rerun to completion, twice: the second must add nothing.
    ok(&weir(dir, &["run", "--quiet"]));
    ok(&weir(dir, &["run", "--quiet"]));
    assert_eq!(scalar(dir, "select count(*) from raw.events"), ROWS);
    assert_eq!(
        scalar(dir, "select count(distinct id) from raw.events"),
        ROWS
    );
    assert_eq!(
        scalar(dir, "select sum(id) from raw.events"),
        ROWS * (ROWS - 1) / 2
    );
}

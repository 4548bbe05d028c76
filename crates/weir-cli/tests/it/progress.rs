//! Progress on a terminal, silence elsewhere.

use std::path::Path;
use std::process::{Command, Stdio};

fn project(dir: &Path) {
    std::fs::create_dir_all(dir.join("pipelines")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("weir.yaml"), "name: t\n").unwrap();
    std::fs::write(
        dir.join("pipelines/events.yaml"),
        "source:\n  type: files\n  path: data/events.csv\nsink:\n  table: raw.events\n  mode: overwrite\n",
    )
    .unwrap();
    let mut text = String::from("id,kind,amount\n");
    for i in 0..200_000 {
        text.push_str(&format!("{i},k{},{}.5\n", i % 7, i % 1000));
    }
    std::fs::write(dir.join("data/events.csv"), text).unwrap();
}

/// Runs weir under a pseudo-terminal (util-linux `script`) and returns what the terminal
/// showed.
fn on_terminal(dir: &Path, extra: &str) -> String {
    let cmd = format!(
        "{} --project {} run {extra}",
        env!("CARGO_BIN_EXE_weir"),
        dir.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .env_remove("NO_COLOR")
        .output()
        .expect("util-linux `script` runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn progress_shows_on_a_terminal_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    project(dir.path());

    let shown = on_terminal(dir.path(), "");
    assert!(
        shown.contains("events: ") && shown.contains(" rows, "),
        "no progress line on the terminal:\n{shown}"
    );
    // The final summary still prints.
    assert!(shown.contains("200,000"), "{shown}");

    let quiet = on_terminal(dir.path(), "--quiet");
    assert!(
        !quiet.contains(" rows, "),
        "--quiet printed progress:\n{quiet}"
    );

    let piped = crate::weir(dir.path(), &["run"]);
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{err}");
    assert!(!err.contains(" rows, "), "progress went to a pipe:\n{err}");
}

//! Reading a table's commits one by one: what each version added and removed, and the
//! table's size after it (for `weir table history` and `weir table stats`).
//!
//! The totals come from replaying every commit from version 0, because a remove action
//! does not say how many rows its file held. When early commits were cleaned up after a
//! checkpoint, each commit's own counts remain but the totals are unknown.

use std::collections::HashMap;

use deltalake::DeltaTable;
use serde::Serialize;
use weir_common::Error;

use crate::delta_error;

/// What one commit changed, and the table after it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VersionCounts {
    pub files_added: u64,
    pub files_removed: u64,
    pub rows_added: u64,
    /// `None` when a removed file's add action is no longer in the log.
    pub rows_removed: Option<u64>,
    /// Data files after this commit (`None` when early commits are gone).
    pub files: Option<u64>,
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
}

#[derive(Clone, Copy)]
struct Live {
    rows: u64,
    bytes: u64,
}

/// One commit: its number, its `commitInfo` action and its counts.
pub(crate) struct Commit {
    pub version: u64,
    pub info: serde_json::Map<String, serde_json::Value>,
    pub counts: VersionCounts,
}

/// The actions of commit `version`, one JSON object each; `None` when the commit file is
/// gone (cleaned up after a checkpoint).
pub(crate) async fn commit_actions(
    table: &DeltaTable,
    name: &str,
    version: u64,
) -> Result<Option<Vec<serde_json::Value>>, Error> {
    let bytes = table
        .log_store()
        .read_commit_entry(version)
        .await
        .map_err(|e| delta_error(format!("reading commit {version} of `{name}`"), e))?;
    Ok(bytes.map(|b| {
        b.split(|c| *c == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect()
    }))
}

/// Every commit from version 0 to the table's current one, oldest first; versions whose
/// commit file is gone are left out. The version is the commit file's number: a writer
/// that retried after a concurrent commit records an older read version in its info.
pub(crate) async fn replay(table: &DeltaTable, name: &str) -> Result<Vec<Commit>, Error> {
    let latest = table.version().unwrap_or(0);
    let mut live: HashMap<String, Live> = HashMap::new();
    let mut complete = true;
    let mut out = Vec::new();
    for version in 0..=latest {
        let Some(actions) = commit_actions(table, name, version).await? else {
            complete = false;
            continue;
        };
        let mut c = VersionCounts {
            rows_removed: Some(0),
            ..Default::default()
        };
        let mut info = serde_json::Map::new();
        for action in actions {
            if let Some(serde_json::Value::Object(i)) = action.get("commitInfo") {
                info = i.clone();
            } else if let Some(add) = action.get("add") {
                let path = add["path"].as_str().unwrap_or_default().to_string();
                let rows = add["stats"]
                    .as_str()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    .and_then(|s| s["numRecords"].as_u64())
                    .unwrap_or(0);
                let size = add["size"].as_u64().unwrap_or(0);
                c.files_added += 1;
                c.rows_added += rows;
                live.insert(path, Live { rows, bytes: size });
            } else if let Some(remove) = action.get("remove") {
                let path = remove["path"].as_str().unwrap_or_default();
                c.files_removed += 1;
                match live.remove(path) {
                    Some(l) => c.rows_removed = c.rows_removed.map(|r| r + l.rows),
                    None => c.rows_removed = None,
                }
            }
        }
        if complete {
            c.files = Some(live.len() as u64);
            c.rows = Some(live.values().map(|l| l.rows).sum());
            c.bytes = Some(live.values().map(|l| l.bytes).sum());
        }
        out.push(Commit {
            version,
            info,
            counts: c,
        });
    }
    Ok(out)
}

/// The `commitInfo` of commit `version` (empty when the commit file is gone).
pub(crate) async fn commit_info(
    table: &DeltaTable,
    name: &str,
    version: u64,
) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    Ok(commit_actions(table, name, version)
        .await?
        .unwrap_or_default()
        .into_iter()
        .find_map(|a| match a.get("commitInfo") {
            Some(serde_json::Value::Object(i)) => Some(i.clone()),
            _ => None,
        })
        .unwrap_or_default())
}

//! Slowly changing dimensions: how a model or a pipeline sink keeps the history of its keys.

use std::fmt;

use serde::Deserialize;

/// Which kind of slowly changing dimension a table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScdType {
    /// One row per key, changed attributes overwritten in place.
    Scd1,
    /// One row per version of a key, with its validity range.
    Scd2,
    /// One row per key, with the previous value of the tracked columns beside the current.
    Scd3,
    /// Type 2 where each load is a full snapshot of the source: keys it lacks are deleted.
    Snapshot,
}

impl fmt::Display for ScdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScdType::Scd1 => "scd1",
            ScdType::Scd2 => "scd2",
            ScdType::Scd3 => "scd3",
            ScdType::Snapshot => "snapshot",
        })
    }
}

/// What a deleted key leaves in a dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    /// Type 2: the current version is closed at the delete, so the key has no current
    /// row. Types 1 and 3: the key's row is removed.
    #[default]
    Close,
    /// Type 2: the current version is closed and a version with `is_deleted = true`
    /// starts. Types 1 and 3: the row stays, with `is_deleted = true`.
    Marker,
}

/// A dimension's full configuration, from a model's config or a pipeline's sink.
#[derive(Debug, Clone)]
pub struct Dimension {
    pub scd: ScdType,
    /// The business key.
    pub key: Vec<String>,
    /// Columns whose changes make a new version (type 2) or keep a previous value
    /// (type 3); empty: every attribute.
    pub tracked: Vec<String>,
    /// The column holding when each change happened (source time); without it, the time
    /// of the load. With `snapshot`, the time of the snapshot each row belongs to.
    pub change_ts: Option<String>,
    pub deletes: DeleteMode,
    /// A boolean input column: rows where it is true delete their key.
    pub delete_flag: Option<String>,
    /// Name of the surrogate key column.
    pub surrogate_key: String,
    /// Keep a row with surrogate key `-1` for facts whose key is unknown.
    pub unknown_member: bool,
    /// A table (`schema.table`) or model whose business keys must exist in the dimension:
    /// a key it lacks gets an inferred row (attributes null, `is_inferred`), filled in
    /// when the key's first real change arrives.
    pub inferred_members: Option<String>,
}

/// The surrogate key of the unknown member.
pub const UNKNOWN_MEMBER: &str = "-1";

/// The default name of the surrogate key column.
pub const DEFAULT_SURROGATE_KEY: &str = "sk";

//! `maintenance:` in weir.yaml: per-table policies that weir applies after every write to a
//! matching table and on `weir table maintain`.
//!
//! ```yaml
//! maintenance:
//!   - tables: [raw.events, "marts.*"]
//!     optimize: {min_small_files: 10, target_size: 128MiB, zorder: [customer_id]}
//!     vacuum: {every: 7d, retain: 7d}
//!     retention: {column: event_date, keep: 400d}
//!     tiering: {column: event_date, after: 90d, to: /mnt/cold/lake}
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::spec::de_duration;

/// One policy; the first policy whose `tables` match a table applies to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenancePolicy {
    /// `schema.table` names or globs (`raw.*`, `*`).
    pub tables: Vec<String>,
    /// Compact small files when there are enough of them.
    #[serde(default)]
    pub optimize: Option<OptimizePolicy>,
    /// Delete unreferenced files older than the retention, at most this often.
    #[serde(default)]
    pub vacuum: Option<VacuumPolicy>,
    /// Delete rows older than a duration (whole files, when `column` partitions the table).
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
    /// Move the files of old partitions to a cold location; the table keeps reading them.
    #[serde(default)]
    pub tiering: Option<TieringPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TieringPolicy {
    /// A date or timestamp column that partitions the table.
    pub column: String,
    /// Partitions older than this move (`90d`).
    #[serde(deserialize_with = "de_duration")]
    pub after: Duration,
    /// The cold location: an absolute directory or an object-store URL (on S3, in the
    /// lake's bucket); the table's files go under `<to>/<schema>/<table>/`.
    pub to: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizePolicy {
    /// Compact once at least this many files are small (default 10).
    #[serde(default = "default_min_small_files")]
    pub min_small_files: u64,
    /// Files under this size are small (default `32MiB`).
    #[serde(default = "default_small_file", deserialize_with = "de_size")]
    pub small_file_size: u64,
    /// The size compaction aims for (default `100MiB`).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub target_size: Option<u64>,
    /// Cluster the rows by these columns while compacting.
    #[serde(default)]
    pub zorder: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VacuumPolicy {
    /// Vacuum at most this often (default `7d`).
    #[serde(default = "week", deserialize_with = "de_duration")]
    pub every: Duration,
    /// Keep removed files this long, for time travel and running readers (default `7d`;
    /// at least 7 days).
    #[serde(default = "week", deserialize_with = "de_duration")]
    pub retain: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// A date or timestamp column.
    pub column: String,
    /// Rows whose `column` is older than this are deleted (`400d`, `90d`).
    #[serde(deserialize_with = "de_duration")]
    pub keep: Duration,
}

fn default_min_small_files() -> u64 {
    10
}

fn default_small_file() -> u64 {
    32 << 20
}

fn week() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// A size in bytes from `100MiB`, `512KiB`, `2GB` (powers of 1024) or a plain number.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size: write e.g. 128MiB or 512KiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit `{other}`: use KiB, MiB or GiB")),
    };
    let bytes = number * (1u64 << shift) as f64;
    if bytes < 1.0 {
        return Err(format!("`{text}` is below one byte"));
    }
    Ok(bytes as u64)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = serde_yaml_ng::Value::deserialize(d)?;
    let text = match v {
        serde_yaml_ng::Value::Number(n) => n.to_string(),
        serde_yaml_ng::Value::String(s) => s,
        other => format!("{other:?}"),
    };
    parse_size(&text).map_err(serde::de::Error::custom)
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
pub fn table_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

impl crate::Project {
    /// The maintenance policy of table `name`: the first whose `tables` match it.
    pub fn maintenance_for(&self, name: &str) -> Option<&MaintenancePolicy> {
        self.config
            .maintenance
            .iter()
            .find(|p| p.tables.iter().any(|t| table_matches(t, name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_table_names() {
        assert!(table_matches("raw.events", "raw.events"));
        assert!(!table_matches("raw.events", "raw.events2"));
        assert!(table_matches("raw.*", "raw.events"));
        assert!(table_matches("*", "marts.x"));
        assert!(table_matches("*.events", "raw.events"));
        assert!(table_matches("r*w.*s", "raw.events"));
        assert!(!table_matches("raw.*", "marts.raw"));
        assert!(!table_matches("a*a", "a"));
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("512 kb"), Ok(512 << 10));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").unwrap_err().contains("parsecs"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn policies_parse_with_defaults() {
        let text = "name: p\nmaintenance:\n  - tables: [raw.events]\n    optimize: {min_small_files: 4, target_size: 1MiB}\n    vacuum: {}\n    retention: {column: day, keep: 30d}\n";
        let c: crate::ProjectConfig =
            crate::parse_yaml(std::path::Path::new("weir.yaml"), text).unwrap();
        let p = &c.maintenance[0];
        let o = p.optimize.as_ref().unwrap();
        assert_eq!(
            (o.min_small_files, o.target_size, o.small_file_size),
            (4, Some(1 << 20), 32 << 20)
        );
        assert_eq!(p.vacuum.as_ref().unwrap().every, week());
        assert_eq!(
            p.retention.as_ref().unwrap().keep,
            Duration::from_secs(30 * 86400)
        );
        let bad =
            "name: p\nmaintenance:\n  - tables: [x.y]\n    optimize: {target_size: 12 parsecs}\n";
        let err = crate::parse_yaml::<crate::ProjectConfig>(std::path::Path::new("weir.yaml"), bad)
            .unwrap_err();
        assert!(err.render().contains("parsecs"), "{}", err.render());
    }
}

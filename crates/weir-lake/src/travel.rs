//! Time travel: a table as it was at a version or a moment.
//!
//! ```text
//!   weir query --as-of 3 "..."            every table the query names, at its version 3
//!   weir query --as-of 2026-11-29T10:00Z  ... at its last commit at or before that moment
//!   select * from raw.events@v3           one reference, in the SQL itself
//! ```

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use deltalake::DeltaTable;
use weir_common::Error;

use crate::{delta_error, Lake};

/// A point in a table's past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// The table's commit number `N` (`3` or `v3`).
    Version(u64),
    /// The last commit at or before this moment.
    Time(DateTime<Utc>),
}

impl AsOf {
    /// `3`, `v3`, an RFC 3339 time (`2026-11-29T10:00:00Z`), `2026-11-29 10:00:00` or
    /// `2026-11-29` (both UTC).
    pub fn parse(text: &str) -> Result<AsOf, Error> {
        let t = text.trim();
        let digits = t.strip_prefix(['v', 'V']).unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(v) = digits.parse() {
                return Ok(AsOf::Version(v));
            }
        }
        if let Ok(d) = DateTime::parse_from_rfc3339(t) {
            return Ok(AsOf::Time(d.with_timezone(&Utc)));
        }
        for f in [
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M",
        ] {
            if let Ok(d) = NaiveDateTime::parse_from_str(t, f) {
                return Ok(AsOf::Time(d.and_utc()));
            }
        }
        if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
            return Ok(AsOf::Time(
                d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc(),
            ));
        }
        Err(
            Error::user(format!("`{text}` is neither a version nor a time")).with_hint(
                "a version: `3` or `v3`; a time (UTC unless it has an offset): \
             `2026-11-29T10:00:00Z`, `2026-11-29 10:00:00`, `2026-11-29`",
            ),
        )
    }
}

impl std::fmt::Display for AsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsOf::Version(v) => write!(f, "version {v}"),
            AsOf::Time(t) => write!(f, "{}", t.to_rfc3339()),
        }
    }
}

impl Lake {
    /// Opens table `name` as it was at `as_of`: an error with a hint when the table had no
    /// such version, did not exist yet, or the version's files were vacuumed.
    pub async fn open_as_of(&self, name: &str, as_of: AsOf) -> Result<DeltaTable, Error> {
        let mut table = self.open_existing(name).await?;
        let latest = table.version().unwrap_or(0);
        let version = match as_of {
            AsOf::Version(v) => v,
            AsOf::Time(t) => self.version_at(&table, name, t).await?,
        };
        if version > latest {
            return Err(Error::user(format!(
                "`{name}` has no version {version}; it is at {latest}"
            ))
            .with_hint(format!("`weir table history {name}` lists the versions")));
        }
        if version < latest {
            table.load_version(version).await.map_err(|e| {
                delta_error(format!("reading `{name}` at version {version}"), e).with_hint(format!(
                    "the log of early versions can be cleaned up after a checkpoint; \
                         `weir table history {name}` lists the versions that remain"
                ))
            })?;
        }
        Ok(table)
    }

    /// The last version of `table` committed at or before `at`.
    async fn version_at(
        &self,
        table: &DeltaTable,
        name: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, Error> {
        let commits = crate::log::replay(table, name).await?;
        let target = at.timestamp_millis();
        let stamp = |c: &crate::log::Commit| c.info.get("timestamp").and_then(|t| t.as_i64());
        let first = commits.iter().find_map(stamp);
        if let Some(c) = commits
            .iter()
            .rev()
            .find(|c| stamp(c).is_some_and(|ts| ts <= target))
        {
            return Ok(c.version);
        }
        let created = first
            .and_then(DateTime::from_timestamp_millis)
            .map(|d| format!("; its first commit is from {}", d.to_rfc3339()))
            .unwrap_or_default();
        Err(Error::user(format!(
            "`{name}` did not exist yet at {}{created}",
            at.to_rfc3339()
        ))
        .with_hint(format!("`weir table history {name}` lists the versions")))
    }
}

#[cfg(test)]
mod tests {
    use super::AsOf;

    #[test]
    fn versions_and_times_parse() {
        assert_eq!(AsOf::parse("3").unwrap(), AsOf::Version(3));
        assert_eq!(AsOf::parse("v12").unwrap(), AsOf::Version(12));
        let t = |s: &str| match AsOf::parse(s).unwrap() {
            AsOf::Time(t) => t.to_rfc3339(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(t("2026-11-29T10:00:00Z"), "2026-11-29T10:00:00+00:00");
        assert_eq!(t("2026-11-29T12:00:00+02:00"), "2026-11-29T10:00:00+00:00");
        assert_eq!(t("2026-11-29 10:00:00"), "2026-11-29T10:00:00+00:00");
        assert_eq!(t("2026-11-29"), "2026-11-29T00:00:00+00:00");
        let err = AsOf::parse("yesterday").unwrap_err();
        assert!(err.render().contains("v3"), "{}", err.render());
        assert!(AsOf::parse("v").is_err());
    }
}

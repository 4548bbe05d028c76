//! Partitioned assets: time partitions (hourly, daily, monthly) or a static list of values,
//! each run and tracked on its own, so backfills can fill in the missing ones.

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, Timelike};
use serde::Deserialize;
use weir_common::Error;

/// How an asset's partitions are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionEvery {
    Hourly,
    Daily,
    Monthly,
}

/// `partitions:` of a model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionsConfig {
    /// `hourly`, `daily` or `monthly` (time partitions, with `start`).
    #[serde(default)]
    pub every: Option<PartitionEvery>,
    /// The first partition: `2024-01-01` (daily), `2024-01` (monthly), `2024-01-01T00` (hourly).
    #[serde(default)]
    pub start: Option<String>,
    /// A fixed list of partitions instead of time (`[eu, us, apac]`).
    #[serde(default)]
    pub values: Vec<String>,
    /// The output column holding the partition: a partition's run replaces exactly the
    /// rows whose column falls in the partition (a time range or the value).
    pub column: String,
}

/// One partition: its key, and for time partitions the half-open range `[start, end)` as
/// SQL literals (`2024-01-05`, `2024-01-05 03:00:00`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionWindow {
    pub key: String,
    pub start: Option<String>,
    pub end: Option<String>,
}

impl PartitionsConfig {
    /// Checks the declaration; `what` names it in messages.
    pub fn validate(&self, what: &str) -> Result<(), Error> {
        match (&self.every, &self.start, self.values.is_empty()) {
            (Some(every), Some(start), true) => {
                parse_key(*every, start)
                    .map_err(|e| e.context(format!("{what}: partitions.start")))?;
                Ok(())
            }
            (None, None, false) => Ok(()),
            _ => Err(Error::user(format!(
                "{what}: partitions need either `every` with `start` (time) or `values` (a list)"
            ))
            .with_hint("e.g. `partitions: {every: daily, start: 2024-01-01, column: order_date}`")),
        }
    }

    /// The window of partition `key`.
    pub fn window(&self, key: &str) -> Result<PartitionWindow, Error> {
        match self.every {
            None => {
                if !self.values.iter().any(|v| v == key) {
                    return Err(Error::user(format!("`{key}` is not a partition"))
                        .with_hint(format!("partitions: {}", self.values.join(", "))));
                }
                Ok(PartitionWindow {
                    key: key.to_string(),
                    start: None,
                    end: None,
                })
            }
            Some(every) => {
                let start = parse_key(every, key)?;
                let end = step(every, start);
                let fmt = |t: NaiveDateTime| match every {
                    PartitionEvery::Hourly => t.format("%Y-%m-%d %H:%M:%S").to_string(),
                    _ => t.format("%Y-%m-%d").to_string(),
                };
                Ok(PartitionWindow {
                    key: format_key(every, start),
                    start: Some(fmt(start)),
                    end: Some(fmt(end)),
                })
            }
        }
    }

    /// Partition keys from `from` to `to`, both included (all values for a static list
    /// when both are `None`).
    pub fn keys_between(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<String>, Error> {
        let Some(every) = self.every else {
            let pos = |k: Option<&str>, default: usize| -> Result<usize, Error> {
                match k {
                    None => Ok(default),
                    Some(k) => self.values.iter().position(|v| v == k).ok_or_else(|| {
                        Error::user(format!("`{k}` is not a partition"))
                            .with_hint(format!("partitions: {}", self.values.join(", ")))
                    }),
                }
            };
            let (a, b) = (pos(from, 0)?, pos(to, self.values.len().saturating_sub(1))?);
            return Ok(self
                .values
                .get(a..=b)
                .map(<[String]>::to_vec)
                .unwrap_or_default());
        };
        let first = parse_key(every, self.start.as_deref().unwrap_or_default())?;
        let from = match from {
            Some(f) => parse_key(every, f)?.max(first),
            None => first,
        };
        let to = match to {
            Some(t) => parse_key(every, t)?,
            None => return Err(Error::user("a time partition range needs `--to`")),
        };
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            out.push(format_key(every, t));
            t = step(every, t);
            if out.len() > 100_000 {
                return Err(Error::user("more than 100,000 partitions in the range"));
            }
        }
        Ok(out)
    }

    /// The newest partition that has ended by `now` (what a run without a partition builds).
    pub fn last_complete(&self, now: NaiveDateTime) -> Option<String> {
        let Some(every) = self.every else {
            return self.values.last().cloned();
        };
        let first = parse_key(every, self.start.as_deref()?).ok()?;
        let current = truncate(every, now);
        let prev = match every {
            PartitionEvery::Hourly => current - Duration::hours(1),
            PartitionEvery::Daily => current - Duration::days(1),
            PartitionEvery::Monthly => {
                let (y, m) = if current.month() == 1 {
                    (current.year() - 1, 12)
                } else {
                    (current.year(), current.month() - 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1)?.and_hms_opt(0, 0, 0)?
            }
        };
        (prev >= first).then(|| format_key(every, prev))
    }

    /// Partition `key`'s window, or without a key the last complete partition by `now` (the
    /// first one while none has ended yet).
    pub fn resolve(&self, key: Option<&str>, now: NaiveDateTime) -> Result<PartitionWindow, Error> {
        let key = key
            .map(str::to_string)
            .or_else(|| self.last_complete(now))
            .or_else(|| self.start.clone())
            .or_else(|| self.values.first().cloned())
            .ok_or_else(|| Error::user("no partitions are declared"))?;
        self.window(&key)
    }

    /// The SQL predicate selecting partition `key`'s rows of the output.
    pub fn predicate(&self, key: &str) -> Result<String, Error> {
        let w = self.window(key)?;
        let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let col = format!("\"{}\"", self.column.replace('"', "\"\""));
        Ok(match (&w.start, &w.end) {
            (Some(s), Some(e)) => format!("{col} >= {} AND {col} < {}", lit(s), lit(e)),
            _ => format!("{col} = {}", lit(&w.key)),
        })
    }
}

/// The names a partitioned asset's text may refer to.
const PARTITION_VARS: [&str; 3] = ["partition_key", "partition_start", "partition_end"];

/// Whether `text` refers to the partition (`{{ partition_key }}` and friends).
pub fn mentions_partition(text: &str) -> bool {
    placeholders(text).any(|(_, name)| PARTITION_VARS.contains(&name))
}

/// The `{{ name }}` placeholders of `text`: their byte range and trimmed name.
fn placeholders(text: &str) -> impl Iterator<Item = (std::ops::Range<usize>, &str)> {
    let mut from = 0;
    std::iter::from_fn(move || {
        let open = from + text.get(from..)?.find("{{")?;
        let close = open + 2 + text[open + 2..].find("}}")?;
        from = close + 2;
        Some((open..close + 2, text[open + 2..close].trim()))
    })
}

impl PartitionWindow {
    /// `text` with `{{ partition_key }}`, `{{ partition_start }}` and `{{ partition_end }}`
    /// filled in; any other placeholder is an error naming it.
    pub fn fill(&self, text: &str) -> Result<String, Error> {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for (range, name) in placeholders(text) {
            let value = match name {
                "partition_key" => Some(&self.key),
                "partition_start" => self.start.as_ref(),
                "partition_end" => self.end.as_ref(),
                other => return Err(Error::user(format!(
                    "unknown placeholder `{{{{ {other} }}}}`"
                ))
                .with_hint(
                    "partitioned pipelines know partition_key, partition_start and partition_end",
                )),
            };
            let value = value.ok_or_else(|| {
                Error::user(format!("`{name}` is defined for time partitions only"))
                    .with_hint("a partition of a `values:` list has only `partition_key`")
            })?;
            out.push_str(&text[last..range.start]);
            out.push_str(value);
            last = range.end;
        }
        out.push_str(&text[last..]);
        Ok(out)
    }
}

fn truncate(every: PartitionEvery, t: NaiveDateTime) -> NaiveDateTime {
    let day = t.date().and_hms_opt(0, 0, 0).unwrap_or(t);
    match every {
        PartitionEvery::Hourly => day + Duration::hours(i64::from(t.hour())),
        PartitionEvery::Daily => day,
        PartitionEvery::Monthly => NaiveDate::from_ymd_opt(t.year(), t.month(), 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .unwrap_or(day),
    }
}

fn step(every: PartitionEvery, t: NaiveDateTime) -> NaiveDateTime {
    match every {
        PartitionEvery::Hourly => t + Duration::hours(1),
        PartitionEvery::Daily => t + Duration::days(1),
        PartitionEvery::Monthly => {
            let (y, m) = if t.month() == 12 {
                (t.year() + 1, 1)
            } else {
                (t.year(), t.month() + 1)
            };
            NaiveDate::from_ymd_opt(y, m, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .unwrap_or(t)
        }
    }
}

fn format_key(every: PartitionEvery, t: NaiveDateTime) -> String {
    match every {
        PartitionEvery::Hourly => t.format("%Y-%m-%dT%H").to_string(),
        PartitionEvery::Daily => t.format("%Y-%m-%d").to_string(),
        PartitionEvery::Monthly => t.format("%Y-%m").to_string(),
    }
}

fn parse_key(every: PartitionEvery, key: &str) -> Result<NaiveDateTime, Error> {
    let bad = || {
        Error::user(format!("`{key}` is not a {every:?} partition key").to_lowercase()).with_hint(
            match every {
                PartitionEvery::Hourly => "write hours as 2024-01-31T05",
                PartitionEvery::Daily => "write days as 2024-01-31",
                PartitionEvery::Monthly => "write months as 2024-01",
            },
        )
    };
    let parsed = match every {
        PartitionEvery::Hourly => NaiveDateTime::parse_from_str(
            &format!("{}:00:00", key.replace(' ', "T")),
            "%Y-%m-%dT%H:%M:%S",
        )
        .ok(),
        PartitionEvery::Daily => NaiveDate::parse_from_str(key, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0)),
        PartitionEvery::Monthly => NaiveDate::parse_from_str(&format!("{key}-01"), "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0)),
    };
    parsed.ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daily() -> PartitionsConfig {
        PartitionsConfig {
            every: Some(PartitionEvery::Daily),
            start: Some("2024-01-01".into()),
            values: vec![],
            column: "day".into(),
        }
    }

    #[test]
    fn time_partitions_have_half_open_windows() {
        let d = daily();
        let w = d.window("2024-02-28").unwrap();
        assert_eq!(w.start.as_deref(), Some("2024-02-28"));
        assert_eq!(w.end.as_deref(), Some("2024-02-29"));
        assert_eq!(
            d.predicate("2024-12-31").unwrap(),
            "\"day\" >= '2024-12-31' AND \"day\" < '2025-01-01'"
        );
        let mut m = daily();
        m.every = Some(PartitionEvery::Monthly);
        m.start = Some("2024-01".into());
        assert_eq!(
            m.window("2024-12").unwrap().end.as_deref(),
            Some("2025-01-01")
        );
        let mut h = daily();
        h.every = Some(PartitionEvery::Hourly);
        h.start = Some("2024-01-01T00".into());
        let w = h.window("2024-01-01T23").unwrap();
        assert_eq!(w.start.as_deref(), Some("2024-01-01 23:00:00"));
        assert_eq!(w.end.as_deref(), Some("2024-01-02 00:00:00"));
    }

    #[test]
    fn ranges_are_inclusive_and_start_at_the_first_partition() {
        let d = daily();
        let keys = d
            .keys_between(Some("2023-12-30"), Some("2024-01-30"))
            .unwrap();
        assert_eq!(keys.len(), 30);
        assert_eq!(keys[0], "2024-01-01");
        assert_eq!(keys[29], "2024-01-30");
        let err = d
            .keys_between(Some("2024-13-01"), Some("2024-01-02"))
            .unwrap_err();
        assert!(err.message.contains("not a daily partition key"), "{err}");
    }

    #[test]
    fn the_last_complete_partition_is_the_previous_one() {
        let d = daily();
        let now = NaiveDate::from_ymd_opt(2024, 3, 1)
            .unwrap()
            .and_hms_opt(6, 0, 0)
            .unwrap();
        assert_eq!(d.last_complete(now).as_deref(), Some("2024-02-29"));
        let mut m = daily();
        m.every = Some(PartitionEvery::Monthly);
        m.start = Some("2024-01".into());
        assert_eq!(m.last_complete(now).as_deref(), Some("2024-02"));
    }

    #[test]
    fn placeholders_are_filled_and_unknown_ones_refused() {
        let w = daily().window("2024-01-31").unwrap();
        assert_eq!(
            w.fill("select * from t where d >= '{{partition_start}}' and d < '{{ partition_end }}' -- {{ partition_key }}").unwrap(),
            "select * from t where d >= '2024-01-31' and d < '2024-02-01' -- 2024-01-31"
        );
        assert_eq!(w.fill("data/{ x }/a.csv").unwrap(), "data/{ x }/a.csv");
        let err = w.fill("data/{{ day }}/*.csv").unwrap_err();
        assert!(err.message.contains("`{{ day }}`"), "{err}");
        assert!(mentions_partition("data/{{partition_key}}/*.csv"));
        assert!(!mentions_partition("data/*.csv"));
        let eu = PartitionWindow {
            key: "eu".into(),
            start: None,
            end: None,
        };
        assert!(eu.fill("{{ partition_start }}").is_err());
        let now = NaiveDate::from_ymd_opt(2024, 3, 1)
            .unwrap()
            .and_hms_opt(6, 0, 0)
            .unwrap();
        assert_eq!(daily().resolve(None, now).unwrap().key, "2024-02-29");
        let early = NaiveDate::from_ymd_opt(2023, 3, 1)
            .unwrap()
            .and_hms_opt(6, 0, 0)
            .unwrap();
        assert_eq!(daily().resolve(None, early).unwrap().key, "2024-01-01");
    }

    #[test]
    fn static_partitions() {
        let s = PartitionsConfig {
            every: None,
            start: None,
            values: vec!["eu".into(), "us".into(), "apac".into()],
            column: "region".into(),
        };
        s.validate("m").unwrap();
        assert_eq!(
            s.keys_between(Some("us"), None).unwrap(),
            vec!["us", "apac"]
        );
        assert_eq!(s.predicate("eu").unwrap(), "\"region\" = 'eu'");
        assert!(s.window("mars").is_err());
        assert!(daily().validate("m").is_ok());
        let mut bad = daily();
        bad.values = vec!["x".into()];
        assert!(bad.validate("m").is_err());
    }
}

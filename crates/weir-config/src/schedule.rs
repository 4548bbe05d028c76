//! Schedules (cron with a time zone) and sensors (new files, an updated table).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A cron expression: five fields (minute hour day-of-month month day-of-week), an
/// optional leading seconds field, or a nickname (`@hourly`, `@daily`, `@weekly`, ...).
#[derive(Clone)]
pub struct CronExpr {
    pub text: String,
    pub cron: croner::Cron,
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronExpr({:?})", self.text)
    }
}

impl FromStr for CronExpr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        croner::Cron::from_str(text)
            .map(|cron| CronExpr {
                text: text.to_string(),
                cron,
            })
            .map_err(|e| {
                format!(
                    "invalid cron expression `{text}` ({e}); write five fields like `0 6 * * *` \
                     (minute hour day-of-month month day-of-week) or `@daily`"
                )
            })
    }
}

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An IANA time zone name (`Europe/Berlin`, `America/New_York`, `UTC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(pub chrono_tz::Tz);

impl Default for TimeZone {
    fn default() -> Self {
        TimeZone(chrono_tz::UTC)
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        chrono_tz::Tz::from_str(&text).map(TimeZone).map_err(|_| {
            serde::de::Error::custom(format!(
                "unknown time zone `{text}`; use an IANA name like `Europe/Berlin` or `UTC`"
            ))
        })
    }
}

/// What a schedule does about ticks that passed while no scheduler was running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissed {
    /// One run for the latest missed tick, however many were missed.
    #[default]
    RunOnce,
    /// No run for missed ticks; wait for the next one.
    Skip,
}

/// A schedule: in `weir.yaml` under `schedules:`, or as `schedule:` of a pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique name (required in `weir.yaml`; a pipeline's schedule takes the pipeline's name).
    #[serde(default)]
    pub name: Option<String>,
    /// When to run, e.g. `0 6 * * *` (06:00 every day), `*/15 * * * *`, `@hourly`.
    pub cron: CronExpr,
    /// Time zone the cron expression is read in (default `UTC`). Daylight saving changes
    /// are handled: a time that does not exist runs at the first valid time after it, a
    /// time that exists twice runs once.
    #[serde(default)]
    pub timezone: TimeZone,
    /// Which assets run (as for `weir run`); a pipeline's schedule defaults to the pipeline
    /// and everything downstream of it (`name+`), a project schedule to everything.
    #[serde(default)]
    pub select: Option<String>,
    /// `run_once` (default) or `skip`.
    #[serde(default)]
    pub on_missed: OnMissed,
}

/// A sensor: starts a run when something changes. Exactly one of `files` and `asset`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    pub name: String,
    /// A glob relative to the project (`data/orders/*.csv`): fires when files appear or change.
    #[serde(default)]
    pub files: Option<String>,
    /// A lake table (`raw.orders`): fires when a new version of it is committed.
    #[serde(default)]
    pub asset: Option<String>,
    /// Which assets run (as for `weir run`); default: everything.
    #[serde(default)]
    pub select: Option<String>,
    /// How often to look (default `30s`).
    #[serde(
        default = "default_interval",
        deserialize_with = "crate::spec::de_duration"
    )]
    pub interval: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(30)
}

//! Schedules and sensors turn time and change into queued runs. Each pass takes `now`
//! as an argument, so tests drive it with a fake clock. A tick becomes a run with the run
//! key `schedule:NAME:TICK`: however many schedulers see the same tick (restarts, several
//! `weir serve` processes on one PostgreSQL store), it runs once.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use chrono::{DateTime, Utc};
use weir_common::Error;
use weir_config::{CronExpr, OnMissed, Project};

use crate::store::{RunRecord, Store};

/// A tick seen later than this after its time counts as missed (the scheduler was down).
pub const GRACE: Duration = Duration::from_secs(60);

/// A schedule of the project, from `weir.yaml` or a pipeline.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub cron: CronExpr,
    pub tz: chrono_tz::Tz,
    pub select: Option<String>,
    pub on_missed: OnMissed,
}

/// Every schedule of the project: `weir.yaml`'s, then the pipelines'.
pub fn schedules(project: &Project) -> Vec<Schedule> {
    let mut out: Vec<Schedule> = project
        .config
        .schedules
        .iter()
        .map(|s| Schedule {
            name: s.name.clone().unwrap_or_default(),
            cron: s.cron.clone(),
            tz: s.timezone.0,
            select: s.select.clone(),
            on_missed: s.on_missed,
        })
        .collect();
    for p in &project.pipelines {
        if let Some(s) = &p.config.schedule {
            out.push(Schedule {
                name: s.name.clone().unwrap_or_else(|| p.name.clone()),
                cron: s.cron.clone(),
                tz: s.timezone.0,
                select: Some(s.select.clone().unwrap_or_else(|| format!("{}+", p.name))),
                on_missed: s.on_missed,
            });
        }
    }
    out
}

impl Schedule {
    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use chrono::{Offset, Timelike};
        let next = self
            .cron
            .cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))?;
        // When clocks fall back, an hour of wall-clock time happens twice. Jobs with a
        // fixed time run once (as above); interval jobs (`0 * * * *`) run in both hours,
        // so look through real time for a match the wall-clock search stepped over.
        let offset = |d: DateTime<Utc>| d.with_timezone(&self.tz).offset().fix();
        if self.cron.cron.determine_job_type() == croner::JobType::IntervalWildcard
            && offset(t) != offset(next)
        {
            let with_seconds = self.cron.text.split_whitespace().count() >= 6;
            let step = chrono::Duration::seconds(if with_seconds { 1 } else { 60 });
            let mut m = if with_seconds {
                t.with_nanosecond(0)?
            } else {
                t.with_nanosecond(0)?.with_second(0)?
            } + step;
            while m < next {
                if self
                    .cron
                    .cron
                    .is_time_matching(&m.with_timezone(&self.tz))
                    .unwrap_or(false)
                {
                    return Some(m);
                }
                m += step;
            }
        }
        Some(next)
    }

    /// The tick to run when the scheduler looks at `now` and last looked at `last`:
    /// the latest tick in `(last, now]`, if it is on time or missed ticks run once.
    pub fn due(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut latest = None;
        let mut count = 0;
        let mut t = last;
        // Walk forward; a very frequent cron over a long outage jumps to the end.
        while let Some(next) = self.next_after(t).filter(|n| *n <= now) {
            latest = Some(next);
            count += 1;
            t = next;
            if count >= 10_000 {
                latest = self
                    .cron
                    .cron
                    .find_previous_occurrence(&now.with_timezone(&self.tz), true)
                    .ok()
                    .map(|d| d.with_timezone(&Utc))
                    .or(latest);
                count += 1;
                break;
            }
        }
        let latest = latest?;
        let on_time = (now - latest).to_std().unwrap_or_default() <= GRACE;
        match (count == 1 && on_time, self.on_missed) {
            (true, _) => Some(latest),
            (false, OnMissed::RunOnce) => Some(latest),
            (false, OnMissed::Skip) => on_time.then_some(latest),
        }
    }

    fn state_key(&self) -> String {
        format!("schedule:{}", self.name)
    }
}

/// One scheduler pass at `now`: queues the runs of due ticks and remembers `now` per
/// schedule. A schedule seen for the first time starts from `now` (no runs for the past).
pub async fn tick(
    project: &Project,
    store: &Store,
    schedules: &[Schedule],
    now: DateTime<Utc>,
) -> Result<Vec<RunRecord>, Error> {
    let mut queued = Vec::new();
    for s in schedules {
        let last = store
            .get_state(&s.state_key())
            .await?
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(DateTime::from_timestamp_millis);
        if let Some(last) = last {
            if let Some(t) = s.due(last, now) {
                let mut run = RunRecord::new(&project.config.name, &format!("schedule:{}", s.name));
                run.selector = s.select.clone();
                run.run_key = Some(format!(
                    "schedule:{}:{}",
                    s.name,
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
                // Queue first, then move the cursor: a crash in between re-queues the same
                // tick, which its run key turns into a no-op.
                if crate::enqueue(store, &run).await? {
                    tracing::info!(schedule = %s.name, tick = %t, run = %run.id, "schedule tick queued a run");
                    queued.push(run);
                }
            }
        }
        store
            .set_state(&s.state_key(), &now.timestamp_millis().to_string())
            .await?;
    }
    Ok(queued)
}

/// When each schedule runs next after `now`.
pub fn upcoming(
    schedules: &[Schedule],
    now: DateTime<Utc>,
) -> Vec<(String, Option<DateTime<Utc>>)> {
    schedules
        .iter()
        .map(|s| (s.name.clone(), s.next_after(now)))
        .collect()
}

/// The sensors of a project with the time each was last evaluated.
pub struct Sensors {
    last: BTreeMap<String, DateTime<Utc>>,
}

impl Default for Sensors {
    fn default() -> Self {
        Self::new()
    }
}

impl Sensors {
    pub fn new() -> Self {
        Self {
            last: BTreeMap::new(),
        }
    }

    /// Evaluates every sensor whose interval has passed; queues a run for each change.
    pub async fn tick(
        &mut self,
        project: &Project,
        store: &Store,
        now: DateTime<Utc>,
    ) -> Result<Vec<RunRecord>, Error> {
        let mut queued = Vec::new();
        for s in &project.config.sensors {
            if let Some(prev) = self.last.get(&s.name) {
                if (now - *prev).to_std().unwrap_or_default() < s.interval {
                    continue;
                }
            }
            self.last.insert(s.name.clone(), now);
            let cursor = match (&s.files, &s.asset) {
                (Some(glob), _) => files_cursor(project, glob)?,
                (None, Some(table)) => table_cursor(project, table).await?,
                _ => None,
            };
            let Some(cursor) = cursor else { continue };
            let key = format!("sensor:{}", s.name);
            if store.get_state(&key).await?.as_deref() == Some(cursor.as_str()) {
                continue;
            }
            let mut run = RunRecord::new(&project.config.name, &format!("sensor:{}", s.name));
            run.selector = s.select.clone();
            run.run_key = Some(format!("sensor:{}:{cursor}", s.name));
            if crate::enqueue(store, &run).await? {
                tracing::info!(sensor = %s.name, cursor = %cursor, run = %run.id, "sensor queued a run");
                queued.push(run);
            }
            store.set_state(&key, &cursor).await?;
        }
        Ok(queued)
    }
}

/// A fingerprint of the files matching `glob` (path, size, modification time); `None`
/// when nothing matches.
fn files_cursor(project: &Project, glob: &str) -> Result<Option<String>, Error> {
    let matcher = globset::Glob::new(glob)
        .map_err(|e| Error::user(format!("sensor glob `{glob}`: {e}")))?
        .compile_matcher();
    // The walk starts at the glob's literal prefix.
    let literal: Vec<&str> = glob
        .split('/')
        .take_while(|part| !part.contains(['*', '?', '[', '{']))
        .collect();
    let base = project.root.join(literal.join("/"));
    let mut files = Vec::new();
    let mut stack = vec![base];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(&project.root).unwrap_or(&path);
            if matcher.is_match(rel) {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                files.push((rel.to_string_lossy().into_owned(), meta.len(), mtime));
            }
        }
    }
    if files.is_empty() {
        return Ok(None);
    }
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    Ok(Some(format!("{}-{:016x}", files.len(), h.finish())))
}

/// The table's current version as text; `None` while the table does not exist.
async fn table_cursor(project: &Project, table: &str) -> Result<Option<String>, Error> {
    let lake = weir_lake::Lake::for_project(project);
    if !lake.exists(table).await {
        return Ok(None);
    }
    let t = lake.open(table).await?;
    Ok(t.version().map(|v| format!("v{v}")))
}

#[cfg(test)]
mod tests;

use std::str::FromStr;

use chrono::TimeZone as _;

use super::*;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn sched(cron: &str, tz: &str, on_missed: OnMissed) -> Schedule {
    Schedule {
        name: "s".into(),
        cron: CronExpr::from_str(cron).unwrap(),
        tz: chrono_tz::Tz::from_str(tz).unwrap(),
        select: None,
        on_missed,
    }
}

#[test]
fn cron_is_read_in_the_schedules_time_zone() {
    let s = sched("0 6 * * *", "Europe/Berlin", OnMissed::RunOnce);
    // Winter: UTC+1; summer: UTC+2.
    assert_eq!(
        s.next_after(at("2024-01-15T00:00:00Z")),
        Some(at("2024-01-15T05:00:00Z"))
    );
    assert_eq!(
        s.next_after(at("2024-07-15T00:00:00Z")),
        Some(at("2024-07-15T04:00:00Z"))
    );
    let ny = sched("0 9 * * 1-5", "America/New_York", OnMissed::RunOnce);
    // Saturday 2024-06-01 -> Monday 09:00 EDT.
    assert_eq!(
        ny.next_after(at("2024-06-01T12:00:00Z")),
        Some(at("2024-06-03T13:00:00Z"))
    );
}

#[test]
fn a_time_skipped_by_dst_runs_once_right_after_the_gap() {
    // Berlin springs forward on 2024-03-31: 02:00 -> 03:00, so 02:30 does not exist.
    let s = sched("30 2 * * *", "Europe/Berlin", OnMissed::RunOnce);
    let day_before = s.next_after(at("2024-03-30T00:00:00Z")).unwrap();
    assert_eq!(day_before, at("2024-03-30T01:30:00Z"));
    let gap_day = s.next_after(day_before).unwrap();
    assert_eq!(
        gap_day,
        at("2024-03-31T01:00:00Z"),
        "03:00 CEST, the first valid time"
    );
    let next = s.next_after(gap_day).unwrap();
    assert_eq!(next, at("2024-04-01T00:30:00Z"));
}

#[test]
fn a_time_repeated_by_dst_runs_once() {
    // Berlin falls back on 2024-10-27: 02:30 happens at 00:30Z and again at 01:30Z.
    let s = sched("30 2 * * *", "Europe/Berlin", OnMissed::RunOnce);
    let first = s.next_after(at("2024-10-26T12:00:00Z")).unwrap();
    assert_eq!(first, at("2024-10-27T00:30:00Z"));
    let next = s.next_after(first).unwrap();
    assert_eq!(next, at("2024-10-28T01:30:00Z"), "not 01:30Z the same day");
    // Hourly jobs do run in both repeated hours.
    let hourly = sched("0 * * * *", "Europe/Berlin", OnMissed::RunOnce);
    let mut t = at("2024-10-26T23:30:00Z");
    let mut ticks = Vec::new();
    for _ in 0..4 {
        t = hourly.next_after(t).unwrap();
        ticks.push(t);
    }
    assert_eq!(
        ticks,
        vec![
            at("2024-10-27T00:00:00Z"),
            at("2024-10-27T01:00:00Z"),
            at("2024-10-27T02:00:00Z"),
            at("2024-10-27T03:00:00Z")
        ]
    );
}

#[test]
fn due_fires_on_time_ticks_and_one_run_for_missed_ones() {
    let s = sched("0 * * * *", "UTC", OnMissed::RunOnce);
    // Looked at 09:59:59, now 10:00:01: the 10:00 tick.
    assert_eq!(
        s.due(at("2024-01-01T09:59:59Z"), at("2024-01-01T10:00:01Z")),
        Some(at("2024-01-01T10:00:00Z"))
    );
    // No tick in between.
    assert_eq!(
        s.due(at("2024-01-01T10:00:01Z"), at("2024-01-01T10:30:00Z")),
        None
    );
    // Down from 10:00:01 to 15:20: five ticks missed, one run, for the latest.
    assert_eq!(
        s.due(at("2024-01-01T10:00:01Z"), at("2024-01-01T15:20:00Z")),
        Some(at("2024-01-01T15:00:00Z"))
    );
    // A very frequent cron over a long outage is still one run.
    let every_minute = sched("* * * * *", "UTC", OnMissed::RunOnce);
    assert_eq!(
        every_minute.due(at("2024-01-01T00:00:00Z"), at("2024-03-01T00:00:30Z")),
        Some(at("2024-03-01T00:00:00Z"))
    );
}

#[test]
fn skip_drops_missed_ticks_but_not_the_one_on_time() {
    let s = sched("0 * * * *", "UTC", OnMissed::Skip);
    assert_eq!(
        s.due(at("2024-01-01T10:00:01Z"), at("2024-01-01T15:20:00Z")),
        None
    );
    // Down since 10:00:01, back at 15:00:05: the 15:00 tick is on time.
    assert_eq!(
        s.due(at("2024-01-01T10:00:01Z"), at("2024-01-01T15:00:05Z")),
        Some(at("2024-01-01T15:00:00Z"))
    );
}

async fn project_with(yaml: &str) -> (tempfile::TempDir, Project, Store) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weir.yaml"), yaml).unwrap();
    let project = weir_config::load_project(dir.path()).unwrap();
    let store = Store::open(&project).await.unwrap();
    (dir, project, store)
}

#[tokio::test]
async fn ticks_queue_runs_once_with_a_fake_clock() {
    let (_dir, project, store) = project_with(
        "name: p\nschedules:\n  - name: hourly\n    cron: '0 * * * *'\n    select: orders+\n",
    )
    .await;
    let s = schedules(&project);
    // First look: remembers the time, queues nothing for the past.
    assert!(tick(&project, &store, &s, at("2024-01-01T09:59:30Z"))
        .await
        .unwrap()
        .is_empty());
    let runs = tick(&project, &store, &s, at("2024-01-01T10:00:00Z"))
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].trigger, "schedule:hourly");
    assert_eq!(runs[0].selector.as_deref(), Some("orders+"));
    assert_eq!(
        runs[0].run_key.as_deref(),
        Some("schedule:hourly:2024-01-01T10:00:00Z")
    );
    // The same instant again, and a second scheduler that still thinks it is 09:59:
    // the run key keeps it to one run.
    assert!(tick(&project, &store, &s, at("2024-01-01T10:00:00Z"))
        .await
        .unwrap()
        .is_empty());
    store
        .set_state(
            "schedule:hourly",
            &at("2024-01-01T09:59:30Z").timestamp_millis().to_string(),
        )
        .await
        .unwrap();
    assert!(tick(&project, &store, &s, at("2024-01-01T10:00:02Z"))
        .await
        .unwrap()
        .is_empty());
    // Down for three days: one run on restart.
    let runs = tick(&project, &store, &s, at("2024-01-04T10:30:00Z"))
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].run_key.as_deref(),
        Some("schedule:hourly:2024-01-04T10:00:00Z")
    );
    let queued = store.list_runs(10, Some("queued")).await.unwrap();
    assert_eq!(queued.len(), 2);
}

#[tokio::test]
async fn pipeline_schedules_select_the_pipeline_and_downstream() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weir.yaml"), "name: p\n").unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/orders.yaml"),
        "source: {type: files, path: 'data/*.csv'}\nsink: {table: raw.orders}\nschedule:\n  cron: '@daily'\n  timezone: Asia/Tokyo\n",
    )
    .unwrap();
    let project = weir_config::load_project(dir.path()).unwrap();
    let s = schedules(&project);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].name, "orders");
    assert_eq!(s[0].select.as_deref(), Some("orders+"));
    assert_eq!(
        s[0].next_after(at("2024-01-01T12:00:00Z")),
        Some(
            chrono_tz::Asia::Tokyo
                .with_ymd_and_hms(2024, 1, 2, 0, 0, 0)
                .unwrap()
                .with_timezone(&Utc)
        )
    );
}

#[tokio::test]
async fn a_file_sensor_fires_for_new_and_changed_files() {
    let (dir, project, store) = project_with(
        "name: p\nsensors:\n  - name: landing\n    files: 'landing/**/*.csv'\n    interval: 1s\n",
    )
    .await;
    let mut sensors = Sensors::new();
    let mut now = at("2024-01-01T00:00:00Z");
    assert!(sensors
        .tick(&project, &store, now)
        .await
        .unwrap()
        .is_empty());
    std::fs::create_dir_all(dir.path().join("landing/2024")).unwrap();
    std::fs::write(dir.path().join("landing/2024/a.csv"), "x\n1\n").unwrap();
    std::fs::write(dir.path().join("landing/2024/ignored.txt"), "x").unwrap();
    // Within the interval nothing is looked at.
    assert!(sensors
        .tick(&project, &store, now)
        .await
        .unwrap()
        .is_empty());
    now += chrono::Duration::seconds(2);
    let runs = sensors.tick(&project, &store, now).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].trigger, "sensor:landing");
    now += chrono::Duration::seconds(2);
    assert!(sensors
        .tick(&project, &store, now)
        .await
        .unwrap()
        .is_empty());
    std::fs::write(dir.path().join("landing/2024/b.csv"), "x\n2\n").unwrap();
    now += chrono::Duration::seconds(2);
    assert_eq!(sensors.tick(&project, &store, now).await.unwrap().len(), 1);
    // A restarted server with fresh memory does not fire again for the same files.
    let mut restarted = Sensors::new();
    assert!(restarted
        .tick(&project, &store, now)
        .await
        .unwrap()
        .is_empty());
}

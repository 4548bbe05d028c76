use std::collections::BTreeSet;

use super::*;

async fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("state.db"))
        .await
        .unwrap();
    (dir, store)
}

fn asset(run: &str, name: &str, pos: i64, max: i64) -> AssetRecord {
    AssetRecord::queued(run, name, pos, "pipeline", max)
}

#[tokio::test]
async fn migrations_apply_once_and_reopen_cleanly() {
    let (dir, store) = temp_store().await;
    assert_eq!(
        store.schema_version().await.unwrap(),
        MIGRATIONS.len() as i64
    );
    drop(store);
    let again = Store::open_sqlite(&dir.path().join("state.db"))
        .await
        .unwrap();
    assert_eq!(
        again.schema_version().await.unwrap(),
        MIGRATIONS.len() as i64
    );
}

#[tokio::test]
async fn runs_round_trip_and_list_newest_first() {
    let (_dir, store) = temp_store().await;
    let mut a = RunRecord::new("p", "manual");
    a.created_at = 1_000;
    a.selector = Some("orders+".into());
    let mut b = RunRecord::new("p", "schedule:nightly");
    b.created_at = 2_000;
    b.partition = Some("2024-01-02".into());
    assert!(store.insert_run(&a).await.unwrap());
    assert!(store.insert_run(&b).await.unwrap());
    assert_eq!(store.run(&a.id).await.unwrap().unwrap(), a);
    let listed = store.list_runs(10, None).await.unwrap();
    assert_eq!(listed, vec![b.clone(), a.clone()]);
    assert_eq!(store.find_run(&b.id[..6]).await.unwrap().id, b.id);
    let err = store.find_run("zzzz").await.unwrap_err();
    assert!(err.message.contains("no run `zzzz`"), "{err}");
}

#[tokio::test]
async fn a_run_key_is_enqueued_once() {
    let (_dir, store) = temp_store().await;
    let mut a = RunRecord::new("p", "schedule:s");
    a.run_key = Some("schedule:s:2024-01-01T06:00:00Z".into());
    let mut b = RunRecord::new("p", "schedule:s");
    b.run_key = a.run_key.clone();
    assert!(store.insert_run(&a).await.unwrap());
    assert!(!store.insert_run(&b).await.unwrap());
    assert_eq!(store.list_runs(10, None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn competing_workers_claim_each_run_once() {
    let (_dir, store) = temp_store().await;
    let mut ids = BTreeSet::new();
    for i in 0..40 {
        let mut r = RunRecord::new("p", "manual");
        r.created_at = i;
        ids.insert(r.id.clone());
        store.insert_run(&r).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(r) = store.claim(&format!("w{w}")).await.unwrap() {
                assert_eq!(r.status, "running");
                got.push(r.id);
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    assert_eq!(claimed.len(), 40, "every run claimed exactly once");
    assert_eq!(claimed.into_iter().collect::<BTreeSet<_>>(), ids);
    assert!(store.claim("late").await.unwrap().is_none());
}

#[tokio::test]
async fn claims_go_oldest_first() {
    let (_dir, store) = temp_store().await;
    let mut new = RunRecord::new("p", "manual");
    new.created_at = 5;
    let mut old = RunRecord::new("p", "manual");
    old.created_at = 1;
    store.insert_run(&new).await.unwrap();
    store.insert_run(&old).await.unwrap();
    assert_eq!(store.claim("w").await.unwrap().unwrap().id, old.id);
    assert_eq!(store.claim("w").await.unwrap().unwrap().id, new.id);
}

#[tokio::test]
async fn recovery_fails_attempts_without_retries_and_requeues_the_rest() {
    let (_dir, store) = temp_store().await;
    let run = RunRecord::new("p", "manual");
    store.insert_run(&run).await.unwrap();
    let claimed = store.claim("dead").await.unwrap().unwrap();
    assert_eq!(claimed.worker.as_deref(), Some("dead"));
    let mut once = asset(&run.id, "once", 0, 1);
    let mut twice = asset(&run.id, "twice", 1, 2);
    let mut done = asset(&run.id, "done", 2, 1);
    let waiting = asset(&run.id, "waiting", 3, 1);
    store
        .insert_assets(&[once.clone(), twice.clone(), done.clone(), waiting.clone()])
        .await
        .unwrap();
    for a in [&mut once, &mut twice] {
        a.status = "running".into();
        a.attempts = 1;
        store.update_asset(a).await.unwrap();
    }
    done.status = "succeeded".into();
    done.attempts = 1;
    store.update_asset(&done).await.unwrap();

    // A live lease is left alone.
    assert!(store
        .recover(Duration::from_secs(60), "me")
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(30)).await;
    let rec = store
        .recover(Duration::from_millis(10), "me")
        .await
        .unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].failed, vec!["once".to_string()]);
    assert_eq!(rec[0].retried, vec!["twice".to_string()]);
    // The dead worker can no longer renew its lease.
    assert!(!store.heartbeat(&run.id, "dead").await.unwrap());

    let after = store.run(&run.id).await.unwrap().unwrap();
    assert_eq!(after.status, "queued");
    assert_eq!(after.recoveries, 1);
    assert_eq!(after.worker, None);
    let assets = store.assets(&run.id).await.unwrap();
    let status: Vec<(&str, &str, i64)> = assets
        .iter()
        .map(|a| (a.asset.as_str(), a.status.as_str(), a.attempts))
        .collect();
    assert_eq!(
        status,
        vec![
            ("once", "failed", 1),
            ("twice", "queued", 1),
            ("done", "succeeded", 1),
            ("waiting", "queued", 0)
        ]
    );
    assert!(assets[0]
        .error
        .as_deref()
        .unwrap()
        .contains("no attempts left"));
    // Recovered once: a second pass finds nothing.
    assert!(store
        .recover(Duration::from_millis(10), "me")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn heartbeats_renew_only_the_holders_lease() {
    let (_dir, store) = temp_store().await;
    let run = RunRecord::new("p", "manual");
    store.insert_run(&run).await.unwrap();
    store.claim("w1").await.unwrap().unwrap();
    assert!(store.heartbeat(&run.id, "w1").await.unwrap());
    assert!(!store.heartbeat(&run.id, "w2").await.unwrap());
    store.finish_run(&run.id, "succeeded", None).await.unwrap();
    assert!(!store.heartbeat(&run.id, "w1").await.unwrap());
    let r = store.run(&run.id).await.unwrap().unwrap();
    assert_eq!(r.status, "succeeded");
    assert!(r.ended_at.is_some());
}

#[tokio::test]
async fn named_state_and_partitions_upsert() {
    let (_dir, store) = temp_store().await;
    assert_eq!(store.get_state("schedule:a").await.unwrap(), None);
    store.set_state("schedule:a", "1").await.unwrap();
    store.set_state("schedule:a", "2").await.unwrap();
    assert_eq!(
        store.get_state("schedule:a").await.unwrap().as_deref(),
        Some("2")
    );
    store
        .set_partition("raw.x", "2024-01-02", "running", Some("r1"))
        .await
        .unwrap();
    store
        .set_partition("raw.x", "2024-01-01", "succeeded", Some("r0"))
        .await
        .unwrap();
    store
        .set_partition("raw.x", "2024-01-02", "succeeded", Some("r2"))
        .await
        .unwrap();
    assert_eq!(
        store.partitions("raw.x").await.unwrap(),
        vec![
            ("2024-01-01".into(), "succeeded".into(), Some("r0".into())),
            ("2024-01-02".into(), "succeeded".into(), Some("r2".into()))
        ]
    );
}

#[tokio::test]
async fn many_assets_insert_in_chunks() {
    let (_dir, store) = temp_store().await;
    let run = RunRecord::new("p", "manual");
    store.insert_run(&run).await.unwrap();
    let rows: Vec<AssetRecord> = (0..123)
        .map(|i| asset(&run.id, &format!("a{i:03}"), i, 1))
        .collect();
    store.insert_assets(&rows).await.unwrap();
    let back = store.assets(&run.id).await.unwrap();
    assert_eq!(back, rows);
}

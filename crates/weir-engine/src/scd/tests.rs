//! The history against a naive reference: every key's changes walked one by one.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;

use super::*;

/// One change: key, two attributes, time, arrival, delete.
#[derive(Debug, Clone)]
struct Change {
    k: i64,
    a: Option<String>,
    b: Option<i64>,
    ts: i64,
    seq: i64,
    del: bool,
}

/// (k, a, b, valid_from, valid_to, is_current, version, is_deleted)
type Row = (
    i64,
    Option<String>,
    Option<i64>,
    i64,
    Option<i64>,
    bool,
    i64,
    bool,
);

fn reference(changes: &[Change], mode: DeleteMode) -> Vec<Row> {
    let mut per_key: BTreeMap<i64, Vec<&Change>> = BTreeMap::new();
    for c in changes {
        per_key.entry(c.k).or_default().push(c);
    }
    let mut out = Vec::new();
    for (k, mut cs) in per_key {
        cs.sort_by_key(|c| (c.ts, c.seq));
        // The state before each change: absent, deleted, or attribute values.
        let mut state: Option<(bool, Option<String>, Option<i64>)> = None;
        let mut versions: Vec<(&Change, bool)> = Vec::new();
        for c in cs {
            let effective = match (&state, c.del) {
                (None, true) => false,
                (Some((true, _, _)), true) => false,
                (_, true) => true,
                (None, false) | (Some((true, _, _)), false) => true,
                (Some((false, a, b)), false) => *a != c.a || *b != c.b,
            };
            if effective || state.is_none() {
                state = Some((c.del, c.a.clone(), c.b));
            }
            if effective {
                versions.push((c, c.del));
            }
        }
        let mut n = 0;
        for (i, (c, del)) in versions.iter().enumerate() {
            let next = versions.get(i + 1).map(|(n, _)| n.ts);
            if *del && mode == DeleteMode::Close {
                continue;
            }
            n += 1;
            out.push((k, c.a.clone(), c.b, c.ts, next, next.is_none(), n, *del));
        }
    }
    out.sort_by_key(|r| (r.0, r.3, r.6));
    out
}

fn batch(changes: &[Change]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("a", DataType::Utf8, true),
        Field::new("b", DataType::Int64, true),
        Field::new(TS, DataType::Int64, false),
        Field::new(SEQ, DataType::Int64, false),
        Field::new(DELETED, DataType::Boolean, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.k))),
            Arc::new(StringArray::from_iter(changes.iter().map(|c| c.a.clone()))),
            Arc::new(Int64Array::from_iter(changes.iter().map(|c| c.b))),
            Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.ts))),
            Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.seq))),
            Arc::new(BooleanArray::from_iter(changes.iter().map(|c| Some(c.del)))),
        ],
    )
    .unwrap()
}

async fn computed(changes: &[Change], mode: DeleteMode) -> Vec<Row> {
    let ctx = SessionContext::new();
    let df = ctx.read_batch(batch(changes)).unwrap();
    let scd = Scd2 {
        key: vec!["k".into()],
        tracked: vec![],
        deletes: mode,
        inferred: false,
        binary: Vec::new(),
    };
    let batches = scd
        .history(&ctx, df)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    rows_of(&batches)
}

fn rows_of(batches: &[RecordBatch]) -> Vec<Row> {
    let mut out = Vec::new();
    for b in batches {
        let i64s = |name: &str| {
            b.column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone()
        };
        let (k, bb, from, to, version) = (
            i64s("k"),
            i64s("b"),
            i64s("valid_from"),
            i64s("valid_to"),
            i64s("version"),
        );
        let a = b.column_by_name("a").unwrap();
        let a = a.as_any().downcast_ref::<StringArray>().unwrap();
        let current = b.column_by_name("is_current").unwrap();
        let current = current.as_any().downcast_ref::<BooleanArray>().unwrap();
        let deleted = b
            .column_by_name("is_deleted")
            .map(|c| c.as_any().downcast_ref::<BooleanArray>().unwrap().clone());
        for i in 0..b.num_rows() {
            out.push((
                k.value(i),
                a.is_valid(i).then(|| a.value(i).to_string()),
                bb.is_valid(i).then(|| bb.value(i)),
                from.value(i),
                to.is_valid(i).then(|| to.value(i)),
                current.value(i),
                version.value(i),
                deleted.as_ref().is_some_and(|d| d.value(i)),
            ));
        }
    }
    out.sort_by_key(|r| (r.0, r.3, r.6));
    out
}

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn change(k: i64, a: Option<&str>, b: Option<i64>, ts: i64, seq: i64, del: bool) -> Change {
    Change {
        k,
        a: a.map(str::to_string),
        b,
        ts,
        seq,
        del,
    }
}

#[tokio::test]
async fn random_change_streams_match_the_reference_in_any_row_order() {
    let values = [None, Some(""), Some("x"), Some("x|y"), Some("1:x")];
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n = rng.below(40) as usize;
        let mut changes: Vec<Change> = (0..n)
            .map(|i| {
                change(
                    rng.below(4) as i64,
                    values[rng.below(values.len() as u64) as usize],
                    [None, Some(0), Some(1)][rng.below(3) as usize],
                    rng.below(12) as i64,
                    i as i64,
                    rng.below(6) == 0,
                )
            })
            .collect();
        // Arrival order in the table does not matter, only `ts` and `seq`.
        for i in (1..changes.len()).rev() {
            changes.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for mode in [DeleteMode::Close, DeleteMode::Marker] {
            assert_eq!(
                computed(&changes, mode).await,
                reference(&changes, mode),
                "seed {seed}, {mode:?}: {changes:#?}"
            );
        }
    }
}

#[tokio::test]
async fn no_op_changes_make_no_version_and_nulls_are_values() {
    let changes = vec![
        change(1, Some("x"), None, 1, 1, false),
        change(1, Some("x"), None, 2, 2, false), // no-op
        change(1, Some(""), None, 3, 3, false),  // '' is not null
        change(1, None, None, 4, 4, false),      // null is not ''
        change(1, None, None, 5, 5, false),      // no-op
        change(1, None, Some(0), 6, 6, false),   // null -> 0 in another column
    ];
    let rows = computed(&changes, DeleteMode::Close).await;
    let starts: Vec<i64> = rows.iter().map(|r| r.3).collect();
    assert_eq!(starts, vec![1, 3, 4, 6]);
    assert_eq!(rows, reference(&changes, DeleteMode::Close));
    assert!(rows[3].5 && rows.iter().filter(|r| r.5).count() == 1);
}

#[tokio::test]
async fn a_late_change_lands_in_place_and_a_later_no_op_becomes_a_version() {
    // A at 1, A again at 3 (a no-op when it arrives); B arrives late, at 2.
    let mut changes = vec![
        change(7, Some("A"), None, 1, 1, false),
        change(7, Some("A"), None, 3, 2, false),
    ];
    assert_eq!(computed(&changes, DeleteMode::Close).await.len(), 1);
    changes.push(change(7, Some("B"), None, 2, 3, false));
    let rows = computed(&changes, DeleteMode::Close).await;
    let ranges: Vec<(Option<String>, i64, Option<i64>, i64)> =
        rows.iter().map(|r| (r.1.clone(), r.3, r.4, r.6)).collect();
    assert_eq!(
        ranges,
        vec![
            (Some("A".into()), 1, Some(2), 1),
            (Some("B".into()), 2, Some(3), 2),
            (Some("A".into()), 3, None, 3),
        ]
    );
}

#[tokio::test]
async fn same_time_changes_apply_in_arrival_order_and_deletes_close_or_mark() {
    let changes = vec![
        change(1, Some("a"), None, 5, 2, false),
        change(1, Some("b"), None, 5, 3, false),
        change(1, None, None, 8, 4, true),
        change(1, None, None, 9, 5, true), // deleting an absent key: nothing
        change(1, Some("b"), None, 10, 6, false),
    ];
    let close = computed(&changes, DeleteMode::Close).await;
    let got: Vec<(Option<String>, i64, Option<i64>, bool)> =
        close.iter().map(|r| (r.1.clone(), r.3, r.4, r.5)).collect();
    assert_eq!(
        got,
        vec![
            (Some("a".into()), 5, Some(5), false),
            (Some("b".into()), 5, Some(8), false),
            (Some("b".into()), 10, None, true),
        ]
    );
    let marker = computed(&changes, DeleteMode::Marker).await;
    assert_eq!(marker.len(), 4);
    assert!(marker.iter().any(|r| r.7 && r.3 == 8 && r.4 == Some(10)));
}

/// Applies `loads` (each a batch of changes, in order) to a dimension in a fresh lake and
/// returns the dimension's rows. A change's `seq` is its position in its load.
/// The dimension after applying `loads` in order.
async fn loaded(loads: &[Vec<Change>], mode: DeleteMode) -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let lake = weir_lake::Lake::new(dir.path().to_string_lossy().to_string());
    let dim = weir_config::Dimension {
        scd: weir_config::ScdType::Scd2,
        key: vec!["k".into()],
        tracked: vec![],
        change_ts: Some("ts".into()),
        deletes: mode,
        delete_flag: Some("del".into()),
        surrogate_key: "sk".into(),
        unknown_member: false,
        inferred_members: None,
    };
    for (n, changes) in loads.iter().enumerate() {
        let ctx = weir_lake::new_session();
        let b = batch(changes);
        let input = ctx
            .read_batch(b)
            .unwrap()
            .with_column_renamed(TS, "ts")
            .unwrap()
            .with_column_renamed(DELETED, "del")
            .unwrap();
        let load = apply::Load {
            txn: ("test".into(), n as i64 + 1),
            time: chrono::Utc::now(),
            rebuild: false,
            metadata: Default::default(),
        };
        apply::apply(&lake, &ctx, "d.dim", &dim, input, &load)
            .await
            .unwrap();
    }
    let ctx = crate::session::lake_session(&lake).await.unwrap();
    let batches = ctx
        .sql("select k, arrow_cast(a, 'Utf8') as a, b, valid_from, valid_to, is_current, version, is_deleted from d.dim")
        .await
        .or(ctx
            .sql("select k, arrow_cast(a, 'Utf8') as a, b, valid_from, valid_to, is_current, version from d.dim")
            .await)
        .unwrap()
        .collect()
        .await
        .unwrap();
    rows_of(&batches)
}

#[tokio::test]
async fn loads_in_any_split_and_order_give_the_reference_history() {
    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let n = 1 + rng.below(30) as usize;
        let changes = random_changes(&mut rng, n, 5, 10);
        // Random loads: each change goes to one of up to 4 loads; the loads then arrive
        // in a random order, so many changes are late.
        let parts = 1 + rng.below(4) as usize;
        let mut loads: Vec<Vec<Change>> = vec![Vec::new(); parts];
        for c in &changes {
            loads[rng.below(parts as u64) as usize].push(c.clone());
        }
        for i in (1..loads.len()).rev() {
            loads.swap(i, rng.below(i as u64 + 1) as usize);
        }
        loads.retain(|l| !l.is_empty());
        loads_match_the_reference(seed, loads).await;
    }
}

/// `n` random changes of `keys` keys at `times` times: values with null and `''`, one
/// in five a delete.
fn random_changes(rng: &mut Rng, n: usize, keys: u64, times: u64) -> Vec<Change> {
    let values = [None, Some(""), Some("x"), Some("y")];
    (0..n)
        .map(|_| {
            change(
                rng.below(keys) as i64,
                values[rng.below(values.len() as u64) as usize],
                [None, Some(1)][rng.below(2) as usize],
                rng.below(times) as i64,
                0,
                rng.below(5) == 0,
            )
        })
        .collect()
}

/// Applies `loads` in order (close deletes for even seeds, markers for odd) and compares
/// the dimension with the reference over every change at once.
async fn loads_match_the_reference(seed: u64, mut loads: Vec<Vec<Change>>) {
    let arrived = arrivals(&mut loads);
    let mode = if seed.is_multiple_of(2) {
        DeleteMode::Close
    } else {
        DeleteMode::Marker
    };
    assert_eq!(
        loaded(&loads, mode).await,
        reference(&arrived, mode),
        "seed {seed}, {mode:?}: {loads:#?}"
    );
}

/// Arrival order of `loads`: load number, then position in the load.
fn arrivals(loads: &mut [Vec<Change>]) -> Vec<Change> {
    let mut arrived = Vec::new();
    for (n, load) in loads.iter_mut().enumerate() {
        for (i, c) in load.iter_mut().enumerate() {
            c.seq = i as i64 + 1;
            let mut a = c.clone();
            a.seq = ((n as i64 + 1) << 32) + i as i64 + 1;
            arrived.push(a);
        }
    }
    arrived
}

/// Loads in time order (the usual daily load), some sharing a boundary time, now and then
/// two of them swapped: the same history as all changes at once.
#[tokio::test]
async fn loads_in_time_order_give_the_reference_history() {
    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n = 2 + rng.below(40) as usize;
        let mut changes = random_changes(&mut rng, n, 6, 12);
        changes.sort_by_key(|c| c.ts);
        // Consecutive slices of the time-ordered changes: a boundary time may be shared.
        let mut loads: Vec<Vec<Change>> = Vec::new();
        for c in changes {
            if loads.is_empty() || rng.below(4) == 0 {
                loads.push(Vec::new());
            }
            loads.last_mut().unwrap().push(c);
        }
        if loads.len() > 2 && rng.below(3) == 0 {
            let i = 1 + rng.below(loads.len() as u64 - 1) as usize;
            loads.swap(i, i - 1);
        }
        loads_match_the_reference(seed, loads).await;
    }
}

/// A key deleted and re-inserted with the same values at one time has two versions that
/// hash alike; a later load must still see the delete between them (and a key deleted
/// for good stays deleted until it comes back).
#[tokio::test]
async fn a_load_after_a_delete_and_reinsert_at_one_time() {
    let mut loads = vec![
        vec![
            change(1, Some("x"), None, 1, 0, false),
            change(1, None, None, 3, 0, true),
            change(1, Some("x"), None, 3, 0, false),
            change(2, Some("x"), None, 1, 0, false),
            change(2, None, None, 2, 0, true),
        ],
        vec![
            change(1, Some("y"), None, 5, 0, false),
            change(2, Some("x"), None, 6, 0, false),
        ],
    ];
    let arrived = arrivals(&mut loads);
    let rows = loaded(&loads, DeleteMode::Close).await;
    let expected = reference(&arrived, DeleteMode::Close);
    assert_eq!(rows, expected);
    assert_eq!(
        expected.iter().filter(|r| r.0 == 1).count(),
        3,
        "{expected:?}"
    );
}

//! Dimensional modeling helpers through the real binary.

use crate::{ok, query, weir, write};

#[test]
fn surrogate_keys_are_stable_and_tell_nulls_from_empty_strings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: dims\n");
    write(
        d,
        "models/keys.sql",
        "select id, code, {{ surrogate_key('id', 'code') }} as sk, {{ surrogate_key(['id']) }} as id_sk \
         from (values (1, 'a'), (1, ''), (1, null), (2, 'a'), (12, null)) as t(id, code)",
    );
    ok(&weir(d, &["run"]));
    let rows = query(
        d,
        "select id, code, sk, id_sk from analytics.keys order by id, code",
    );
    assert_eq!(rows.len(), 5);
    let sks: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["sk"].as_str().unwrap()).collect();
    assert_eq!(sks.len(), 5, "every row has its own key: {rows:?}");
    assert!(sks.iter().all(|k| k.len() == 32), "{sks:?}");
    // The same value hashes the same in every row and every run: id 1's key is md5('1:1').
    let ones: Vec<&serde_json::Value> = rows.iter().filter(|r| r["id"] == 1).collect();
    assert!(ones.iter().all(|r| r["id_sk"] == ones[0]["id_sk"]));
    let expected = query(d, "select md5('1:1') as h");
    assert_eq!(ones[0]["id_sk"], expected[0]["h"]);

    write(d, "models/bad.sql", "select {{ surrogate_key() }} as sk");
    let out = weir(d, &["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("surrogate_key() needs at least one column"),
        "{err}"
    );
}

/// `(key, attribute, valid_from, valid_to, is_current, version)` of a type 2 dimension.
fn versions(d: &std::path::Path, sql: &str) -> Vec<(i64, String, String, String, bool, i64)> {
    query(d, sql)
        .iter()
        .map(|r| {
            let text = |k: &str| match &r[k] {
                serde_json::Value::Null => "-".to_string(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (
                r["id"].as_i64().unwrap(),
                text("v"),
                text("valid_from"),
                text("valid_to"),
                r["is_current"].as_bool().unwrap(),
                r["version"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_scd2_pipeline_keeps_history_across_loads_with_late_and_no_op_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: dims\n");
    write(
        d,
        "pipelines/customers.yaml",
        "source:\n  type: files\n  path: data/*.csv\n\
         sink:\n  table: dim.customers\n  mode: scd2\n  key: [id]\n  change_ts: changed_at\n  delete_flag: gone\n",
    );
    let sql = "select id, city as v, cast(valid_from as varchar) as valid_from, \
               cast(valid_to as varchar) as valid_to, is_current, version \
               from dim.customers order by id, version";
    // Load 1: two customers; customer 1 changes twice within the load (applied in order).
    write(
        d,
        "data/1.csv",
        "id,city,changed_at,gone\n1,Oslo,2024-01-01T00:00:00,false\n2,Rome,2024-01-01T00:00:00,false\n1,Bergen,2024-01-05T00:00:00,false\n",
    );
    ok(&weir(d, &["run"]));
    // Load 2: a no-op for 2 (same city, later), a new customer, 2 deleted later on.
    write(
        d,
        "data/2.csv",
        "id,city,changed_at,gone\n2,Rome,2024-02-01T00:00:00,false\n3,Lima,2024-02-01T00:00:00,false\n2,,2024-03-01T00:00:00,true\n",
    );
    ok(&weir(d, &["run"]));
    // Load 3, late: customer 1 lived in Paris from Jan 3 to Jan 5 (between its versions).
    write(
        d,
        "data/3.csv",
        "id,city,changed_at,gone\n1,Paris,2024-01-03T00:00:00,false\n",
    );
    ok(&weir(d, &["run"]));
    let t = |s: &str| format!("2024-{s}T00:00:00");
    let got = versions(d, sql);
    assert_eq!(
        got,
        vec![
            (1, "Oslo".into(), t("01-01"), t("01-03"), false, 1),
            (1, "Paris".into(), t("01-03"), t("01-05"), false, 2),
            (1, "Bergen".into(), t("01-05"), "-".into(), true, 3),
            // The no-op on Feb 1 made no version; the delete closed the current one.
            (2, "Rome".into(), t("01-01"), t("03-01"), false, 1),
            (3, "Lima".into(), t("02-01"), "-".into(), true, 1),
        ]
    );
    // Every change received is kept, the no-op and the delete included.
    let changes = query(d, "select count(*) as n from dim.customers__changes");
    assert_eq!(changes[0]["n"], 7);
    // Surrogate keys: one per version, 32 hex characters, stable across loads.
    let sks = query(
        d,
        "select count(distinct sk) as n, min(length(sk)) as l from dim.customers",
    );
    assert_eq!(
        (sks[0]["n"].as_i64(), sks[0]["l"].as_i64()),
        (Some(5), Some(32))
    );
    let before = query(d, "select sk from dim.customers where id = 3");
    write(
        d,
        "data/4.csv",
        "id,city,changed_at,gone\n1,Bergen,2024-04-01T00:00:00,false\n",
    );
    ok(&weir(d, &["run"]));
    assert_eq!(
        query(d, "select sk from dim.customers where id = 3"),
        before
    );
    assert_eq!(versions(d, sql), got, "a no-op load changes nothing");
}

#[test]
fn a_star_schema_with_point_in_time_lookups_unknown_members_and_a_date_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: star\n");
    write(
        d,
        "pipelines/raw_customers.yaml",
        "source:\n  type: files\n  path: data/customers.csv\n  incremental: false\n\
         sink:\n  table: raw.customers\n  mode: overwrite\n",
    );
    write(
        d,
        "pipelines/raw_orders.yaml",
        "source:\n  type: files\n  path: data/orders.csv\n  incremental: false\n\
         sink:\n  table: raw.orders\n  mode: overwrite\n",
    );
    write(
        d,
        "models/dim_customer.sql",
        "{{ config(materialized='scd2', unique_key='customer_id', change_ts='updated_at', \
         unknown_member=true, surrogate_key='customer_sk') }}\n\
         select customer_id, city, updated_at from {{ source('raw', 'customers') }}",
    );
    write(
        d,
        "models/dim_date.sql",
        "{{ date_dimension('2024-01-01', '2024-12-31') }}",
    );
    write(
        d,
        "models/fct_sales.sql",
        "select o.order_id, coalesce(c.customer_sk, {{ unknown_key() }}) as customer_sk, \
           cast(to_char(o.ordered_at, '%Y%m%d') as int) as date_key, o.amount \
         from {{ source('raw', 'orders') }} o \
         left join {{ ref('dim_customer') }} c \
           on c.customer_id = o.customer_id and {{ as_of('c', 'o.ordered_at') }}",
    );
    write(
        d,
        "data/customers.csv",
        "customer_id,city,updated_at\n1,Oslo,2024-01-01T00:00:00\n2,Rome,2024-01-01T00:00:00\n",
    );
    write(
        d,
        "data/orders.csv",
        "order_id,customer_id,ordered_at,amount\n\
         10,1,2024-02-01T12:00:00,5\n11,1,2024-03-01T12:00:00,7\n12,9,2024-03-01T12:00:00,1\n13,2,2023-06-01T00:00:00,2\n",
    );
    ok(&weir(d, &["run"]));
    // Day two: customer 1 moved on Feb 15.
    write(
        d,
        "data/customers.csv",
        "customer_id,city,updated_at\n1,Bergen,2024-02-15T00:00:00\n2,Rome,2024-01-01T00:00:00\n",
    );
    ok(&weir(d, &["run"]));
    let sales = query(
        d,
        "select f.order_id, c.city, f.customer_sk, d.day_name, d.month_name from analytics.fct_sales f \
         join analytics.dim_customer c on c.customer_sk = f.customer_sk \
         left join analytics.dim_date d on d.date_key = f.date_key order by f.order_id",
    );
    let got: Vec<(i64, serde_json::Value, serde_json::Value)> = sales
        .iter()
        .map(|r| {
            (
                r["order_id"].as_i64().unwrap(),
                r["city"].clone(),
                r["day_name"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (10, "Oslo".into(), "Thursday".into()),
            (11, "Bergen".into(), "Friday".into()),
            // An unknown customer and an order before the customer's first version both
            // point at the unknown member, whose attributes are null.
            (12, serde_json::Value::Null, "Friday".into()),
            (13, serde_json::Value::Null, serde_json::Value::Null),
        ]
    );
    assert_eq!(sales[2]["customer_sk"], "-1");
    let dates = query(
        d,
        "select count(*) as n, sum(case when is_weekend then 1 else 0 end) as weekend, \
         max(day_of_year) as last, min(date_key) as first from analytics.dim_date",
    );
    assert_eq!(dates[0]["n"], 366);
    assert_eq!(dates[0]["weekend"], 104);
    assert_eq!(dates[0]["last"], 366);
    assert_eq!(dates[0]["first"], 20240101);
    // One unknown member, two versions of customer 1, one of customer 2.
    let dim = query(
        d,
        "select count(*) as n, sum(case when is_current then 1 else 0 end) as current \
         from analytics.dim_customer",
    );
    assert_eq!(
        (dim[0]["n"].as_i64(), dim[0]["current"].as_i64()),
        (Some(4), Some(3))
    );
}

#[test]
fn snapshots_close_vanished_keys_and_rebuild_from_past_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: snaps\n");
    // Past snapshots, one per day, all at once: 2 vanishes on day 2 and returns on day 3.
    write(
        d,
        "models/history.sql",
        "{{ config(materialized='snapshot', unique_key='id', change_ts='day') }}\n\
         select id, v, cast(day as date) as day from (values \
           (1, 'a', '2024-01-01'), (2, 'b', '2024-01-01'), \
           (1, 'a2', '2024-01-02'), \
           (1, 'a2', '2024-01-03'), (2, 'b', '2024-01-03')) as t(id, v, day)",
    );
    ok(&weir(d, &["run", "history"]));
    let sql = "select id, v, cast(valid_from as varchar) as valid_from, \
               cast(valid_to as varchar) as valid_to, is_current, version \
               from analytics.history order by id, version";
    let rebuilt = versions(d, sql);
    assert_eq!(
        rebuilt,
        vec![
            (
                1,
                "a".into(),
                "2024-01-01".into(),
                "2024-01-02".into(),
                false,
                1
            ),
            (1, "a2".into(), "2024-01-02".into(), "-".into(), true, 2),
            (
                2,
                "b".into(),
                "2024-01-01".into(),
                "2024-01-02".into(),
                false,
                1
            ),
            (2, "b".into(), "2024-01-03".into(), "-".into(), true, 2),
        ]
    );

    // Snapshotting a live table on each run: the load time is the snapshot's time.
    write(
        d,
        "models/live.sql",
        "select * from (values (1, 'x'), (2, 'y'), (3, 'z')) as t(id, v)",
    );
    write(
        d,
        "models/snap.sql",
        "{{ config(materialized='snapshot', unique_key='id') }}\nselect id, v from {{ ref('live') }}",
    );
    ok(&weir(d, &["run", "live", "snap"]));
    write(
        d,
        "models/live.sql",
        "select * from (values (1, 'x'), (3, 'z2')) as t(id, v)",
    );
    ok(&weir(d, &["run", "live", "snap"]));
    let rows = query(
        d,
        "select id, v, is_current, valid_to is null as open from analytics.snap order by id, version",
    );
    let got: Vec<(i64, &str, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["v"].as_str().unwrap(),
                r["is_current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "x", true),
            (2, "y", false),
            (3, "z", false),
            (3, "z2", true)
        ]
    );
}

#[test]
fn type_1_and_type_3_dimensions_keep_one_row_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: t13\n");
    let model =
        |values: &str| format!("select * from (values {values}) as t(product_id, name, category)");
    write(
        d,
        "models/src.sql",
        &model("(1, 'pen', 'office'), (2, 'cup', 'kitchen')"),
    );
    write(
        d,
        "models/p1.sql",
        "{{ config(materialized='scd1', unique_key='product_id') }}\nselect * from {{ ref('src') }}",
    );
    write(
        d,
        "models/p3.sql",
        "{{ config(materialized='scd3', unique_key='product_id', tracked='category') }}\nselect * from {{ ref('src') }}",
    );
    ok(&weir(d, &["run"]));
    let sk_before = query(d, "select sk from analytics.p1 where product_id = 1");
    write(
        d,
        "models/src.sql",
        &model("(1, 'pen', 'school'), (2, 'mug', 'kitchen')"),
    );
    ok(&weir(d, &["run"]));
    let p1 = query(
        d,
        "select product_id, name, category from analytics.p1 order by product_id",
    );
    assert_eq!(p1.len(), 2);
    assert_eq!(
        (p1[0]["category"].as_str(), p1[1]["name"].as_str()),
        (Some("school"), Some("mug"))
    );
    assert_eq!(
        query(d, "select sk from analytics.p1 where product_id = 1"),
        sk_before
    );
    let p3 = query(
        d,
        "select product_id, name, category, previous_category from analytics.p3 order by product_id",
    );
    // Product 1's category changed: the old one is kept beside it. Product 2's name is
    // not tracked: overwritten in place, no previous value.
    assert_eq!(p3[0]["category"], "school");
    assert_eq!(p3[0]["previous_category"], "office");
    assert_eq!(p3[1]["name"], "mug");
    assert_eq!(p3[1]["previous_category"], serde_json::Value::Null);
}

#[test]
fn dimension_mistakes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: bad\n");
    let fails = |sql: &str, expected: &str| {
        write(d, "models/m.sql", sql);
        let out = weir(d, &["run"]);
        assert!(!out.status.success(), "{sql}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
    };
    fails(
        "{{ config(materialized='scd2') }}\nselect 1 as id",
        "needs a key",
    );
    fails(
        "{{ config(materialized='scd2', unique_key='id') }}\nselect cast(null as int) as id, 'a' as v",
        "have no key",
    );
    fails(
        "{{ config(materialized='scd2', unique_key='id') }}\nselect 1 as id, 'a' as valid_from",
        "a name the dimension keeps for itself",
    );
    fails(
        "{{ config(materialized='scd2', unique_key='id', change_ts='changed') }}\nselect 1 as id",
        "`change_ts` column `changed` is not in the dimension's input",
    );
    assert!(!d.join("lake/analytics/m").exists(), "nothing was written");
}

#[test]
fn inferred_members_are_filled_in_when_the_real_row_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "weir.yaml", "name: inferred\n");
    write(
        d,
        "models/orders.sql",
        "select * from (values (1, 7, timestamp '2024-03-01 10:00:00'), (2, 9, timestamp '2024-03-02 10:00:00')) \
         as t(order_id, customer_id, ordered_at)",
    );
    write(
        d,
        "models/customers.sql",
        "select * from (values (7, 'Oslo', timestamp '2024-01-01 00:00:00')) as t(customer_id, city, updated_at)",
    );
    write(
        d,
        "models/dim_customer.sql",
        "{{ config(materialized='scd2', unique_key='customer_id', change_ts='updated_at', \
         inferred_members='orders') }}\nselect * from {{ ref('customers') }}",
    );
    write(
        d,
        "models/fct_orders.sql",
        "select o.order_id, c.sk from {{ ref('orders') }} o left join {{ ref('dim_customer') }} c \
         on c.customer_id = o.customer_id and {{ as_of('c', 'o.ordered_at') }}",
    );
    ok(&weir(d, &["run"]));
    let dim =
        "select customer_id, city, is_inferred, cast(valid_from as varchar) as valid_from, sk \
               from analytics.dim_customer order by customer_id";
    let rows = query(d, dim);
    assert_eq!(rows.len(), 2, "{rows:?}");
    // Customer 9 is only known from an order: an inferred member, valid from the start.
    assert_eq!(rows[1]["customer_id"], 9);
    assert_eq!(rows[1]["city"], serde_json::Value::Null);
    assert_eq!(rows[1]["is_inferred"], true);
    assert_eq!(rows[1]["valid_from"], "1900-01-01T00:00:00");
    assert_eq!(rows[0]["is_inferred"], false);
    let facts = query(
        d,
        "select order_id, sk from analytics.fct_orders order by order_id",
    );
    assert_eq!(
        facts[1]["sk"], rows[1]["sk"],
        "the fact found the inferred member"
    );

    // The real row arrives (changed after the order): the inferred row is filled in, its
    // surrogate key stays, so the fact keeps pointing at it.
    write(
        d,
        "models/customers.sql",
        "select * from (values (7, 'Oslo', timestamp '2024-01-01 00:00:00'), \
         (9, 'Lima', timestamp '2024-03-05 00:00:00')) as t(customer_id, city, updated_at)",
    );
    ok(&weir(d, &["run", "customers+"]));
    let after = query(d, dim);
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[1]["city"], "Lima");
    assert_eq!(after[1]["is_inferred"], false);
    assert_eq!(after[1]["sk"], rows[1]["sk"]);
    let joined = query(
        d,
        "select c.city from analytics.fct_orders f join analytics.dim_customer c on c.sk = f.sk where f.order_id = 2",
    );
    assert_eq!(joined[0]["city"], "Lima");
}

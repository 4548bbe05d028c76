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

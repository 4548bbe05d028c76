//! Change data capture groundwork: a `pgoutput` slot on the test server, read without
//! moving it, decoded, then advanced.

use weir_connectors::postgres::cdc::{self, Message, Value};

#[test]
fn pgoutput_changes_are_decoded_and_the_slot_moves_only_when_told() {
    let pg = weir_test::PgServer::shared();
    let db = pg.fresh_database("cdc").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={} password={} dbname={db}",
                pg.port(),
                pg.user(),
                weir_test::PgServer::PASSWORD
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "CREATE TABLE public.items (id bigint PRIMARY KEY, name text, body text);
                 ALTER TABLE public.items ALTER COLUMN body SET STORAGE EXTERNAL;",
            )
            .await
            .unwrap();
        let slot = format!("weir_{db}");
        let start = cdc::ensure_slot(&client, "weir_pub", &slot, &["public.items".into()])
            .await
            .unwrap();
        assert!(start > 0);
        // Again: both exist, nothing changes.
        assert_eq!(
            cdc::ensure_slot(&client, "weir_pub", &slot, &["public.items".into()])
                .await
                .unwrap(),
            start
        );
        let big = "x".repeat(100_000); // TOASTed, out of line
        client
            .execute(
                "INSERT INTO items VALUES (1, 'one', $1), (2, 'two', NULL)",
                &[&big],
            )
            .await
            .unwrap();
        client
            .batch_execute(
                "BEGIN; UPDATE items SET name = 'uno' WHERE id = 1; DELETE FROM items WHERE id = 2; COMMIT;
                 TRUNCATE items;",
            )
            .await
            .unwrap();
        let changes = cdc::peek(&client, &slot, "weir_pub", 1_000).await.unwrap();
        let kinds: Vec<&str> = changes
            .iter()
            .map(|(_, m)| match m {
                Message::Begin { .. } => "B",
                Message::Commit { .. } => "C",
                Message::Relation(_) => "R",
                Message::Insert { .. } => "I",
                Message::Update { .. } => "U",
                Message::Delete { .. } => "D",
                Message::Truncate { .. } => "T",
                Message::Other(_) => "?",
            })
            .collect();
        assert_eq!(kinds.join(""), "BRIICBUDCBRTC", "{changes:?}");
        let rel = changes
            .iter()
            .find_map(|(_, m)| match m {
                Message::Relation(r) => Some(r.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!((rel.schema.as_str(), rel.name.as_str()), ("public", "items"));
        let cols: Vec<(&str, bool)> = rel.columns.iter().map(|c| (c.name.as_str(), c.key)).collect();
        assert_eq!(cols, [("id", true), ("name", false), ("body", false)]);
        match &changes[2].1 {
            Message::Insert { new, .. } => {
                assert_eq!(new[0], Value::Text("1".into()));
                assert_eq!(new[2], Value::Text(big.clone()));
            }
            other => panic!("{other:?}"),
        }
        match &changes[6].1 {
            // The unchanged TOASTed body is not sent: the previous row's value stands.
            Message::Update { new, .. } => {
                assert_eq!(new[1], Value::Text("uno".into()));
                assert_eq!(new[2], Value::Unchanged);
            }
            other => panic!("{other:?}"),
        }
        match &changes[7].1 {
            Message::Delete { old, .. } => assert_eq!(old[0], Value::Text("2".into())),
            other => panic!("{other:?}"),
        }
        // Peeking again reads the same; after advancing past the first transaction, only
        // the later ones remain.
        let again = cdc::peek(&client, &slot, "weir_pub", 1_000).await.unwrap();
        assert_eq!(again.len(), changes.len());
        let Message::Commit { end_lsn, .. } = changes[4].1 else {
            panic!("{:?}", changes[4]);
        };
        cdc::advance(&client, &slot, end_lsn).await.unwrap();
        let rest = cdc::peek(&client, &slot, "weir_pub", 1_000).await.unwrap();
        // A new decoding session sends the table's Relation again before its first change.
        assert!(matches!(rest[0].1, Message::Begin { .. }), "{rest:?}");
        assert!(matches!(rest[1].1, Message::Relation(_)), "{rest:?}");
        assert!(matches!(rest[2].1, Message::Update { .. }), "{rest:?}");
        assert_eq!(rest.len(), changes.len() - 5 + 1);
        client
            .query("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .unwrap();
    });
}

//! Publishing a stream's committed rows to a Kafka topic, exactly once.
//!
//! Each commit's rows go out in one Kafka transaction (`transactional.id` =
//! `weir-<stream>-<topic>`, unless `options` set one), which also commits the commit's epoch as the offset of group
//! `weir-<stream>-publish` on partition 0 of the topic: the record of what is published,
//! atomic with the records themselves. A new producer with the same transactional id fences
//! the old one and aborts its open transaction, so readers with
//! `isolation.level=read_committed` see each commit's rows once.

use std::time::Duration;

use arrow::array::RecordBatch;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir_common::Error;
use weir_config::{Delivery, KafkaSinkConfig, KafkaSourceConfig, SinkFormat};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A transactional producer for one stream's output topic.
pub struct Publisher {
    producer: ThreadedProducer<DefaultProducerContext>,
    /// A member of the publish group (never subscribed): its group metadata goes into each
    /// transaction, and it reads what was published.
    marker: BaseConsumer,
    topic: String,
    key: Vec<String>,
    transactions: bool,
    /// With `format: avro`: where the rows' schema is registered.
    avro: Option<AvroOut>,
}

/// Avro output: the registry, and the ids of the schemas registered so far.
struct AvroOut {
    registry: url::Url,
    client: reqwest::Client,
    subject: String,
    ids: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

fn kafka_error(what: &str, topic: &str, e: impl std::fmt::Display) -> Error {
    Error::external(format!("Kafka sink `{topic}`: {what}: {e}"))
        .with_hint("check `sink.kafka` (brokers, topic, options)")
}

impl Publisher {
    /// Connects, fences any earlier producer of `stream` and checks the topic exists.
    pub fn connect(
        cfg: &KafkaSinkConfig,
        source: &KafkaSourceConfig,
        stream: &str,
    ) -> Result<Publisher, Error> {
        let brokers = cfg
            .brokers
            .clone()
            .unwrap_or_else(|| source.brokers.clone());
        let topic = cfg.topic.clone();
        let mut p = ClientConfig::new();
        for (k, v) in &cfg.options {
            p.set(k, v);
        }
        let transactions = cfg.delivery == Delivery::ExactlyOnce;
        p.set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true");
        // The producer's identity across restarts: the stream and its topic, as the publish
        // group's record is. With the stream's name alone, two projects' streams of one name
        // on one cluster would fence each other's transactions.
        if transactions && !cfg.options.contains_key("transactional.id") {
            p.set("transactional.id", format!("weir-{stream}-{topic}"));
        }
        let producer: ThreadedProducer<DefaultProducerContext> = p
            .create()
            .map_err(|e| kafka_error("creating the producer", &topic, e))?;
        let mut c = ClientConfig::new();
        for (k, v) in &cfg.options {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &brokers)
            .set("group.id", format!("weir-{stream}-publish"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        let marker: BaseConsumer = c
            .create()
            .map_err(|e| kafka_error("creating the publish group's client", &topic, e))?;
        let metadata = marker
            .fetch_metadata(Some(&topic), TIMEOUT)
            .map_err(|e| kafka_error("reading the topic's metadata", &topic, e))?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(Error::user(format!(
                "Kafka sink: topic `{topic}` does not exist on {brokers}"
            ))
            .with_hint("create the topic, or fix `sink.kafka.topic`"));
        }
        if transactions {
            producer
                .init_transactions(TIMEOUT)
                .map_err(|e| kafka_error("starting transactions", &topic, e))
                .map_err(|e| {
                    e.with_hint("the broker must support transactions (Kafka 0.11 or later); or set `sink.kafka.delivery: at_least_once`")
                })?;
        }
        let avro = match (cfg.format, &cfg.registry) {
            (SinkFormat::Json, _) => None,
            (SinkFormat::Avro, None) => {
                return Err(Error::user(
                    "sink.kafka: `format: avro` needs `registry` (the schema registry the rows' schema is registered in)",
                ))
            }
            (SinkFormat::Avro, Some(r)) => Some(AvroOut {
                registry: url::Url::parse(r).map_err(|e| {
                    Error::user(format!("sink.kafka.registry `{r}` is not a URL: {e}"))
                })?,
                client: reqwest::Client::builder()
                    .timeout(TIMEOUT)
                    .build()
                    .map_err(|e| Error::internal(format!("HTTP client: {e}")))?,
                subject: format!("{topic}-value"),
                ids: Default::default(),
            }),
        };
        Ok(Publisher {
            producer,
            marker,
            topic,
            key: cfg.key.clone(),
            transactions,
            avro,
        })
    }

    /// The epoch of the last commit published, if any was.
    pub fn published(&self) -> Result<Option<i64>, Error> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, 0);
        let got = self
            .marker
            .committed_offsets(tpl, TIMEOUT)
            .map_err(|e| kafka_error("reading what was published", &self.topic, e))?;
        Ok(got.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(n) => Some(n),
            _ => None,
        }))
    }

    /// Publishes the rows of commit `epoch` and records the epoch, in one transaction.
    /// Returns the records sent.
    pub fn publish(&self, epoch: i64, rows: &[RecordBatch]) -> Result<u64, Error> {
        let messages = match &self.avro {
            None => messages(rows, &self.key)?,
            Some(a) => {
                let keys = keys(rows, &self.key)?;
                let values = a.encode(rows)?;
                match keys {
                    Some(k) => k.into_iter().map(Some).zip(values).collect(),
                    None => values.into_iter().map(|v| (None, v)).collect(),
                }
            }
        };
        let fail = |what: &str, e: rdkafka::error::KafkaError| {
            if self.transactions {
                let _ = self.producer.abort_transaction(TIMEOUT);
            }
            kafka_error(what, &self.topic, e)
        };
        if self.transactions {
            self.producer
                .begin_transaction()
                .map_err(|e| kafka_error("beginning a transaction", &self.topic, e))?;
        }
        for (key, value) in &messages {
            let mut record = BaseRecord::<Vec<u8>, Vec<u8>>::to(&self.topic).payload(value);
            if let Some(k) = key {
                record = record.key(k);
            }
            let mut record = Some(record);
            while let Some(r) = record.take() {
                match self.producer.send(r) {
                    Ok(()) => {}
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        std::thread::sleep(Duration::from_millis(10));
                        record = Some(back);
                    }
                    Err((e, _)) => return Err(fail("sending", e)),
                }
            }
        }
        let mut marker = TopicPartitionList::new();
        marker
            .add_partition_offset(&self.topic, 0, Offset::Offset(epoch))
            .map_err(|e| fail("recording the epoch", e))?;
        if !self.transactions {
            // At least once: the records are on the broker before the epoch is recorded.
            self.producer
                .flush(TIMEOUT)
                .map_err(|e| kafka_error("sending", &self.topic, e))?;
            self.marker
                .commit(&marker, rdkafka::consumer::CommitMode::Sync)
                .map_err(|e| kafka_error("recording the epoch", &self.topic, e))?;
            return Ok(messages.len() as u64);
        }
        let group = self
            .marker
            .group_metadata()
            .ok_or_else(|| kafka_error("recording the epoch", &self.topic, "no group metadata"))?;
        self.producer
            .send_offsets_to_transaction(&marker, &group, TIMEOUT)
            .map_err(|e| fail("recording the epoch", e))?;
        self.producer
            .commit_transaction(TIMEOUT)
            .map_err(|e| fail("committing the transaction", e))?;
        Ok(messages.len() as u64)
    }
}

/// Rows as lines of JSON, one per row.
fn json_lines(batches: &[RecordBatch]) -> Result<Vec<Vec<u8>>, Error> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
        for b in batches {
            w.write(b)
                .map_err(|e| Error::internal(format!("rows as JSON: {e}")))?;
        }
        w.finish()
            .map_err(|e| Error::internal(format!("rows as JSON: {e}")))?;
    }
    // The writer emits one line per row (`{}` when every column is null).
    Ok(buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Each row's key (see [`KafkaSinkConfig::key`]); `None` without key columns.
fn keys(rows: &[RecordBatch], key: &[String]) -> Result<Option<Vec<Vec<u8>>>, Error> {
    if key.is_empty() {
        return Ok(None);
    }
    let mut keyed = Vec::new();
    for b in rows {
        let idx = key
            .iter()
            .map(|k| {
                b.schema().index_of(k).map_err(|_| {
                    Error::user(format!("sink.kafka.key: `{k}` is not a column of the rows"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        keyed.push(
            b.project(&idx)
                .map_err(|e| Error::internal(format!("keys: {e}")))?,
        );
    }
    let keys = json_lines(&keyed)?.into_iter().map(|k| {
        if key.len() > 1 {
            return k;
        }
        // One column: its value as text.
        match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&k) {
            Ok(m) => match m.into_iter().next().map(|(_, v)| v) {
                Some(serde_json::Value::String(s)) => s.into_bytes(),
                Some(v) => v.to_string().into_bytes(),
                None => Vec::new(),
            },
            Err(_) => k,
        }
    });
    Ok(Some(keys.collect()))
}

/// One JSON object per row, with its key.
#[allow(clippy::type_complexity)]
fn messages(
    rows: &[RecordBatch],
    key: &[String],
) -> Result<Vec<(Option<Vec<u8>>, Vec<u8>)>, Error> {
    let values = json_lines(rows)?;
    Ok(match keys(rows, key)? {
        Some(k) => k.into_iter().map(Some).zip(values).collect(),
        None => values.into_iter().map(|v| (None, v)).collect(),
    })
}

impl AvroOut {
    /// Each row in the Confluent wire format, under the id of the rows' schema.
    fn encode(&self, rows: &[RecordBatch]) -> Result<Vec<Vec<u8>>, Error> {
        use arrow_avro::schema::{AvroSchema, FingerprintStrategy};
        use arrow_avro::writer::{format::AvroSoeFormat, WriterBuilder};
        let fail = |e: arrow_avro::errors::AvroError| Error::internal(format!("rows as Avro: {e}"));
        let mut out = Vec::new();
        for b in rows.iter().filter(|b| b.num_rows() > 0) {
            let schema = arrow::datatypes::Schema::new(b.schema().fields().clone());
            let avro = AvroSchema::try_from(&schema).map_err(|e| {
                Error::user(format!("sink.kafka: the rows have no Avro schema: {e}"))
            })?;
            let id = self.register(&avro.json_string)?;
            let mut enc = WriterBuilder::new(schema)
                .with_fingerprint_strategy(FingerprintStrategy::Id(id))
                .build_encoder::<AvroSoeFormat>()
                .map_err(fail)?;
            enc.encode(b).map_err(fail)?;
            out.extend(enc.flush().iter().map(|r| r.to_vec()));
        }
        Ok(out)
    }

    /// The registry's id for `schema` (registered under the subject on first use).
    fn register(&self, schema: &str) -> Result<u32, Error> {
        if let Some(id) = self
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(schema)
        {
            return Ok(*id);
        }
        let (url, req) = crate::avro::registry_request(
            &self.client,
            reqwest::Method::POST,
            &self.registry,
            &format!("subjects/{}/versions", self.subject),
        )?;
        let req = req
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(serde_json::json!({ "schema": schema }).to_string());
        let failed = |e: String| {
            Error::external(format!("schema registry {url}: {e}"))
                .with_hint("check `sink.kafka.registry`")
        };
        let answer = tokio::runtime::Handle::current().block_on(async {
            let resp = req.send().await.map_err(|e| failed(e.to_string()))?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| failed(e.to_string()))?;
            match status.is_success() {
                true => Ok(body),
                false => Err(failed(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body)
                ))),
            }
        })?;
        let id = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["id"].as_u64())
            .ok_or_else(|| failed("the answer has no `id`".into()))? as u32;
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(schema.to_string(), id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn rows_become_json_records_with_keys() {
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("user", DataType::Utf8, true),
                Field::new("n", DataType::Int64, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec![Some("ann"), Some("bob")])),
                Arc::new(Int64Array::from(vec![3, 4])),
            ],
        )
        .unwrap();
        let m = messages(std::slice::from_ref(&b), &["user".into()]).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0.as_deref(), Some(&b"ann"[..]));
        assert_eq!(m[1].1, br#"{"user":"bob","n":4}"#.to_vec());
        let m = messages(&[b], &["n".into(), "user".into()]).unwrap();
        assert_eq!(m[0].0.as_deref(), Some(&br#"{"n":3,"user":"ann"}"#[..]));
    }
}

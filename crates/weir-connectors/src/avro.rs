//! Avro record values: the Confluent wire format (a zero byte, a 4-byte big-endian schema
//! id, the Avro body) with schemas from a schema registry, or bare bodies of one schema
//! file. Decoding is arrow-avro's; writer schemas are resolved to one reader schema (the
//! schema file, else the newest registry schema seen), so the columns stay the same when
//! producers move to a newer compatible schema.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use weir_common::Error;
use weir_config::{AvroConfig, AvroFraming};

/// The id a schema file is known by when values carry no framing.
const FILE_SCHEMA_ID: u32 = 0;

/// A request to `path` of schema registry `base`: credentials in the URL
/// (`https://user:password@host`) become basic auth. Returns the URL without them (for
/// messages) and the request.
pub(crate) fn registry_request(
    client: &reqwest::Client,
    method: reqwest::Method,
    base: &url::Url,
    path: &str,
) -> Result<(url::Url, reqwest::RequestBuilder), Error> {
    let mut url = base
        .join(path)
        .map_err(|e| Error::internal(format!("registry URL: {e}")))?;
    let user = url.username().to_string();
    let password = url.password().map(str::to_string);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let mut req = client.request(method, url.clone());
    if !user.is_empty() {
        req = req.basic_auth(user, password);
    }
    Ok((url, req))
}

/// The schemas Avro values are decoded with.
pub struct AvroSchemas {
    registry: Option<Registry>,
    framing: AvroFraming,
    /// The schema file's schema: the reader schema.
    reader: Option<AvroSchema>,
    /// Writer schemas by id.
    writers: BTreeMap<u32, AvroSchema>,
    /// Ids the registry does not know, with its answer.
    unknown: BTreeMap<u32, String>,
}

impl std::fmt::Debug for AvroSchemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroSchemas")
            .field("ids", &self.writers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Registry {
    base: url::Url,
    client: reqwest::Client,
}

impl AvroSchemas {
    /// The schemas of `cfg`; `root` is the project directory (for `schema_file`).
    pub fn new(cfg: &AvroConfig, root: &Path) -> Result<AvroSchemas, Error> {
        let reader = match &cfg.schema_file {
            Some(f) => {
                let path = root.join(f);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::io(format!("Avro schema {}", path.display()), e))?;
                if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
                    return Err(Error::user(format!(
                        "Avro schema {} is not JSON: {e}",
                        path.display()
                    )));
                }
                Some(AvroSchema::new(text))
            }
            None => None,
        };
        let registry = match &cfg.registry {
            Some(u) => {
                let base = url::Url::parse(u).map_err(|e| {
                    Error::user(format!("source.avro.registry `{u}` is not a URL: {e}"))
                })?;
                let client = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(30))
                    .build()
                    .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
                Some(Registry { base, client })
            }
            None => None,
        };
        let mut writers = BTreeMap::new();
        match (cfg.framing, &registry, &reader) {
            (AvroFraming::None, _, Some(r)) => {
                writers.insert(FILE_SCHEMA_ID, r.clone());
            }
            (AvroFraming::None, _, None) => {
                return Err(Error::user(
                    "source.avro: bare Avro values (`framing: none`) need `schema_file`",
                ))
            }
            (AvroFraming::Confluent, None, None) => {
                return Err(Error::user(
                    "source.avro: Confluent-framed values need `registry` (or `schema_file` for one known schema)",
                ))
            }
            (AvroFraming::Confluent, None, Some(_)) => {}
            (AvroFraming::Confluent, Some(_), _) => {}
        }
        Ok(AvroSchemas {
            registry,
            framing: cfg.framing,
            reader,
            writers,
            unknown: BTreeMap::new(),
        })
    }

    /// The schema id a framed value names, or why it has none.
    fn id_of(&self, value: &[u8]) -> Result<u32, String> {
        if self.framing == AvroFraming::None {
            return Ok(FILE_SCHEMA_ID);
        }
        match value {
            [0, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            [] => Err("the value is empty".into()),
            [m, ..] if *m != 0 => Err(format!(
                "the value does not start with the Confluent magic byte 0 (it starts with {m})"
            )),
            _ => Err("the value is shorter than the Confluent header".into()),
        }
    }

    /// Looks up the schema ids of `values` not known yet. An id the registry does not
    /// have makes its records bad rows; a registry that cannot be reached is an error.
    pub async fn fetch<'a>(
        &mut self,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), Error> {
        let mut wanted = std::collections::BTreeSet::new();
        for v in values {
            if let Ok(id) = self.id_of(v) {
                if !self.writers.contains_key(&id) && !self.unknown.contains_key(&id) {
                    wanted.insert(id);
                }
            }
        }
        for id in wanted {
            let Some(reg) = &self.registry else {
                // A schema file only: it is the writer schema of every id.
                if let Some(r) = &self.reader {
                    self.writers.insert(id, r.clone());
                }
                continue;
            };
            let (url, req) = registry_request(
                &reg.client,
                reqwest::Method::GET,
                &reg.base,
                &format!("schemas/ids/{id}"),
            )?;
            let failed = |e: String| {
                Error::external(format!("schema registry {url}: {e}"))
                    .with_hint("check `source.avro.registry`")
            };
            let resp = req.send().await.map_err(|e| failed(e.to_string()))?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| failed(e.to_string()))?;
            if status == reqwest::StatusCode::NOT_FOUND {
                self.unknown.insert(
                    id,
                    format!(
                        "schema id {id} is not in the registry: {}",
                        String::from_utf8_lossy(&body)
                    ),
                );
                continue;
            }
            if !status.is_success() {
                return Err(failed(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| failed(format!("not JSON: {e}")))?;
            if v.get("schemaType")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t != "AVRO")
            {
                self.unknown
                    .insert(id, format!("schema id {id} is not an Avro schema"));
                continue;
            }
            let schema = v["schema"]
                .as_str()
                .ok_or_else(|| failed("the answer has no `schema`".into()))?;
            self.writers.insert(id, AvroSchema::new(schema.to_string()));
        }
        Ok(())
    }

    /// The reader schema: the schema file's, else the newest writer schema known.
    fn reader(&self) -> Option<&AvroSchema> {
        self.reader
            .as_ref()
            .or_else(|| self.writers.values().next_back())
    }

    /// Decodes `values` (all already [fetched](AvroSchemas::fetch)): per value, `None`
    /// when it became a row or why it did not; and the rows.
    pub fn decode(&self, values: &[&[u8]]) -> Result<(Vec<Option<String>>, RecordBatch), Error> {
        let mut verdicts: Vec<Option<String>> = Vec::with_capacity(values.len());
        let mut framed: Vec<std::borrow::Cow<[u8]>> = Vec::with_capacity(values.len());
        for v in values {
            match self.id_of(v) {
                Ok(id) if self.writers.contains_key(&id) => {
                    verdicts.push(None);
                    framed.push(match self.framing {
                        AvroFraming::Confluent => std::borrow::Cow::Borrowed(*v),
                        AvroFraming::None => {
                            let mut f = vec![0u8];
                            f.extend(FILE_SCHEMA_ID.to_be_bytes());
                            f.extend_from_slice(v);
                            std::borrow::Cow::Owned(f)
                        }
                    });
                }
                Ok(id) => verdicts.push(Some(
                    self.unknown
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| format!("schema id {id} is unknown")),
                )),
                Err(e) => verdicts.push(Some(e)),
            }
        }
        let schema = self.arrow_schema()?;
        let good: Vec<&[u8]> = framed.iter().map(|f| f.as_ref()).collect();
        // Together first; one by one only when that fails, to find the bad values.
        if let Ok(batch) = self.decode_all(&good, &schema) {
            return Ok((verdicts, batch));
        }
        let mut rows = Vec::new();
        let mut at = 0;
        for verdict in verdicts.iter_mut() {
            if verdict.is_some() {
                continue;
            }
            match self.decode_all(&good[at..at + 1], &schema) {
                Ok(b) => rows.push(b),
                Err(e) => *verdict = Some(format!("the value is not valid Avro: {e}")),
            }
            at += 1;
        }
        let batch = arrow::compute::concat_batches(&schema, &rows)
            .map_err(|e| Error::internal(format!("Avro rows: {e}")))?;
        Ok((verdicts, batch))
    }

    /// The columns values decode to (the reader schema's fields, nullable).
    pub fn arrow_schema(&self) -> Result<SchemaRef, Error> {
        let Some(reader) = self.reader() else {
            return Ok(Arc::new(Schema::empty()));
        };
        let schema = self.builder(reader)?.build_decoder().map(|d| d.schema());
        let schema = schema.map_err(|e| Error::user(format!("Avro schema: {e}")))?;
        Ok(Arc::new(Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        )))
    }

    fn builder(&self, reader: &AvroSchema) -> Result<ReaderBuilder, Error> {
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        for (id, s) in &self.writers {
            store
                .set(Fingerprint::Id(*id), s.clone())
                .map_err(|e| Error::internal(format!("Avro schemas: {e}")))?;
        }
        let first = self
            .writers
            .keys()
            .next()
            .copied()
            .unwrap_or(FILE_SCHEMA_ID);
        if self.writers.is_empty() {
            store
                .set(Fingerprint::Id(first), reader.clone())
                .map_err(|e| Error::internal(format!("Avro schemas: {e}")))?;
        }
        Ok(ReaderBuilder::new()
            .with_writer_schema_store(store)
            .with_active_fingerprint(Fingerprint::Id(first))
            .with_reader_schema(reader.clone()))
    }

    fn decode_all(&self, values: &[&[u8]], schema: &SchemaRef) -> Result<RecordBatch, String> {
        let reader = self.reader().ok_or("no schema")?;
        let mut dec = self
            .builder(reader)
            .map_err(|e| e.to_string())?
            .with_batch_size(values.len().clamp(1, 8192))
            .build_decoder()
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for v in values {
            let mut at = 0;
            while at < v.len() {
                let n = dec.decode(&v[at..]).map_err(|e| e.to_string())?;
                at += n;
                if n == 0 {
                    // A full batch, or a schema switch: flush and go on; twice in a row
                    // means the value is cut short.
                    match dec.flush().map_err(|e| e.to_string())? {
                        Some(b) => out.push(b),
                        None => return Err("the value is cut short".into()),
                    }
                }
            }
        }
        while let Some(b) = dec.flush().map_err(|e| e.to_string())? {
            out.push(b);
        }
        let out: Vec<RecordBatch> = out
            .into_iter()
            .map(|b| {
                RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        let batch = arrow::compute::concat_batches(schema, &out).map_err(|e| e.to_string())?;
        if batch.num_rows() != values.len() {
            return Err(format!(
                "{} values gave {} rows",
                values.len(),
                batch.num_rows()
            ));
        }
        Ok(batch)
    }
}

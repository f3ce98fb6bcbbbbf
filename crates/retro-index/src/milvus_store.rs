//! Keys in Milvus (feature `milvus`), through the official Rust client (`milvus-sdk-rust`, its
//! v1 API, which speaks the gRPC service of Milvus 2.3 and later).
//!
//! The collection holds one row per chunk: `chunk` (primary key, the chunk id), `document`,
//! `start` (the chunk's first token within its document) and `key` (the unit key). Chunk tokens
//! and documents stay in the database folder. Searches use the inner product over unit keys (the
//! order of the embedded index's `unit-l2`; a hit's distance is `1 - score`), and the
//! same-document filter runs inside Milvus as a boolean expression on `document` and `start`, so
//! a filtered search returns exactly k hits whenever k exist.

use crate::error::{IndexError, Result};
use crate::hnsw::Hit;
use crate::ids::{ChunkId, DatabaseId};
use crate::key_index::{
    check_filters, IndexDescription, KeyFilter, KeyIndex, KeyIndexBuilder, KeyRef,
};
use crate::queries::Queries;
use crate::vector_store::{
    collection_description, MilvusIndexParams, MilvusLocation, MilvusOptions, VectorStoreRecord,
};
use milvus::client::Client;
use milvus::data::FieldColumn;
use milvus::index::{IndexParams, IndexType, MetricType};
use milvus::query::SearchOptions;
use milvus::schema::{CollectionSchema, CollectionSchemaBuilder, FieldSchema};
use milvus::v1::value::Value;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

const CHUNK: &str = "chunk";
const DOCUMENT: &str = "document";
const START: &str = "start";
const KEY: &str = "key";
/// Milvus' metric for unit keys.
pub const METRIC: &str = "IP";
/// Milvus caps topk at 16,384.
const MAX_K: usize = 16_384;

fn store_error(loc: &MilvusLocation, what: &str, e: impl std::fmt::Display) -> IndexError {
    IndexError::Store {
        location: loc.to_string(),
        message: format!("{what}: {e}"),
    }
}

/// Connection errors and an unavailable server are worth another attempt; a refused request is not.
fn transient(e: &milvus::v1::error::Error) -> bool {
    use milvus::v1::error::Error as E;
    match e {
        E::Communication(_) => true,
        E::Grpc(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
        ),
        _ => false,
    }
}

/// A connection to one collection, with its own small runtime: the rest of the project is
/// synchronous, and every call here blocks until Milvus answers or the attempts run out.
struct Connection {
    rt: tokio::runtime::Runtime,
    client: Client,
    loc: MilvusLocation,
    opts: MilvusOptions,
}

impl Connection {
    fn open(loc: &MilvusLocation, opts: MilvusOptions) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| store_error(loc, "starting the client runtime", e))?;
        let endpoint = loc.endpoint();
        let client = Self::retry_on(&rt, loc, opts, "connecting", || {
            Client::with_timeout(endpoint.clone(), Duration::from_secs(60), None, None)
        })
        .map_err(|e| match e {
            IndexError::Store { location, message } => IndexError::Store {
                location,
                message: format!("{message} (is the Milvus server running there?)"),
            },
            e => e,
        })?;
        Ok(Self {
            rt,
            client,
            loc: loc.clone(),
            opts,
        })
    }

    fn retry_on<T, F, Fut>(
        rt: &tokio::runtime::Runtime,
        loc: &MilvusLocation,
        opts: MilvusOptions,
        what: &str,
        f: F,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = milvus::v1::error::Result<T>>,
    {
        let attempts = opts.attempts.max(1);
        let mut wait = Duration::from_millis(100);
        for attempt in 1..=attempts {
            match rt.block_on(f()) {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && attempt < attempts => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(3200));
                }
                Err(e) => {
                    let tries = if transient(&e) {
                        format!(" (after {attempt} attempts)")
                    } else {
                        String::new()
                    };
                    return Err(store_error(loc, &format!("{what}{tries}"), e));
                }
            }
        }
        unreachable!("the loop returns on the last attempt")
    }

    fn retry<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = milvus::v1::error::Result<T>>,
    {
        Self::retry_on(&self.rt, &self.loc, self.opts, what, f)
    }

    fn name(&self) -> &str {
        &self.loc.collection
    }

    fn exists(&self) -> Result<bool> {
        self.retry("looking for the collection", || {
            self.client.has_collection(self.name())
        })
    }

    fn count(&self) -> Result<usize> {
        let stats = self.retry("reading the collection's statistics", || {
            self.client.get_collection_stats(self.name())
        })?;
        stats
            .get("row_count")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| store_error(&self.loc, "statistics", "no row_count"))
    }
}

fn schema(name: &str, dim: usize, database_id: &DatabaseId) -> Result<CollectionSchema> {
    CollectionSchemaBuilder::new(name, &collection_description(database_id))
        .add_field(FieldSchema::new_primary_int64(CHUNK, "chunk id", false))
        .add_field(FieldSchema::new_int64(DOCUMENT, "document index"))
        .add_field(FieldSchema::new_int64(
            START,
            "first token within the document",
        ))
        .add_field(FieldSchema::new_float_vector(KEY, "unit key", dim as i64))
        .build()
        .map_err(|e| IndexError::Index(format!("Milvus schema: {e}")))
}

/// Builds a collection: [`MilvusBuilder::create`], [`KeyIndexBuilder::add`] in batches, then
/// [`KeyIndexBuilder::finish`] (flush, index, load, count check).
pub struct MilvusBuilder {
    conn: Connection,
    schema: CollectionSchema,
    index: MilvusIndexParams,
    dim: usize,
    database_id: DatabaseId,
    added: usize,
}

impl MilvusBuilder {
    /// Creates the collection; one that exists already is dropped only with `overwrite`.
    pub fn create(
        loc: &MilvusLocation,
        dim: usize,
        index: MilvusIndexParams,
        database_id: &DatabaseId,
        overwrite: bool,
        opts: MilvusOptions,
    ) -> Result<Self> {
        index.validate()?;
        let conn = Connection::open(loc, opts)?;
        if conn.exists()? {
            if !overwrite {
                return Err(store_error(
                    loc,
                    "the collection exists",
                    "pass --overwrite to replace it",
                ));
            }
            conn.retry("dropping the old collection", || {
                conn.client.drop_collection(conn.name())
            })?;
        }
        let schema = schema(&loc.collection, dim, database_id)?;
        conn.retry("creating the collection", || {
            conn.client.create_collection(schema.clone(), None)
        })?;
        Ok(Self {
            conn,
            schema,
            index,
            dim,
            database_id: database_id.clone(),
            added: 0,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.conn.opts.batch_size.max(1)
    }

    fn field(&self, name: &str) -> Result<&FieldSchema> {
        self.schema
            .get_field(name)
            .ok_or_else(|| IndexError::Index(format!("Milvus schema has no field {name}")))
    }
}

impl KeyIndexBuilder for MilvusBuilder {
    fn add(&mut self, keys: &[f32], refs: &[KeyRef]) -> Result<()> {
        if keys.len() != refs.len() * self.dim {
            return Err(IndexError::invalid(
                "keys",
                keys.len(),
                format!("{} refs of dim {}", refs.len(), self.dim),
            ));
        }
        let b = self.batch_size();
        for (i, part) in refs.chunks(b).enumerate() {
            let rows = &keys[i * b * self.dim..(i * b + part.len()) * self.dim];
            let cols = || -> Result<Vec<FieldColumn>> {
                let ints = |f: fn(&KeyRef) -> usize| -> Vec<i64> {
                    part.iter().map(|r| f(r) as i64).collect()
                };
                Ok(vec![
                    FieldColumn::new(self.field(CHUNK)?, ints(|r| r.chunk.0)),
                    FieldColumn::new(self.field(DOCUMENT)?, ints(|r| r.document.0)),
                    FieldColumn::new(self.field(START)?, ints(|r| r.start)),
                    FieldColumn::new(self.field(KEY)?, rows.to_vec()),
                ])
            };
            let columns = cols()?;
            let conn = &self.conn;
            conn.retry("inserting keys", || {
                conn.client.insert(conn.name(), columns.clone(), None)
            })?;
            self.added += part.len();
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<IndexDescription> {
        let conn = &self.conn;
        conn.retry("flushing", || conn.client.flush(conn.name()))?;
        // Flush only starts sealing: an index created before the segments are flushed covers none
        // of them, and the keys are then searched through the growing segments' interim index
        // (`retro bench index --vector-store` on 12,922 MiniLM keys: recall@10 0.869 for HNSW and
        // IVF alike without this wait, 0.998 for HNSW with it).
        wait_until_flushed(conn, self.added)?;
        let (kind, params) = match self.index {
            MilvusIndexParams::Hnsw {
                m, ef_construction, ..
            } => (
                IndexType::HNSW,
                HashMap::from([
                    ("M".to_string(), m.to_string()),
                    ("efConstruction".to_string(), ef_construction.to_string()),
                ]),
            ),
            MilvusIndexParams::IvfFlat { nlist, .. } => (
                IndexType::IvfFlat,
                HashMap::from([("nlist".to_string(), nlist.to_string())]),
            ),
            MilvusIndexParams::Flat => (IndexType::Flat, HashMap::new()),
        };
        let ip = IndexParams::new(format!("{KEY}_index"), kind, MetricType::IP, params);
        conn.retry("building the index", || {
            conn.client.create_index(conn.name(), KEY, ip.clone())
        })?;
        conn.retry("loading the collection", || {
            conn.client.load_collection(conn.name(), None)
        })?;
        let count = conn.count()?;
        if count != self.added {
            return Err(store_error(
                &conn.loc,
                "after the build",
                format!(
                    "the collection counts {count} keys, {} were inserted",
                    self.added
                ),
            ));
        }
        Ok(describe(&conn.loc, self.dim, count, self.index))
    }
}

/// Polls the collection's persistent segments until `rows` keys are in flushed segments (10 minutes
/// at most).
fn wait_until_flushed(conn: &Connection, rows: usize) -> Result<()> {
    use milvus::proto::common::SegmentState;
    let started = std::time::Instant::now();
    loop {
        let segments = conn.retry("waiting for the flush", || {
            conn.client.list_persistent_segments(conn.name())
        })?;
        let flushed: i64 = segments
            .iter()
            .filter(|s| s.state == SegmentState::Flushed)
            .map(|s| s.num_rows)
            .sum();
        if flushed as usize >= rows {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(store_error(
                &conn.loc,
                "waiting for the flush",
                format!("{flushed} of {rows} keys flushed after 10 minutes"),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl MilvusBuilder {
    /// What the manifest records about the collection being built.
    pub fn record(&self, count: usize) -> VectorStoreRecord {
        VectorStoreRecord {
            location: self.conn.loc.clone(),
            metric: METRIC.into(),
            index: self.index,
            count,
            dim: self.dim,
            database_id: self.database_id.clone(),
        }
    }
}

fn describe(
    loc: &MilvusLocation,
    dim: usize,
    count: usize,
    index: MilvusIndexParams,
) -> IndexDescription {
    IndexDescription {
        store: "milvus".into(),
        location: loc.to_string(),
        metric: format!("{METRIC} over unit keys"),
        dim,
        count,
        params: index.to_string(),
    }
}

/// The filter as a Milvus boolean expression on `document` and `start` (empty: no filter).
pub fn filter_expression(f: &KeyFilter) -> String {
    f.exclude
        .iter()
        .map(|e| {
            let d = e.document.0;
            let (lo, hi) = (e.starts.start, e.starts.end);
            match (lo, hi) {
                (0, usize::MAX) => format!("{DOCUMENT} != {d}"),
                (lo, usize::MAX) => format!("not ({DOCUMENT} == {d} and {START} >= {lo})"),
                (lo, hi) => {
                    format!("not ({DOCUMENT} == {d} and {START} >= {lo} and {START} < {hi})")
                }
            }
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

/// An opened collection.
pub struct MilvusIndex {
    conn: Connection,
    record: VectorStoreRecord,
}

impl MilvusIndex {
    /// Opens the collection a manifest records, and checks it against the record: it exists,
    /// it was built for this database, and its dim, metric and count agree.
    pub fn open(record: &VectorStoreRecord, opts: MilvusOptions) -> Result<Self> {
        let loc = &record.location;
        let conn = Connection::open(loc, opts)?;
        let mismatch = |field: &str, found: String, recorded: String| {
            store_error(
                loc,
                &format!("collection {:?}", loc.collection),
                format!(
                    "{field} is {found}, the manifest records {recorded} (rebuild the database \
                     with `retro index build --vector-store {loc} --overwrite`)"
                ),
            )
        };
        if !conn.exists()? {
            return Err(store_error(
                loc,
                &format!("collection {:?}", loc.collection),
                "missing (dropped, or a different server?): rebuild the database with \
                 `retro index build --vector-store ... --overwrite`",
            ));
        }
        let d = conn.retry("describing the collection", || {
            conn.client.describe_collection(conn.name())
        })?;
        let want = collection_description(&record.database_id);
        if d.schema.description != want {
            return Err(store_error(
                loc,
                &format!("collection {:?}", loc.collection),
                format!(
                    "holds other keys (its description is {:?}, this database's would be {want:?}): \
                     it was rebuilt for another database; rebuild this one with \
                     `retro index build --vector-store {loc} --overwrite`, or point it at its own collection",
                    d.schema.description
                ),
            ));
        }
        let key = d.schema.fields.iter().find(|f| f.name == KEY);
        let dim = key.and_then(|f| {
            f.type_params
                .iter()
                .find(|kv| kv.key == "dim")
                .and_then(|kv| kv.value.parse::<usize>().ok())
        });
        if dim != Some(record.dim) {
            return Err(mismatch(
                "dim",
                dim.map_or("absent".into(), |d| d.to_string()),
                record.dim.to_string(),
            ));
        }
        let indexes = conn.retry("describing the index", || {
            conn.client
                .describe_index(conn.name().to_string(), KEY.to_string())
        })?;
        let metric = indexes
            .first()
            .map(|i| i.params().metric_type().to_string());
        if metric.as_deref() != Some(record.metric.as_str()) {
            return Err(mismatch(
                "metric",
                metric.unwrap_or_else(|| "absent (no index)".into()),
                record.metric.clone(),
            ));
        }
        conn.retry("loading the collection", || {
            conn.client.load_collection(conn.name(), None)
        })?;
        let count = conn.count()?;
        if count != record.count {
            return Err(mismatch(
                "count",
                count.to_string(),
                record.count.to_string(),
            ));
        }
        Ok(Self {
            conn,
            record: record.clone(),
        })
    }

    fn search_group(
        &self,
        queries: &[&[f32]],
        k: usize,
        ef: Option<usize>,
        expr: &str,
    ) -> Result<Vec<Vec<Hit>>> {
        if k > MAX_K {
            return Err(IndexError::invalid(
                "k",
                k,
                format!("Milvus takes at most {MAX_K}"),
            ));
        }
        let breadth = match self.record.index {
            MilvusIndexParams::Hnsw { ef: e, .. } => Some(("ef", ef.unwrap_or(e).max(k))),
            MilvusIndexParams::IvfFlat { nprobe, .. } => Some(("nprobe", ef.unwrap_or(nprobe))),
            MilvusIndexParams::Flat => None,
        };
        // SearchOptions is not Clone: each attempt builds its own.
        let options = || {
            let mut o = SearchOptions::new()
                .limit(k)
                .add_param("anns_field", KEY)
                .add_param("metric_type", METRIC);
            if let Some((name, v)) = breadth {
                o = o.add_param(name, v.to_string());
            }
            if !expr.is_empty() {
                o = o.filter(expr.to_string());
            }
            o
        };
        let conn = &self.conn;
        let res = conn.retry("searching", || {
            let data: Vec<Value> = queries.iter().map(|q| Value::from(q.to_vec())).collect();
            conn.client.search(conn.name(), data, Some(options()))
        })?;
        if res.len() != queries.len() {
            return Err(store_error(
                &conn.loc,
                "searching",
                format!("{} results for {} queries", res.len(), queries.len()),
            ));
        }
        res.into_iter()
            .map(|r| {
                r.id.iter()
                    .zip(&r.score)
                    .map(|(id, &score)| match id {
                        Value::Long(c) if *c >= 0 && (*c as usize) < self.record.count => {
                            Ok((ChunkId(*c as usize), 1.0 - score))
                        }
                        v => Err(store_error(
                            &conn.loc,
                            "searching",
                            format!("a hit with chunk id {v:?}, not one of this database's"),
                        )),
                    })
                    .collect()
            })
            .collect()
    }
}

impl KeyIndex for MilvusIndex {
    fn describe(&self) -> IndexDescription {
        describe(
            &self.record.location,
            self.record.dim,
            self.record.count,
            self.record.index,
        )
    }
    fn len(&self) -> usize {
        self.record.count
    }
    fn drop_index(&self) -> Result<()> {
        let conn = &self.conn;
        conn.retry("dropping the collection", || {
            conn.client.drop_collection(conn.name())
        })
    }
    fn dim(&self) -> usize {
        self.record.dim
    }
    fn search(&self, queries: &Queries, k: usize, ef: Option<usize>) -> Result<Vec<Vec<Hit>>> {
        // No filter: one group, searched in batches.
        let none = vec![KeyFilter::default(); queries.len()];
        self.search_filtered(queries, k, ef, &none)
    }
    fn search_filtered(
        &self,
        queries: &Queries,
        k: usize,
        ef: Option<usize>,
        filters: &[KeyFilter],
    ) -> Result<Vec<Vec<Hit>>> {
        check_filters(queries, filters)?;
        queries.check(self.record.dim)?;
        // One request per distinct filter (the queries of one sequence share theirs), in
        // batches; answers go back to their queries' places.
        let mut groups: Vec<(String, Vec<usize>)> = vec![];
        let mut by_expr: HashMap<String, usize> = HashMap::new();
        for (i, f) in filters.iter().enumerate() {
            let e = filter_expression(f);
            let g = *by_expr.entry(e.clone()).or_insert_with(|| {
                groups.push((e, vec![]));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let mut out: Vec<Vec<Hit>> = vec![vec![]; queries.len()];
        for (expr, ids) in &groups {
            for part in ids.chunks(self.conn.opts.batch_size.max(1)) {
                let qs: Vec<&[f32]> = part.iter().map(|&i| queries.get(i)).collect();
                for (&i, hits) in part.iter().zip(self.search_group(&qs, k, ef, expr)?) {
                    out[i] = hits;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DocumentId;
    use crate::key_index::Exclusion;

    #[test]
    fn expressions_say_what_the_filter_says() {
        let f = KeyFilter {
            exclude: vec![
                Exclusion::document(DocumentId(3)),
                Exclusion {
                    document: DocumentId(1),
                    starts: 5..usize::MAX,
                },
                Exclusion {
                    document: DocumentId(2),
                    starts: 0..40,
                },
            ],
        };
        assert_eq!(
            filter_expression(&f),
            "document != 3 and not (document == 1 and start >= 5) and \
             not (document == 2 and start >= 0 and start < 40)"
        );
        assert_eq!(filter_expression(&KeyFilter::default()), "");
    }
}

//! Where a database's keys live, as the manifest records it: in the folder (the embedded HNSW
//! graph, the default) or in Milvus. These types are compiled without the `milvus` feature too,
//! so that such a build can say what a database needs instead of failing to read its manifest.

use crate::error::{IndexError, Result};
use crate::hnsw::HnswParams;
use crate::ids::DatabaseId;

/// A Milvus collection: `milvus://HOST:PORT/COLLECTION`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MilvusLocation {
    pub host: String,
    pub port: u16,
    pub collection: String,
}

impl MilvusLocation {
    /// Parses `milvus://HOST:PORT/COLLECTION`. Collection names are Milvus': a letter or `_`,
    /// then letters, digits and `_`, at most 255.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| IndexError::invalid("--vector-store", spec, why.to_string());
        let rest = spec
            .strip_prefix("milvus://")
            .ok_or_else(|| bad("expected milvus://HOST:PORT/COLLECTION"))?;
        let (addr, collection) = rest
            .split_once('/')
            .ok_or_else(|| bad("no collection: expected milvus://HOST:PORT/COLLECTION"))?;
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| bad("no port: expected milvus://HOST:PORT/COLLECTION"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| bad("the port must be a number between 1 and 65535"))?;
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(bad("the host is empty or not a host name"));
        }
        let ok_name = collection.len() <= 255
            && collection
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && collection
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok_name {
            return Err(bad(
                "the collection name must start with a letter or `_` and hold only letters, digits and `_`",
            ));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            collection: collection.to_string(),
        })
    }

    /// The gRPC endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for MilvusLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "milvus://{}:{}/{}",
            self.host, self.port, self.collection
        )
    }
}

/// The index Milvus builds over the keys, with its search breadth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MilvusIndexParams {
    /// Milvus' HNSW: `M`, `efConstruction`, and `ef` at search time.
    Hnsw {
        m: usize,
        ef_construction: usize,
        ef: usize,
    },
    /// Inverted lists over `nlist` k-means cells, `nprobe` of them searched.
    IvfFlat { nlist: usize, nprobe: usize },
    /// Exact search.
    Flat,
}

impl MilvusIndexParams {
    /// The same graph parameters as the embedded index.
    pub fn hnsw(p: HnswParams) -> Self {
        Self::Hnsw {
            m: p.m,
            ef_construction: p.ef_construction,
            ef: p.ef_search,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Hnsw {
                m,
                ef_construction,
                ef,
            } => {
                // Milvus' own bounds.
                if !(2..=2048).contains(&m) {
                    return Err(IndexError::invalid("HNSW M", m, "Milvus takes 2..=2048"));
                }
                if !(1..=65_535).contains(&ef_construction) || !(1..=32_768).contains(&ef) {
                    return Err(IndexError::invalid(
                        "HNSW ef",
                        format!("efConstruction {ef_construction}, ef {ef}"),
                        "Milvus takes efConstruction 1..=65535 and ef 1..=32768",
                    ));
                }
            }
            Self::IvfFlat { nlist, nprobe } => {
                if !(1..=65_536).contains(&nlist) || nprobe == 0 || nprobe > nlist {
                    return Err(IndexError::invalid(
                        "IVF",
                        format!("nlist {nlist}, nprobe {nprobe}"),
                        "nlist must be 1..=65536 and nprobe 1..=nlist",
                    ));
                }
            }
            Self::Flat => {}
        }
        Ok(())
    }
}

impl std::fmt::Display for MilvusIndexParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hnsw {
                m,
                ef_construction,
                ef,
            } => write!(f, "HNSW M={m} efConstruction={ef_construction} ef={ef}"),
            Self::IvfFlat { nlist, nprobe } => write!(f, "IVF_FLAT nlist={nlist} nprobe={nprobe}"),
            Self::Flat => write!(f, "FLAT"),
        }
    }
}

/// The manifest's `vector_store`: the keys live in a Milvus collection (absent: in the folder).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VectorStoreRecord {
    pub location: MilvusLocation,
    /// Milvus' metric: `IP` over unit keys (the same order as the embedded index's `unit-l2`).
    pub metric: String,
    pub index: MilvusIndexParams,
    pub count: usize,
    pub dim: usize,
    /// The database the collection was built for, also written into the collection's
    /// description, so a collection rebuilt for another database is refused. The manifest holds
    /// the bare string (`DatabaseId` serializes transparently).
    pub database_id: DatabaseId,
}

/// Options for a Milvus store: how many keys or queries per request, how many attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MilvusOptions {
    pub batch_size: usize,
    /// Attempts per request on transient errors (connection refused, unavailable), with backoff
    /// from 100 ms doubling up to 3.2 s.
    pub attempts: usize,
}

impl Default for MilvusOptions {
    fn default() -> Self {
        Self {
            batch_size: 1024,
            attempts: 5,
        }
    }
}

/// The description written into a collection built for database `id`.
pub fn collection_description(id: &DatabaseId) -> String {
    format!("retro-rs keys of database {id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations_and_names_what_is_wrong() {
        let l = MilvusLocation::parse("milvus://127.0.0.1:19530/retro_keys").unwrap();
        assert_eq!(l.endpoint(), "http://127.0.0.1:19530");
        assert_eq!(l.to_string(), "milvus://127.0.0.1:19530/retro_keys");
        for (bad, says) in [
            ("http://127.0.0.1:19530/c", "milvus://"),
            ("milvus://127.0.0.1:19530", "no collection"),
            ("milvus://127.0.0.1/c", "no port"),
            ("milvus://127.0.0.1:0/c", "port"),
            ("milvus://127.0.0.1:19530/9c", "collection name"),
            ("milvus://127.0.0.1:19530/a-b", "collection name"),
            ("milvus://:19530/c", "host"),
        ] {
            let e = MilvusLocation::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn index_params_round_trip_and_validate() {
        let p = MilvusIndexParams::IvfFlat {
            nlist: 128,
            nprobe: 16,
        };
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, r#"{"type":"IVF_FLAT","nlist":128,"nprobe":16}"#);
        assert_eq!(serde_json::from_str::<MilvusIndexParams>(&j).unwrap(), p);
        assert!(p.validate().is_ok());
        assert!(MilvusIndexParams::IvfFlat {
            nlist: 8,
            nprobe: 9
        }
        .validate()
        .is_err());
        assert!(MilvusIndexParams::hnsw(HnswParams::default())
            .validate()
            .is_ok());
    }
}

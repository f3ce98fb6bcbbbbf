//! Opening a dataset: `dataset.json` checked alone or against its database, every file's checksum,
//! the splits memory-mapped.

use super::*;
use crate::error::{Context, PipelineError, Result};
use crate::filter::Origin;
use memmap2::Mmap;
use retro_format::FolderKind;
use retro_index::{Database, DocumentId};
use std::path::Path;

impl Dataset {
    /// Reads `dataset.json` alone (e.g. to find the database a dataset was built from), checking
    /// its format version and the fields that need no database.
    pub fn read_meta(dir: &Path) -> Result<DatasetMeta> {
        let (path, meta): (_, DatasetMeta) = FolderKind::Dataset.read_manifest(dir)?;
        meta.validate(&path)?;
        Ok(meta)
    }

    /// Opens a dataset, checking its format and that it was built from `db`.
    pub fn open(dir: &Path, db: &Database) -> Result<Dataset> {
        let meta_path = dir.join(FolderKind::Dataset.marker());
        let meta = Self::read_meta(dir)?;
        meta.check_against(&meta_path, db)?;
        meta.files.check(
            dir,
            "dataset.json",
            "rebuild the dataset (`retro dataset build --overwrite`)",
            |_, _| true,
        )?;
        let per_seq = (meta.seq_len / meta.chunk_len) * meta.k;
        let load = |split: Split, info: &SplitInfo| -> Result<SplitData> {
            let name = split.name();
            let origins_path = dir.join(format!("{name}.origins"));
            let raw =
                std::fs::read(&origins_path).map_err(|e| PipelineError::io(&origins_path, e))?;
            if Some(raw.len()) != info.sequences.checked_mul(8) {
                return Err(PipelineError::file(
                    &origins_path,
                    format!(
                        "{} bytes, expected {} for {} sequences",
                        raw.len(),
                        info.sequences.saturating_mul(8),
                        info.sequences
                    ),
                ));
            }
            let origins = raw
                .chunks_exact(8)
                .map(|b| Origin {
                    document: DocumentId(u32::from_le_bytes(b[..4].try_into().unwrap()) as usize),
                    start: u32::from_le_bytes(b[4..].try_into().unwrap()) as usize,
                })
                .collect::<Vec<_>>();
            for o in &origins {
                if o.document.0 >= db.store().documents().len()
                    || o.start + meta.seq_len + 1 > db.store().document_tokens(o.document).len()
                {
                    return Err(PipelineError::file(
                        &origins_path,
                        format!("sequence {o:?} lies outside the database's documents"),
                    ));
                }
            }
            let map = |file: String, bytes_per: usize| -> Result<Option<Mmap>> {
                let path = dir.join(file);
                let f = std::fs::File::open(&path).map_err(|e| PipelineError::io(&path, e))?;
                let want = info
                    .sequences
                    .saturating_mul(per_seq)
                    .saturating_mul(bytes_per);
                let len = f.metadata().map_err(|e| PipelineError::io(&path, e))?.len() as usize;
                if len != want {
                    return Err(PipelineError::file(
                        &path,
                        format!("{len} bytes, expected {want}"),
                    ));
                }
                if len == 0 {
                    return Ok(None);
                }
                // SAFETY: the file is only read; the dataset's files are written once, atomically.
                let m = unsafe { Mmap::map(&f) }.map_err(|e| PipelineError::io(&path, e))?;
                Ok(Some(m))
            };
            let neighbours = map(format!("{name}.neighbours"), 4)?;
            if let Some(m) = &neighbours {
                let n_chunks = db.store().len() as u32;
                if let Some(bad) = bytemuck::cast_slice::<u8, u32>(m)
                    .iter()
                    .find(|&&i| i != NO_CHUNK && i >= n_chunks)
                {
                    return Err(PipelineError::file(
                        &dir.join(format!("{name}.neighbours")),
                        format!("chunk id {bad} is beyond the database's {n_chunks} chunks"),
                    ));
                }
            }
            Ok(SplitData {
                origins,
                neighbours,
                distances: map(format!("{name}.distances"), 4)?,
            })
        };
        let train = load(Split::Train, &meta.train)?;
        let valid = load(Split::Valid, &meta.valid)?;
        Ok(Dataset {
            dir: dir.to_owned(),
            meta,
            train,
            valid,
        })
    }
}

impl Dataset {
    /// Opens the database a dataset names (or `db`, when given) and the dataset on it.
    pub fn open_with_database(dataset: &Path, db: Option<&Path>) -> Result<(Database, Dataset)> {
        let meta = Dataset::read_meta(dataset)?;
        let db_dir = db.map(Path::to_path_buf).unwrap_or(meta.database_dir);
        let db =
            Database::open(&db_dir).context(|| format!("opening database {}", db_dir.display()))?;
        let ds = Dataset::open(dataset, &db)?;
        Ok((db, ds))
    }
}

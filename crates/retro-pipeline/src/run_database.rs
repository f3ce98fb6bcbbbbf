//! The retrieval database a trained run reads at evaluation and generation: its own, or another
//! swapped in without retraining, checked to tokenize and chunk as the run was trained; and the
//! documents of it that the run held out or trained on.

use crate::error::{Context, PipelineError, Result};
use crate::{Dataset, DatasetMeta, Run};
use retro_index::{Database, DocumentId, LmTokenizer};
use std::collections::HashSet;
use std::path::Path;

/// A run's database (its own, or `--db`), K, the tokenizer the model reads, and the dataset it was
/// trained on (when its `dataset.json` is still there).
pub struct RunDatabase {
    pub db: Database,
    pub k: usize,
    pub tokenizer: LmTokenizer,
    pub dataset: Option<DatasetMeta>,
}

impl RunDatabase {
    /// Opens the database for `run`: `db` if given (another database swapped in without
    /// retraining), else the one its dataset was built from; `k` neighbours per chunk (default:
    /// the dataset's K, else 2). Refuses a database whose tokenizer or chunk_len is not the run's:
    /// its chunks would be read as other tokens.
    pub fn open(run: &Run, db: Option<&Path>, k: Option<usize>) -> Result<RunDatabase> {
        let dataset = run
            .state()?
            .and_then(|s| Dataset::read_meta(&s.dataset).ok());
        let dir = match (db, &dataset) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(m)) => m.database_dir.clone(),
            (None, None) => {
                return Err(PipelineError::file(
                    &run.dir,
                    "the run does not say which database it was trained with: pass --db",
                ))
            }
        };
        let db = Database::open(&dir).context(|| format!("opening database {}", dir.display()))?;
        let chunk_len = run.model_config.chunk_len;
        db.check_chunk_len(chunk_len).context(|| {
            format!(
                "database {} cannot serve run {} (trained with chunk_len {chunk_len})",
                dir.display(),
                run.dir.display()
            )
        })?;
        let tokenizer = match run.tokenizer()? {
            Some(t) => t,
            None => match &dataset {
                // Runs written before the run kept its tokenizer: the training database's.
                Some(m) if m.database_id == *db.id() => db.load_tokenizer()?,
                Some(m) => Database::open(&m.database_dir)
                    .and_then(|d| d.load_tokenizer())
                    .context(|| {
                        format!(
                            "run {} keeps no tokenizer and its training database {} cannot be \
                             opened to check that {} uses the same one",
                            run.dir.display(),
                            m.database_dir.display(),
                            dir.display()
                        )
                    })?,
                None => {
                    return Err(PipelineError::file(
                        &run.dir,
                        format!(
                            "the run keeps no tokenizer and names no dataset: cannot check that \
                             {} tokenizes as the model was trained",
                            dir.display()
                        ),
                    ))
                }
            },
        };
        db.check_compatible(&tokenizer).context(|| {
            format!(
                "database {} tokenizes differently from run {}: the model would read its chunks \
                 as other tokens",
                dir.display(),
                run.dir.display()
            )
        })?;
        let k = k.or(dataset.as_ref().map(|m| m.k)).unwrap_or(2);
        Ok(RunDatabase {
            db,
            k,
            tokenizer,
            dataset,
        })
    }

    /// Whether `db` is the database the run was trained with.
    pub fn is_training_database(&self) -> bool {
        self.dataset
            .as_ref()
            .is_some_and(|m| m.database_id == *self.db.id())
    }

    /// The documents of this database the run held out (found by id, so in a swapped database
    /// too), and those it was trained on (none unless this is its training database).
    pub fn document_sets(&self) -> DocumentSets {
        let held_ids: HashSet<&str> = self
            .dataset
            .iter()
            .flat_map(|m| m.held_out_documents.iter().map(|(_, id)| id.as_str()))
            .collect();
        let docs = self.db.store().documents();
        let held_out: HashSet<DocumentId> = (0..docs.len())
            .filter(|&d| held_ids.contains(docs[d].id.as_str()))
            .map(DocumentId)
            .collect();
        let trained_on = if self.is_training_database() {
            (0..docs.len())
                .map(DocumentId)
                .filter(|d| !held_out.contains(d))
                .collect()
        } else {
            HashSet::new()
        };
        DocumentSets {
            held_out,
            trained_on,
        }
    }
}

/// See [`RunDatabase::document_sets`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocumentSets {
    pub held_out: HashSet<DocumentId>,
    pub trained_on: HashSet<DocumentId>,
}

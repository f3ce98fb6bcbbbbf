//! What several subcommands share: opening a run's retrieval database with the checks that make a
//! swapped database safe (same tokenizer and chunk_len as the run was trained with).

use anyhow::{bail, Context, Result};
use retro_index::{Database, LmTokenizer};
use retro_pipeline::{DatasetMeta, Gate, Run};
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
    /// Whether `db` is the database the run was trained with.
    pub fn is_training_database(&self) -> bool {
        self.dataset
            .as_ref()
            .is_some_and(|m| m.database_id == *self.db.id())
    }
}

/// Opens the database for `run`: `db` if given (another database swapped in without retraining),
/// else the one its dataset was built from. Refuses a database whose tokenizer or chunk_len is not
/// the run's: its chunks would be read as other tokens.
pub fn run_database(run: &Run, db: Option<&Path>, k: Option<usize>) -> Result<RunDatabase> {
    let dataset = run
        .state()?
        .and_then(|s| retro_pipeline::Dataset::read_meta(&s.dataset).ok());
    let dir = match (db, &dataset) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(m)) => m.database_dir.clone(),
        (None, None) => {
            bail!("pass --db: the run does not say which database it was trained with")
        }
    };
    let db = Database::open(&dir).with_context(|| format!("opening database {}", dir.display()))?;
    let chunk_len = run.model_config.chunk_len;
    db.check_chunk_len(chunk_len).with_context(|| {
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
                .with_context(|| {
                    format!(
                        "run {} keeps no tokenizer and its training database {} cannot be opened \
                         to check that {} uses the same one",
                        run.dir.display(),
                        m.database_dir.display(),
                        dir.display()
                    )
                })?,
            None => bail!(
                "run {} keeps no tokenizer and names no dataset: cannot check that {} tokenizes \
                 as the model was trained",
                run.dir.display(),
                dir.display()
            ),
        },
    };
    db.check_compatible(&tokenizer).with_context(|| {
        format!(
            "database {} tokenizes differently from run {}: the model would read its chunks as \
             other tokens",
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

/// Which chunks' neighbours the model reads.
#[derive(clap::Args, Debug)]
pub struct GateArgs {
    /// Read a chunk's neighbours only when the nearest is at most this far from it (the database's
    /// distance, as `index query` prints it); farther ones leave RETRO[OFF]'s prediction. Default:
    /// read every neighbour, as the paper does. docs/QUALITY.md measures the trade-off.
    #[arg(long, conflicts_with_all = ["min_overlap", "coherent"])]
    pub max_distance: Option<f32>,
    /// Read a chunk's neighbours only when one of them (chunk + continuation) shares a run of at
    /// least this fraction of chunk_len tokens with the chunk; otherwise RETRO[OFF]'s prediction.
    #[arg(long, conflicts_with = "coherent")]
    pub min_overlap: Option<f32>,
    /// Read a chunk's neighbours only when one of them lies in the same document as a neighbour
    /// of one of the `--coherent-lookback` chunks before it, at most this many chunks after it per
    /// chunk back (the database follows the text, as another edition of it does); otherwise
    /// RETRO[OFF]'s prediction. The demo uses 2 with a lookback of 8 (docs/QUALITY.md).
    #[arg(long, value_name = "MAX_STEP")]
    pub coherent: Option<usize>,
    /// With `--coherent`: how many chunks back a neighbour may be followed from (a neighbour of
    /// chunk u - j, by at most j x MAX_STEP chunks).
    #[arg(long, requires = "coherent", default_value_t = 1)]
    pub coherent_lookback: usize,
}

impl GateArgs {
    /// The gate to retrieve with: `None` reads every neighbour.
    pub fn gate(&self) -> Result<Option<Gate>> {
        if let Some(m) = self.coherent {
            return Ok(Some(
                Gate::coherent(m, self.coherent_lookback).context("--coherent-lookback")?,
            ));
        }
        if let Some(m) = self.min_overlap {
            return Ok(Some(Gate::overlap(m).context("--min-overlap")?));
        }
        self.max_distance
            .map(|m| Gate::distance(m).context("--max-distance"))
            .transpose()
    }
}

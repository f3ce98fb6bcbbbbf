//! What several subcommands share, so that no subcommand imports from another: the model,
//! embedder, gate and vector-store arguments, and what they open.

use anyhow::{bail, Context, Result};
use clap::Args;
use retro_index::{
    BertEmbedder, BertOptions, Database, Embedder, HnswParams, LexicalEmbedder, LmTokenizer,
    MilvusIndexParams, MilvusLocation, MilvusOptions,
};
use retro_pipeline::{Gate, Run, RunDatabase};
use std::path::PathBuf;

/// Which model to decode: a trained run with its database, or an imported base alone.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelSource {
    /// A trained run (RETRO, or a RETRO-fitted base).
    #[arg(long, required_unless_present = "base", conflicts_with = "base")]
    pub run: Option<PathBuf>,
    /// An imported base (`retro base import`): the pretrained model alone, no retrieval.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Retrieval database (default: the one the run's dataset was built from).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Neighbours per chunk (default: the run's dataset's K).
    #[arg(long)]
    pub k: Option<usize>,
}

/// What `generate` and `serve` decode: an imported base alone, or a run with its retrieval
/// database and that database's embedder.
// Made once per command and moved, never stored in bulk: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum OpenedModel {
    Base {
        model: retro_model::llama::LlamaBase,
        tokenizer: LmTokenizer,
    },
    Run {
        model: retro_pipeline::RunModel,
        db: RunDatabase,
        embedder: Box<dyn Embedder>,
    },
}

/// Opens what `src` names on `embedder`'s device, saying each step to `step`.
pub fn open_model(
    src: &ModelSource,
    embedder: &EmbedderArgs,
    step: &dyn Fn(&str),
) -> Result<OpenedModel> {
    let device = retro_model::device_from_name(&embedder.device)?;
    let dir = match (&src.run, &src.base) {
        (_, Some(dir)) => {
            step(&format!("loading base {}", dir.display()));
            let base = retro_pipeline::BaseDir::open(dir)?;
            return Ok(OpenedModel::Base {
                tokenizer: base.tokenizer()?,
                model: base.load(&device)?,
            });
        }
        (Some(dir), None) => dir,
        (None, None) => bail!("pass --run RUN or --base BASE"),
    };
    let run = Run::open(dir)?;
    step("opening the run's database");
    let db = RunDatabase::open(&run, src.db.as_deref(), src.k)?;
    step("loading the embedder");
    let (embedder, _) = load_embedder(embedder, Some(&db.db))?;
    step(&format!("loading run {}", dir.display()));
    Ok(OpenedModel::Run {
        model: run.load(&device)?,
        db,
        embedder,
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

/// Which embedder to use: a model directory, or the weight-free lexical one (never implicit).
#[derive(Debug, Args, Clone)]
pub struct EmbedderArgs {
    /// A Hugging Face BERT-family model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, conflicts_with = "lexical_embedder")]
    pub embedder: Option<PathBuf>,
    /// Use the lexical (hashed n-gram) embedder of this width instead of a model.
    #[arg(long, value_name = "DIM")]
    pub lexical_embedder: Option<usize>,
    /// The lexical embedder's features: `words` (words, word bigrams, character trigrams) or
    /// `chars` (character trigrams only, robust to spelling variants and short chunks).
    #[arg(long, value_enum, default_value_t = super::choices::LexicalFeaturesArg::Words, requires = "lexical_embedder")]
    pub lexical_features: super::choices::LexicalFeaturesArg,
    /// Texts per forward pass of the model.
    #[arg(long, default_value_t = 32)]
    pub embed_batch: usize,
    /// Truncate model inputs to this many tokens (default: the model's max_seq_length).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// cpu or cuda[:N] (cuda needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run candle-transformers' BERT (padded batches) on the CPU too, instead of the packed encoder.
    #[arg(long)]
    pub candle_transformers: bool,
}

/// Loads the embedder named by the arguments; with none given, the one the database records.
pub fn load_embedder(
    a: &EmbedderArgs,
    db: Option<&Database>,
) -> anyhow::Result<(Box<dyn Embedder>, Option<String>)> {
    if let Some(dim) = a.lexical_embedder {
        return Ok((
            Box::new(LexicalEmbedder::with_features(
                dim,
                a.lexical_features.into(),
            )?),
            None,
        ));
    }
    let device = retro_model::device_from_name(&a.device)?;
    let opts = BertOptions {
        batch_size: a.embed_batch,
        max_len: a.max_len,
        candle_transformers: a.candle_transformers,
    };
    let dir = match (&a.embedder, db) {
        (Some(d), _) => d.clone(),
        (None, Some(db)) => {
            let e = db.own_embedder(None, &device, opts).map_err(|e| {
                anyhow::anyhow!("{e} (pass --embedder DIR or --lexical-embedder DIM)")
            })?;
            return Ok((e, db.manifest().embedder_source.clone()));
        }
        (None, None) => bail!("choose an embedder: --embedder MODEL_DIR or --lexical-embedder DIM"),
    };
    let e = BertEmbedder::load_with(&dir, &device, opts)
        .with_context(|| format!("loading embedder {}", dir.display()))?;
    let source = dir.canonicalize().unwrap_or(dir).display().to_string();
    Ok((Box::new(e), Some(source)))
}

/// Loads the LM tokenizer: `char` (built from the corpus) or a tokenizer.json path.
pub fn load_lm_tokenizer(spec: &str, corpus: &retro_index::Corpus) -> anyhow::Result<LmTokenizer> {
    Ok(LmTokenizer::from_spec(spec, corpus)?)
}

/// Where the keys go: the embedded HNSW graph (default) or a Milvus collection.
#[derive(Debug, Args, Clone)]
pub struct VectorStoreArgs {
    /// `milvus://HOST:PORT/COLLECTION`: put the keys into Milvus (needs a build with
    /// `--features milvus`); chunk tokens and documents stay in the folder. Default: the
    /// embedded graph. A collection that exists needs --overwrite.
    #[arg(long, value_name = "URL")]
    pub vector_store: Option<String>,
    /// Milvus' index over the keys: `hnsw` (--m, --ef-construction, --ef-search), `ivf-flat`
    /// (--nlist, --nprobe) or `flat` (exact).
    #[arg(long, value_enum, default_value_t = super::choices::MilvusIndexKind::Hnsw, requires = "vector_store")]
    pub milvus_index: super::choices::MilvusIndexKind,
    #[arg(long, default_value_t = 1024, requires = "vector_store")]
    pub nlist: usize,
    #[arg(long, default_value_t = 16, requires = "vector_store")]
    pub nprobe: usize,
    /// Keys per insert and queries per search request.
    #[arg(long, default_value_t = MilvusOptions::default().batch_size, requires = "vector_store")]
    pub milvus_batch: usize,
}

impl VectorStoreArgs {
    /// The store and its index, or `None` for the embedded graph.
    pub fn resolve(
        &self,
        hnsw: HnswParams,
    ) -> anyhow::Result<Option<(MilvusLocation, MilvusIndexParams)>> {
        let Some(url) = &self.vector_store else {
            return Ok(None);
        };
        let loc = MilvusLocation::parse(url)?;
        use super::choices::MilvusIndexKind;
        let index = match self.milvus_index {
            MilvusIndexKind::IvfFlat => MilvusIndexParams::IvfFlat {
                nlist: self.nlist,
                nprobe: self.nprobe,
            },
            MilvusIndexKind::Flat => MilvusIndexParams::Flat,
            MilvusIndexKind::Hnsw => MilvusIndexParams::hnsw(hnsw),
        };
        index.validate()?;
        if self.milvus_batch == 0 {
            bail!("--milvus-batch must be positive");
        }
        Ok(Some((loc, index)))
    }

    pub fn options(&self) -> MilvusOptions {
        MilvusOptions {
            batch_size: self.milvus_batch,
            ..Default::default()
        }
    }
}

/// Threads rayon runs on: `RAYON_NUM_THREADS`, else the available parallelism (benchmarks report it).
pub fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

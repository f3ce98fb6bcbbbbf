//! `retro dataset build | info | show`: training sequences with precomputed neighbours.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use retro_index::Database;
use retro_pipeline::{Dataset, DatasetParams, Filter, Split};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum DatasetCmd {
    /// Cut training sequences from a database's documents and precompute their neighbours.
    Build(BuildArgs),
    /// Parameters and counts of a dataset.
    Info {
        dataset: PathBuf,
        /// The database (default: where the dataset says it was built from).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Samples with their chunks and neighbours, to audit the filter.
    Show {
        dataset: PathBuf,
        #[arg(long)]
        db: Option<PathBuf>,
        /// Sequence index.
        #[arg(long, default_value_t = 0)]
        sample: usize,
        #[arg(long, value_enum, default_value_t = super::choices::SplitArg::Train)]
        split: super::choices::SplitArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Neighbours per chunk.
    #[arg(long, default_value_t = 2)]
    pub k: usize,
    /// none, same-document or window:N (default: same-document; window:2*chunk_len for one document).
    #[arg(long)]
    pub filter: Option<Filter>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Hold out the document with this id (repeatable).
    #[arg(long = "hold-out")]
    pub hold_out: Vec<String>,
    /// Hold out every document whose id contains this text (repeatable), e.g. every edition of a play.
    #[arg(long = "hold-out-matching")]
    pub hold_out_matching: Vec<String>,
    /// Without --hold-out*, hold out this fraction of the documents (or of one document's tail).
    #[arg(long, default_value_t = 0.1)]
    pub valid_fraction: f64,
    #[arg(long)]
    pub max_train_sequences: Option<usize>,
    #[arg(long)]
    pub max_valid_sequences: Option<usize>,
    /// Give this fraction of the training sequences *novel* neighbours: each chunk's also kept out
    /// of the document of its nearest neighbour (e.g. the other edition of its play), so CCA also
    /// trains on neighbours that look alike but do not continue the text. 0, as in the paper.
    #[arg(long, default_value_t = 0.0)]
    pub novel_fraction: f64,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the dataset already at --out (never a folder that is not a dataset).
    #[arg(long)]
    pub overwrite: bool,
}

impl DatasetCmd {
    pub fn run(self) -> Result<()> {
        match self {
            DatasetCmd::Build(a) => {
                let db = Database::open(&a.db)
                    .with_context(|| format!("opening database {}", a.db.display()))?;
                let params = DatasetParams {
                    seq_len: a.seq_len,
                    k: a.k,
                    filter: a.filter,
                    seed: a.seed,
                    held_out_ids: a.hold_out,
                    held_out_matching: a.hold_out_matching,
                    valid_fraction: a.valid_fraction,
                    max_train_sequences: a.max_train_sequences,
                    max_valid_sequences: a.max_valid_sequences,
                    novel_fraction: a.novel_fraction,
                    cancel: Default::default(),
                };
                let bar = indicatif::ProgressBar::new(0).with_style(
                    indicatif::ProgressStyle::with_template(
                        "neighbours {bar:40} {pos}/{len} sequences {per_sec} eta {eta}",
                    )
                    .expect("template"),
                );
                let t0 = std::time::Instant::now();
                let ds = Dataset::build_with(&db, &params, &a.out, a.overwrite, &|done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })?;
                bar.finish_and_clear();
                print_info(&ds);
                let chunks =
                    (ds.len(Split::Train) + ds.len(Split::Valid)) * (a.seq_len / db.chunk_len());
                println!(
                    "precomputed neighbours of {chunks} chunks in {:.1} s -> {}",
                    t0.elapsed().as_secs_f64(),
                    a.out.display()
                );
            }
            DatasetCmd::Info { dataset, db } => {
                print_info(&Dataset::open_with_database(&dataset, db.as_deref())?.1)
            }
            DatasetCmd::Show {
                dataset,
                db,
                sample,
                split,
                json,
            } => {
                let (db, ds) = Dataset::open_with_database(&dataset, db.as_deref())?;
                let split = Split::from(split);
                anyhow::ensure!(
                    sample < ds.len(split),
                    "--sample {sample}: the split has {} sequences",
                    ds.len(split)
                );
                let tok = db.load_tokenizer()?;
                let store = db.store();
                let (o, m) = (ds.origin(split, sample), ds.meta());
                let seq = &store.document_tokens(o.document)[o.start..o.start + m.seq_len];
                let nb = ds.neighbours(split, sample);
                let mut chunks = vec![];
                for (u, chunk) in seq.chunks(m.chunk_len).enumerate() {
                    let neighbours: Vec<_> = nb[u * m.k..(u + 1) * m.k]
                        .iter()
                        .map(|(id, dist)| match id {
                            Some(id) => serde_json::json!({
                                "chunk_id": id,
                                "document_id": store.document(store.document_of(*id)).id,
                                "distance": dist,
                                "text": tok.decode(&store.neighbour(*id)).unwrap_or_default(),
                            }),
                            None => serde_json::json!({"chunk_id": null, "padded": true}),
                        })
                        .collect();
                    chunks.push(serde_json::json!({"chunk": u, "text": tok.decode(chunk)?, "neighbours": neighbours}));
                }
                let out = serde_json::json!({
                    "sample": sample,
                    "document_id": store.document(o.document).id,
                    "start": o.start,
                    "filter": m.filter.to_string(),
                    "chunks": chunks,
                });
                if json {
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    println!(
                        "sample {sample} of document {} at token {} (filter {})",
                        out["document_id"], o.start, m.filter
                    );
                    for c in out["chunks"].as_array().expect("array") {
                        println!(
                            "chunk {}: {:?}",
                            c["chunk"],
                            c["text"].as_str().unwrap_or("")
                        );
                        for n in c["neighbours"].as_array().expect("array") {
                            println!(
                                "    {} doc {} d={} {:?}",
                                n["chunk_id"],
                                n["document_id"],
                                n["distance"],
                                n["text"].as_str().unwrap_or("")
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn print_info(ds: &Dataset) {
    let m = ds.meta();
    println!(
        "dataset {} (format {})",
        ds.dir().display(),
        m.format_version
    );
    println!(
        "  database {} ({})",
        m.database_id,
        m.database_dir.display()
    );
    println!(
        "  seq_len {}  chunk_len {}  K {}  neighbour_len {}  filter {}  seed {}",
        m.seq_len, m.chunk_len, m.k, m.neighbour_len, m.filter, m.seed
    );
    println!(
        "  train {} sequences ({} padded neighbours; {} with novel neighbours)",
        m.train.sequences, m.train.padded_neighbours, m.train.novel_sequences
    );
    println!(
        "  valid {} sequences ({} padded neighbours)",
        m.valid.sequences, m.valid.padded_neighbours
    );
    println!(
        "  held-out documents {}  training documents too short {}",
        m.held_out_documents.len(),
        m.skipped_short_documents
    );
}

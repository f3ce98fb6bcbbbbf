//! `retro train`: train (or resume, or RETRO-fit) a model on a dataset.

use anyhow::{bail, Context, Result};
use clap::Args;
use retro_model::RetroConfig;
use retro_pipeline::{Run, Schedule, TrainConfig};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Dataset built by `retro dataset build`.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Database (default: the one the dataset was built from).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Model config JSON (n_vocab must cover the database's tokenizer).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// labml-small or tiny; n_vocab is taken from the database's tokenizer, chunk_len from the dataset.
    #[arg(long)]
    pub preset: Option<String>,
    /// Train without retrieval (the same config with no CCA layers): the baseline.
    #[arg(long)]
    pub no_retrieval: bool,
    /// Run directory to create.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory where it stopped.
    #[arg(long, conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Start from these weights (e.g. a trained base model).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train only the CCA layers, encoder and norm_e (RETRO-fitting; use with --init).
    #[arg(long)]
    pub freeze_base: bool,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// noam, cosine or constant.
    #[arg(long, default_value = "noam")]
    pub schedule: Schedule,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 4)]
    pub eval_batches: usize,
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: usize,
    /// Stop after this many minutes (the checkpoint is written; --resume continues).
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Stop at this step as an interrupted run would (the schedule still spans --steps).
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn preset(name: &str, n_vocab: usize) -> Result<RetroConfig> {
    Ok(RetroConfig::preset(name, n_vocab)?)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (db, ds) = super::dataset::open(&a.dataset, a.db.as_deref())?;
    let device = retro_model::device_from_name(&a.device)?;
    let vocab = db.load_tokenizer()?.vocab_size();
    let (run_dir, resume, mut model_cfg, train_cfg) = if let Some(dir) = &a.resume {
        let run = Run::open(dir).with_context(|| format!("opening run {}", dir.display()))?;
        (dir.clone(), true, run.model_config, run.train_config)
    } else {
        let cl = ds.meta().chunk_len;
        let cfg = match (&a.config, &a.preset) {
            (Some(p), _) => {
                let c = RetroConfig::from_json_file(p)?;
                if c.chunk_len != cl {
                    bail!(
                        "{}: chunk_len {} but the dataset {} (and its database) use chunk_len {cl}",
                        p.display(),
                        c.chunk_len,
                        a.dataset.display()
                    );
                }
                c
            }
            (None, p) => RetroConfig {
                chunk_len: cl,
                ..preset(p.as_deref().unwrap_or("labml-small"), vocab)?
            },
        };
        let tc = TrainConfig {
            steps: a.steps,
            batch_size: a.batch_size,
            lr: a.lr,
            warmup: a.warmup,
            schedule: a.schedule,
            weight_decay: a.weight_decay,
            grad_clip: a.grad_clip,
            seed: a.seed,
            eval_every: a.eval_every,
            eval_batches: a.eval_batches,
            checkpoint_every: a.checkpoint_every,
            freeze_base: a.freeze_base,
            max_seconds: None,
            stop_after: None,
        };
        (
            a.out.clone().expect("clap requires --out without --resume"),
            false,
            cfg,
            tc,
        )
    };
    if a.no_retrieval {
        model_cfg = model_cfg.without_retrieval();
    }
    let mut train_cfg = train_cfg;
    train_cfg.max_seconds = a.max_minutes.map(|m| m * 60.0);
    train_cfg.stop_after = a.stop_after;
    let params = retro_model::RetroModel::new(
        &model_cfg,
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?
    .num_parameters();
    println!(
        "training {} parameters on {} sequences of {} tokens (K {}, filter {}) -> {}",
        params,
        ds.len(retro_pipeline::Split::Train),
        ds.meta().seq_len,
        ds.meta().k,
        ds.meta().filter,
        run_dir.display()
    );
    let bar = indicatif::ProgressBar::new(train_cfg.steps as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} eta {eta}")
            .expect("template"),
    );
    let mut last_valid = None;
    let state = retro_pipeline::train(
        &run_dir,
        &model_cfg,
        &train_cfg,
        &ds,
        &db,
        &device,
        a.init.as_deref(),
        resume,
        &mut |m, _| {
            last_valid = m.valid_loss.or(last_valid);
            bar.set_position(m.step as u64);
            let v = last_valid.map_or(String::new(), |v| format!(" valid {v:.4}"));
            bar.set_message(format!(
                "loss {:.4}{v} lr {:.2e} {:.0} tok/s",
                m.loss, m.lr, m.tokens_per_s
            ));
        },
    )?;
    bar.finish();
    println!(
        "step {}: checkpoint {}",
        state.step,
        run_dir.join(&state.checkpoint).display()
    );
    println!(
        "metrics {}  loss curve {}",
        run_dir.join("metrics.jsonl").display(),
        run_dir.join("loss.png").display()
    );
    Ok(())
}

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
    /// Steps to train [default: 1000]. With --resume: extends (or keeps) the run's count.
    #[arg(long)]
    pub steps: Option<usize>,
    /// [default: 4]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 0.002].
    #[arg(long)]
    pub lr: Option<f64>,
    /// [default: 200]
    #[arg(long)]
    pub warmup: Option<usize>,
    /// noam, cosine or constant [default: noam].
    #[arg(long)]
    pub schedule: Option<Schedule>,
    /// [default: 0.01]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// [default: 1.0]
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// The fraction of training sequences that get another sequence's neighbours, so that CCA
    /// also learns what unrelated neighbours look like and to ignore them [default: 0].
    #[arg(long, value_name = "P")]
    pub neighbour_shuffle: Option<f64>,
    /// [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// [default: 100]
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// [default: 4]
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// [default: 200]
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Stop after this many minutes (the checkpoint is written; --resume continues).
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Stop at this step as an interrupted run would (the schedule still spans --steps).
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The training flags over `base` (the defaults, or a resumed run's `train.json`). A resumed run
/// keeps its config: a flag that would change it is an error, except `--steps`, which extends it.
fn apply_flags(
    a: &TrainArgs,
    base: TrainConfig,
    resumed: Option<&std::path::Path>,
) -> Result<TrainConfig> {
    let mut c = base;
    if a.freeze_base && resumed.is_none() {
        c.freeze_base = true;
    }
    macro_rules! flag {
        ($field:ident, $name:literal) => {
            if let Some(v) = a.$field.clone() {
                if let Some(path) = resumed {
                    if v != c.$field {
                        bail!(
                            "{} {} conflicts with the run's {} = {} ({}): a resumed run keeps its \
                             training flags; only --steps (to extend it), --max-minutes and \
                             --stop-after apply",
                            $name,
                            v,
                            stringify!($field),
                            c.$field,
                            path.display()
                        );
                    }
                }
                c.$field = v;
            }
        };
    }
    if let (Some(path), Some(steps)) = (resumed, a.steps) {
        if steps != c.steps {
            println!(
                "--steps {steps}: the run's step count goes from {} to {steps} ({} is rewritten; \
                 the learning-rate schedule now spans {steps} steps)",
                c.steps,
                path.display()
            );
        }
        c.steps = steps;
    }
    if resumed.is_none() {
        flag!(steps, "--steps");
    }
    flag!(batch_size, "--batch-size");
    flag!(lr, "--lr");
    flag!(warmup, "--warmup");
    flag!(schedule, "--schedule");
    flag!(weight_decay, "--weight-decay");
    flag!(grad_clip, "--grad-clip");
    flag!(neighbour_shuffle, "--neighbour-shuffle");
    flag!(seed, "--seed");
    flag!(eval_every, "--eval-every");
    flag!(eval_batches, "--eval-batches");
    flag!(checkpoint_every, "--checkpoint-every");
    if resumed.is_some() && (a.init.is_some() || (a.freeze_base && !c.freeze_base)) {
        bail!("--init and --freeze-base start a run; they do not apply to --resume");
    }
    if !(c.lr.is_finite() && c.lr > 0.0) {
        bail!("--lr {}: must be a positive number", c.lr);
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        bail!("--weight-decay {}: must be a number >= 0", c.weight_decay);
    }
    if !(c.grad_clip.is_finite() && c.grad_clip > 0.0) {
        bail!("--grad-clip {}: must be a positive number", c.grad_clip);
    }
    if c.batch_size == 0 {
        bail!("--batch-size 0: a batch holds at least one sequence");
    }
    if !(0.0..1.0).contains(&c.neighbour_shuffle) {
        bail!(
            "--neighbour-shuffle {}: must be a fraction in [0, 1)",
            c.neighbour_shuffle
        );
    }
    if c.neighbour_shuffle > 0.0 && c.batch_size < 2 {
        bail!("--neighbour-shuffle takes neighbours from another sequence of the batch: --batch-size must be at least 2");
    }
    if c.steps == 0 {
        bail!("--steps 0: nothing to train");
    }
    Ok(c)
}

pub fn preset(name: &str, n_vocab: usize) -> Result<RetroConfig> {
    Ok(RetroConfig::preset(name, n_vocab)?)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (db, ds) = super::common::open_dataset(&a.dataset, a.db.as_deref())?;
    let device = retro_model::device_from_name(&a.device)?;
    let vocab = db.load_tokenizer()?.vocab_size();
    let (run_dir, resume, mut model_cfg, train_cfg) = if let Some(dir) = &a.resume {
        let run = Run::open(dir).with_context(|| format!("opening run {}", dir.display()))?;
        let point = run.resume_point()?;
        for n in &point.notes {
            eprintln!("note: {n}");
        }
        println!(
            "resuming {} from {} (step {})",
            dir.display(),
            point.state.checkpoint,
            point.state.step
        );
        let tc = apply_flags(&a, run.train_config.clone(), Some(&dir.join("train.json")))?;
        (dir.clone(), true, run.model_config, tc)
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
        let tc = apply_flags(&a, TrainConfig::default(), None)?;
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
        retro_pipeline::TrainData {
            dataset: &ds,
            database: &db,
            device: &device,
        },
        match (resume, a.init.as_deref()) {
            (true, _) => retro_pipeline::Start::Resume,
            (false, Some(init)) => retro_pipeline::Start::From(init),
            (false, None) => retro_pipeline::Start::Fresh,
        },
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

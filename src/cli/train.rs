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
    /// An imported base (`retro base import`) to RETRO-fit: with --retrofit, CCA and the neighbour
    /// encoder are added to it and only they train. The dataset's database must use the base's
    /// tokenizer.json.
    #[arg(long, requires = "retrofit", conflicts_with_all = ["config", "preset", "init", "no_retrieval", "resume"])]
    pub base: Option<PathBuf>,
    /// RETRO-fit --base (the paper's section 4.2).
    #[arg(long, requires = "base")]
    pub retrofit: bool,
    #[command(flatten)]
    pub fit: RetrofitArgs,
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
    /// Stop after this many minutes (the checkpoint is written; --resume continues). With
    /// `--schedule cosine`, the learning rate decays over these minutes when they end the run
    /// before --steps (counted over the whole run: a run resumed past them stays at the floor).
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

/// The per-invocation limits (`--max-minutes`, `--stop-after`), which a run does not keep.
fn with_limits(a: &TrainArgs, mut tc: TrainConfig) -> TrainConfig {
    tc.max_seconds = a.max_minutes.map(|m| m * 60.0);
    tc.stop_after = a.stop_after;
    tc
}

/// Progress bar for the steps; returns the callback that moves it.
fn progress(
    steps: usize,
) -> (
    indicatif::ProgressBar,
    impl FnMut(&retro_pipeline::StepMetrics, usize),
) {
    let bar = indicatif::ProgressBar::new(steps as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} eta {eta}")
            .expect("template"),
    );
    let mut last_valid = None;
    let b = bar.clone();
    (bar, move |m: &retro_pipeline::StepMetrics, _| {
        last_valid = m.valid_loss.or(last_valid);
        b.set_position(m.step as u64);
        let v = last_valid.map_or(String::new(), |v| format!(" valid {v:.4}"));
        b.set_message(format!(
            "loss {:.4}{v} lr {:.2e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        ));
    })
}

fn print_done(run_dir: &std::path::Path, state: &retro_pipeline::RunState) {
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
}

/// `--base B --retrofit`, or `--resume` of such a run.
fn run_retrofit(
    a: &TrainArgs,
    base: &retro_pipeline::BaseDir,
    fit: retro_model::retrofit::RetrofitConfig,
    run_dir: PathBuf,
    train_cfg: TrainConfig,
    resume: bool,
) -> Result<()> {
    let (db, ds) = retro_pipeline::Dataset::open_with_database(&a.dataset, a.db.as_deref())?;
    let device = retro_model::device_from_name(&a.device)?;
    let base_dir = &base.dir;
    let blocks = fit.blocks(&base.config)?;
    let trainable = fit.num_new_parameters(&base.config)?;
    let mut reads = match fit.neighbour_states {
        retro_model::retrofit::NeighbourStates::Encoder => {
            format!("a {}-layer encoder", blocks.enc_n_layers)
        }
        retro_model::retrofit::NeighbourStates::BaseLayers => {
            "no encoder (each reads the base's states of the neighbours)".to_string()
        }
    };
    if fit.cca_positions {
        reads.push_str(", rotary positions");
    }
    if fit.gated_output {
        reads.push_str(", gated output");
    }
    println!(
        "RETRO-fitting {} ({} parameters, frozen): CCA in layers {:?}, {reads}, about {} new parameters ({:.1}%), on {} sequences of {} tokens (K {}) -> {}",
        base_dir.display(),
        base.config.num_parameters(),
        blocks.ca_layers,
        trainable,
        100.0 * trainable as f64 / base.config.num_parameters() as f64,
        ds.len(retro_pipeline::Split::Train),
        ds.meta().seq_len,
        ds.meta().k,
        run_dir.display()
    );
    let (bar, mut on_step) = progress(train_cfg.steps);
    let state = retro_pipeline::train_retrofit(
        &run_dir,
        base,
        &fit,
        &train_cfg,
        retro_pipeline::TrainData {
            dataset: &ds,
            database: &db,
            device: &device,
        },
        if resume {
            retro_pipeline::Start::Resume
        } else {
            retro_pipeline::Start::Fresh
        },
        &mut on_step,
    )?;
    bar.finish();
    print_done(&run_dir, &state);
    Ok(())
}

pub fn run(a: TrainArgs) -> Result<()> {
    if let Some(dir) = &a.base {
        let tc = with_limits(&a, apply_flags(&a, TrainConfig::default(), None)?);
        let base = retro_pipeline::BaseDir::open(dir)?;
        // Only the parameters: the dataset itself is opened once, by `run_retrofit`.
        let chunk_len = retro_pipeline::Dataset::read_meta(&a.dataset)?.chunk_len;
        let fit = a.fit.config(chunk_len, base.config.hidden_size);
        let out = a.out.clone().expect("clap requires --out without --resume");
        return run_retrofit(&a, &base, fit, out, tc, false);
    }
    if let Some(dir) = &a.resume {
        let run = Run::open(dir).with_context(|| format!("opening run {}", dir.display()))?;
        if let Some(spec) = run.retrofit.clone() {
            let tc = apply_flags(&a, run.train_config.clone(), Some(&dir.join("train.json")))?;
            let base = spec.open_base()?;
            return run_retrofit(&a, &base, spec.fit, dir.clone(), with_limits(&a, tc), true);
        }
    }
    let (db, ds) = retro_pipeline::Dataset::open_with_database(&a.dataset, a.db.as_deref())?;
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
    let train_cfg = with_limits(&a, train_cfg);
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
    let (bar, mut on_step) = progress(train_cfg.steps);
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
        &mut on_step,
    )?;
    bar.finish();
    print_done(&run_dir, &state);
    Ok(())
}

/// Where `retro train --base B --retrofit` (and `retro bench retrofit`) put the new blocks.
#[derive(Args, Debug, Clone)]
pub struct RetrofitArgs {
    /// RETRO-fit: the first layer (0-based) with CCA.
    #[arg(long, default_value_t = 6)]
    pub ca_start: usize,
    /// RETRO-fit: CCA in every this-many-th layer from --ca-start (the paper's Table 12: 3).
    #[arg(long, default_value_t = 3)]
    pub ca_every: usize,
    /// RETRO-fit: layers of the neighbour encoder.
    #[arg(long, default_value_t = 2)]
    pub enc_layers: usize,
    /// RETRO-fit: the encoder's feed-forward width [default: twice the base's width].
    #[arg(long)]
    pub enc_d_ff: Option<usize>,
    /// RETRO-fit: the encoder reads each neighbour as the base's residual stream after this many
    /// of its layers (frozen); 0 reads the token embeddings [default: --ca-start].
    #[arg(long)]
    pub enc_input_layers: Option<usize>,
    /// RETRO-fit: how the new blocks start: `base` (each CCA as its layer's self-attention reading
    /// the neighbours, the encoder as the identity) or `random` (PyTorch's default). Either way
    /// the CCA's output starts at zero, so the model starts exactly at the base.
    #[arg(long, value_enum, default_value_t = super::choices::BlocksInit::Base)]
    pub blocks_init: super::choices::BlocksInit,
    /// RETRO-fit: what each CCA reads of the neighbours: `encoder` (the paper's: a trained
    /// encoder, read by every CCA) or `base-layers` (no encoder: each CCA reads the frozen base's
    /// own states of the neighbours at its layer).
    #[arg(long, value_enum, default_value_t = super::choices::NeighbourStatesArg::Encoder)]
    pub neighbour_states: super::choices::NeighbourStatesArg,
    /// RETRO-fit: rotary positions in each CCA (the base's tables; each neighbour before the
    /// rows it conditions, as in the base's context). Without, the CCA sees no positions.
    #[arg(long)]
    pub cca_positions: bool,
    /// RETRO-fit: each CCA's output times tanh(10 g), g learned from 0 (Flamingo's gate), so that
    /// its output projection can start as its layer's own (`--blocks-init base`) instead of zero.
    #[arg(long)]
    pub gated_output: bool,
}

impl RetrofitArgs {
    /// The new blocks for chunks of `chunk_len` on a base of width `hidden`.
    pub fn config(&self, chunk_len: usize, hidden: usize) -> retro_model::retrofit::RetrofitConfig {
        retro_model::retrofit::RetrofitConfig {
            chunk_len,
            ca_start: self.ca_start,
            ca_every: self.ca_every,
            enc_n_layers: self.enc_layers,
            enc_d_ff: self.enc_d_ff.unwrap_or(2 * hidden),
            enc_input_layers: self.enc_input_layers.unwrap_or(self.ca_start),
            init_from_base: self.blocks_init == super::choices::BlocksInit::Base,
            neighbour_states: self.neighbour_states.into(),
            cca_positions: self.cca_positions,
            gated_output: self.gated_output,
        }
    }
}

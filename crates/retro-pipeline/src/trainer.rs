//! The training loop: AdamW with a warm-up schedule, global-norm clipping, validation loss every N
//! steps, atomic checkpoints (weights under the reference's names, config, optimizer moments, step)
//! every N steps and at the end, exact resume, metrics as JSONL and a loss-curve PNG.

use crate::dataset::{Dataset, Split};
use crate::error::{PipelineError, Result};
use crate::schedule::Schedule;
use candle_core::{DType, Device, Tensor};
use retro_index::fsutil::{read_json, write_json_atomic};
use retro_index::Database;
use retro_model::train::{clip_grad_norm, cross_entropy, loss_and_grads, AdamW, AdamWParams};
use retro_model::{RetroConfig, RetroModel};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const RUN_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub eval_every: usize,
    pub eval_batches: usize,
    pub checkpoint_every: usize,
    /// RETRO-fitting: train only the CCA layers, the encoder and `norm_e` on top of a checkpoint.
    pub freeze_base: bool,
    /// Stop (and checkpoint) after this many seconds of training, if set.
    pub max_seconds: Option<f64>,
    /// Stop (and checkpoint) once this step is reached, as an interrupted run would; the schedule
    /// still spans `steps`. Not saved with the run.
    #[serde(skip)]
    pub stop_after: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 4,
            lr: 2e-3,
            warmup: 200,
            schedule: Schedule::Noam,
            weight_decay: 0.01,
            grad_clip: 1.0,
            seed: 0,
            eval_every: 100,
            eval_batches: 4,
            checkpoint_every: 200,
            freeze_base: false,
            max_seconds: None,
            stop_after: None,
        }
    }
}

/// `RUN/state.json`: which checkpoint is the latest and what it was trained on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    pub format_version: u32,
    pub step: usize,
    pub checkpoint: String,
    pub dataset: PathBuf,
    pub database_id: String,
    pub tokens_seen: u64,
    /// Seconds spent in training steps (batches, forward, backward, optimizer), validation and
    /// checkpoints left out: the budget `max_seconds` counts, and what an equal-time comparison
    /// compares.
    #[serde(default)]
    pub train_seconds: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub valid_loss: Option<f64>,
}

/// A training run directory: `config.json`, `train.json`, `state.json`, `checkpoint-STEP/`,
/// `metrics.jsonl`, `loss.png`.
pub struct Run {
    pub dir: PathBuf,
    pub model_config: RetroConfig,
    pub train_config: TrainConfig,
}

impl Run {
    pub fn open(dir: &Path) -> Result<Run> {
        Ok(Run {
            dir: dir.to_owned(),
            model_config: RetroConfig::from_json_file(&dir.join("config.json"))?,
            train_config: read_json(&dir.join("train.json"))?,
        })
    }

    pub fn state(&self) -> Result<Option<RunState>> {
        let p = self.dir.join("state.json");
        if !p.exists() {
            return Ok(None);
        }
        let s: RunState = read_json(&p)?;
        if s.format_version != RUN_FORMAT_VERSION {
            return Err(PipelineError::file(
                &p,
                format!(
                    "format_version {} (this build reads {RUN_FORMAT_VERSION})",
                    s.format_version
                ),
            ));
        }
        Ok(Some(s))
    }

    /// The tokenizer the model was trained to read (`RUN/lm_tokenizer.json`); `None` for runs written
    /// before runs kept it.
    pub fn tokenizer(&self) -> Result<Option<retro_index::LmTokenizer>> {
        if !self
            .dir
            .join(retro_index::tokenizer::TOKENIZER_FILE)
            .exists()
        {
            return Ok(None);
        }
        Ok(Some(retro_index::LmTokenizer::load(&self.dir)?))
    }

    /// The latest checkpoint's weights.
    pub fn weights_path(&self) -> Result<PathBuf> {
        let state = self.state()?.ok_or_else(|| {
            PipelineError::file(&self.dir, "no checkpoint yet (state.json missing)")
        })?;
        Ok(self.dir.join(state.checkpoint).join("model.safetensors"))
    }

    /// The latest checkpoint as a model.
    pub fn load_model(&self, device: &Device) -> Result<RetroModel> {
        Ok(RetroModel::from_safetensors(
            &self.model_config,
            &self.weights_path()?,
            DType::F32,
            device,
        )?)
    }
}

fn is_retrieval_param(name: &str) -> bool {
    name.starts_with("cca.") || name.starts_with("encoder.") || name.starts_with("norm_e.")
}

/// Mean loss over up to `batches` validation batches (inference kernels).
pub fn validation_loss(
    model: &RetroModel,
    ds: &Dataset,
    db: &Database,
    batch_size: usize,
    batches: usize,
    retrieval: bool,
) -> Result<Option<f64>> {
    let order = ds.epoch_batches(
        Split::Valid,
        batch_size.min(ds.len(Split::Valid)).max(1),
        0,
        0,
    );
    let mut total = 0.0;
    let mut n = 0;
    for idx in order.iter().take(batches) {
        let (x, y, ret) = ds.batch(db, Split::Valid, idx).tensors(model.device())?;
        let logits = if retrieval && !model.config().ca_layers.is_empty() {
            model.forward(&x, &ret)?
        } else {
            model.forward_without_retrieval(&x)?
        };
        total += cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        n += 1;
    }
    Ok((n > 0).then(|| total / n as f64))
}

/// What the caller (the CLI's progress bar) hears after each step.
pub type OnStep<'a> = &'a mut dyn FnMut(&StepMetrics, usize);

/// Creates `run_dir` (or resumes it when `resume` is set) and trains. `init` optionally starts from
/// a checkpoint (e.g. a base model for `freeze_base`).
#[allow(clippy::too_many_arguments)]
pub fn train(
    run_dir: &Path,
    model_config: &RetroConfig,
    cfg: &TrainConfig,
    ds: &Dataset,
    db: &Database,
    device: &Device,
    init: Option<&Path>,
    resume: bool,
    on_step: OnStep,
) -> Result<RunState> {
    model_config.validate()?;
    if ds.meta().chunk_len != model_config.chunk_len {
        return Err(PipelineError::invalid(
            "chunk_len",
            model_config.chunk_len,
            format!("the dataset was cut with chunk_len {}", ds.meta().chunk_len),
        ));
    }
    let vocab = db.load_tokenizer()?.vocab_size();
    if vocab > model_config.n_vocab {
        return Err(PipelineError::invalid(
            "n_vocab",
            model_config.n_vocab,
            format!("the database's tokenizer has {vocab} tokens"),
        ));
    }
    if cfg.batch_size == 0 || ds.len(Split::Train) < cfg.batch_size {
        return Err(PipelineError::invalid(
            "batch_size",
            cfg.batch_size,
            format!(
                "the dataset has {} training sequences",
                ds.len(Split::Train)
            ),
        ));
    }
    let model = RetroModel::new(model_config, cfg.seed, DType::F32, device)?;
    let vars: Vec<_> = model
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !cfg.freeze_base || is_retrieval_param(n))
        .collect();
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut step = 0;
    let mut tokens_seen = 0u64;
    let mut train_seconds = 0f64;
    let run = Run {
        dir: run_dir.to_owned(),
        model_config: model_config.clone(),
        train_config: cfg.clone(),
    };
    if resume {
        let prev = Run::open(run_dir)?;
        if prev.model_config != *model_config {
            return Err(PipelineError::file(
                &run_dir.join("config.json"),
                "the run was trained with another model config",
            ));
        }
        let state = prev
            .state()?
            .ok_or_else(|| PipelineError::file(run_dir, "nothing to resume: no checkpoint"))?;
        let ck = run_dir.join(&state.checkpoint);
        model.load_safetensors(&ck.join("model.safetensors"))?;
        let opt_path = ck.join("optimizer.safetensors");
        let st = candle_core::safetensors::load(&opt_path, device)
            .map_err(|e| PipelineError::file(&opt_path, e.to_string()))?;
        opt.load_state_dict(&st, state.step)?;
        step = state.step;
        tokens_seen = state.tokens_seen;
        train_seconds = state.train_seconds;
    } else {
        if run_dir.join("state.json").exists() {
            return Err(PipelineError::file(
                run_dir,
                "already holds a run (resume it, or choose another directory)",
            ));
        }
        std::fs::create_dir_all(run_dir)
            .map_err(|e| PipelineError::file(run_dir, e.to_string()))?;
        if let Some(init) = init {
            model.load_safetensors(init)?;
        }
        write_json_atomic(&run_dir.join("config.json"), model_config)?;
        write_json_atomic(&run_dir.join("train.json"), cfg)?;
        db.load_tokenizer()?.save(run_dir)?;
    }
    let retrieval = !model_config.ca_layers.is_empty();
    let budget_start = train_seconds;
    let start_step = step;
    // The step's clock starts when the previous step's bookkeeping ends, so waiting for a batch counts.
    let mut step_started = Instant::now();
    // Every step's metrics so far (a resumed run's too), for the loss curve.
    let mut rows: Vec<StepMetrics> = match std::fs::read_to_string(run_dir.join("metrics.jsonl")) {
        Ok(text) => text
            .lines()
            .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
            .filter(|m| m.step <= step)
            .collect(),
        Err(_) => vec![],
    };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))
        .map_err(|e| PipelineError::file(&run_dir.join("metrics.jsonl"), e.to_string()))?;
    let mut last_state = None;
    // The next batches are gathered on another thread while the model runs.
    ds.for_each_train_batch(
        db,
        cfg.batch_size,
        cfg.seed,
        step..cfg.steps,
        &mut |batch| {
            let t0 = step_started;
            let (x, y, ret) = batch.tensors(device)?;
            let (loss, mut grads) = loss_and_grads(&model, &x, &y, retrieval.then_some(&ret))?;
            let grad_norm = clip_grad_norm(opt.vars(), &mut grads, cfg.grad_clip)?;
            let lr = cfg.schedule.lr(cfg.lr, cfg.warmup, step + 1, cfg.steps);
            opt.step(&grads, lr)?;
            step += 1;
            tokens_seen += (batch.batch * batch.seq_len) as u64;
            let loss_v = loss.to_scalar::<f32>()? as f64;
            if !loss_v.is_finite() {
                return Err(PipelineError::invalid(
                    "loss",
                    loss_v,
                    format!("diverged at step {step}; lower the learning rate"),
                ));
            }
            let mut m = StepMetrics {
                step,
                loss: loss_v,
                lr,
                grad_norm,
                tokens_per_s: (batch.batch * batch.seq_len) as f64 / t0.elapsed().as_secs_f64(),
                valid_loss: None,
            };
            train_seconds += t0.elapsed().as_secs_f64();
            let out_of_time = cfg
                .max_seconds
                .is_some_and(|s| train_seconds - budget_start >= s)
                || cfg.stop_after.is_some_and(|s| step >= s);
            let last = step == cfg.steps || out_of_time;
            if cfg.eval_every > 0 && (step % cfg.eval_every == 0 || last) {
                m.valid_loss =
                    validation_loss(&model, ds, db, cfg.batch_size, cfg.eval_batches, retrieval)?;
            }
            writeln!(
                metrics,
                "{}",
                serde_json::to_string(&m).expect("metrics serialise")
            )
            .map_err(|e| PipelineError::file(&run_dir.join("metrics.jsonl"), e.to_string()))?;
            on_step(&m, cfg.steps);
            rows.push(m.clone());
            if last || (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0) {
                last_state = Some(save_checkpoint(
                    &run,
                    &model,
                    &opt,
                    (step, tokens_seen, train_seconds),
                    ds,
                    db,
                )?);
            }
            step_started = Instant::now();
            Ok(!out_of_time)
        },
    )?;
    let title = format!(
        "{} ({}): loss by step",
        run_dir
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy()),
        if retrieval { "RETRO" } else { "no retrieval" }
    );
    crate::plot::loss_curve(&rows, &title, &run_dir.join("loss.png"))?;
    match last_state {
        Some(s) => Ok(s),
        None if step > start_step => unreachable!("the last step always checkpoints"),
        None => run
            .state()?
            .ok_or_else(|| PipelineError::file(run_dir, "no steps to train")),
    }
}

/// Writes `checkpoint-STEP/` through a temporary directory and rename, then points `state.json` at it
/// (atomically), then removes older checkpoints but the previous one.
fn save_checkpoint(
    run: &Run,
    model: &RetroModel,
    opt: &AdamW,
    (step, tokens_seen, train_seconds): (usize, u64, f64),
    ds: &Dataset,
    db: &Database,
) -> Result<RunState> {
    let name = format!("checkpoint-{step:07}");
    let tmp = run.dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| PipelineError::file(&tmp, e.to_string()))?;
    model.save_safetensors(&tmp.join("model.safetensors"))?;
    let (moments, _) = opt.state_dict()?;
    let moments: std::collections::HashMap<String, Tensor> = moments
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    write_json_atomic(&tmp.join("config.json"), &run.model_config)?;
    let final_dir = run.dir.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir)
        .map_err(|e| PipelineError::file(&final_dir, e.to_string()))?;
    let state = RunState {
        format_version: RUN_FORMAT_VERSION,
        step,
        checkpoint: name.clone(),
        dataset: ds.dir().to_owned(),
        database_id: db.id().to_string(),
        tokens_seen,
        train_seconds,
    };
    let previous = run.state().ok().flatten();
    write_json_atomic(&run.dir.join("state.json"), &state)?;
    // Keep this checkpoint and the one before it.
    if let Ok(entries) = std::fs::read_dir(&run.dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let keep = n == name || previous.as_ref().is_some_and(|p| p.checkpoint == n);
            if n.starts_with("checkpoint-") && !keep {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(state)
}

//! The training loop: AdamW with a warm-up schedule, global-norm clipping, validation loss every N
//! steps, atomic checkpoints (weights under the reference's names, config, optimizer moments, step)
//! every N steps and at the end, exact resume, metrics as JSONL and a loss-curve PNG.

use crate::base::BaseDir;
use crate::dataset::{Dataset, Split};
use crate::error::{PipelineError, Result};
use crate::eval::Scorer;
use crate::metrics::{MetricsLog, StepMetrics};
use crate::schedule::Schedule;
use crate::trainee::Trainee;
use candle_core::{DType, Device, Tensor};
use retro_format::{read_json, sync_path, write_json_atomic, FileTable, FolderKind};
use retro_index::{Database, DatabaseId};
use retro_model::llama::LlamaBase;
use retro_model::retrofit::{RetroFitted, RetrofitConfig};
use retro_model::train::{clip_grad_norm, cross_entropy, AdamW, AdamWParams};
use retro_model::{RetroConfig, RetroModel};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const RUN_FORMAT_VERSION: u32 = FolderKind::Run.version();

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
    /// Stop (and checkpoint) after this many seconds of training, if set; the cosine schedule
    /// then decays over this budget when it ends the run before `steps`.
    pub max_seconds: Option<f64>,
    /// The fraction of training sequences that get the neighbours of another sequence of their
    /// batch: CCA then also sees neighbours that say nothing about the text, as a database
    /// without a related document gives, and learns to ignore them (0 in older runs).
    #[serde(default)]
    pub neighbour_shuffle: f64,
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
            neighbour_shuffle: 0.0,
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
    pub database_id: DatabaseId,
    pub tokens_seen: u64,
    /// Seconds spent in training steps (batches, forward, backward, optimizer), validation and
    /// checkpoints left out: the budget `max_seconds` counts, and what an equal-time comparison
    /// compares.
    #[serde(default)]
    pub train_seconds: f64,
    /// [`crate::DatasetMeta::dataset_id`] of the dataset trained on (empty in runs written before
    /// datasets had ids): resuming on another dataset is refused.
    #[serde(default)]
    pub dataset_id: crate::dataset::DatasetId,
    /// What a resume had to say (damaged checkpoints skipped); not saved.
    #[serde(skip)]
    pub notes: Vec<String>,
}

/// `checkpoint-STEP/checkpoint.json`: what the checkpoint holds, with checksums verified on resume.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub step: usize,
    pub tokens_seen: u64,
    pub train_seconds: f64,
    pub files: FileTable,
}

const CHECKPOINT_FILES: [&str; 3] = ["model.safetensors", "optimizer.safetensors", "config.json"];

/// Where a resumed run continues: the newest intact checkpoint, and what was skipped to find it.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    pub state: RunState,
    /// Checkpoints that were newer but damaged, with the reason, newest first.
    pub notes: Vec<String>,
}

/// Checks a checkpoint directory against its `checkpoint.json`.
fn verify_checkpoint(dir: &Path) -> Result<CheckpointMeta> {
    let (meta_path, meta): (_, CheckpointMeta) = FolderKind::Checkpoint.read_manifest(dir)?;
    meta.files.require(&meta_path, CHECKPOINT_FILES)?;
    meta.files.check(
        dir,
        "checkpoint.json",
        "its weights cannot be trusted",
        |_, _| true,
    )?;
    Ok(meta)
}

/// A training run directory: `config.json`, `train.json`, `state.json`, `checkpoint-STEP/`,
/// `metrics.jsonl`, `loss.png`.
pub struct Run {
    pub dir: PathBuf,
    /// The labml model's config; for a RETRO-fitted base, that of its new blocks.
    pub model_config: RetroConfig,
    pub train_config: TrainConfig,
    /// `retrofit.json`: the run RETRO-fits this imported base (only the new blocks train).
    pub retrofit: Option<RetrofitSpec>,
}

/// `RUN/retrofit.json`: which imported base a RETRO-fitted run reads, and where the blocks go.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrofitSpec {
    /// The base folder (`retro base import`), as given when the run started.
    pub base: PathBuf,
    /// SHA-256 of its `model.safetensors`: a run never reads another base by mistake.
    pub base_sha256: String,
    pub fit: RetrofitConfig,
}

impl RetrofitSpec {
    /// Opens the base and checks it is the one the run was trained on.
    pub fn open_base(&self) -> Result<BaseDir> {
        let base = BaseDir::open(&self.base)?;
        let sha = base.weights_sha256();
        if sha != self.base_sha256 {
            return Err(PipelineError::file(
                &self.base,
                format!(
                    "holds base weights {sha}, the run was RETRO-fitted on {}",
                    self.base_sha256
                ),
            ));
        }
        Ok(base)
    }
}

impl Run {
    pub fn open(dir: &Path) -> Result<Run> {
        let train_json = FolderKind::Run.open(dir)?;
        let retrofit_path = dir.join("retrofit.json");
        Ok(Run {
            dir: dir.to_owned(),
            model_config: RetroConfig::from_json_file(&dir.join("config.json"))?,
            train_config: read_json(&train_json)?,
            retrofit: if retrofit_path.exists() {
                Some(read_json(&retrofit_path)?)
            } else {
                None
            },
        })
    }

    pub fn state(&self) -> Result<Option<RunState>> {
        let p = self.dir.join("state.json");
        if !p.exists() {
            return Ok(None);
        }
        Ok(Some(FolderKind::Run.read_versioned(&p)?))
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

    /// The newest checkpoint that passes its checksums: `state.json`'s, or when that one is damaged
    /// (a disk error, a copy cut short), the newest older one, said in [`ResumePoint::notes`].
    pub fn resume_point(&self) -> Result<ResumePoint> {
        let state = self.state()?.ok_or_else(|| {
            PipelineError::file(
                &self.dir,
                "nothing to resume: no checkpoint (state.json missing)",
            )
        })?;
        let mut names: Vec<(usize, String)> = std::fs::read_dir(&self.dir)
            .map_err(|e| PipelineError::io(&self.dir, e))?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let step = n.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
                (step <= state.step).then_some((step, n))
            })
            .collect();
        names.sort_by(|a, b| b.cmp(a));
        let mut notes = vec![];
        for (step, name) in names {
            let dir = self.dir.join(&name);
            let legacy = !dir.join("checkpoint.json").exists() && name == state.checkpoint;
            if legacy {
                // Written before checkpoints carried checksums: nothing to verify against.
                notes.push(format!(
                    "{name} has no checkpoint.json (an older run): its weights are not verified"
                ));
                return Ok(ResumePoint { state, notes });
            }
            match verify_checkpoint(&dir) {
                Ok(m) if m.step == step => {
                    let state = RunState {
                        step,
                        checkpoint: name,
                        tokens_seen: m.tokens_seen,
                        train_seconds: m.train_seconds,
                        ..state
                    };
                    return Ok(ResumePoint { state, notes });
                }
                Ok(m) => notes.push(format!(
                    "{name} is damaged: checkpoint.json says step {}",
                    m.step
                )),
                Err(why) => notes.push(format!("{name} is damaged ({why}), skipped")),
            }
        }
        Err(PipelineError::file(
            &self.dir,
            format!("no intact checkpoint to resume from: {}", notes.join("; ")),
        ))
    }

    /// The latest checkpoint's weights.
    pub fn weights_path(&self) -> Result<PathBuf> {
        let state = self.state()?.ok_or_else(|| {
            PipelineError::file(&self.dir, "no checkpoint yet (state.json missing)")
        })?;
        // The weights must pass their checksums; a damaged latest checkpoint is an error here
        // (evaluating an older one without a word would be a silent wrong result).
        let point = self.resume_point()?;
        if point.state.checkpoint != state.checkpoint {
            return Err(PipelineError::file(
                &self.dir.join(&state.checkpoint),
                format!(
                    "{}; `retro train --resume` continues from {} (step {})",
                    point.notes.join("; "),
                    point.state.checkpoint,
                    point.state.step
                ),
            ));
        }
        Ok(self.dir.join(state.checkpoint).join("model.safetensors"))
    }

    /// The latest checkpoint as a model.
    pub fn load_model(&self, device: &Device) -> Result<RetroModel> {
        if self.retrofit.is_some() {
            return Err(PipelineError::file(
                &self.dir,
                "a RETRO-fitted Llama base, not a labml model: open it with `Run::load_retrofit`",
            ));
        }
        Ok(RetroModel::from_safetensors(
            &self.model_config,
            &self.weights_path()?,
            DType::F32,
            device,
        )?)
    }

    /// The latest checkpoint of a RETRO-fitted run: its base, and the new blocks trained on it.
    pub fn load_retrofit(&self, device: &Device) -> Result<RetroFitted> {
        let spec = self.retrofit.as_ref().ok_or_else(|| {
            PipelineError::file(&self.dir, "not a RETRO-fitted run (no retrofit.json)")
        })?;
        let base = spec.open_base()?.load(device)?;
        let model = RetroFitted::new(base, &spec.fit, 0)?;
        model.load_safetensors(&self.weights_path()?)?;
        Ok(model)
    }

    /// The latest checkpoint as the model it is: labml's, or a RETRO-fitted base.
    pub fn load(&self, device: &Device) -> Result<RunModel> {
        Ok(match self.retrofit {
            Some(_) => RunModel::Fitted(self.load_retrofit(device)?),
            None => RunModel::Labml(self.load_model(device)?),
        })
    }
}

/// A run's model, of either kind.
pub enum RunModel {
    Labml(RetroModel),
    Fitted(RetroFitted),
}

impl RunModel {
    /// The model, for evaluation.
    pub fn scorer(&self) -> &dyn Scorer {
        match self {
            RunModel::Labml(m) => m,
            RunModel::Fitted(m) => m,
        }
    }

    /// The frozen base of a RETRO-fitted model: what in-context retrieval runs.
    pub fn base(&self) -> Option<&LlamaBase> {
        match self {
            RunModel::Labml(_) => None,
            RunModel::Fitted(m) => Some(m.base()),
        }
    }
}

/// A resumed run keeps its training config: only `steps` may change (to extend the run; the
/// schedule then spans the new count), besides the per-invocation `max_seconds` and `stop_after`.
fn check_resumable(run: &TrainConfig, given: &TrainConfig, path: &Path) -> Result<()> {
    let a = serde_json::to_value(run).expect("config serialises");
    let b = serde_json::to_value(given).expect("config serialises");
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Ok(());
    };
    for (k, v) in a {
        if k == "steps" || k == "max_seconds" {
            continue;
        }
        if b.get(k) != Some(v) {
            return Err(PipelineError::file(
                path,
                format!(
                    "the run was trained with {k} = {v}, resumed with {}: a resumed run keeps its \
                     training config (only the step count may grow)",
                    b.get(k).map_or("nothing".into(), |x| x.to_string())
                ),
            ));
        }
    }
    Ok(())
}

/// Mean loss over up to `batches` validation batches (inference kernels).
pub fn validation_loss(
    model: &dyn Trainee,
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
        let logits = model.logits(&x, retrieval.then_some(&ret), None)?;
        total += cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        n += 1;
    }
    Ok((n > 0).then(|| total / n as f64))
}

/// What the caller (the CLI's progress bar) hears after each step.
pub type OnStep<'a> = &'a mut dyn FnMut(&StepMetrics, usize);

/// How a run begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start<'a> {
    /// A new run, weights from the seed.
    Fresh,
    /// A new run, weights from this `model.safetensors` (e.g. a base model for `freeze_base`).
    From(&'a Path),
    /// The run already in `run_dir`, from its newest intact checkpoint.
    Resume,
}

/// What a run trains on, and where.
#[derive(Clone, Copy)]
pub struct TrainData<'a> {
    pub dataset: &'a Dataset,
    pub database: &'a Database,
    pub device: &'a Device,
}

/// Creates `run_dir` (or resumes it) and trains.
pub fn train(
    run_dir: &Path,
    model_config: &RetroConfig,
    cfg: &TrainConfig,
    data: TrainData,
    start: Start,
    on_step: OnStep,
) -> Result<RunState> {
    let TrainData {
        dataset: ds,
        database: db,
        device,
    } = data;
    model_config.validate()?;
    check_dataset(ds, model_config.chunk_len, cfg)?;
    let vocab = db.load_tokenizer()?.vocab_size();
    if vocab > model_config.n_vocab {
        return Err(PipelineError::invalid(
            "n_vocab",
            model_config.n_vocab,
            format!("the database's tokenizer has {vocab} tokens"),
        ));
    }
    let model = RetroModel::new(model_config, cfg.seed, DType::F32, device)?;
    train_model(
        run_dir,
        model_config,
        None,
        &model,
        cfg,
        data,
        start,
        on_step,
    )
}

/// RETRO-fits an imported base: CCA and the neighbour encoder at `fit`'s places, trained on
/// `data` (whose database must use the base's tokenizer), the base never written. Starts or
/// resumes `run_dir` as [`train`] does.
pub fn train_retrofit(
    run_dir: &Path,
    base: &BaseDir,
    fit: &RetrofitConfig,
    cfg: &TrainConfig,
    data: TrainData,
    start: Start,
    on_step: OnStep,
) -> Result<RunState> {
    let TrainData {
        dataset: ds,
        database: db,
        device,
    } = data;
    let blocks = fit.blocks(&base.config)?;
    check_dataset(ds, fit.chunk_len, cfg)?;
    let theirs = db.load_tokenizer()?.fingerprint();
    if theirs != base.tokenizer()?.fingerprint() {
        return Err(PipelineError::file(
            db.dir(),
            format!(
                "the database's tokenizer is not the base's ({}): build it with `--tokenizer {}`",
                base.dir.display(),
                base.dir.join("tokenizer.json").display()
            ),
        ));
    }
    if matches!(start, Start::From(_)) {
        return Err(PipelineError::invalid(
            "start",
            "from weights",
            "a RETRO-fit starts from its base: begin afresh or resume",
        ));
    }
    let model = RetroFitted::new(base.load(device)?, fit, cfg.seed)?;
    let spec = RetrofitSpec {
        base: base.dir.clone(),
        base_sha256: base.weights_sha256().to_string(),
        fit: fit.clone(),
    };
    train_model(
        run_dir,
        &blocks,
        Some(spec),
        &model,
        cfg,
        data,
        start,
        on_step,
    )
}

/// The dataset was cut in the model's chunks and holds a batch.
fn check_dataset(ds: &Dataset, chunk_len: usize, cfg: &TrainConfig) -> Result<()> {
    if ds.meta().chunk_len != chunk_len {
        return Err(PipelineError::invalid(
            "chunk_len",
            chunk_len,
            format!("the dataset was cut with chunk_len {}", ds.meta().chunk_len),
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
    Ok(())
}

/// Where a run stands: steps taken, tokens trained on, seconds spent in training steps.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    step: usize,
    tokens_seen: u64,
    train_seconds: f64,
}

/// The loop both kinds of run share.
#[allow(clippy::too_many_arguments)]
fn train_model(
    run_dir: &Path,
    model_config: &RetroConfig,
    retrofit: Option<RetrofitSpec>,
    model: &dyn Trainee,
    cfg: &TrainConfig,
    data: TrainData,
    start: Start,
    on_step: OnStep,
) -> Result<RunState> {
    let mut opt = AdamW::new(
        model.trainable(cfg.freeze_base),
        AdamWParams {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let run = Run {
        dir: run_dir.to_owned(),
        model_config: model_config.clone(),
        train_config: cfg.clone(),
        retrofit,
    };
    let (progress, resumed_notes) = match start {
        Start::Resume => resume(&run, model, &mut opt, data)?,
        _ => {
            begin(&run, model, start, data.database)?;
            (Progress::default(), vec![])
        }
    };
    remove_half_written(run_dir);
    // Every step's metrics so far (a resumed run's too), for the loss curve. Steps past the
    // checkpoint (trained before a crash, or past a damaged checkpoint) are trained again: their
    // old lines go, so the file holds each step once.
    let metrics_path = run_dir.join("metrics.jsonl");
    let rows = MetricsLog::read(&metrics_path, progress.step)?;
    if start == Start::Resume {
        MetricsLog::rewrite(&metrics_path, &rows)?;
    }
    let mut steps = Steps {
        run: &run,
        model,
        opt,
        data,
        retrieval: model.reads_neighbours(),
        progress,
        budget_start: progress.train_seconds,
        metrics: MetricsLog::append_to(&metrics_path)?,
        rows,
        last_state: None,
        on_step,
    };
    // The step's clock starts when the previous step's bookkeeping ends, so waiting for a batch counts.
    let mut step_started = Instant::now();
    // The next batches are gathered on another thread while the model runs.
    data.dataset.for_each_train_batch(
        data.database,
        cfg.batch_size,
        cfg.seed,
        progress.step..cfg.steps,
        &mut |batch| {
            let go_on = steps.step(batch, step_started)?;
            step_started = Instant::now();
            Ok(go_on)
        },
    )?;
    let title = format!(
        "{} ({}): loss by step",
        run_dir
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy()),
        if steps.retrieval {
            "RETRO"
        } else {
            "no retrieval"
        }
    );
    crate::plot::loss_curve(&steps.rows, &title, &run_dir.join("loss.png"))?;
    let with_notes = |mut s: RunState| {
        s.notes = resumed_notes.clone();
        s
    };
    match steps.last_state.map(with_notes) {
        Some(s) => Ok(s),
        None if steps.progress.step > progress.step => {
            unreachable!("the last step always checkpoints")
        }
        None => run
            .state()?
            .map(with_notes)
            .ok_or_else(|| PipelineError::file(run_dir, "no steps to train")),
    }
}

/// Starts `run` in its directory, which must not hold a run: its config, training settings and
/// tokenizer written, the model loaded from `Start::From`'s weights if given.
fn begin(run: &Run, model: &dyn Trainee, start: Start, db: &Database) -> Result<()> {
    let run_dir = &run.dir;
    if run_dir.join("state.json").exists() {
        return Err(PipelineError::file(
            run_dir,
            "already holds a run (resume it, or choose another directory)",
        ));
    }
    std::fs::create_dir_all(run_dir).map_err(|e| PipelineError::io(run_dir, e))?;
    if let Start::From(init) = start {
        model.load(init)?;
    }
    write_json_atomic(&run_dir.join("config.json"), &run.model_config)?;
    if let Some(spec) = &run.retrofit {
        write_json_atomic(&run_dir.join("retrofit.json"), spec)?;
    }
    write_json_atomic(&run_dir.join("train.json"), &run.train_config)?;
    db.load_tokenizer()?.save(run_dir)?;
    Ok(())
}

/// Reopens the run in `run.dir` to go on: it must be the same model (and base), on the same
/// database and dataset, with the same settings but `steps`. Its newest intact checkpoint is
/// loaded into `model` and `opt`; returns where it stands and the damaged checkpoints skipped.
fn resume(
    run: &Run,
    model: &dyn Trainee,
    opt: &mut AdamW,
    data: TrainData,
) -> Result<(Progress, Vec<String>)> {
    let (run_dir, cfg, ds, db) = (&run.dir, &run.train_config, data.dataset, data.database);
    let prev = Run::open(run_dir)?;
    if prev.model_config != run.model_config {
        return Err(PipelineError::file(
            &run_dir.join("config.json"),
            "the run was trained with another model config",
        ));
    }
    if prev.retrofit != run.retrofit {
        return Err(PipelineError::file(
            &run_dir.join("retrofit.json"),
            "the run was RETRO-fitted on another base or with other blocks",
        ));
    }
    check_resumable(&prev.train_config, cfg, &run_dir.join("train.json"))?;
    let point = prev.resume_point()?;
    let state = point.state;
    if cfg.steps < state.step {
        return Err(PipelineError::invalid(
            "steps",
            cfg.steps,
            format!("the run is already at step {}", state.step),
        ));
    }
    if state.database_id != *db.id() {
        return Err(PipelineError::file(
            &run_dir.join("state.json"),
            format!(
                "the run was trained on database {}, given database {} ({})",
                state.database_id,
                db.id(),
                db.dir().display()
            ),
        ));
    }
    if !state.dataset_id.is_unknown() && state.dataset_id != ds.meta().dataset_id {
        return Err(PipelineError::file(
            &run_dir.join("state.json"),
            format!(
                "the run was trained on dataset {} ({}), but {} is now dataset {} \
                 (seq_len {}, K {}, filter {}): it was rebuilt; resume with the dataset the run \
                 started on, or start a new run",
                state.dataset_id,
                state.dataset.display(),
                ds.dir().display(),
                ds.meta().dataset_id,
                ds.meta().seq_len,
                ds.meta().k,
                ds.meta().filter
            ),
        ));
    }
    if cfg.steps != prev.train_config.steps {
        write_json_atomic(&run_dir.join("train.json"), cfg)?;
    }
    let ck = run_dir.join(&state.checkpoint);
    model.load(&ck.join("model.safetensors"))?;
    let opt_path = ck.join("optimizer.safetensors");
    let st = candle_core::safetensors::load(&opt_path, data.device).map_err(|source| {
        PipelineError::Tensors {
            path: opt_path.clone(),
            source,
        }
    })?;
    opt.load_state_dict(&st, state.step)?;
    let progress = Progress {
        step: state.step,
        tokens_seen: state.tokens_seen,
        train_seconds: state.train_seconds,
    };
    Ok((progress, point.notes))
}

/// Removes the half-written checkpoints and files of a run that was killed (staged
/// `.NAME.building-*` folders, `.NAME.PID.tmp` files): never referenced. A run directory has one
/// trainer at a time.
fn remove_half_written(run_dir: &Path) {
    retro_format::remove_stale_staged(run_dir);
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.ends_with(".tmp") {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(p)
                } else {
                    std::fs::remove_file(p)
                };
            }
        }
    }
}

/// The training steps of one invocation: the optimizer, where the run stands, the metrics logged
/// and the last checkpoint written.
struct Steps<'a, 'f> {
    run: &'a Run,
    model: &'a dyn Trainee,
    opt: AdamW,
    data: TrainData<'a>,
    retrieval: bool,
    progress: Progress,
    /// `train_seconds` when this invocation started: `max_seconds` counts from there.
    budget_start: f64,
    metrics: MetricsLog,
    rows: Vec<StepMetrics>,
    last_state: Option<RunState>,
    on_step: OnStep<'f>,
}

impl Steps<'_, '_> {
    /// One optimizer step on `batch`, timed from `started`, then validation and a checkpoint when
    /// due. Returns whether to go on.
    fn step(&mut self, mut batch: crate::dataset::Batch, started: Instant) -> Result<bool> {
        let cfg = &self.run.train_config;
        let step = self.progress.step;
        if self.retrieval && cfg.neighbour_shuffle > 0.0 {
            // Seeded by the step, so a resumed run shuffles as the uninterrupted one did.
            batch.shuffle_neighbours(cfg.neighbour_shuffle, cfg.seed ^ ((step as u64) << 20));
        }
        let (x, y, ret) = batch.tensors(self.data.device)?;
        let (loss, mut grads) =
            self.model
                .loss_and_grads(&x, &y, self.retrieval.then_some(&ret))?;
        let grad_norm = clip_grad_norm(self.opt.vars(), &mut grads, cfg.grad_clip)?;
        // A decaying schedule spans the run's time budget when that ends it before `steps`
        // (counted over the whole run, so a resumed run goes on down the same curve).
        let spent = cfg
            .max_seconds
            .map(|m| self.progress.train_seconds / m.max(1e-9));
        let lr = cfg
            .schedule
            .lr_within(cfg.lr, cfg.warmup, step + 1, cfg.steps, spent);
        self.opt.step(&grads, lr)?;
        let step = step + 1;
        let tokens = batch.batch * batch.seq_len;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            return Err(PipelineError::invalid(
                "loss",
                loss_v,
                format!("diverged at step {step}; lower the learning rate"),
            ));
        }
        let seconds = started.elapsed().as_secs_f64();
        self.progress = Progress {
            step,
            tokens_seen: self.progress.tokens_seen + tokens as u64,
            train_seconds: self.progress.train_seconds + seconds,
        };
        let mut m = StepMetrics {
            step,
            loss: loss_v,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / seconds,
            valid_loss: None,
        };
        let out_of_time = cfg
            .max_seconds
            .is_some_and(|s| self.progress.train_seconds - self.budget_start >= s)
            || cfg.stop_after.is_some_and(|s| step >= s);
        let last = step == cfg.steps || out_of_time;
        let (ds, db) = (self.data.dataset, self.data.database);
        if cfg.eval_every > 0 && (step.is_multiple_of(cfg.eval_every) || last) {
            m.valid_loss = validation_loss(
                self.model,
                ds,
                db,
                cfg.batch_size,
                cfg.eval_batches,
                self.retrieval,
            )?;
        }
        self.metrics.push(&m)?;
        (self.on_step)(&m, cfg.steps);
        self.rows.push(m);
        if last || (cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every)) {
            self.last_state = Some(save_checkpoint(
                self.run,
                self.model,
                &self.opt,
                self.progress,
                ds,
                db,
            )?);
        }
        Ok(!out_of_time)
    }
}

/// Writes `checkpoint-STEP/` through a temporary directory and rename, then points `state.json` at it
/// (atomically), then removes older checkpoints but the previous one.
fn save_checkpoint(
    run: &Run,
    model: &dyn Trainee,
    opt: &AdamW,
    progress: Progress,
    ds: &Dataset,
    db: &Database,
) -> Result<RunState> {
    let Progress {
        step,
        tokens_seen,
        train_seconds,
    } = progress;
    let name = format!("checkpoint-{step:07}");
    // A checkpoint of this step left by a run that died after writing it is replaced.
    let staged = FolderKind::Checkpoint.stage(&run.dir.join(&name), true)?;
    let tmp = staged.path();
    model.save(&tmp.join("model.safetensors"))?;
    let (moments, _) = opt.state_dict()?;
    let moments: std::collections::HashMap<String, Tensor> = moments
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    write_json_atomic(&tmp.join("config.json"), &run.model_config)?;
    write_json_atomic(
        &tmp.join(FolderKind::Checkpoint.marker()),
        &CheckpointMeta {
            format_version: FolderKind::Checkpoint.version(),
            step,
            tokens_seen,
            train_seconds,
            files: FileTable::record(tmp, CHECKPOINT_FILES)?,
        },
    )?;
    // The folder's entries must be durable before the swap publishes them.
    sync_path(tmp)?;
    staged.commit()?;
    let state = RunState {
        format_version: RUN_FORMAT_VERSION,
        step,
        checkpoint: name.clone(),
        dataset: ds.dir().to_owned(),
        database_id: db.id().clone(),
        tokens_seen,
        train_seconds,
        dataset_id: ds.meta().dataset_id.clone(),
        notes: vec![],
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

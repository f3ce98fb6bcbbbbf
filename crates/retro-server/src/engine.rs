//! The decoding engine: one thread owns the model, the database and the embedder. Each turn it
//! admits waiting requests up to `max_batch`, drops those whose client is gone or whose time is
//! up, and advances every active request by one token with one batched model step
//! ([`retro_pipeline::step_together`]); each request retrieves for its own chunks as they
//! complete, and hears its text, neighbours and end through its own channel.

use crate::api::Params;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::text::TextStream;
use retro_index::{Database, Embedder, LmTokenizer};
use retro_model::llama::LlamaBase;
use retro_model::retrofit::RetroFitted;
use retro_model::RetroModel;
use retro_pipeline::{
    step_together, Decoder, Event, Finish, Gate, Generation, PipelineError, Retriever,
};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver, UnboundedSender};

/// The model a server decodes.
pub enum ServedModel {
    /// A RETRO model trained from scratch (labml's architecture).
    Labml(RetroModel),
    /// A RETRO-fitted pretrained base.
    Fitted(RetroFitted),
    /// A pretrained base alone: no retrieval.
    Base(LlamaBase),
}

/// What retrieval reads: the database, its embedder, and the default K and gate.
pub struct ServedRetrieval {
    pub db: Database,
    pub embedder: Box<dyn Embedder>,
    pub k: usize,
    pub gate: Option<Gate>,
}

/// Everything a server loads once, before it is ready.
pub struct Served {
    pub model: ServedModel,
    /// The tokenizer the model reads.
    pub tokenizer: LmTokenizer,
    /// `None`: generation without retrieval.
    pub retrieval: Option<ServedRetrieval>,
}

/// One neighbour read for a chunk, as the response's `retrieval` lists it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct NeighbourInfo {
    /// The id of the document it comes from.
    pub document: String,
    pub chunk_id: u64,
    pub distance: f32,
    /// The chunk and its continuation.
    pub text: String,
}

/// The neighbours retrieved when chunk `chunk` of the text (prompt included) completed.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ChunkRetrieval {
    pub chunk: usize,
    pub text: String,
    /// False where the gate left this chunk's neighbours unread.
    pub read: bool,
    pub neighbours: Vec<NeighbourInfo>,
}

/// What a request hears from the engine, in order: `Accepted` or `Rejected` first, then
/// `Retrieved` and `Text` as they come, then `Done` or `Failed`.
#[derive(Debug)]
pub(crate) enum Msg {
    Accepted { prompt_tokens: usize },
    Rejected(ApiError),
    Retrieved(ChunkRetrieval),
    Text(String),
    Done(Summary),
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    /// OpenAI's `finish_reason`: "stop", "length", or "time_limit".
    pub finish: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A place among the requests admitted or waiting; freed when the request is done with,
/// whichever way (finished, refused, client gone).
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place if fewer than `limit` are taken.
    pub fn take(taken: &Arc<AtomicUsize>, limit: usize) -> Option<Slot> {
        let mut n = taken.load(Ordering::Acquire);
        loop {
            if n >= limit {
                return None;
            }
            match taken.compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Slot(taken.clone())),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) struct Job {
    pub id: String,
    pub params: Params,
    pub events: UnboundedSender<Msg>,
    /// Held until the job is dropped: then its place frees.
    pub _slot: Slot,
    pub received: Instant,
}

/// Shared between the HTTP side and the engine.
#[derive(Default)]
pub(crate) struct Control {
    /// Set once everything is loaded.
    pub ready: AtomicBool,
    /// Set on SIGTERM: nothing more is admitted.
    pub stopping: AtomicBool,
    /// After SIGTERM: when the streams still in flight are cut.
    pub cut_at: OnceLock<Instant>,
}

/// Runs until every sender of `jobs` is gone and no request is left.
pub(crate) fn run(
    served: Served,
    cfg: &ServerConfig,
    jobs: UnboundedReceiver<Job>,
    ctl: &Control,
) -> Result<(), PipelineError> {
    let retriever = match &served.retrieval {
        Some(r) => Some(
            Retriever::new(&r.db, r.embedder.as_ref(), &served.tokenizer, r.k)?.with_gate(r.gate),
        ),
        None => None,
    };
    let mut engine = Engine {
        cfg,
        ctl,
        tokenizer: &served.tokenizer,
        retriever,
        jobs,
    };
    ctl.ready.store(true, Ordering::Release);
    tracing::info!("ready");
    match &served.model {
        ServedModel::Labml(m) => engine.serve(m),
        ServedModel::Fitted(m) => engine.serve(m),
        ServedModel::Base(m) => engine.serve(m),
    }
    Ok(())
}

struct Engine<'a> {
    cfg: &'a ServerConfig,
    ctl: &'a Control,
    tokenizer: &'a LmTokenizer,
    retriever: Option<Retriever<'a>>,
    jobs: UnboundedReceiver<Job>,
}

/// A request being decoded, beside its [`Generation`].
struct Active {
    job: Job,
    text: TextStream,
    started: Instant,
    chunks: usize,
    /// Why the engine ended it, where the generation did not end itself.
    cut: Option<&'static str>,
}

impl<'a> Engine<'a> {
    fn serve<D: Decoder>(&mut self, model: &'a D) {
        let mut gens: Vec<Generation<'a, D>> = vec![];
        let mut active: Vec<Active> = vec![];
        loop {
            if !self.admit(model, &mut gens, &mut active) {
                return;
            }
            let now = Instant::now();
            let cut_all = self.ctl.cut_at.get().is_some_and(|&t| now >= t);
            for (g, a) in gens.iter_mut().zip(&mut active) {
                if a.job.events.is_closed() {
                    g.finish(Finish::Cancelled);
                } else if cut_all {
                    a.cut = Some("shutdown");
                    g.finish(Finish::Cancelled);
                } else if now - a.job.received > self.cfg.limits.request_time {
                    a.cut = Some("time_limit");
                    g.finish(Finish::Cancelled);
                }
            }
            let mut retrieved: Vec<Vec<ChunkRetrieval>> = vec![vec![]; gens.len()];
            let db = self.retriever.as_ref().map(|r| r.database());
            let tokenizer = self.tokenizer;
            let stepped = step_together(model, &mut gens, &mut |i, e| {
                if let (
                    Event::Neighbours {
                        chunk,
                        tokens,
                        neighbours,
                    },
                    Some(db),
                ) = (e, db)
                {
                    retrieved[i].push(describe(db, tokenizer, chunk, tokens, neighbours));
                }
            });
            if let Err(e) = stepped {
                tracing::error!("model step failed: {e}");
            }
            for ((g, a), r) in gens.iter_mut().zip(&mut active).zip(retrieved) {
                a.chunks += r.len();
                for c in r {
                    let _ = a.job.events.send(Msg::Retrieved(c));
                }
                let done = g.finished().is_some();
                let (delta, stopped) = a.text.update(self.tokenizer, g.generated(), done);
                if !delta.is_empty() {
                    let _ = a.job.events.send(Msg::Text(delta));
                }
                if stopped {
                    g.finish(Finish::Stop);
                }
            }
            // Finished requests leave; their slots free as their jobs drop.
            let mut i = 0;
            while i < gens.len() {
                if gens[i].finished().is_some() {
                    let g = gens.swap_remove(i);
                    let a = active.swap_remove(i);
                    self.conclude(&g, a);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Admits waiting requests while slots are free, waiting for one when nothing is active.
    /// Returns false when the engine should stop.
    fn admit<D: Decoder>(
        &mut self,
        model: &'a D,
        gens: &mut Vec<Generation<'a, D>>,
        active: &mut Vec<Active>,
    ) -> bool {
        while gens.len() < self.cfg.max_batch {
            let job = if gens.is_empty() {
                match self.jobs.blocking_recv() {
                    Some(j) => j,
                    None => return false,
                }
            } else {
                match self.jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
                }
            };
            if job.events.is_closed() {
                continue;
            }
            if self.ctl.stopping.load(Ordering::Acquire) {
                let _ = job.events.send(Msg::Rejected(ApiError::overloaded(
                    "the server is stopping",
                )));
                continue;
            }
            match self.start(model, &job.params) {
                Ok(g) => {
                    let _ = job.events.send(Msg::Accepted {
                        prompt_tokens: g.prompt().len(),
                    });
                    active.push(Active {
                        text: TextStream::new(&job.params.stop),
                        job,
                        started: Instant::now(),
                        chunks: 0,
                        cut: None,
                    });
                    gens.push(g);
                }
                Err(e) => {
                    let _ = job.events.send(Msg::Rejected(e));
                }
            }
        }
        true
    }

    fn start<D: Decoder>(&self, model: &'a D, p: &Params) -> Result<Generation<'a, D>, ApiError> {
        let r = &p.retrieval;
        let retriever = match (&self.retriever, r.enabled) {
            (Some(base), true) => {
                let mut x = base.clone();
                if let Some(k) = r.k {
                    x = x
                        .with_k(k)
                        .map_err(|e| ApiError::invalid("retrieval.k", e.to_string()))?;
                }
                if let Some(g) = r.gate {
                    x = x.with_gate(g);
                }
                Some(x)
            }
            _ => None,
        };
        let g = Generation::new(
            model,
            retriever.as_ref(),
            self.tokenizer,
            &p.prompt,
            p.max_tokens,
            &p.sampling,
        )
        .map_err(|e| {
            let param = match &e {
                PipelineError::Invalid { field, .. } => *field,
                _ => "prompt",
            };
            ApiError::invalid(param, e.to_string())
        })?;
        let limit = self.cfg.limits.max_prompt_tokens;
        if g.prompt().len() > limit {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "{} tokens is over the limit of {limit} tokens",
                    g.prompt().len()
                ),
            ));
        }
        Ok(g)
    }

    /// Sends a finished request its end and logs it.
    fn conclude<D: Decoder>(&self, g: &Generation<'a, D>, a: Active) {
        let summary = Summary {
            finish: match (a.cut, g.finished()) {
                (Some(why), _) => why,
                (None, Some(Finish::Length)) => "length",
                _ => "stop",
            },
            prompt_tokens: g.prompt().len(),
            completion_tokens: g.generated().len(),
        };
        let secs = a.started.elapsed().as_secs_f64();
        match g.finished() {
            Some(Finish::Failed(msg)) => {
                tracing::error!(id = %a.job.id, "failed: {msg}");
                let _ = a.job.events.send(Msg::Failed(msg.clone()));
            }
            Some(Finish::Cancelled) if a.cut.is_none() => {
                tracing::info!(
                    id = %a.job.id,
                    "client gone after {} tokens, {secs:.2} s",
                    summary.completion_tokens
                );
            }
            _ => {
                tracing::info!(
                    id = %a.job.id,
                    "{} prompt + {} tokens, {} chunks retrieved, {secs:.2} s ({:.1} tokens/s), finish {}",
                    summary.prompt_tokens,
                    summary.completion_tokens,
                    a.chunks,
                    summary.completion_tokens as f64 / secs.max(1e-9),
                    summary.finish
                );
                let _ = a.job.events.send(Msg::Done(summary));
            }
        }
    }
}

/// The response's view of one chunk's neighbours.
fn describe(
    db: &Database,
    tokenizer: &LmTokenizer,
    chunk: usize,
    tokens: &[u32],
    n: &retro_pipeline::Neighbours,
) -> ChunkRetrieval {
    let store = db.store();
    let text = |t: &[u32]| tokenizer.decode(t).unwrap_or_default();
    ChunkRetrieval {
        chunk,
        text: text(tokens),
        read: !matches!(n.keep.as_deref(), Some([k]) if *k == 0.0),
        neighbours: n
            .chunk_ids
            .iter()
            .zip(&n.distances)
            .filter_map(|(id, &distance)| {
                let id = (*id)?;
                Some(NeighbourInfo {
                    document: store.document(store.document_of(id)).id.clone(),
                    chunk_id: id.0 as u64,
                    distance,
                    text: text(&store.neighbour(id)),
                })
            })
            .collect(),
    }
}

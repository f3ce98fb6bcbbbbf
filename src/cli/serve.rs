//! `retro serve`: a run (or a base alone) behind OpenAI's completions API, retrieving for every
//! chunk as it completes. The server is `retro-server`'s; this parses its settings and says how
//! to load the model.

use anyhow::Result;
use clap::Args;
use retro_pipeline::RunModel;
use retro_server::{Limits, Served, ServedModel, ServedRetrieval, Server, ServerConfig};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The run (or base) served; `--k` is the neighbours per chunk unless a request sets
    /// `retrieval.k`.
    #[command(flatten)]
    pub model: super::common::ModelSource,
    /// Where to listen. 127.0.0.1 unless you mean to open it to a network; port 0 picks a free
    /// port (printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "RETRO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests decoded together (their steps batched).
    #[arg(long, default_value_t = ServerConfig::default().max_batch)]
    pub max_batch: usize,
    /// Requests that may wait for a slot; past them, 503 with Retry-After.
    #[arg(long, default_value_t = ServerConfig::default().queue)]
    pub queue: usize,
    /// Request bodies over this many bytes get 413.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Prompts over this many tokens get 400.
    #[arg(long, default_value_t = Limits::default().max_prompt_tokens)]
    pub max_prompt_tokens: usize,
    /// The largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_tokens)]
    pub max_tokens_limit: usize,
    /// The largest `retrieval.k` a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_k)]
    pub max_k: usize,
    /// Seconds a request may take; then it ends with finish_reason "time_limit".
    #[arg(long, default_value_t = Limits::default().request_time.as_secs_f64())]
    pub request_timeout: f64,
    /// Seconds the streams in flight may go on after SIGTERM before they are cut.
    #[arg(long, default_value_t = ServerConfig::default().shutdown_grace.as_secs_f64())]
    pub shutdown_grace: f64,
    #[command(flatten)]
    pub gate: super::common::GateArgs,
    #[command(flatten)]
    pub embedder: super::common::EmbedderArgs,
}

fn seconds(name: &str, s: f64) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0) {
        anyhow::bail!("--{name} must be a positive number of seconds, not {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

pub fn run(a: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    if a.max_batch == 0 {
        anyhow::bail!("--max-batch must be at least 1");
    }
    let cfg = ServerConfig {
        addr: a.addr,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        max_batch: a.max_batch,
        queue: a.queue,
        shutdown_grace: seconds("shutdown-grace", a.shutdown_grace)?,
        limits: Limits {
            max_body_bytes: a.max_body_bytes,
            max_prompt_bytes: Limits::default().max_prompt_bytes.min(a.max_body_bytes),
            max_prompt_tokens: a.max_prompt_tokens,
            max_tokens: a.max_tokens_limit,
            max_k: a.max_k,
            request_time: seconds("request-timeout", a.request_timeout)?,
        },
    };
    let name = a
        .model
        .run
        .as_ref()
        .or(a.model.base.as_ref())
        .and_then(|p| p.file_name())
        .map_or("retro".into(), |n| n.to_string_lossy().into_owned());
    let server = Server::bind(cfg)?;
    // The line scripts wait for (with port 0, the port is only known here).
    println!("listening on http://{}", server.local_addr());
    server.run(name, move || load(&a).map_err(|e| format!("{e:#}").into()))?;
    Ok(())
}

/// Loads the model, and with a run its database and embedder, printing each step.
fn load(a: &ServeArgs) -> Result<Served> {
    use super::common::{open_model, OpenedModel};
    Ok(
        match open_model(&a.model, &a.embedder, &|s| eprintln!("{s}"))? {
            OpenedModel::Base { model, tokenizer } => Served {
                tokenizer,
                model: ServedModel::Base(model),
                retrieval: None,
            },
            OpenedModel::Run {
                model,
                db,
                embedder,
            } => Served {
                model: match model {
                    RunModel::Labml(m) => ServedModel::Labml(m),
                    RunModel::Fitted(m) => ServedModel::Fitted(m),
                },
                tokenizer: db.tokenizer,
                retrieval: Some(ServedRetrieval {
                    db: db.db,
                    embedder,
                    k: db.k,
                    gate: a.gate.gate()?,
                }),
            },
        },
    )
}

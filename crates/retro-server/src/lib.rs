//! # retro-server
//!
//! Retrieval-augmented generation over HTTP: OpenAI's completions API (`POST /v1/completions`,
//! streamed as server-sent events or whole), `GET /v1/models` and `GET /health`, in front of a
//! RETRO model that retrieves for every chunk as it completes. The requests in flight are decoded
//! together: each turn, one batched model step advances all of them, each on its own cache with
//! its own neighbours. RETRO's extension, `retrieval` (`enabled`, `k`, `gate`), sets retrieval per
//! request, and every response lists the neighbours each completed chunk read.
//!
//! The server loads its model on its own thread after it starts listening (`/health` says
//! `loading` until then), refuses bad requests with a 400 naming the field, answers 503 with
//! `Retry-After` past its queue, needs `Authorization: Bearer` when it has a key, and on SIGTERM
//! lets the streams in flight finish (cut after a grace time) before it exits.
//!
//! ```
//! use retro_index::{BuildOptions, Corpus, Database, Document, LexicalEmbedder, LmTokenizer};
//! use retro_model::{RetroConfig, RetroModel};
//! use retro_server::{Served, ServedModel, ServedRetrieval, Server, ServerConfig};
//!
//! let corpus = Corpus::from_documents([Document {
//!     id: "a".into(), source: "mem".into(), text: "The cat sat on the mat. ".repeat(8),
//! }]);
//! let tokenizer = LmTokenizer::char_from_corpus(&corpus);
//! let dir = tempfile::tempdir()?;
//! let opts = BuildOptions { chunk_len: 8, ..Default::default() };
//! let db = Database::build(&corpus, &tokenizer, &LexicalEmbedder::new(64)?, &opts, &dir.path().join("db"))?;
//! let config = RetroConfig { n_vocab: tokenizer.vocab_size(), chunk_len: 8, ..RetroConfig::tiny() };
//! let model = RetroModel::new(&config, 1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
//!
//! // Port 0: any free port of 127.0.0.1.
//! let server = Server::bind(ServerConfig { addr: "127.0.0.1:0".parse()?, ..Default::default() })?;
//! let addr = server.local_addr();
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let running = std::thread::spawn(move || {
//!     server.run_until("tiny".into(), move || Ok(Served {
//!         model: ServedModel::Labml(model),
//!         tokenizer,
//!         retrieval: Some(ServedRetrieval { db, embedder: Box::new(LexicalEmbedder::new(64)?), k: 2, gate: None }),
//!     }), async { stopped.await.ok(); })
//! });
//!
//! // Any HTTP client: here a bare one, as curl would send it.
//! let body = r#"{"prompt": "The cat sat on", "max_tokens": 12, "temperature": 0}"#;
//! let answer = retro_server::client::post_json(addr, "/v1/completions", body, None)?;
//! assert_eq!(answer.status, 200, "{}", answer.body);
//! let v: serde_json::Value = serde_json::from_str(&answer.body)?;
//! assert_eq!(v["usage"]["completion_tokens"], 12);
//! assert_eq!(v["retrieval"]["chunks"][0]["chunk"], 0); // "The cat " completed chunk 0
//! stop.send(()).ok();
//! running.join().unwrap()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod client;
pub mod config;
mod engine;
pub mod error;
mod http;
mod text;

pub use config::{Limits, ServerConfig};
pub use engine::{ChunkRetrieval, NeighbourInfo, Served, ServedModel, ServedRetrieval};
pub use error::ApiError;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What loading the model may fail with.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// A bound server, not yet serving.
pub struct Server {
    listener: std::net::TcpListener,
    cfg: ServerConfig,
}

impl Server {
    /// Binds `cfg.addr` (port 0 picks a free port: see [`Server::local_addr`]).
    pub fn bind(cfg: ServerConfig) -> Result<Self, ServeError> {
        let bind = |source| ServeError::Bind {
            addr: cfg.addr,
            source,
        };
        let listener = std::net::TcpListener::bind(cfg.addr).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        Ok(Self { listener, cfg })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener")
    }

    /// Serves until SIGTERM or Ctrl-C, loading the model with `load` (on the engine's thread,
    /// while `/health` says `loading`).
    pub fn run(
        self,
        name: String,
        load: impl FnOnce() -> Result<Served, LoadError> + Send + 'static,
    ) -> Result<(), ServeError> {
        self.run_until(name, load, signal())
    }

    /// Serves until `shutdown` completes, then as after SIGTERM: nothing more is admitted, the
    /// streams in flight finish (cut after the grace time), and it returns.
    pub fn run_until(
        self,
        name: String,
        load: impl FnOnce() -> Result<Served, LoadError> + Send + 'static,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let ctl = Arc::new(engine::Control::default());
        let (jobs, queue) = tokio::sync::mpsc::unbounded_channel();
        let (failed_tx, failed) = tokio::sync::oneshot::channel::<String>();
        let engine = {
            let (ctl, cfg) = (ctl.clone(), self.cfg.clone());
            std::thread::Builder::new()
                .name("retro-engine".into())
                .spawn(move || {
                    let t0 = Instant::now();
                    let result = load().map_err(|e| e.to_string()).and_then(|served| {
                        tracing::info!("loaded in {:.1} s", t0.elapsed().as_secs_f64());
                        engine::run(served, &cfg, queue, &ctl).map_err(|e| e.to_string())
                    });
                    if let Err(e) = &result {
                        let _ = failed_tx.send(e.clone());
                    }
                    result
                })?
        };
        let addr = self.local_addr();
        let app = http::router(jobs, ctl.clone(), self.cfg.clone(), name);
        let grace = self.cfg.shutdown_grace;
        let served = rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(self.listener)?;
            tracing::info!("listening on http://{addr} (loading the model)");
            let stop = async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = failed => {}
                }
                ctl.stopping.store(true, Ordering::Release);
                let _ = ctl.cut_at.set(Instant::now() + grace);
                tracing::info!("stopping: finishing the requests in flight");
            };
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        });
        // The router is gone with its senders: the engine ends once its requests are done.
        let engine = engine
            .join()
            .map_err(|_| ServeError::Load("the engine panicked".into()))?;
        served?;
        engine.map_err(ServeError::Load)
    }
}

/// SIGTERM or Ctrl-C.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

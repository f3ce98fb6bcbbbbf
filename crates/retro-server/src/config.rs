//! What the server is started with: where it listens, who may call it, and its limits.

use std::net::SocketAddr;
use std::time::Duration;

/// Bounds on one request; each is settable (`retro serve --help`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request bodies over this many bytes get 413.
    pub max_body_bytes: usize,
    /// Prompts over this many bytes get 400 before they are tokenized.
    pub max_prompt_bytes: usize,
    /// Prompts over this many tokens get 400 (the model's own context also bounds them).
    pub max_prompt_tokens: usize,
    /// The largest `max_tokens` accepted.
    pub max_tokens: usize,
    /// The largest `retrieval.k` accepted.
    pub max_k: usize,
    /// A request still generating after this long ends with `finish_reason` "time_limit".
    pub request_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_prompt_bytes: 256 << 10,
            max_prompt_tokens: 4096,
            max_tokens: 2048,
            max_k: 16,
            request_time: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// 127.0.0.1 by default: opening it to a network is the caller's explicit choice.
    pub addr: SocketAddr,
    /// When set, every `/v1` request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Sequences decoded together, their steps batched.
    pub max_batch: usize,
    /// Requests that may wait for a slot; past them, 503 with `Retry-After`.
    pub queue: usize,
    /// After SIGTERM, streams in flight may finish for this long, then are cut.
    pub shutdown_grace: Duration,
    pub limits: Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            max_batch: 16,
            queue: 64,
            shutdown_grace: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }
}

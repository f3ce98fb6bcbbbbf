//! The HTTP side: routes, the API key, bodies within their limit, and the responses of
//! `/v1/completions` (one JSON, or server-sent events in OpenAI's format).

use crate::api;
use crate::engine::{ChunkRetrieval, Control, Job, Msg, Slot, Summary};
use crate::error::ApiError;
use crate::ServerConfig;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// How long a request's body may take to arrive.
const BODY_TIME: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) struct Inner {
    pub jobs: UnboundedSender<Job>,
    pub ctl: Arc<Control>,
    pub cfg: ServerConfig,
    pub name: String,
    /// SHA-256 of the API key: keys are compared as digests, in constant time.
    key: Option<[u8; 32]>,
    taken: Arc<AtomicUsize>,
    next_id: AtomicU64,
}

pub(crate) fn router(
    jobs: UnboundedSender<Job>,
    ctl: Arc<Control>,
    cfg: ServerConfig,
    name: String,
) -> Router {
    let inner = Inner {
        jobs,
        ctl,
        key: cfg.api_key.as_deref().map(digest),
        cfg,
        name,
        taken: Arc::default(),
        next_id: AtomicU64::new(seed_from_clock()),
    };
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::not_found("no such path: see /v1/completions") })
        .with_state(Arc::new(inner))
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn seed_from_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Inner {
    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(want) = &self.key else {
            return Ok(());
        };
        let got = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(digest)
            .unwrap_or([0; 32]);
        if bool::from(got.ct_eq(want)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    fn check_ready(&self) -> Result<(), ApiError> {
        if self.ctl.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(ApiError::overloaded("the model is still loading"))
        }
    }
}

async fn health(State(s): State<Arc<Inner>>) -> Response {
    if s.ctl.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ok", "model": s.name})).into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn models(State(s): State<Arc<Inner>>, headers: HeaderMap) -> Result<Response, ApiError> {
    s.check_key(&headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "retro"}],
    }))
    .into_response())
}

async fn completions(
    State(s): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    s.check_key(&headers)?;
    s.check_ready()?;
    let limit = s.cfg.limits.max_body_bytes;
    // A client that stops sending its body does not hold the connection open.
    let bytes = tokio::time::timeout(BODY_TIME, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::timeout(BODY_TIME))?
        .map_err(|_| ApiError::too_large(limit))?;
    let id_n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let params = api::parse(&bytes)?.check(&s.cfg.limits, id_n)?;
    if s.ctl.stopping.load(Ordering::Acquire) {
        return Err(ApiError::overloaded("the server is stopping"));
    }
    let places = s.cfg.max_batch + s.cfg.queue;
    let slot = Slot::take(&s.taken, places).ok_or_else(|| {
        ApiError::overloaded(format!(
            "all {} decoding slots and {} queue places are taken",
            s.cfg.max_batch, s.cfg.queue
        ))
    })?;
    let (tx, mut rx) = unbounded_channel();
    let id = format!("cmpl-{id_n:016x}");
    let (stream, include_usage) = (params.stream, params.include_usage);
    s.jobs
        .send(Job {
            id: id.clone(),
            params,
            events: tx,
            _slot: slot,
            received: Instant::now(),
        })
        .map_err(|_| ApiError::internal("the decoding engine has stopped"))?;
    let prompt_tokens = match rx.recv().await {
        Some(Msg::Accepted { prompt_tokens }) => prompt_tokens,
        Some(Msg::Rejected(e)) => return Err(e),
        _ => {
            return Err(ApiError::internal(
                "the decoding engine dropped the request",
            ))
        }
    };
    let meta = Meta {
        id,
        created: unix_now(),
        model: s.name.clone(),
    };
    if stream {
        Ok(sse(meta, rx, include_usage))
    } else {
        whole(meta, rx, prompt_tokens).await
    }
}

/// What every response object repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn object(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

fn choice(text: &str, finish: Option<&str>) -> Value {
    json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}])
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    })
}

/// The non-streamed response: the whole text, `usage`, and every chunk's neighbours.
async fn whole(
    meta: Meta,
    mut rx: UnboundedReceiver<Msg>,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut chunks: Vec<ChunkRetrieval> = vec![];
    loop {
        match rx.recv().await {
            Some(Msg::Text(t)) => text.push_str(&t),
            Some(Msg::Retrieved(c)) => chunks.push(c),
            Some(Msg::Done(sum)) => {
                debug_assert_eq!(sum.prompt_tokens, prompt_tokens);
                let mut body = meta.object(choice(&text, Some(sum.finish)));
                body["usage"] = usage(&sum);
                body["retrieval"] = json!({ "chunks": chunks });
                return Ok(Json(body).into_response());
            }
            Some(Msg::Failed(m)) => return Err(ApiError::internal(m)),
            Some(Msg::Accepted { .. } | Msg::Rejected(_)) => {}
            None => {
                return Err(ApiError::internal(
                    "the decoding engine dropped the request",
                ))
            }
        }
    }
}

/// The streamed response: one event per piece of text, one per chunk's neighbours (with empty
/// text and a `retrieval` object), the last with `finish_reason`, `usage` when asked, then
/// `data: [DONE]`. Dropping it (the client gone) drops `rx`, which frees the request's slot.
fn sse(meta: Meta, rx: UnboundedReceiver<Msg>, include_usage: bool) -> Response {
    struct St {
        meta: Meta,
        rx: UnboundedReceiver<Msg>,
        pending: VecDeque<Event>,
        done: bool,
        include_usage: bool,
    }
    let data = |v: Value| Event::default().data(v.to_string());
    let st = St {
        meta,
        rx,
        pending: VecDeque::new(),
        done: false,
        include_usage,
    };
    let events = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Msg::Text(t)) => st.pending.push_back(data(st.meta.object(choice(&t, None)))),
                Some(Msg::Retrieved(c)) => {
                    let mut v = st.meta.object(choice("", None));
                    v["retrieval"] = json!({ "chunks": [c] });
                    st.pending.push_back(data(v));
                }
                Some(Msg::Done(sum)) => {
                    st.pending
                        .push_back(data(st.meta.object(choice("", Some(sum.finish)))));
                    if st.include_usage {
                        let mut v = st.meta.object(json!([]));
                        v["usage"] = usage(&sum);
                        st.pending.push_back(data(v));
                    }
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Msg::Failed(m)) => {
                    st.pending.push_back(data(ApiError::internal(m).body()));
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Msg::Accepted { .. } | Msg::Rejected(_)) => {}
                None => {
                    st.pending.push_back(data(
                        ApiError::internal("the decoding engine dropped the request").body(),
                    ));
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

//! The request of `POST /v1/completions` as OpenAI's completions API defines it, with RETRO's
//! `retrieval` extension, and its checks: every field out of range is a 400 that names it.

use crate::config::Limits;
use crate::error::ApiError;
use retro_pipeline::{Gate, Sampling};
use serde::Deserialize;

/// The body, as sent. Unknown fields are refused by name (a misspelt `max_token` would
/// otherwise be ignored silently).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// Accepted for the clients that always send it; the server serves one model.
    pub model: Option<String>,
    pub prompt: String,
    /// Default 16, as OpenAI's.
    pub max_tokens: Option<u64>,
    /// Default 1, as OpenAI's; 0 is greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    /// Default: a fresh seed per request.
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Only 1.
    pub n: Option<u64>,
    /// Accepted and ignored, as OpenAI uses it for abuse tracking.
    pub user: Option<String>,
    pub retrieval: Option<RetrievalRequest>,
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// A last event with `usage` and no choices.
    pub include_usage: Option<bool>,
}

/// RETRO's extension: whether and how each completed chunk retrieves.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalRequest {
    /// False: RETRO\[OFF\], no neighbour read. Default true.
    pub enabled: Option<bool>,
    /// Neighbours per chunk (default: the server's).
    pub k: Option<u64>,
    /// Which chunks' neighbours are read (default: the server's gate). `{}` reads every
    /// neighbour; otherwise one of `max_distance`, `min_overlap` or `coherent` (with `lookback`).
    pub gate: Option<GateRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    pub max_distance: Option<f32>,
    pub min_overlap: Option<f32>,
    pub coherent: Option<u64>,
    pub lookback: Option<u64>,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Params {
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub retrieval: RetrievalParams,
}

#[derive(Debug, Clone, Copy)]
pub struct RetrievalParams {
    pub enabled: bool,
    pub k: Option<usize>,
    /// `None`: the server's gate; `Some(None)`: every neighbour read.
    pub gate: Option<Option<Gate>>,
}

/// Parses a body, naming the field at fault in the error (`retrieval.k`, `stop[1]`).
pub fn parse(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    // serde would read a JSON array as the struct's fields in order.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid(
            "body",
            "malformed request: the body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // A missing field is named in serde's message, not in the path (an unknown one is in
        // both).
        let field = msg
            .starts_with("missing field")
            .then(|| field_in(&msg))
            .flatten();
        let root = path == "." || path == "?";
        let param = match (root, field) {
            (true, Some(f)) => f,
            (true, None) => "body".into(),
            (false, Some(f)) => format!("{path}.{f}"),
            (false, None) => path,
        };
        ApiError::invalid(param, format!("malformed request: {inner}"))
    })
}

/// The field serde's message names in backquotes (`unknown field `x``, `missing field `x``).
fn field_in(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_string())
}

impl CompletionRequest {
    /// Checks every field against the server's limits.
    pub fn check(self, limits: &Limits, fresh_seed: u64) -> Result<Params, ApiError> {
        if self.prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "must not be empty"));
        }
        if self.prompt.len() > limits.max_prompt_bytes {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "{} bytes is over the limit of {} bytes",
                    self.prompt.len(),
                    limits.max_prompt_bytes
                ),
            ));
        }
        let max_tokens = self.max_tokens.unwrap_or(16);
        if max_tokens == 0 || max_tokens > limits.max_tokens as u64 {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{max_tokens} is out of range: must be in 1..={}",
                    limits.max_tokens
                ),
            ));
        }
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                format!("{n}: this server returns one choice per request"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::invalid(
                "temperature",
                format!("{temperature} is out of range: must be in [0, 2] (0 is greedy)"),
            ));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(ApiError::invalid(
                "top_p",
                format!("{p} is out of range: must be in (0, 1]"),
            ));
        }
        if self.top_k == Some(0) {
            return Err(ApiError::invalid("top_k", "0: must be at least 1"));
        }
        let stop = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                "stop",
                format!("{} sequences: at most 4", stop.len()),
            ));
        }
        if let Some(i) = stop.iter().position(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::invalid(
                format!("stop[{i}]"),
                "must be 1 to 256 bytes",
            ));
        }
        let r = self.retrieval;
        let enabled = r.as_ref().and_then(|r| r.enabled).unwrap_or(true);
        let k = match r.as_ref().and_then(|r| r.k) {
            None => None,
            Some(k) if k == 0 || k > limits.max_k as u64 => {
                return Err(ApiError::invalid(
                    "retrieval.k",
                    format!("{k} is out of range: must be in 1..={}", limits.max_k),
                ))
            }
            Some(k) => Some(k as usize),
        };
        let gate = r.and_then(|r| r.gate).map(|g| g.gate()).transpose()?;
        Ok(Params {
            prompt: self.prompt,
            max_tokens: max_tokens as usize,
            sampling: Sampling {
                temperature,
                top_k: self.top_k.map(|k| k as usize),
                top_p: self.top_p,
                seed: self.seed.unwrap_or(fresh_seed),
            },
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            retrieval: RetrievalParams { enabled, k, gate },
        })
    }
}

impl GateRequest {
    fn gate(self) -> Result<Option<Gate>, ApiError> {
        let bad = |field: &str, e: retro_pipeline::PipelineError| {
            ApiError::invalid(format!("retrieval.gate.{field}"), e.to_string())
        };
        match (self.max_distance, self.min_overlap, self.coherent) {
            (None, None, None) if self.lookback.is_some() => Err(ApiError::invalid(
                "retrieval.gate.lookback",
                "comes only with `coherent`",
            )),
            (None, None, None) => Ok(None),
            (Some(d), None, None) => {
                Ok(Some(Gate::distance(d).map_err(|e| bad("max_distance", e))?))
            }
            (None, Some(o), None) => Ok(Some(Gate::overlap(o).map_err(|e| bad("min_overlap", e))?)),
            (None, None, Some(m)) => Ok(Some(
                Gate::coherent(m as usize, self.lookback.unwrap_or(1) as usize)
                    .map_err(|e| bad("coherent", e))?,
            )),
            _ => Err(ApiError::invalid(
                "retrieval.gate",
                "name one of `max_distance`, `min_overlap` and `coherent`",
            )),
        }
    }
}

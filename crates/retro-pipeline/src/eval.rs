//! Evaluation on held-out documents: loss, perplexity and bits per byte with retrieval on, with
//! retrieval off (CCA skipped: RETRO[OFF]) and for a baseline model without retrieval.

use crate::error::{PipelineError, Result};
use crate::filter::Filter;
use crate::retriever::Retriever;
use candle_core::{DType, Tensor};
use retro_index::{Corpus, LmTokenizer};
use retro_model::RetroModel;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Scores {
    /// Mean negative log-likelihood, nats per token.
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub documents: usize,
    pub tokens: usize,
    pub bytes: usize,
    pub retrieval_on: Option<Scores>,
    pub retrieval_off: Scores,
    pub baseline: Option<Scores>,
    /// Held-out documents whose id is also in the database: those database documents are excluded
    /// from retrieval during the evaluation.
    pub held_out_in_database: Vec<String>,
}

/// Windows of `seq_len + 1` tokens at stride `seq_len` over each document (the last may be shorter).
fn windows(tokens: &[u32], seq_len: usize) -> Vec<&[u32]> {
    let mut out = vec![];
    let mut s = 0;
    while s + 1 < tokens.len() {
        let e = (s + seq_len + 1).min(tokens.len());
        out.push(&tokens[s..e]);
        s += seq_len;
    }
    out
}

fn nll_sum(model: &RetroModel, x: &Tensor, y: &Tensor, ret: Option<&Tensor>) -> Result<f64> {
    let logits = match ret {
        Some(r) => model.forward(x, r)?,
        None => model.forward_without_retrieval(x)?,
    };
    let (b, t, v) = logits.dims3()?;
    let lsm = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?.to_dtype(DType::F32)?, 1)?;
    let picked = lsm.gather(&y.reshape((b * t, 1))?, 1)?;
    Ok(-(picked.sum_all()?.to_scalar::<f32>()? as f64))
}

fn scores(nll: f64, tokens: usize, bytes: usize) -> Scores {
    let loss = nll / tokens.max(1) as f64;
    Scores {
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
    }
}

/// Scores `model` (and `baseline`) on `held_out`, up to `max_tokens` scored tokens. Held-out documents
/// should not be in the database; those that are (same id) are listed and never retrieved.
pub fn evaluate(
    model: &RetroModel,
    baseline: Option<&RetroModel>,
    retriever: Option<&Retriever>,
    tokenizer: &LmTokenizer,
    held_out: &Corpus,
    seq_len: usize,
    max_tokens: Option<usize>,
) -> Result<EvalReport> {
    if seq_len == 0 {
        return Err(PipelineError::invalid("seq_len", 0, "must be positive"));
    }
    let device = model.device();
    let mut held_out_in_database = vec![];
    let mut excluded = std::collections::HashSet::new();
    if let Some(r) = retriever {
        let store = r.database().store();
        for d in &held_out.documents {
            if let Some(i) = store.documents().iter().position(|e| e.id == d.id) {
                held_out_in_database.push(d.id.clone());
                excluded.insert(i);
            }
        }
    }
    let retriever = retriever.map(|r| r.clone().with_excluded_documents(excluded));
    let retrieval = retriever
        .as_ref()
        .filter(|_| !model.config().ca_layers.is_empty());
    let (mut on, mut off, mut base) = (0.0, 0.0, 0.0);
    let (mut tokens, mut bytes) = (0usize, 0usize);
    for doc in &held_out.documents {
        let ids = tokenizer.encode(&doc.text)?;
        for w in windows(&ids, seq_len) {
            if max_tokens.is_some_and(|m| tokens >= m) {
                break;
            }
            let t = w.len() - 1;
            let x = Tensor::from_vec(w[..t].to_vec(), (1, t), device)?;
            let y = Tensor::from_vec(w[1..].to_vec(), (1, t), device)?;
            tokens += t;
            bytes += tokenizer.decode(&w[1..])?.len();
            if let Some(r) = retrieval {
                let ret = r
                    .retrieve(&[w[..t].to_vec()], None, Filter::None)?
                    .to_tensor(device)?;
                on += nll_sum(model, &x, &y, Some(&ret))?;
            }
            off += nll_sum(model, &x, &y, None)?;
            if let Some(b) = baseline {
                base += nll_sum(b, &x, &y, None)?;
            }
        }
    }
    if tokens == 0 {
        return Err(PipelineError::invalid(
            "held-out data",
            held_out.documents.len(),
            "no document has two tokens to score",
        ));
    }
    Ok(EvalReport {
        documents: held_out.documents.len(),
        tokens,
        bytes,
        retrieval_on: retrieval.map(|_| scores(on, tokens, bytes)),
        retrieval_off: scores(off, tokens, bytes),
        baseline: baseline.map(|_| scores(base, tokens, bytes)),
        held_out_in_database,
    })
}

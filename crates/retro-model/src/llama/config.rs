//! The Llama base's hyper-parameters, named as Hugging Face's `LlamaConfig` names them, so a
//! `config.json` written here reads as theirs.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A Llama decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// The output projection is the token embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Errors naming the first field out of its domain.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(ModelError::Config(m));
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("num_key_value_heads", self.num_key_value_heads, 1024),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ] {
            if v == 0 || v > max {
                return err(format!("`{name}` = {v} must be in 1..={max}"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "`hidden_size` = {} is not a multiple of `num_attention_heads` = {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return err(format!(
                "`num_attention_heads` = {} is not a multiple of `num_key_value_heads` = {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return err(format!(
                "head width {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return err(format!(
                "`rms_norm_eps` = {} must be > 0",
                self.rms_norm_eps
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return err(format!("`rope_theta` = {} must be > 0", self.rope_theta));
        }
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                return err(format!(
                    "`{name}` = {id} is beyond `vocab_size` = {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Reads and validates a `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        crate::config::read_config(path, Self::validate)
    }

    /// Number of parameters (the tied output projection counted once).
    pub fn num_parameters(&self) -> usize {
        let (d, kv) = (self.hidden_size, self.num_key_value_heads * self.head_dim());
        let layer = 2 * d * d + 2 * d * kv + 3 * d * self.intermediate_size + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }

    #[test]
    fn smollm2_counts_its_published_parameters() {
        let c = smollm2();
        c.validate().unwrap();
        assert_eq!(c.head_dim(), 64);
        // SmolLM2-135M: 134,515,008 parameters (Hugging Face's model card).
        assert_eq!(c.num_parameters(), 134_515_008);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = smollm2();
        c.num_key_value_heads = 2;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
        let mut c = smollm2();
        c.eos_token_id = Some(49152);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("eos_token_id"));
        let mut c = smollm2();
        c.rope_theta = f64::NAN;
        assert!(c.validate().unwrap_err().to_string().contains("rope_theta"));
    }
}

//! The model's hyper-parameters, named and laid out as the labml reference's constructor takes them.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

fn default_eps() -> f64 {
    1e-5
}
fn default_rope_base() -> f64 {
    10_000.0
}

/// RETRO decoder + neighbour encoder sizes. Layer sets are 0-based, as in the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetroConfig {
    pub n_vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    /// Decoder layers with chunked cross-attention (CCA).
    pub ca_layers: BTreeSet<usize>,
    pub chunk_len: usize,
    pub n_heads: usize,
    pub d_k: usize,
    pub d_ff: usize,
    pub enc_n_layers: usize,
    /// Encoder layers with cross-attention to the input chunk.
    pub enc_ca_layers: BTreeSet<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
}

impl RetroConfig {
    /// Which CCA (0-based, in layer order) decoder layer `layer` has, if any.
    pub fn cca_index(&self, layer: usize) -> Option<usize> {
        self.ca_layers.iter().position(|&l| l == layer)
    }

    /// labml's "small" training configuration (3,584,289 parameters).
    pub fn labml_small() -> Self {
        Self {
            n_vocab: 65,
            d_model: 128,
            n_layers: 6,
            ca_layers: [3, 5].into(),
            chunk_len: 16,
            n_heads: 16,
            d_k: 16,
            d_ff: 512,
            enc_n_layers: 6,
            enc_ca_layers: [3].into(),
            layer_norm_eps: 1e-5,
            rope_base: 10_000.0,
        }
    }

    /// A 4-layer, 64-wide model (CCA at layers 1 and 3, a 2-layer encoder): minutes on a CPU.
    pub fn tiny() -> Self {
        Self {
            n_vocab: 65,
            d_model: 64,
            n_layers: 4,
            ca_layers: [1, 3].into(),
            chunk_len: 16,
            n_heads: 4,
            d_k: 16,
            d_ff: 256,
            enc_n_layers: 2,
            enc_ca_layers: [1].into(),
            layer_norm_eps: 1e-5,
            rope_base: 10_000.0,
        }
    }

    /// The named presets: `labml-small`, `tiny`.
    pub const PRESETS: [&'static str; 2] = ["labml-small", "tiny"];

    /// A preset by name with the given vocabulary size.
    pub fn preset(name: &str, n_vocab: usize) -> Result<Self> {
        let mut c = match name {
            "labml-small" => Self::labml_small(),
            "tiny" => Self::tiny(),
            p => {
                return Err(ModelError::Config(format!(
                    "unknown preset `{p}` (expected one of {:?})",
                    Self::PRESETS
                )))
            }
        };
        c.n_vocab = n_vocab;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(ModelError::Config(m));
        for (name, v) in [
            ("n_vocab", self.n_vocab),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("chunk_len", self.chunk_len),
            ("n_heads", self.n_heads),
            ("d_k", self.d_k),
            ("d_ff", self.d_ff),
        ] {
            if v == 0 {
                return err(format!("`{name}` must be > 0"));
            }
        }
        // Bounds that keep every size computation far from overflow and refuse absurd configs
        // (a typo of three zeros) before anything is allocated.
        for (name, v, max) in [
            ("n_vocab", self.n_vocab, 1 << 24),
            ("d_model", self.d_model, 1 << 16),
            ("n_layers", self.n_layers, 1024),
            ("enc_n_layers", self.enc_n_layers, 1024),
            ("chunk_len", self.chunk_len, 4096),
            ("n_heads", self.n_heads, 1024),
            ("d_k", self.d_k, 4096),
            ("d_ff", self.d_ff, 1 << 18),
        ] {
            if v > max {
                return err(format!(
                    "`{name}` = {v} is beyond this build's limit of {max}"
                ));
            }
        }
        let per_layer = 4 * self.d_model * self.n_heads * self.d_k + 2 * self.d_model * self.d_ff;
        let params = (self.n_layers + self.enc_n_layers + self.ca_layers.len()) as u128
            * per_layer as u128
            + (self.n_vocab * self.d_model * 2) as u128;
        if params > 1 << 36 {
            return err(format!(
                "about {params} parameters: beyond this build's limit of 2^36 (check d_model, d_ff, n_layers)"
            ));
        }
        if !self.d_k.is_multiple_of(2) {
            return err(format!(
                "`d_k` = {} must be even for rotary embeddings",
                self.d_k
            ));
        }
        if let Some(&l) = self.ca_layers.iter().find(|&&l| l >= self.n_layers) {
            return err(format!(
                "`ca_layers` names layer {l}, but the decoder has n_layers = {} (0-based)",
                self.n_layers
            ));
        }
        if let Some(&l) = self.enc_ca_layers.iter().find(|&&l| l >= self.enc_n_layers) {
            return err(format!(
                "`enc_ca_layers` names layer {l}, but the encoder has enc_n_layers = {} (0-based)",
                self.enc_n_layers
            ));
        }
        if !self.ca_layers.is_empty() && self.enc_n_layers == 0 {
            return err("`ca_layers` is not empty but `enc_n_layers` is 0".into());
        }
        // Written so that NaN fails too.
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return err(format!(
                "`layer_norm_eps` = {} must be > 0",
                self.layer_norm_eps
            ));
        }
        if self.rope_base.is_nan() || self.rope_base <= 0.0 {
            return err(format!("`rope_base` = {} must be > 0", self.rope_base));
        }
        Ok(())
    }

    /// Reads and validates a JSON config.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        read_config(path, Self::validate)
    }

    /// The config with no decoder CCA layers (a baseline trained without retrieval).
    pub fn without_retrieval(&self) -> Self {
        Self {
            ca_layers: BTreeSet::new(),
            ..self.clone()
        }
    }

    /// Width of the attention heads taken together (may differ from `d_model`).
    pub fn d_attn(&self) -> usize {
        self.n_heads * self.d_k
    }
}

/// Reads a JSON config and validates it; every error names the file.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl Fn(&T) -> Result<()>,
) -> Result<T> {
    let file = |msg: String| ModelError::File {
        path: path.to_owned(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    let cfg: T =
        serde_json::from_str(&text).map_err(|e| file(format!("invalid config JSON: {e}")))?;
    validate(&cfg).map_err(|e| file(e.to_string()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labml_small_is_valid_and_round_trips() {
        let c = RetroConfig::labml_small();
        c.validate().unwrap();
        let back: RetroConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = RetroConfig::labml_small();
        c.ca_layers.insert(6);
        assert!(c.validate().unwrap_err().to_string().contains("ca_layers"));
        let mut c = RetroConfig::labml_small();
        c.d_k = 15;
        assert!(c.validate().unwrap_err().to_string().contains("d_k"));
        let mut c = RetroConfig::labml_small();
        c.d_model = 0;
        assert!(c.validate().unwrap_err().to_string().contains("d_model"));
        let mut c = RetroConfig::labml_small();
        c.enc_ca_layers.insert(9);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("enc_ca_layers"));
    }

    #[test]
    fn eps_and_base_default() {
        let json = r#"{"n_vocab":5,"d_model":8,"n_layers":2,"ca_layers":[1],"chunk_len":4,
            "n_heads":2,"d_k":4,"d_ff":16,"enc_n_layers":1,"enc_ca_layers":[0]}"#;
        let c: RetroConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.layer_norm_eps, 1e-5);
        assert_eq!(c.rope_base, 10_000.0);
    }
}

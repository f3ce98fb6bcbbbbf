//! Weight-free embedders for users without a model: hashed word and character n-grams.
//! They are lexical (surface overlap), not semantic, and never a silent default.

use crate::embed::{l2_normalize, Embedder, EmbedderId};
use crate::error::{IndexError, Result};

/// Which n-grams a [`LexicalEmbedder`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LexicalFeatures {
    /// Lowercased words, word bigrams and character trigrams (`lexical-ngram-v1`).
    Words,
    /// Lowercased character trigrams only (`lexical-chargram-v1`). Robust to spelling variants
    /// ("haue" / "have") that break every word feature, and to short chunks: on the demo's
    /// 16-character chunks it finds the other edition's passage far more often (docs/QUALITY.md).
    CharTrigrams,
}

impl LexicalFeatures {
    /// The embedder name recorded in a manifest.
    pub fn name(self) -> &'static str {
        match self {
            Self::Words => "lexical-ngram-v1",
            Self::CharTrigrams => "lexical-chargram-v1",
        }
    }

    /// The features a recorded embedder name stands for, if it is a lexical one.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Words, Self::CharTrigrams]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// Hashed n-gram features folded into `dim` buckets with a sign hash, then L2-normalised.
#[derive(Debug, Clone)]
pub struct LexicalEmbedder {
    dim: usize,
    features: LexicalFeatures,
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x100000001b3);
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // final avalanche (splitmix64)
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

impl LexicalEmbedder {
    /// Words, word bigrams and character trigrams ([`LexicalFeatures::Words`]).
    pub fn new(dim: usize) -> Result<Self> {
        Self::with_features(dim, LexicalFeatures::Words)
    }

    pub fn with_features(dim: usize, features: LexicalFeatures) -> Result<Self> {
        if dim == 0 {
            return Err(IndexError::invalid(
                "lexical embedder dim",
                dim,
                "must be positive",
            ));
        }
        Ok(Self { dim, features })
    }

    pub fn features(&self) -> LexicalFeatures {
        self.features
    }

    fn add(&self, v: &mut [f32], kind: u64, bytes: &[u8], weight: f32) {
        let h = fnv1a(kind, bytes);
        let i = (h % self.dim as u64) as usize;
        v[i] += if h >> 63 == 0 { weight } else { -weight };
    }

    fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        let lower = text.to_lowercase();
        if self.features == LexicalFeatures::CharTrigrams {
            self.add_char_trigrams(&mut v, &lower, 1.0);
            l2_normalize(&mut v);
            return v;
        }
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        for w in &words {
            self.add(&mut v, 1, w.as_bytes(), 1.0);
        }
        for p in words.windows(2) {
            self.add(&mut v, 2, format!("{} {}", p[0], p[1]).as_bytes(), 0.7);
        }
        self.add_char_trigrams(&mut v, &lower, 0.3);
        l2_normalize(&mut v);
        v
    }

    fn add_char_trigrams(&self, v: &mut [f32], lower: &str, weight: f32) {
        let chars: Vec<char> = lower.chars().collect();
        let mut buf = String::new();
        for t in chars.windows(3) {
            buf.clear();
            buf.extend(t);
            self.add(v, 3, buf.as_bytes(), weight);
        }
    }
}

impl Embedder for LexicalEmbedder {
    fn id(&self) -> EmbedderId {
        EmbedderId {
            name: self.features.name().into(),
            weights_hash: retro_format::sha256_bytes(
                format!("{}:{}", self.features.name(), self.dim).as_bytes(),
            ),
            dim: self.dim,
        }
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        Ok(texts.par_iter().map(|t| self.embed_one(t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn normalised_and_similar() {
        let e = LexicalEmbedder::new(256).unwrap();
        let v = e
            .embed(&[
                "the cat sat on the mat",
                "the cat sat on a mat",
                "quantum chromodynamics",
                "",
            ])
            .unwrap();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-5);
        assert!(dot(&v[0], &v[1]) > dot(&v[0], &v[2]));
        assert!(v[3].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn char_trigrams_survive_spelling_variants() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        // A modern line, its First Folio spelling, and an unrelated line of the same length.
        let texts = [
            "you have\nPut the wild",
            "you haue\nPut the wild",
            "my lord, I go to",
        ];
        for f in [LexicalFeatures::Words, LexicalFeatures::CharTrigrams] {
            let e = LexicalEmbedder::with_features(512, f).unwrap();
            let v = e.embed(&texts).unwrap();
            assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-5);
            assert!(dot(&v[0], &v[1]) > dot(&v[0], &v[2]), "{f:?}");
        }
        let w = LexicalEmbedder::with_features(512, LexicalFeatures::Words).unwrap();
        let c = LexicalEmbedder::with_features(512, LexicalFeatures::CharTrigrams).unwrap();
        let (vw, vc) = (w.embed(&texts).unwrap(), c.embed(&texts).unwrap());
        // One changed letter costs a whole word and two bigrams in `Words`, three trigrams here.
        assert!(dot(&vc[0], &vc[1]) > dot(&vw[0], &vw[1]));
        assert_ne!(w.id().name, c.id().name);
        assert_eq!(
            LexicalFeatures::from_name(&c.id().name),
            Some(LexicalFeatures::CharTrigrams)
        );
    }
}

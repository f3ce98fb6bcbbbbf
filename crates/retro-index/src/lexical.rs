//! A weight-free embedder for users without a model: hashed word and character n-grams.
//! It is lexical (surface overlap), not semantic, and never a silent default.

use crate::embed::{l2_normalize, Embedder, EmbedderId};
use crate::error::{IndexError, Result};

/// Hashed n-gram features (lowercased words, word bigrams, character trigrams) folded into `dim`
/// buckets with a sign hash, then L2-normalised.
#[derive(Debug, Clone)]
pub struct LexicalEmbedder {
    dim: usize,
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
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(IndexError::invalid(
                "lexical embedder dim",
                dim,
                "must be positive",
            ));
        }
        Ok(Self { dim })
    }

    fn add(&self, v: &mut [f32], kind: u64, bytes: &[u8], weight: f32) {
        let h = fnv1a(kind, bytes);
        let i = (h % self.dim as u64) as usize;
        v[i] += if h >> 63 == 0 { weight } else { -weight };
    }

    fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        let lower = text.to_lowercase();
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
        let chars: Vec<char> = lower.chars().collect();
        let mut buf = String::new();
        for t in chars.windows(3) {
            buf.clear();
            buf.extend(t);
            self.add(&mut v, 3, buf.as_bytes(), 0.3);
        }
        l2_normalize(&mut v);
        v
    }
}

impl Embedder for LexicalEmbedder {
    fn id(&self) -> EmbedderId {
        EmbedderId {
            name: "lexical-ngram-v1".into(),
            weights_hash: crate::fsutil::sha256_bytes(
                format!("lexical-ngram-v1:{}", self.dim).as_bytes(),
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
}

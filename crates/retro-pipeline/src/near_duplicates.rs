//! Finding the database's copies of a scored text, exact or near (the paper's leakage filter,
//! section 2.6: 13-gram Jaccard similarity of at least 0.8), so evaluation never retrieves the
//! text it scores: one byte more must not let a copy through.
//!
//! The n-grams are hashed and subsampled consistently (those whose hash is 0 mod [`SAMPLE`]), so
//! the Jaccard similarity of two sampled sets estimates that of the full sets, and one inverted
//! index over the database serves every scored text.

use retro_index::DocumentId;
use std::collections::HashMap;

/// Tokens per n-gram (the paper's 13).
pub const NGRAM: usize = 13;
/// Jaccard similarity at or above which a document is a near-duplicate (the paper's 0.8).
pub const THRESHOLD: f64 = 0.8;
/// One n-gram in this many is kept.
pub const SAMPLE: u64 = 8;

fn sampled(tokens: &[u32]) -> Vec<u64> {
    let mut out: Vec<u64> = tokens
        .windows(NGRAM)
        .map(|w| {
            // FNV-1a over the ids: stable across runs and platforms.
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            for &t in w {
                for b in t.to_le_bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
                }
            }
            h
        })
        .filter(|h| h % SAMPLE == 0)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The database's documents, indexed by their sampled n-grams.
pub struct NearDuplicates {
    index: HashMap<u64, Vec<DocumentId>>,
    sizes: Vec<usize>,
    /// Documents too short to sample, by content, for the exact test.
    short: HashMap<Vec<u32>, Vec<DocumentId>>,
}

impl NearDuplicates {
    /// Indexes documents `(id, tokens)`; ids index `0..n`.
    pub fn new<'a>(docs: impl IntoIterator<Item = (DocumentId, &'a [u32])>) -> Self {
        let mut index: HashMap<u64, Vec<DocumentId>> = HashMap::new();
        let mut sizes = vec![];
        let mut short: HashMap<Vec<u32>, Vec<DocumentId>> = HashMap::new();
        for (d, tokens) in docs {
            let grams = sampled(tokens);
            if sizes.len() <= d.0 {
                sizes.resize(d.0 + 1, 0);
            }
            sizes[d.0] = grams.len();
            if grams.is_empty() {
                short.entry(tokens.to_vec()).or_default().push(d);
            }
            for g in grams {
                index.entry(g).or_default().push(d);
            }
        }
        Self {
            index,
            sizes,
            short,
        }
    }

    /// The documents that copy `tokens` exactly, or whose sampled 13-gram Jaccard similarity with
    /// it is at least [`THRESHOLD`], with that similarity (1 for an exact copy).
    pub fn of(&self, tokens: &[u32]) -> Vec<(DocumentId, f64)> {
        let grams = sampled(tokens);
        if grams.is_empty() {
            return self
                .short
                .get(tokens)
                .map_or(vec![], |ds| ds.iter().map(|&d| (d, 1.0)).collect());
        }
        let mut shared: HashMap<DocumentId, usize> = HashMap::new();
        for g in &grams {
            for &d in self.index.get(g).into_iter().flatten() {
                *shared.entry(d).or_default() += 1;
            }
        }
        let mut out: Vec<(DocumentId, f64)> = shared
            .into_iter()
            .map(|(d, n)| (d, n as f64 / (grams.len() + self.sizes[d.0] - n) as f64))
            .filter(|&(_, j)| j >= THRESHOLD)
            .collect();
        out.sort_by_key(|&(d, _)| d.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 5000)
            .collect()
    }

    #[test]
    fn a_copy_with_one_token_more_is_still_a_copy() {
        let a = text(1, 3000);
        let mut a_plus = a.clone();
        a_plus.insert(1500, 7); // one token more in the middle
        let b = text(2, 3000);
        // Half of a, half of b: related text, not a copy.
        let half: Vec<u32> = a[..1500].iter().chain(&b[1500..]).copied().collect();
        let docs = [a_plus.clone(), b.clone(), half, vec![1, 2, 3]];
        let nd = NearDuplicates::new(
            docs.iter()
                .enumerate()
                .map(|(i, t)| (DocumentId(i), t.as_slice())),
        );
        let found = nd.of(&a);
        assert_eq!(
            found.iter().map(|f| f.0).collect::<Vec<_>>(),
            [DocumentId(0)]
        );
        assert!(found[0].1 > 0.95 && found[0].1 < 1.0, "{found:?}");
        assert!(nd.of(&text(3, 3000)).is_empty());
        // Too short to sample: exact copies only.
        assert_eq!(nd.of(&[1, 2, 3]), [(DocumentId(3), 1.0)]);
        assert!(nd.of(&[1, 2, 4]).is_empty());
    }
}

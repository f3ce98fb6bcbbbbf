//! The fixed choices of the command line's flags, as clap `ValueEnum`s: the names a user types
//! (clap lists them in `--help` and refuses any other by name) and what each means to the crates.

use clap::ValueEnum;

/// `--lexical-features`: what the lexical embedder hashes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LexicalFeaturesArg {
    /// Words, word bigrams and character trigrams.
    Words,
    /// Character trigrams only (robust to spelling variants and short chunks).
    Chars,
}

impl From<LexicalFeaturesArg> for retro_index::LexicalFeatures {
    fn from(f: LexicalFeaturesArg) -> Self {
        match f {
            LexicalFeaturesArg::Words => Self::Words,
            LexicalFeaturesArg::Chars => Self::CharTrigrams,
        }
    }
}

/// `--milvus-index`: Milvus' index over the keys.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MilvusIndexKind {
    /// HNSW (--m, --ef-construction, --ef-search).
    Hnsw,
    /// IVF_FLAT (--nlist, --nprobe).
    IvfFlat,
    /// Exact search.
    Flat,
}

/// `dataset show --split`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitArg {
    Train,
    Valid,
}

impl From<SplitArg> for retro_pipeline::Split {
    fn from(s: SplitArg) -> Self {
        match s {
            SplitArg::Train => Self::Train,
            SplitArg::Valid => Self::Valid,
        }
    }
}

/// `train --blocks-init`: how a RETRO-fit's new blocks start.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlocksInit {
    /// Each CCA as its layer's self-attention reading the neighbours, the encoder as the identity.
    Base,
    /// PyTorch's default initialisation.
    Random,
}

/// `train --neighbour-states`: what a RETRO-fit's CCAs read of the neighbours.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighbourStatesArg {
    /// A trained neighbour encoder, read by every CCA (the paper's).
    Encoder,
    /// No encoder: each CCA reads the frozen base's states of the neighbours at its layer.
    BaseLayers,
}

impl From<NeighbourStatesArg> for retro_model::retrofit::NeighbourStates {
    fn from(s: NeighbourStatesArg) -> Self {
        match s {
            NeighbourStatesArg::Encoder => Self::Encoder,
            NeighbourStatesArg::BaseLayers => Self::BaseLayers,
        }
    }
}

/// `demo --keys`: the Shakespeare demo's retrieval keys.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoKeys {
    /// Hashed character trigrams (the weight-free lexical embedder).
    Chars,
    /// Frozen MiniLM, a BERT, as the paper's keys are.
    Minilm,
}

/// `demo --baseline-budget`: what the baseline's training budget equals.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaselineBudget {
    /// The same training minutes as RETRO.
    Time,
    /// As many steps as RETRO.
    Steps,
}

/// `bench index --only`: one half of the comparison.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchHalf {
    Embedded,
    Store,
}

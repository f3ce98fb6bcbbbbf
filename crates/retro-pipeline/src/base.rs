//! A pretrained base model imported for RETRO-fitting: a folder with the weights in safetensors
//! (Hugging Face's names, f32), `config.json`, `tokenizer.json` (usable by `index build` and
//! `dataset build` like any other) and `base.json`, which records the source file and the size
//! and SHA-256 of each file. It is written through a staged folder and one rename, and checked
//! whole when opened.

use crate::error::{PipelineError, Result};
use candle_core::{DType, Device};
use retro_format::{sync_path, write_json_atomic, FileInfo, FileTable, FolderKind};
use retro_index::{ByteLevelBpe, LmTokenizer};
use retro_model::llama::{gguf, LlamaBase, LlamaConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The manifest's file name (`base.json`): what makes a folder a base.
pub const BASE_MANIFEST: &str = FolderKind::Base.marker();
const FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSource {
    /// The source file's name (not its path: the folder may move between machines).
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// The GGUF file's `general.*` text fields (name, license, ...).
    pub general: BTreeMap<String, String>,
    /// How many source tensors were of each GGML type (`Q4_1`: 210, ...).
    pub tensor_types: BTreeMap<String, usize>,
}

/// `base.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseMeta {
    pub format_version: u32,
    pub kind: String,
    /// `llama`.
    pub architecture: String,
    pub source: BaseSource,
    pub files: FileTable,
}

/// An imported base folder, checked.
#[derive(Debug, Clone)]
pub struct BaseDir {
    pub dir: PathBuf,
    pub meta: BaseMeta,
    pub config: LlamaConfig,
}

/// Imports a Llama GGUF file into a base folder at `out` (refused if `out` holds anything but a
/// base; an existing base is replaced only with `overwrite`).
pub fn import_gguf(gguf_path: &Path, out: &Path, overwrite: bool) -> Result<BaseDir> {
    let imported = gguf::import(gguf_path)?;
    let vocab = &imported.vocab;
    if vocab.model != "gpt2" {
        return Err(PipelineError::file(
            gguf_path,
            format!(
                "`tokenizer.ggml.model` is `{}`: only byte-level BPE (`gpt2`) is supported",
                vocab.model
            ),
        ));
    }
    let tokenizer = ByteLevelBpe {
        tokens: vocab.tokens.clone(),
        merges: vocab.merges.clone(),
        pre: vocab.pre.clone(),
    }
    .tokenizer()
    .map_err(|e| PipelineError::file(gguf_path, e.to_string()))?;
    let staged = FolderKind::Base.stage(out, overwrite)?;
    let tmp = staged.path();
    write_json_atomic(&tmp.join("config.json"), &imported.config)?;
    let tok_path = tmp.join("tokenizer.json");
    let tok_json = tokenizer
        .to_string(true)
        .map_err(|e| PipelineError::file(&tok_path, e.to_string()))?;
    std::fs::write(&tok_path, tok_json).map_err(|e| PipelineError::io(&tok_path, e))?;
    let weights = tmp.join("model.safetensors");
    candle_core::safetensors::save(&imported.tensors, &weights).map_err(|source| {
        PipelineError::Tensors {
            path: weights.clone(),
            source,
        }
    })?;
    for f in FILES {
        sync_path(&tmp.join(f))?;
    }
    let files = FileTable::record(tmp, FILES)?;
    let source_info = FileInfo::of(gguf_path)?;
    let mut tensor_types = BTreeMap::new();
    for t in imported.source_types.values() {
        *tensor_types.entry(t.clone()).or_insert(0) += 1;
    }
    let meta = BaseMeta {
        format_version: FolderKind::Base.version(),
        kind: "retro-base".into(),
        architecture: "llama".into(),
        source: BaseSource {
            file: gguf_path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            bytes: source_info.bytes,
            sha256: source_info.sha256,
            general: imported.general.into_iter().collect(),
            tensor_types,
        },
        files,
    };
    write_json_atomic(&tmp.join(BASE_MANIFEST), &meta)?;
    sync_path(tmp)?;
    staged.commit()?;
    Ok(BaseDir {
        dir: out.to_owned(),
        meta,
        config: imported.config,
    })
}

impl BaseDir {
    /// Opens a base folder: its manifest's version and kind, then every listed file's size and
    /// SHA-256, then the config.
    pub fn open(dir: &Path) -> Result<Self> {
        let (manifest, meta): (_, BaseMeta) = FolderKind::Base.read_manifest(dir)?;
        if meta.kind != "retro-base" {
            return Err(PipelineError::file(
                &manifest,
                format!("kind `{}` is not `retro-base`", meta.kind),
            ));
        }
        if meta.architecture != "llama" {
            return Err(PipelineError::file(
                &manifest,
                format!("architecture `{}` is not supported", meta.architecture),
            ));
        }
        meta.files.require(&manifest, FILES)?;
        meta.files
            .check(dir, BASE_MANIFEST, "import it again", |_, _| true)?;
        let config = LlamaConfig::from_json_file(&dir.join("config.json"))?;
        Ok(Self {
            dir: dir.to_owned(),
            meta,
            config,
        })
    }

    /// SHA-256 of `model.safetensors`, as `base.json` records it (checked on opening).
    pub fn weights_sha256(&self) -> &str {
        &self.meta.files["model.safetensors"].sha256
    }

    /// The LM tokenizer (`tokenizer.json`).
    pub fn tokenizer(&self) -> Result<LmTokenizer> {
        Ok(LmTokenizer::from_file(&self.dir.join("tokenizer.json"))?)
    }

    /// The model, in f32 on `device`.
    pub fn load(&self, device: &Device) -> Result<LlamaBase> {
        Ok(LlamaBase::load(&self.dir, DType::F32, device)?)
    }
}

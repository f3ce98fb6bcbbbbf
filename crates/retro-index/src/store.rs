//! The chunk store: token ids of every document in one little-endian u32 file (memory-mapped),
//! a chunk table and a document table. Chunks never cross a document boundary.

use crate::array_file::{check_header, header, map_file};
use crate::error::{IndexError, Result};
use crate::ids::{ChunkId, DocumentId};
use retro_format::{read_json, write_atomic, write_json_atomic};
use std::ops::Range;
use std::path::Path;

pub const TOKENS_FILE: &str = "tokens.bin";
pub const CHUNKS_FILE: &str = "chunks.bin";
pub const DOCUMENTS_FILE: &str = "documents.json";
const TOKENS_MAGIC: &[u8; 8] = b"RETROTOK";
const CHUNKS_MAGIC: &[u8; 8] = b"RETROCHK";
const FORMAT_VERSION: u32 = 1;

/// A row of the chunk table (16 bytes, little-endian on disk).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ChunkEntry {
    /// Index of the document the chunk belongs to.
    pub doc: u32,
    /// Real tokens in the chunk (`<= chunk_len`; the rest is padding).
    pub len: u32,
    /// Offset of the chunk's first token in the token file.
    pub offset: u64,
}

/// A row of the document table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DocumentEntry {
    pub id: String,
    pub source: String,
    /// Offset of the document's first token in the token file.
    pub token_offset: u64,
    pub token_count: u64,
    /// Index of the document's first chunk.
    pub first_chunk: u64,
    pub chunk_count: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DocumentsFile {
    format_version: u32,
    chunk_len: usize,
    pad_id: u32,
    total_tokens: u64,
    documents: Vec<DocumentEntry>,
}

/// Read-only view of a stored chunk database (token file and chunk table are memory-mapped).
pub struct ChunkStore {
    tokens: memmap2::Mmap,
    chunks: memmap2::Mmap,
    documents: Vec<DocumentEntry>,
    chunk_len: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("documents", &self.documents.len())
            .field("chunks", &self.len())
            .field("tokens", &self.total_tokens())
            .field("chunk_len", &self.chunk_len)
            .finish()
    }
}

/// What [`ChunkStore::write`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreCounts {
    pub documents: usize,
    pub chunks: usize,
    pub tokens: usize,
}

impl ChunkStore {
    /// Writes the store of tokenized documents into `dir`: `docs[i]` is `(id, source, tokens)`.
    /// Each document is cut at stride `chunk_len`; its last, shorter chunk is padded when read.
    pub fn write<'a>(
        dir: &Path,
        docs: impl IntoIterator<Item = (&'a str, &'a str, &'a [u32])>,
        chunk_len: usize,
        pad_id: u32,
    ) -> Result<StoreCounts> {
        if chunk_len == 0 {
            return Err(IndexError::invalid("chunk_len", 0, "must be positive"));
        }
        let mut documents = Vec::new();
        let mut chunks: Vec<ChunkEntry> = Vec::new();
        let mut offset = 0u64;
        let tokens_path = dir.join(TOKENS_FILE);
        write_atomic(&tokens_path, |w| {
            w.write_all(&header(TOKENS_MAGIC, FORMAT_VERSION))?;
            for (d, (id, source, toks)) in docs.into_iter().enumerate() {
                let first_chunk = chunks.len() as u64;
                for (c, piece) in toks.chunks(chunk_len).enumerate() {
                    chunks.push(ChunkEntry {
                        doc: d as u32,
                        len: piece.len() as u32,
                        offset: offset + (c * chunk_len) as u64,
                    });
                }
                documents.push(DocumentEntry {
                    id: id.to_string(),
                    source: source.to_string(),
                    token_offset: offset,
                    token_count: toks.len() as u64,
                    first_chunk,
                    chunk_count: chunks.len() as u64 - first_chunk,
                });
                w.write_all(bytemuck::cast_slice(toks))?;
                offset += toks.len() as u64;
            }
            Ok(())
        })?;
        write_atomic(&dir.join(CHUNKS_FILE), |w| {
            w.write_all(&header(CHUNKS_MAGIC, FORMAT_VERSION))?;
            w.write_all(bytemuck::cast_slice(&chunks))
        })?;
        let counts = StoreCounts {
            documents: documents.len(),
            chunks: chunks.len(),
            tokens: offset as usize,
        };
        write_json_atomic(
            &dir.join(DOCUMENTS_FILE),
            &DocumentsFile {
                format_version: FORMAT_VERSION,
                chunk_len,
                pad_id,
                total_tokens: offset,
                documents,
            },
        )?;
        Ok(counts)
    }

    /// Opens a store: maps the token file and chunk table and checks that every entry is in bounds.
    pub fn open(dir: &Path) -> Result<Self> {
        let docs_path = dir.join(DOCUMENTS_FILE);
        let df: DocumentsFile = read_json(&docs_path)?;
        if df.format_version != FORMAT_VERSION {
            return Err(IndexError::version(
                &docs_path,
                df.format_version,
                FORMAT_VERSION,
            ));
        }
        if df.chunk_len == 0 {
            return Err(IndexError::corrupt(&docs_path, "chunk_len is 0"));
        }
        let tokens_path = dir.join(TOKENS_FILE);
        let tokens = map_file(&tokens_path)?;
        let payload = check_header(&tokens_path, &tokens, TOKENS_MAGIC, FORMAT_VERSION)?;
        if Some(payload.len() as u64) != df.total_tokens.checked_mul(4) {
            return Err(IndexError::corrupt(
                &tokens_path,
                format!(
                    "{} bytes of tokens, the document table says {} tokens",
                    payload.len(),
                    df.total_tokens
                ),
            ));
        }
        let chunks_path = dir.join(CHUNKS_FILE);
        let chunks = map_file(&chunks_path)?;
        let cpayload = check_header(&chunks_path, &chunks, CHUNKS_MAGIC, FORMAT_VERSION)?;
        if cpayload.len() % std::mem::size_of::<ChunkEntry>() != 0 {
            return Err(IndexError::corrupt(
                &chunks_path,
                "size is not a whole number of chunk entries",
            ));
        }
        let store = ChunkStore {
            tokens,
            chunks,
            documents: df.documents,
            chunk_len: df.chunk_len,
            pad_id: df.pad_id,
        };
        store.validate(&docs_path, &chunks_path)?;
        Ok(store)
    }

    fn validate(&self, docs_path: &Path, chunks_path: &Path) -> Result<()> {
        let total = self.total_tokens() as u64;
        let n = self.len() as u64;
        for (d, doc) in self.documents.iter().enumerate() {
            let ok = doc
                .token_offset
                .checked_add(doc.token_count)
                .is_some_and(|e| e <= total)
                && doc
                    .first_chunk
                    .checked_add(doc.chunk_count)
                    .is_some_and(|e| e <= n)
                && doc.chunk_count == doc.token_count.div_ceil(self.chunk_len as u64);
            if !ok {
                return Err(IndexError::corrupt(
                    docs_path,
                    format!("document {d} ({:?}) is out of bounds", doc.id),
                ));
            }
        }
        for (i, c) in self.entries().iter().enumerate() {
            let doc = self.documents.get(c.doc as usize);
            let ok = doc.is_some_and(|doc| {
                c.len as usize <= self.chunk_len
                    && c.offset >= doc.token_offset
                    && c.offset
                        .checked_add(c.len as u64)
                        .is_some_and(|end| end <= doc.token_offset.saturating_add(doc.token_count))
                    && (i as u64).wrapping_sub(doc.first_chunk) < doc.chunk_count
            });
            if !ok {
                return Err(IndexError::corrupt(
                    chunks_path,
                    format!("chunk {i} is out of bounds"),
                ));
            }
        }
        Ok(())
    }

    fn all_tokens(&self) -> &[u32] {
        bytemuck::cast_slice(&self.tokens[crate::array_file::HEADER_LEN..])
    }
    fn entries(&self) -> &[ChunkEntry] {
        bytemuck::cast_slice(&self.chunks[crate::array_file::HEADER_LEN..])
    }

    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.entries().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn total_tokens(&self) -> usize {
        self.all_tokens().len()
    }
    /// The chunk table row of chunk `i`. Panics if `i >= len()`.
    pub fn chunk(&self, i: ChunkId) -> ChunkEntry {
        self.entries()[i.0]
    }
    /// The real (unpadded) tokens of chunk `i`: `chunk_len` of them except for a document's last chunk.
    pub fn chunk_tokens(&self, i: ChunkId) -> &[u32] {
        let c = self.chunk(i);
        &self.all_tokens()[c.offset as usize..c.offset as usize + c.len as usize]
    }
    /// Chunk `i` padded with the pad id to exactly `chunk_len` tokens.
    pub fn chunk_padded(&self, i: ChunkId) -> Vec<u32> {
        let mut v = self.chunk_tokens(i).to_vec();
        v.resize(self.chunk_len, self.pad_id);
        v
    }
    /// The continuation of chunk `i`: the next `chunk_len` tokens of the same document (fewer at its end).
    pub fn continuation(&self, i: ChunkId) -> &[u32] {
        let c = self.chunk(i);
        let doc = &self.documents[c.doc as usize];
        let start = c.offset + c.len as u64;
        let end = (start + self.chunk_len as u64).min(doc.token_offset + doc.token_count);
        &self.all_tokens()[start as usize..end.max(start) as usize]
    }
    /// The RETRO neighbour value: chunk `i` followed by its continuation, padded to exactly `2 * chunk_len`.
    /// Never contains tokens of another document.
    pub fn neighbour(&self, i: ChunkId) -> Vec<u32> {
        let mut v = Vec::with_capacity(2 * self.chunk_len);
        v.extend_from_slice(self.chunk_tokens(i));
        v.resize(self.chunk_len, self.pad_id);
        v.extend_from_slice(self.continuation(i));
        v.resize(2 * self.chunk_len, self.pad_id);
        v
    }
    /// The document chunk `i` belongs to.
    pub fn document_of(&self, i: ChunkId) -> DocumentId {
        DocumentId(self.chunk(i).doc as usize)
    }
    /// Token position of chunk `i` within its document (for window filters).
    pub fn chunk_start(&self, i: ChunkId) -> usize {
        let c = self.chunk(i);
        (c.offset - self.documents[c.doc as usize].token_offset) as usize
    }
    pub fn documents(&self) -> &[DocumentEntry] {
        &self.documents
    }
    /// The document table row of document `d`. Panics if `d` is not one of the store's.
    pub fn document(&self, d: DocumentId) -> &DocumentEntry {
        &self.documents[d.0]
    }
    /// The chunks of document `d`: `ChunkId(i)` for each `i` of the range.
    pub fn chunks_of_document(&self, d: DocumentId) -> Range<usize> {
        let doc = self.document(d);
        doc.first_chunk as usize..(doc.first_chunk + doc.chunk_count) as usize
    }
    /// All tokens of document `d`.
    pub fn document_tokens(&self, d: DocumentId) -> &[u32] {
        let doc = self.document(d);
        &self.all_tokens()[doc.token_offset as usize..(doc.token_offset + doc.token_count) as usize]
    }
}

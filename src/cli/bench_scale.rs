//! `retro bench scale`: the embedded graph's scale curve, one process per size (`retro_bench::scale`).

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchScaleArgs {
    /// Numbers of clustered synthetic keys (384 dims unless `--synthetic-dim` is passed on).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub sizes: Vec<usize>,
    /// Writes `scale.json`, `scale.png` and `scale.md` (the table) here.
    #[arg(long)]
    pub out: PathBuf,
    /// The figure's title (say the machine and the date).
    #[arg(long, default_value = "The embedded HNSW graph at scale")]
    pub title: String,
    /// Arguments for each `retro bench index --synthetic N --only embedded` run, after `--`
    /// (e.g. `-- --sample 1000 --m 16`).
    #[arg(last = true)]
    pub index_args: Vec<String>,
}

pub fn run(a: BenchScaleArgs) -> anyhow::Result<()> {
    use retro_bench::scale;
    std::fs::create_dir_all(&a.out)?;
    let exe = std::env::current_exe()?;
    let runs = scale::measure(&exe, &a.sizes, &a.index_args)?;
    let json = a.out.join("scale.json");
    std::fs::write(&json, serde_json::to_string_pretty(&runs)?)?;
    let png = a.out.join("scale.png");
    scale::figure(&runs, &a.title, &png)?;
    let table = scale::table(&runs);
    std::fs::write(a.out.join("scale.md"), &table)?;
    println!("{table}");
    println!("wrote {}, {} and scale.md", json.display(), png.display());
    Ok(())
}

//! `retro bench serve`: N concurrent streaming clients against a running `retro serve`
//! (`retro_bench::serve`).

use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// The server (`retro serve --addr`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    #[arg(long, env = "RETRO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Concurrent clients, one level each, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clients: Vec<usize>,
    /// Streamed requests each client makes per level, one after another.
    #[arg(long, default_value_t = 2)]
    pub requests: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Prompts, used in turn (repeat the flag); they must suit the served model's tokenizer.
    #[arg(long = "prompt", default_values_t = [
        "In the beginning God created the heavens and the earth.".to_string(),
        "And the LORD spoke unto Moses, saying,".to_string(),
        "Blessed are the poor in spirit, for theirs is the kingdom of heaven.".to_string(),
        "The LORD is my shepherd; I shall not want.".to_string(),
    ])]
    pub prompts: Vec<String>,
    /// Seconds after which a level starts no more requests.
    #[arg(long, default_value_t = 300.0)]
    pub time_bound: f64,
    /// Ask for RETRO[OFF] in every request: decoding alone, without the retrieval and encoder
    /// pass of each completed chunk.
    #[arg(long)]
    pub no_retrieval: bool,
    /// Print the levels as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchServeArgs) -> anyhow::Result<()> {
    use retro_bench::serve;
    if a.clients.contains(&0) || a.requests == 0 || a.max_tokens == 0 {
        anyhow::bail!("--clients, --requests and --max-tokens must be positive");
    }
    if !(a.time_bound.is_finite() && a.time_bound > 0.0) {
        anyhow::bail!("--time-bound must be a positive number of seconds");
    }
    let health = retro_server::client::get(a.addr, "/health", None)
        .map_err(|e| anyhow::anyhow!("no server at {}: {e}", a.addr))?;
    if health.status != 200 {
        anyhow::bail!("the server at {} is not ready: {}", a.addr, health.body);
    }
    let spec = serve::LoadSpec {
        addr: a.addr,
        api_key: a.api_key,
        levels: a.clients,
        requests: a.requests,
        max_tokens: a.max_tokens,
        prompts: a.prompts,
        time_bound: Duration::from_secs_f64(a.time_bound),
        no_retrieval: a.no_retrieval,
    };
    let levels = serve::measure(&spec, &mut |l| {
        eprintln!(
            "{} clients: {:.1} tokens/s, {} errors",
            l.clients, l.tokens_per_s, l.errors
        )
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&levels)?);
    } else {
        print!("{}", serve::table(&levels));
        if let Some(e) = levels.iter().find_map(|l| l.first_error.as_ref()) {
            println!("first error: {e}");
        }
    }
    Ok(())
}

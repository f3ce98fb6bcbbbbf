//! `retro serve` as a client sees it, on a free port of 127.0.0.1: the text equals `retro
//! generate`'s, streamed or not; concurrent requests equal each alone; bad input gets its 4xx;
//! a client gone frees its slot; the API key; SIGTERM; the official `openai` Python client.

mod common;

use common::retro;
use retro_server::client::{self, Answer};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

const SENTENCES: [&str; 6] = [
    "The cat sat on the mat and looked at the door. ",
    "A dog ran in the park after a red ball. ",
    "Rain fell on the old town all night long. ",
    "She read the letter twice and then burned it. ",
    "The ship left the harbour at dawn with no flag. ",
    "Bread and salt were set on the table for the guests. ",
];

/// A trained toy run (characters, chunk 16, lexical keys), built once for every test here.
fn run_dir() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let corpus: String = (0..6)
            .map(|i| {
                let text: String = (0..40).map(|j| SENTENCES[(i + j * (i + 1)) % 6]).collect();
                json!({"id": format!("doc{i}"), "text": text}).to_string() + "\n"
            })
            .collect();
        std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
        let d = |n: &str| dir.join(n).to_string_lossy().into_owned();
        retro(&[
            "index",
            "build",
            "--corpus",
            &d("corpus.jsonl"),
            "--tokenizer",
            "char",
            "--lexical-embedder",
            "128",
            "--chunk-len",
            "16",
            "--out",
            &d("db"),
        ]);
        retro(&[
            "dataset",
            "build",
            "--db",
            &d("db"),
            "--seq-len",
            "64",
            "--k",
            "2",
            "--out",
            &d("ds"),
        ]);
        retro(&[
            "train",
            "--dataset",
            &d("ds"),
            "--preset",
            "tiny",
            "--steps",
            "40",
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--out",
            &d("run"),
        ]);
        dir.join("run")
    })
}

/// A `retro serve` process on a free port, killed when dropped.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str], envs: &[(&str, &str)]) -> Served {
    let run = run_dir().to_string_lossy().into_owned();
    let mut args = vec!["serve", "--run", &run, "--addr", "127.0.0.1:0"];
    args.extend(extra);
    let child = Command::new(env!("CARGO_BIN_EXE_retro"))
        .args(&args)
        .env_remove("RETRO_API_KEY")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start retro serve");
    // Killed on every path from here, a failed assertion included.
    let mut s = Served {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let mut line = String::new();
    BufReader::new(s.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    s.addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap();
    // Loading takes well under a second for this run; bounded all the same.
    for _ in 0..600 {
        if client::get(s.addr, "/health", None).is_ok_and(|a| a.status == 200) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("retro serve did not get ready");
}

fn post(s: &Served, body: &Value) -> (Answer, Value) {
    let a = client::post_json(s.addr, "/v1/completions", &body.to_string(), None).unwrap();
    let v = serde_json::from_str(&a.body).unwrap_or(Value::Null);
    (a, v)
}

/// The events of a streamed completion (`[DONE]` as a string).
fn stream(s: &Served, body: &Value) -> Vec<Value> {
    let mut events = vec![];
    let status = client::post_events(
        s.addr,
        "/v1/completions",
        &body.to_string(),
        None,
        &mut |d| {
            events.push(serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.into())));
            true
        },
    )
    .unwrap();
    assert_eq!(status, 200, "{events:?}");
    events
}

fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect()
}

const PROMPT: &str = "The cat sat on the mat and";

/// What `retro generate --run RUN PROMPT SETTINGS` prints after the prompt.
fn generated(settings: &[&str]) -> String {
    let run = run_dir().to_string_lossy().into_owned();
    let mut args = vec!["generate", "--run", &run, PROMPT];
    args.extend(settings);
    let out = retro(&args);
    out.strip_prefix(PROMPT)
        .unwrap()
        .trim_end_matches('\n')
        .to_string()
}

#[test]
fn completions_equal_retro_generate_streamed_or_not() {
    let s = serve(&[], &[]);
    let want = generated(&[
        "--max-tokens",
        "40",
        "--temperature",
        "0.8",
        "--top-k",
        "12",
        "--seed",
        "5",
    ]);
    let want = want.as_str();
    let body = json!({"model": "run", "prompt": PROMPT, "max_tokens": 40, "temperature": 0.8,
                      "top_k": 12, "seed": 5});
    let (a, v) = post(&s, &body);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(v["choices"][0]["text"], want, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT.len());
    assert_eq!(v["usage"]["completion_tokens"], 40);
    assert_eq!(v["usage"]["total_tokens"], PROMPT.len() + 40);
    // 26 prompt + 40 tokens: chunks 0 to 3 complete and each read K = 2 neighbours.
    let chunks = v["retrieval"]["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 4, "{v}");
    for (u, c) in chunks.iter().enumerate() {
        assert_eq!(c["chunk"], u);
        assert_eq!(c["read"], true);
        let n = c["neighbours"].as_array().unwrap();
        assert_eq!(n.len(), 2, "{c}");
        assert!(n[0]["document"].as_str().unwrap().starts_with("doc"), "{c}");
        assert!(n[0]["distance"].as_f64().unwrap() <= n[1]["distance"].as_f64().unwrap());
    }
    assert_eq!(chunks[0]["text"], &PROMPT[..16]);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = stream(&s, &streamed);
    assert_eq!(streamed_text(&events), want);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let n = events.len();
    assert_eq!(
        events[n - 2]["usage"]["completion_tokens"],
        40,
        "{events:?}"
    );
    assert_eq!(events[n - 3]["choices"][0]["finish_reason"], "length");
    let retrieved: Vec<&Value> = events.iter().filter_map(|e| e.get("retrieval")).collect();
    assert_eq!(retrieved.len(), 4);

    // RETRO[OFF] per request: no neighbours, and the text of `generate --no-retrieval`.
    let off = generated(&["--max-tokens", "40", "--no-retrieval"]);
    let (_, v) = post(
        &s,
        &json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "retrieval": {"enabled": false}}),
    );
    assert_eq!(v["choices"][0]["text"], off.trim_end());
    assert_eq!(v["retrieval"]["chunks"].as_array().unwrap().len(), 0);

    // A stop sequence ends the text before it.
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    if let Some(stop) = full.get(10..12).filter(|s| s.is_char_boundary(0)) {
        let (_, v) = post(
            &s,
            &json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                    "retrieval": {"enabled": false}, "stop": [stop]}),
        );
        let cut = &full[..full.find(stop).unwrap()];
        assert_eq!(v["choices"][0]["text"], cut, "stop {stop:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let (a, v) = post(&s, &json!({"prompt": "The", "max_tokens": 3}));
    assert_eq!(a.status, 200, "{v}");
    let models = client::get(s.addr, "/v1/models", None).unwrap();
    assert!(models.body.contains("\"id\":\"run\""), "{}", models.body);
}

#[test]
fn requests_at_once_give_what_each_gives_alone() {
    let s = serve(&[], &[]);
    let bodies: Vec<Value> = (0..3)
        .map(|i| {
            json!({"prompt": &SENTENCES[i][..20 + 3 * i], "max_tokens": 60 + 10 * i,
                   "temperature": 0.7, "seed": i})
        })
        .collect();
    let alone: Vec<Value> = bodies.iter().map(|b| post(&s, b).1).collect();
    let together: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| scope.spawn(|| post(&s, b).1))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(a["choices"], t["choices"]);
        assert_eq!(a["retrieval"], t["retrieval"]);
    }
}

#[test]
fn bad_input_gets_a_4xx_naming_the_field_and_the_server_goes_on() {
    let s = serve(
        &["--max-body-bytes", "2000", "--max-prompt-tokens", "100"],
        &[],
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed JSON", r#"{"prompt": "The""#.into(), 400, "body"),
        ("not an object", "[1, 2]".into(), 400, "body"),
        (
            "unknown field",
            json!({"prompt": "The", "max_token": 3}).to_string(),
            400,
            "max_token",
        ),
        (
            "missing prompt",
            json!({"max_tokens": 3}).to_string(),
            400,
            "prompt",
        ),
        (
            "prompt not a string",
            json!({"prompt": ["The"]}).to_string(),
            400,
            "prompt",
        ),
        (
            "empty prompt",
            json!({"prompt": ""}).to_string(),
            400,
            "prompt",
        ),
        (
            "prompt over the context",
            json!({"prompt": "The cat ".repeat(20)}).to_string(),
            400,
            "prompt",
        ),
        (
            "character outside the vocabulary",
            json!({"prompt": "Zebra \u{1F600}"}).to_string(),
            400,
            "prompt",
        ),
        (
            "max_tokens 0",
            json!({"prompt": "The", "max_tokens": 0}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "max_tokens huge",
            json!({"prompt": "The", "max_tokens": 1u64 << 40}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "max_tokens negative",
            json!({"prompt": "The", "max_tokens": -1}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "temperature",
            json!({"prompt": "The", "temperature": 3.5}).to_string(),
            400,
            "temperature",
        ),
        (
            "top_p",
            json!({"prompt": "The", "top_p": 0}).to_string(),
            400,
            "top_p",
        ),
        (
            "top_k",
            json!({"prompt": "The", "top_k": 0}).to_string(),
            400,
            "top_k",
        ),
        ("n", json!({"prompt": "The", "n": 2}).to_string(), 400, "n"),
        (
            "stop count",
            json!({"prompt": "The", "stop": ["a", "b", "c", "d", "e"]}).to_string(),
            400,
            "stop",
        ),
        (
            "empty stop",
            json!({"prompt": "The", "stop": ["a", ""]}).to_string(),
            400,
            "stop[1]",
        ),
        (
            "retrieval.k",
            json!({"prompt": "The", "retrieval": {"k": 99}}).to_string(),
            400,
            "retrieval.k",
        ),
        (
            "retrieval field",
            json!({"prompt": "The", "retrieval": {"kk": 1}}).to_string(),
            400,
            "retrieval.kk",
        ),
        (
            "two gates",
            json!({"prompt": "The", "retrieval": {"gate": {"max_distance": 1.0, "coherent": 2}}})
                .to_string(),
            400,
            "retrieval.gate",
        ),
        (
            "gate value",
            json!({"prompt": "The", "retrieval": {"gate": {"min_overlap": 7.0}}}).to_string(),
            400,
            "retrieval.gate.min_overlap",
        ),
        (
            "body over the limit",
            json!({"prompt": "x".repeat(5000)}).to_string(),
            413,
            "",
        ),
    ];
    for (name, body, status, param) in &cases {
        let a = client::post_json(s.addr, "/v1/completions", body, None).unwrap();
        assert_eq!(a.status, *status, "{name}: {}", a.body);
        let v: Value =
            serde_json::from_str(&a.body).unwrap_or_else(|_| panic!("{name}: {}", a.body));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {v}"
        );
        if !param.is_empty() {
            assert_eq!(v["error"]["param"], *param, "{name}: {v}");
        }
    }
    let a = client::get(s.addr, "/v2/nothing", None).unwrap();
    assert_eq!(a.status, 404);
    let (a, v) = post(
        &s,
        &json!({"prompt": "The", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(a.status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

#[test]
fn a_client_gone_mid_stream_frees_its_slot_and_a_full_server_says_retry_after() {
    let s = serve(&["--max-batch", "1", "--queue", "0"], &[]);
    let long = json!({"prompt": PROMPT, "max_tokens": 2000, "stream": true});
    let mut seen = 0;
    let mut busy = None;
    client::post_events(
        s.addr,
        "/v1/completions",
        &long.to_string(),
        None,
        &mut |_| {
            seen += 1;
            if seen == 3 {
                // The only slot is taken: the next request is refused at once, with Retry-After.
                busy = Some(post(&s, &json!({"prompt": "The", "max_tokens": 2})).0);
            }
            seen < 3
        },
    )
    .unwrap();
    let busy = busy.expect("three events came");
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert_eq!(busy.header("retry-after"), Some("1"));
    // The client hung up after three events: its slot frees within a step, long before the
    // 2000 tokens it asked for.
    let mut served = None;
    for _ in 0..200 {
        let (a, v) = post(&s, &json!({"prompt": "The", "max_tokens": 2}));
        if a.status == 200 {
            served = Some(v);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let v = served.expect("the slot was never freed");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[test]
fn with_a_key_every_v1_request_needs_it() {
    let s = serve(&[], &[("RETRO_API_KEY", "s3cret")]);
    let body = json!({"prompt": "The", "max_tokens": 2}).to_string();
    for key in [None, Some("wrong"), Some("s3cre"), Some("s3cret2")] {
        let a = client::post_json(s.addr, "/v1/completions", &body, key).unwrap();
        assert_eq!(a.status, 401, "{key:?}: {}", a.body);
        assert!(a.body.contains("authentication_error"));
    }
    assert_eq!(client::get(s.addr, "/v1/models", None).unwrap().status, 401);
    let a = client::post_json(s.addr, "/v1/completions", &body, Some("s3cret")).unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(client::get(s.addr, "/health", None).unwrap().status, 200);
}

#[test]
fn sigterm_ends_the_streams_in_flight_then_exits_zero() {
    let mut s = serve(&["--shutdown-grace", "0.01"], &[]);
    let body = json!({"prompt": PROMPT, "max_tokens": 2000, "stream": true}).to_string();
    let mut events = vec![];
    let pid = s.child.id() as i32;
    client::post_events(s.addr, "/v1/completions", &body, None, &mut |d| {
        if events.len() == 2 {
            // SAFETY: a signal to the child this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        events.push(d.to_string());
        true
    })
    .unwrap();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "shutdown", "{last}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_openai_python_client_gets_streamed_and_whole_completions() {
    // The official `openai` client from PyPI.
    let Some(python) = common::venv_python("openai-venv", "openai", &["openai>=1.0"]) else {
        eprintln!("SKIPPED the_openai_python_client: no venv with PyPI's openai");
        return;
    };
    let s = serve(&["--api-key", "k1"], &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/openai_client_check.py");
    let out = Command::new(python)
        .arg(script)
        .args([&format!("http://{}/v1", s.addr), "k1", PROMPT])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = generated(&["--max-tokens", "30", "--temperature", "0.9", "--seed", "11"]);
    assert_eq!(v["whole"], want, "{v}");
    assert_eq!(v["streamed"], want, "{v}");
    assert_eq!(v["completion_tokens"], 30);
    assert_eq!(v["models"], json!(["run"]));
    assert_eq!(v["wrong_key"], "AuthenticationError");
    assert_eq!(v["bad_request"], "BadRequestError");
}

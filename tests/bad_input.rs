//! Bad input through the `retro` binary, one named test per case: each must fail with a clear
//! error that contains the expected words (the file, field or value at fault), exit with status 1
//! or 2, never panic (status 101) and never write: a refused command leaves its `--out` uncreated
//! and the user's files as they were. docs/RELIABILITY.md lists the cases with the messages users
//! get (`RETRO_RELIABILITY_TABLE=FILE cargo test --test bad_input` writes them).
//!
//! The cases share one fixture (a database, a dataset, a run and damaged copies of each), built
//! once, so the harness is libtest-mimic's (`harness = false` in Cargo.toml): a failure names its
//! case, and `cargo test --test bad_input NAME` runs one.

use libtest_mimic::{Arguments, Failed, Trial};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};

/// One bad input: the arguments, and the words its error must contain.
struct Case {
    name: &'static str,
    args: Vec<String>,
    want: Vec<&'static str>,
}

fn case(name: &'static str, args: Vec<String>, want: Vec<&'static str>) -> Case {
    Case { name, args, want }
}

/// The files every case must leave alone, whatever it is refused for.
const NOTES: &str = "user-files/notes.txt";
const CORPUS_FILE: &str = "corpus-dir/a.txt";

fn run(args: &[String]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_retro"))
        .args(args)
        .output()
        .expect("run retro");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The error as the user reads it: from the `Error:` line on, its causes joined, usage lines left out.
fn error_text(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("Error:") || l.starts_with("error:"))
        .unwrap_or(0);
    let end = lines
        .iter()
        .position(|l| l.starts_with("Stack backtrace:"))
        .unwrap_or(lines.len())
        .max(start);
    let text = lines[start..end]
        .iter()
        .map(|l| l.trim())
        .filter(|l| {
            !l.is_empty()
                && *l != "Caused by:"
                && !l.starts_with("Usage:")
                && !l.starts_with("For more information")
        })
        .map(|l| {
            l.split_once(": ")
                .filter(|(n, _)| n.parse::<usize>().is_ok())
                .map_or(l, |(_, r)| r)
        })
        .collect::<Vec<_>>()
        .join(" / ");
    text.chars().take(400).collect()
}

fn ok(args: &[&str]) -> String {
    let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (code, out, err) = run(&a);
    assert_eq!(code, 0, "retro {args:?}:\n{out}\n{err}");
    out
}

fn write(p: &Path, text: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, text).unwrap();
}

fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

/// Builds the fixture under `t` (a database, a dataset, a 4-step run, damaged copies, bad files)
/// and returns the cases that run against it.
fn fixture(t: &Path) -> Vec<Case> {
    let p = |n: &str| t.join(n).to_string_lossy().into_owned();
    let docs: String = (0..6)
        .map(|i| {
            let body: String = (0..400)
                .map(|j| format!("w{} ", (i * 7 + j * 13) % 40))
                .collect();
            serde_json::json!({"id": format!("doc{i}"), "text": body}).to_string() + "\n"
        })
        .collect();
    write(&t.join("corpus.jsonl"), docs.as_bytes());
    write(
        &t.join("corpus-dir/a.txt"),
        b"some text of the corpus folder",
    );
    let args = |a: &[&str]| -> Vec<String> { a.iter().map(|s| s.to_string()).collect() };
    let build = |corpus: &str, out: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "index",
            "build",
            "--corpus",
            corpus,
            "--tokenizer",
            "char",
            "--lexical-embedder",
            "64",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--chunk-len") {
            v.extend(["--chunk-len".to_string(), "16".to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let b = build(&p("corpus.jsonl"), &p("db"), &[]);
    ok(&b.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&[
        "dataset",
        "build",
        "--db",
        &p("db"),
        "--seq-len",
        "64",
        "--k",
        "2",
        "--out",
        &p("ds"),
    ]);
    let train_flags = [
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--warmup",
        "2",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "2",
    ];
    let (ds_dir, run_dir) = (p("ds"), p("run"));
    let mut a = vec!["train", "--dataset", &ds_dir, "--out", &run_dir];
    a.extend(train_flags);
    ok(&a);
    // Another database: other chunk_len; and one with another tokenizer (other characters).
    ok(&build(&p("corpus.jsonl"), &p("db8"), &["--chunk-len", "8"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    write(&t.join("other.jsonl"), b"{\"id\":\"x\",\"text\":\"ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 !?\"}\n");
    ok(&build(&p("other.jsonl"), &p("db-other-tok"), &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    write(
        &t.join("held.txt"),
        b"w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22",
    );

    // Damaged copies, one fault each.
    let damaged = |name: &str, f: &dyn Fn(&Path)| -> String {
        let d = t.join(name);
        copy_dir(&t.join("db"), &d);
        f(&d);
        d.to_string_lossy().into_owned()
    };
    let short_sha = damaged("db-short-sha", &|d| {
        edit_json(&d.join("manifest.json"), |v| {
            v["files"]["tokens.bin"]["sha256"] = "abc".into()
        })
    });
    let short_fp = damaged("db-short-fp", &|d| {
        edit_json(&d.join("manifest.json"), |v| {
            v["tokenizer"]["fingerprint"] = "12ab".into()
        })
    });
    let vocab = damaged("db-vocab", &|d| {
        edit_json(&d.join("manifest.json"), |v| {
            v["tokenizer"]["vocab_size"] = 7.into()
        })
    });
    let pad = damaged("db-pad", &|d| {
        edit_json(&d.join("manifest.json"), |v| {
            v["tokenizer"]["pad_id"] = 3.into()
        })
    });
    let version = damaged("db-version", &|d| {
        edit_json(&d.join("manifest.json"), |v| {
            v["format_version"] = 99.into()
        })
    });
    let chunk0 = damaged("db-chunk0", &|d| {
        edit_json(&d.join("manifest.json"), |v| v["chunk_len"] = 0.into())
    });
    let ef = damaged("db-ef", &|d| {
        edit_json(&d.join("manifest.json"), |v| {
            v["hnsw"]["ef_search"] = u64::MAX.into()
        })
    });
    let escape = damaged("db-escape", &|d| {
        edit_json(&d.join("manifest.json"), |v| {
            let f = v["files"]["tokens.bin"].clone();
            v["files"]["../outside"] = f;
        })
    });
    let flip = |file: &'static str| {
        move |d: &Path| {
            let p = d.join(file);
            let mut b = std::fs::read(&p).unwrap();
            let n = b.len();
            b[n - 5] ^= 0x10;
            std::fs::write(&p, b).unwrap();
        }
    };
    let tokens_flip = damaged("db-tokens-flip", &flip("tokens.bin"));
    let keys_flip = damaged("db-keys-flip", &flip("embeddings.bin"));
    let docs_flip = damaged("db-docs-flip", &flip("documents.json"));
    let graph_flip = damaged("db-graph-flip", &flip("hnsw/graph.links"));
    let truncated = damaged("db-truncated", &|d| {
        let p = d.join("tokens.bin");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
    let missing = damaged("db-missing", &|d| {
        std::fs::remove_file(d.join("embeddings.bin")).unwrap()
    });
    let ds_copy = |name: &str, f: &dyn Fn(&Path)| -> String {
        let d = t.join(name);
        copy_dir(&t.join("ds"), &d);
        f(&d);
        d.to_string_lossy().into_owned()
    };
    let ds_field = |name: &str, field: &'static str, value: serde_json::Value| {
        ds_copy(name, &move |d: &Path| {
            let value = value.clone();
            edit_json(&d.join("dataset.json"), move |v| v[field] = value)
        })
    };
    let ds_cl0 = ds_field("ds-cl0", "chunk_len", 0.into());
    let ds_nl = ds_field("ds-nl", "neighbour_len", 16.into());
    let ds_nl_big = ds_field("ds-nl-big", "neighbour_len", 64.into());
    let ds_k = ds_field("ds-k", "k", 0.into());
    let ds_v1 = ds_field("ds-v1", "format_version", 1.into());
    let ds_flip = ds_copy("ds-flip", &flip("train.neighbours"));
    let ds_trunc = ds_copy("ds-trunc", &|d| {
        std::fs::write(d.join("valid.origins"), b"").unwrap()
    });
    // Not bad input: a_dataset_json_with_a_byte_order_mark_opens opens it.
    ds_copy("ds-bom", &|d| {
        let p = d.join("dataset.json");
        let mut b = b"\xEF\xBB\xBF".to_vec();
        b.extend(std::fs::read(&p).unwrap());
        std::fs::write(p, b).unwrap();
    });
    let run_damaged = {
        let d = t.join("run-damaged");
        copy_dir(&t.join("run"), &d);
        let w = d.join("checkpoint-0000004/model.safetensors");
        let mut b = std::fs::read(&w).unwrap();
        let n = b.len();
        for x in &mut b[n - 64..] {
            *x ^= 0x5A;
        }
        std::fs::write(&w, b).unwrap();
        d.to_string_lossy().into_owned()
    };
    let bad_cfg = p("bad-config.json");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.join("run/config.json")).unwrap()).unwrap();
    c["chunk_len"] = 8.into();
    write(Path::new(&bad_cfg), &serde_json::to_vec(&c).unwrap());
    let huge_cfg = p("huge-config.json");
    c["chunk_len"] = 16.into();
    c["d_model"] = 1_000_000_000u64.into();
    write(Path::new(&huge_cfg), &serde_json::to_vec(&c).unwrap());
    write(&t.join("user-files/notes.txt"), b"my notes");
    write(&t.join("a-file"), b"x");
    std::fs::create_dir_all(t.join("empty")).unwrap();
    write(
        &t.join("dup.jsonl"),
        b"{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"a\",\"text\":\"y\"}\n",
    );
    write(
        &t.join("notobj.jsonl"),
        b"{\"id\":\"a\",\"text\":\"x\"}\n[1,2]\n",
    );
    write(&t.join("notext.jsonl"), b"{\"id\":\"a\"}\n");
    write(&t.join("numtext.jsonl"), b"{\"id\":\"a\",\"text\":5}\n");
    write(&t.join("bad-utf8.txt"), b"ok \xff no");
    write(&t.join("blank.txt"), b"   \n ");
    write(&t.join("bad-tok.json"), b"{\"model\": 3}");

    let r = p("run");
    let ds = p("ds");
    let db = p("db");
    let held = p("held.txt");
    let cases = vec![
        // bench generate: a reference script that is not there, a batch size of 0
        case(
            "bench_generate_reference_script_missing",
            args(&[
                "bench",
                "generate",
                "--reference-python",
                "python3",
                "--reference-script",
                &p("no-bench.py"),
            ]),
            vec!["no-bench.py", "does not exist"],
        ),
        case(
            "bench_generate_batch_of_zero",
            args(&["bench", "generate", "--batch", "1,0"]),
            vec!["--batch", "> 0"],
        ),
        // index build
        case(
            "index_build_corpus_missing",
            build(&p("nope.jsonl"), &p("o1"), &[]),
            vec!["nope.jsonl", "No such file"],
        ),
        case(
            "index_build_chunk_len_zero",
            build(&p("corpus.jsonl"), &p("o2"), &["--chunk-len", "0"]),
            vec!["chunk_len", "between 1 and 4096"],
        ),
        case(
            "index_build_chunk_len_overflows",
            build(
                &p("corpus.jsonl"),
                &p("o3"),
                &["--chunk-len", "18446744073709551615"],
            ),
            vec!["chunk_len = 18446744073709551615"],
        ),
        case(
            "index_build_out_is_the_corpus_folder",
            build(&p("corpus-dir"), &p("corpus-dir"), &["--overwrite"]),
            vec!["holds the corpus itself"],
        ),
        case(
            "index_build_overwrite_refuses_a_folder_of_user_files",
            build(&p("corpus.jsonl"), &p("user-files"), &["--overwrite"]),
            vec!["user-files", "is not a retro database"],
        ),
        case(
            "index_build_out_holds_a_database_without_overwrite",
            build(&p("corpus.jsonl"), &db, &[]),
            vec!["already holds a retro database", "--overwrite"],
        ),
        case(
            "index_build_out_is_a_file",
            build(&p("corpus.jsonl"), &p("a-file"), &[]),
            vec!["a-file", "is a file"],
        ),
        case(
            "index_build_duplicate_document_ids",
            build(&p("dup.jsonl"), &p("o4"), &[]),
            vec!["duplicate document id \"a\"", "dup.jsonl:1", "dup.jsonl:2"],
        ),
        case(
            "index_build_jsonl_line_not_an_object",
            build(&p("notobj.jsonl"), &p("o5"), &[]),
            vec!["notobj.jsonl, line 2", "not a JSON object"],
        ),
        case(
            "index_build_jsonl_line_without_text",
            build(&p("notext.jsonl"), &p("o6"), &[]),
            vec!["notext.jsonl, line 1", "missing text field"],
        ),
        case(
            "index_build_jsonl_text_not_a_string",
            build(&p("numtext.jsonl"), &p("o7"), &[]),
            vec!["line 1", "is not a string"],
        ),
        case(
            "index_build_corpus_not_utf8",
            build(&p("bad-utf8.txt"), &p("o8"), &[]),
            vec!["bad-utf8.txt", "invalid UTF-8 at byte offset 3"],
        ),
        case(
            "index_build_corpus_blank",
            build(&p("blank.txt"), &p("o9"), &[]),
            vec!["no non-empty documents"],
        ),
        case(
            "index_build_hnsw_m_too_small",
            build(&p("corpus.jsonl"), &p("o10"), &["--m", "1"]),
            vec!["m", "2..=255"],
        ),
        case(
            "index_build_embedder_folder_empty",
            [
                "index",
                "build",
                "--corpus",
                &p("corpus.jsonl"),
                "--tokenizer",
                "char",
                "--embedder",
                &p("empty"),
                "--out",
                &p("o11"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["empty", "BERT model directory"],
        ),
        case(
            "index_build_embedder_folder_missing",
            [
                "index",
                "build",
                "--corpus",
                &p("corpus.jsonl"),
                "--tokenizer",
                "char",
                "--embedder",
                &p("no-such-model"),
                "--out",
                &p("o12"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["no-such-model", "BERT model directory"],
        ),
        case(
            "index_build_tokenizer_file_malformed",
            [
                "index",
                "build",
                "--corpus",
                &p("corpus.jsonl"),
                "--tokenizer",
                &p("bad-tok.json"),
                "--lexical-embedder",
                "64",
                "--out",
                &p("o13"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["tokenizer"],
        ),
        case(
            "index_build_embedder_max_len_zero",
            [
                "index",
                "build",
                "--corpus",
                &p("corpus.jsonl"),
                "--tokenizer",
                "char",
                "--embedder",
                &p("empty"),
                "--max-len",
                "0",
                "--out",
                &p("o28"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["max_len = 0", "same key"],
        ),
        // opening databases
        case(
            "index_info_on_a_dataset",
            ["index", "info", &ds].map(String::from).to_vec(),
            vec!["is a retro dataset, not a database"],
        ),
        case(
            "index_info_on_a_run",
            ["index", "info", &r].map(String::from).to_vec(),
            vec!["training run, not a database"],
        ),
        case(
            "index_info_on_an_empty_folder",
            ["index", "info", &p("empty")].map(String::from).to_vec(),
            vec!["not a retro database"],
        ),
        case(
            "index_info_on_a_missing_folder",
            ["index", "info", &p("nowhere")].map(String::from).to_vec(),
            vec!["nowhere", "no database here"],
        ),
        case(
            "index_open_sha256_too_short",
            ["index", "info", &short_sha].map(String::from).to_vec(),
            vec!["files.tokens.bin.sha256", "64 hex digits"],
        ),
        case(
            "index_open_tokenizer_fingerprint_malformed",
            ["index", "info", &short_fp].map(String::from).to_vec(),
            vec!["tokenizer.fingerprint", "hex digits"],
        ),
        case(
            "index_open_vocab_size_disagrees",
            ["index", "info", &vocab].map(String::from).to_vec(),
            vec!["tokenizer.vocab_size is 7"],
        ),
        case(
            "index_open_pad_id_disagrees",
            ["index", "info", &pad].map(String::from).to_vec(),
            vec!["tokenizer.pad_id is 3"],
        ),
        case(
            "index_open_format_version_unknown",
            ["index", "info", &version].map(String::from).to_vec(),
            vec!["format_version 99"],
        ),
        case(
            "index_open_chunk_len_zero",
            ["index", "info", &chunk0].map(String::from).to_vec(),
            vec!["chunk_len", "outside 1..=4096"],
        ),
        case(
            "index_open_ef_search_out_of_range",
            ["index", "info", &ef].map(String::from).to_vec(),
            vec!["hnsw", "ef_search"],
        ),
        case(
            "index_open_file_table_escapes_the_folder",
            ["index", "info", &escape].map(String::from).to_vec(),
            vec!["leaves the database folder"],
        ),
        case(
            "index_open_tokens_truncated",
            ["index", "info", &truncated].map(String::from).to_vec(),
            vec!["tokens.bin", "bytes, the manifest says"],
        ),
        case(
            "index_open_embeddings_missing",
            ["index", "info", &missing].map(String::from).to_vec(),
            vec!["embeddings.bin", "missing"],
        ),
        case(
            "index_open_documents_corrupt",
            ["index", "info", &docs_flip].map(String::from).to_vec(),
            vec!["documents.json", "SHA-256"],
        ),
        case(
            "index_open_graph_corrupt",
            ["index", "info", &graph_flip].map(String::from).to_vec(),
            vec!["graph.links", "SHA-256"],
        ),
        case(
            "index_verify_embeddings_corrupt",
            ["index", "info", &keys_flip, "--verify"]
                .map(String::from)
                .to_vec(),
            vec!["embeddings.bin", "SHA-256"],
        ),
        case(
            "dataset_build_on_corrupt_embeddings",
            [
                "dataset",
                "build",
                "--db",
                &keys_flip,
                "--seq-len",
                "64",
                "--out",
                &p("o14"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["embeddings.bin", "SHA-256"],
        ),
        case(
            "dataset_build_on_corrupt_tokens",
            [
                "dataset",
                "build",
                "--db",
                &tokens_flip,
                "--seq-len",
                "64",
                "--out",
                &p("o15"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["tokens.bin", "SHA-256"],
        ),
        case(
            "index_query_k_zero",
            ["index", "query", &db, "w1 w2", "-k", "0"]
                .map(String::from)
                .to_vec(),
            vec!["k"],
        ),
        // datasets
        case(
            "dataset_build_k_too_large",
            [
                "dataset",
                "build",
                "--db",
                &db,
                "--seq-len",
                "64",
                "--k",
                "1000",
                "--out",
                &p("o16"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["k = 1000", "between 1 and 64"],
        ),
        case(
            "dataset_build_k_zero",
            [
                "dataset",
                "build",
                "--db",
                &db,
                "--seq-len",
                "64",
                "--k",
                "0",
                "--out",
                &p("o17"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["k = 0"],
        ),
        case(
            "dataset_build_seq_len_below_chunk_len",
            [
                "dataset",
                "build",
                "--db",
                &db,
                "--seq-len",
                "8",
                "--out",
                &p("o18"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["seq_len = 8", "chunk_len"],
        ),
        case(
            "dataset_build_hold_out_matching_nothing",
            [
                "dataset",
                "build",
                "--db",
                &db,
                "--seq-len",
                "64",
                "--hold-out-matching",
                "zzz",
                "--out",
                &p("o19"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["held_out_matching = zzz"],
        ),
        case(
            "dataset_build_hold_out_unknown_id",
            [
                "dataset",
                "build",
                "--db",
                &db,
                "--seq-len",
                "64",
                "--hold-out",
                "doc99",
                "--out",
                &p("o20"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["held_out_ids = doc99"],
        ),
        case(
            "dataset_build_out_holds_a_dataset_without_overwrite",
            [
                "dataset",
                "build",
                "--db",
                &db,
                "--seq-len",
                "64",
                "--out",
                &ds,
            ]
            .map(String::from)
            .to_vec(),
            vec!["already holds a retro dataset", "--overwrite"],
        ),
        case(
            "dataset_build_overwrite_refuses_a_folder_of_user_files",
            [
                "dataset",
                "build",
                "--db",
                &db,
                "--seq-len",
                "64",
                "--out",
                &p("user-files"),
                "--overwrite",
            ]
            .map(String::from)
            .to_vec(),
            vec!["user-files", "is not a retro dataset"],
        ),
        case(
            "dataset_info_on_a_database",
            ["dataset", "info", &db].map(String::from).to_vec(),
            vec!["is a retro database, not a dataset"],
        ),
        case(
            "dataset_open_chunk_len_zero",
            ["dataset", "info", &ds_cl0].map(String::from).to_vec(),
            vec!["chunk_len = 0"],
        ),
        case(
            "dataset_open_neighbour_len_not_two_chunks",
            ["dataset", "info", &ds_nl].map(String::from).to_vec(),
            vec!["neighbour_len = 16", "2 x chunk_len = 32"],
        ),
        case(
            "dataset_open_neighbour_len_too_large",
            ["dataset", "info", &ds_nl_big].map(String::from).to_vec(),
            vec!["neighbour_len = 64"],
        ),
        case(
            "dataset_open_k_zero",
            ["dataset", "info", &ds_k].map(String::from).to_vec(),
            vec!["k = 0"],
        ),
        case(
            "dataset_open_old_format_version",
            ["dataset", "info", &ds_v1].map(String::from).to_vec(),
            vec!["format_version 1", "rebuild"],
        ),
        case(
            "dataset_open_neighbours_corrupt",
            ["dataset", "info", &ds_flip].map(String::from).to_vec(),
            vec!["train.neighbours", "SHA-256"],
        ),
        case(
            "dataset_open_origins_truncated",
            ["dataset", "info", &ds_trunc].map(String::from).to_vec(),
            vec!["valid.origins"],
        ),
        case(
            "dataset_info_with_another_database",
            ["dataset", "info", &ds, "--db", &p("db8")]
                .map(String::from)
                .to_vec(),
            vec!["built from database"],
        ),
        // training
        case(
            "train_config_chunk_len_disagrees_with_the_dataset",
            [
                "train",
                "--dataset",
                &ds,
                "--config",
                &bad_cfg,
                "--out",
                &p("o21"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["chunk_len 8", "chunk_len 16"],
        ),
        case(
            "train_config_too_large",
            [
                "train",
                "--dataset",
                &ds,
                "--config",
                &huge_cfg,
                "--out",
                &p("o22"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["d_model", "limit"],
        ),
        case(
            "train_preset_unknown",
            [
                "train",
                "--dataset",
                &ds,
                "--preset",
                "giant",
                "--out",
                &p("o23"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["giant"],
        ),
        case(
            "train_lr_nan",
            [
                "train",
                "--dataset",
                &ds,
                "--preset",
                "tiny",
                "--lr",
                "NaN",
                "--out",
                &p("o24"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["--lr NaN"],
        ),
        case(
            "train_lr_negative",
            [
                "train",
                "--dataset",
                &ds,
                "--preset",
                "tiny",
                "--lr=-1",
                "--out",
                &p("o25"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["--lr -1"],
        ),
        case(
            "train_batch_size_zero",
            [
                "train",
                "--dataset",
                &ds,
                "--preset",
                "tiny",
                "--batch-size",
                "0",
                "--out",
                &p("o26"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["--batch-size 0"],
        ),
        case(
            "train_steps_zero",
            [
                "train",
                "--dataset",
                &ds,
                "--preset",
                "tiny",
                "--steps",
                "0",
                "--out",
                &p("o27"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["--steps 0"],
        ),
        case(
            "train_out_holds_a_run",
            ["train", "--dataset", &ds, "--preset", "tiny", "--out", &r]
                .map(String::from)
                .to_vec(),
            vec!["already holds a run"],
        ),
        case(
            "train_resume_with_another_lr",
            ["train", "--dataset", &ds, "--resume", &r, "--lr", "0.5"]
                .map(String::from)
                .to_vec(),
            vec!["--lr 0.5 conflicts with the run's lr"],
        ),
        case(
            "train_resume_with_another_batch_size",
            [
                "train",
                "--dataset",
                &ds,
                "--resume",
                &r,
                "--batch-size",
                "3",
            ]
            .map(String::from)
            .to_vec(),
            vec!["--batch-size 3 conflicts"],
        ),
        case(
            "train_resume_steps_behind_the_run",
            ["train", "--dataset", &ds, "--resume", &r, "--steps", "2"]
                .map(String::from)
                .to_vec(),
            vec!["steps = 2", "already at step 4"],
        ),
        case(
            "train_resume_a_missing_run",
            ["train", "--dataset", &ds, "--resume", &p("no-run")]
                .map(String::from)
                .to_vec(),
            vec!["no-run", "no such run"],
        ),
        case(
            "train_resume_with_another_model_config",
            ["train", "--dataset", &ds, "--resume", &r, "--no-retrieval"]
                .map(String::from)
                .to_vec(),
            vec!["another model config"],
        ),
        case(
            "eval_on_a_damaged_checkpoint",
            ["eval", "--run", &run_damaged, "--data", &held]
                .map(String::from)
                .to_vec(),
            vec!["checkpoint-0000004", "damaged"],
        ),
        // generation and evaluation
        case(
            "generate_temperature_nan",
            ["generate", "--run", &r, "w1", "--temperature", "NaN"]
                .map(String::from)
                .to_vec(),
            vec!["temperature"],
        ),
        case(
            "generate_temperature_negative",
            ["generate", "--run", &r, "w1", "--temperature=-1"]
                .map(String::from)
                .to_vec(),
            vec!["temperature"],
        ),
        case(
            "generate_top_p_zero",
            [
                "generate",
                "--run",
                &r,
                "w1",
                "--temperature",
                "1",
                "--top-p",
                "0",
            ]
            .map(String::from)
            .to_vec(),
            vec!["top_p"],
        ),
        case(
            "generate_top_p_above_one",
            [
                "generate",
                "--run",
                &r,
                "w1",
                "--temperature",
                "1",
                "--top-p",
                "2",
            ]
            .map(String::from)
            .to_vec(),
            vec!["top_p"],
        ),
        case(
            "generate_top_k_zero",
            [
                "generate",
                "--run",
                &r,
                "w1",
                "--temperature",
                "1",
                "--top-k",
                "0",
            ]
            .map(String::from)
            .to_vec(),
            vec!["top_k"],
        ),
        case(
            "generate_a_missing_run",
            ["generate", "--run", &p("no-run"), "w1"]
                .map(String::from)
                .to_vec(),
            vec!["no-run", "no such run"],
        ),
        case(
            "generate_with_a_database_of_another_tokenizer",
            ["generate", "--run", &r, "w1", "--db", &p("db-other-tok")]
                .map(String::from)
                .to_vec(),
            vec!["tokenizer"],
        ),
        case(
            "eval_with_a_database_of_another_chunk_len",
            ["eval", "--run", &r, "--data", &held, "--db", &p("db8")]
                .map(String::from)
                .to_vec(),
            vec!["chunk_len"],
        ),
        case(
            "eval_with_a_database_of_another_tokenizer",
            [
                "eval",
                "--run",
                &r,
                "--data",
                &held,
                "--db",
                &p("db-other-tok"),
            ]
            .map(String::from)
            .to_vec(),
            vec!["tokenizer"],
        ),
        case(
            "eval_on_training_documents",
            ["eval", "--run", &r, "--data", &p("corpus.jsonl")]
                .map(String::from)
                .to_vec(),
            vec!["--allow-training-documents"],
        ),
        case(
            "eval_on_a_missing_file",
            ["eval", "--run", &r, "--data", &p("nothing.txt")]
                .map(String::from)
                .to_vec(),
            vec!["nothing.txt"],
        ),
    ];
    cases
}

/// Runs one case: its table row (`| command | message | test |`), and why it failed if it did.
fn check(c: &Case, root: &Path) -> (String, Result<(), Failed>) {
    let fresh_out = c
        .args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| c.args.get(i + 1))
        .map(PathBuf::from)
        .filter(|o| !o.exists());
    let (code, _out, err) = run(&c.args);
    let root_text = root.to_string_lossy();
    let shown = |x: &str| x.replace(&*root_text, "T").replace('|', "\\|");
    let row = format!(
        "| `retro {}` | {} | `{}` |\n",
        shown(&c.args.join(" ")),
        shown(&error_text(&err)),
        c.name
    );
    let good = (code == 1 || code == 2)
        && !err.contains("panicked")
        && c.want.iter().all(|w| err.contains(w));
    let verdict = if !good {
        Err(format!(
            "retro {}\n  exit {code}\n  stderr: {}\n  wanted: {:?}",
            c.args.join(" "),
            err.trim(),
            c.want
        ))
    } else if let Some(o) = fresh_out.filter(|o| o.exists()) {
        Err(format!("{} was created by a refused command", o.display()))
    } else if std::fs::read(root.join(NOTES)).ok().as_deref() != Some(b"my notes".as_slice())
        || !root.join(CORPUS_FILE).exists()
    {
        Err(format!("a user's file changed: {NOTES} or {CORPUS_FILE}"))
    } else {
        Ok(())
    };
    (row, verdict.map_err(Failed::from))
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cases = fixture(&root);
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "two cases share a name");
    let rows = Arc::new(Mutex::new(vec![None; cases.len()]));
    let mut trials: Vec<Trial> = cases
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let (root, rows) = (root.clone(), rows.clone());
            Trial::test(c.name, move || {
                let (row, verdict) = check(&c, &root);
                rows.lock().unwrap()[i] = Some(row);
                verdict
            })
        })
        .collect();
    let ds_bom = root.join("ds-bom").to_string_lossy().into_owned();
    trials.push(Trial::test(
        "a_dataset_json_with_a_byte_order_mark_opens",
        move || {
            ok(&["dataset", "info", &ds_bom]);
            Ok(())
        },
    ));
    let db = root.join("db").to_string_lossy().into_owned();
    trials.push(Trial::test(
        "output_piped_into_head_ends_quietly",
        move || {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "{} index query {db} 'w1 w2 w3' -k 100 --json | head -c 10",
                    env!("CARGO_BIN_EXE_retro")
                ))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Broken pipe") || err.contains("panicked") {
                return Err(err.into_owned().into());
            }
            Ok(())
        },
    ));
    trials.push(Trial::test(
        "an_instruction_set_cap_the_kernels_do_not_know_is_refused_by_name",
        an_instruction_set_cap_the_kernels_do_not_know_is_refused_by_name,
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(f) = std::env::var_os("RETRO_RELIABILITY_TABLE") {
        // The rows of the cases that ran, in the cases' order.
        let table: String = rows.lock().unwrap().iter().flatten().cloned().collect();
        std::fs::write(f, table).unwrap();
    }
    drop(tmp);
    conclusion.exit_code()
}

fn an_instruction_set_cap_the_kernels_do_not_know_is_refused_by_name() -> Result<(), Failed> {
    let out = Command::new(env!("CARGO_BIN_EXE_retro"))
        .args(["index", "info", "no-such-db"])
        .env("RETRO_ISA", "avx3")
        .output()
        .expect("run retro");
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(1)
        || !err.contains("RETRO_ISA")
        || !err.contains("avx3")
        || err.contains("no-such-db")
    {
        return Err(format!("exit {:?}: {err}", out.status.code()).into());
    }
    Ok(())
}

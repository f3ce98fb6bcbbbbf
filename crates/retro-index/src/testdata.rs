//! Locating the shared test data (never copied into the repository).
//!
//! `RETRO_SHARED` names the folder; by default it is `../shared` beside the workspace root.
//! When a file is missing a test skips with a message, unless `RETRO_REQUIRE_SHARED=1` (CI),
//! in which case it panics naming what is missing.

use std::path::PathBuf;

/// The shared data folder (it may not exist).
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("RETRO_SHARED") {
        // A relative path is relative to the workspace root, where the README's command runs
        // (each test binary runs in its own crate's folder).
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(p)
            }
        }
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")),
    }
}

/// Whether missing shared data must fail tests (`RETRO_REQUIRE_SHARED=1`).
pub fn shared_required() -> bool {
    std::env::var("RETRO_REQUIRE_SHARED").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// `shared_dir()/rel` if it exists; otherwise prints a skip message and returns `None`,
/// or panics when [`shared_required`].
pub fn shared_path(rel: &str) -> Option<PathBuf> {
    let p = shared_dir().join(rel);
    if p.exists() {
        return Some(p);
    }
    if shared_required() {
        panic!("shared test data missing: {} (RETRO_REQUIRE_SHARED=1; set RETRO_SHARED to the shared folder)", p.display());
    }
    eprintln!(
        "skipping: shared test data {} not found (set RETRO_SHARED)",
        p.display()
    );
    None
}

//! What several of the binary's test files share. Each file uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `retro args`, failing the test with its output unless it succeeds; returns stdout.
pub fn retro(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_retro"))
        .args(args)
        .output()
        .expect("run retro");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "retro {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The python of a venv `target/NAME` that can `import MODULES`, made once with `packages`
/// from PyPI. None when it cannot be made, which CI (`RETRO_REQUIRE_SHARED`) refuses: the
/// caller then prints its SKIPPED line.
pub fn venv_python(name: &str, modules: &str, packages: &[&str]) -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    let python = venv.join("bin/python");
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    let ready = ok(Command::new(&python).args(["-c", &format!("import {modules}")]))
        || (ok(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            && ok(Command::new(&python)
                .args(["-m", "pip", "install", "-q"])
                .args(packages)));
    assert!(
        ready || std::env::var("RETRO_REQUIRE_SHARED").is_err(),
        "CI: could not install {packages:?} from PyPI into {}",
        venv.display()
    );
    ready.then_some(python)
}

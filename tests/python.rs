//! The Python bindings (`crates/retro-py`, the `retro_rs` module) built by maturin into a venv
//! under `target/` and tested by pytest against the `retro` binary (`crates/retro-py/tests`).

use std::path::Path;
use std::process::Command;

fn ok(c: &mut Command) -> bool {
    c.status().is_ok_and(|s| s.success())
}

#[test]
fn the_python_bindings_pass_their_pytest_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/py-venv");
    let bin = venv.join("bin");
    let python = bin.join("python");
    let tools = ["import maturin, pytest, numpy"];
    let ready = ok(Command::new(&python).args(["-c", tools[0]]))
        || (ok(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            && ok(Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "-q",
                "maturin>=1.5,<2",
                "pytest",
                "numpy",
            ])));
    if !ready {
        assert!(
            std::env::var("RETRO_REQUIRE_SHARED").is_err(),
            "CI: could not install maturin, pytest and numpy from PyPI into target/py-venv"
        );
        eprintln!("SKIPPED the_python_bindings: no venv with maturin, pytest and numpy");
        return;
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let built = Command::new(bin.join("maturin"))
        .args(["develop", "--quiet", "-m"])
        .arg(root.join("crates/retro-py/Cargo.toml"))
        .env("VIRTUAL_ENV", &venv)
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "maturin develop failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("crates/retro-py/tests"))
        .env("RETRO_BIN", env!("CARGO_BIN_EXE_retro"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pytest failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

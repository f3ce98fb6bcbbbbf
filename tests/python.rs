//! The Python bindings (`crates/retro-py`, the `retro_rs` module) tested by pytest against the
//! `retro` binary (`crates/retro-py/tests`). The module is the `libretro_rs.so` cargo built with
//! this test (nothing compiles twice; maturin, which `pip install ./crates/retro-py` runs, would
//! resolve other features and rebuild the workspace), laid out as the package maturin makes;
//! pytest and numpy come from PyPI into a venv under `target/`.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_bindings_pass_their_pytest_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(python) = common::venv_python(
        "py-venv",
        "pytest, numpy, tqdm",
        &["pytest", "numpy", "tqdm"],
    ) else {
        eprintln!("SKIPPED the_python_bindings: no venv with pytest and numpy");
        return;
    };
    // The root package dev-depends on retro-py, so cargo built the module with this test,
    // beside this test's own binary.
    let exe = std::env::current_exe().unwrap();
    let module = exe.parent().unwrap().join("libretro_rs.so");
    assert!(module.is_file(), "{} was not built", module.display());
    // The package as maturin lays it out: the Python sources and the extension beside them.
    let pkg = root.join("target/py-pkg/retro_rs");
    std::fs::create_dir_all(&pkg).unwrap();
    let src = root.join("crates/retro-py/python/retro_rs");
    for f in ["__init__.py", "progress.py", "retro_rs.pyi", "py.typed"] {
        std::fs::copy(src.join(f), pkg.join(f)).unwrap();
    }
    std::fs::copy(&module, pkg.join("retro_rs.abi3.so")).unwrap();
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("crates/retro-py/tests"))
        .env("PYTHONPATH", pkg.parent().unwrap())
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

//! What several test binaries share.

/// Runs this test binary's other tests again in a child process, with the kernels' instruction set
/// capped at AVX2 and at the baseline (`RETRO_ISA`, read once per process), so the AVX2 and
/// generic kernels are checked against the same references on a CPU with AVX-512. `me` is the
/// calling test's name, skipped in the child.
pub fn rerun_with_the_instruction_set_capped(me: &str) {
    let var = retro_kernels::isa::ISA_VAR;
    if std::env::var_os(var).is_some() {
        return; // the child
    }
    for cap in ["avx2", "base"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env(var, cap)
            .args(["--test-threads", "2", "--skip", me])
            .output()
            .expect("rerun the test binary");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("test result: ok"),
            "with {var}={cap}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

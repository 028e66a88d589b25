//! Shared fixtures of the trainer's integration tests: the binary as a
//! process.

#![allow(dead_code, clippy::unwrap_used)]

use std::process::Command;

/// Run `flywheel-trainer` with `args`; its stdout, or a failed test with
/// both streams.
pub fn trainer(args: &[&str]) -> String {
    trainer_output(args).0
}

/// Run `flywheel-trainer` with warnings logged; its stdout and stderr.
pub fn trainer_output(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel-trainer"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "flywheel-trainer {args:?} failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

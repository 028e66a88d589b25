//! Shared fixtures of the demo crate's tests: the binaries as processes.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

/// A binary of the workspace, built beside this test (`cargo test
/// --workspace` builds every package's binaries before it runs a test).
fn workspace_binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let bin = deps
        .parent()
        .unwrap()
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is not built: run the tests with `cargo test --workspace` (or `cargo build --bin {name}` first)",
        bin.display()
    );
    bin
}

/// Run `flywheel-demo` with `args`; its stdout, or a failed test with both streams.
pub fn demo(args: &[&str]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_flywheel-demo")), "flywheel-demo", args)
}

/// Run `flywheel-trainer` with `args`; its stdout, or a failed test with both streams.
pub fn trainer(args: &[&str]) -> String {
    run(
        Command::new(workspace_binary("flywheel-trainer")),
        "flywheel-trainer",
        args,
    )
}

/// Run `flywheel-trainer` with `args`, which must fail; its stderr.
pub fn trainer_fails(args: &[&str]) -> String {
    let out = Command::new(workspace_binary("flywheel-trainer"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "flywheel-trainer {args:?} succeeded:\n{stderr}");
    stderr
}

fn run(mut command: Command, name: &str, args: &[&str]) -> String {
    let out = command.args(args).env("RUST_LOG", "warn").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name} {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

//! `cargo run -p xtask -- <task>`: the project's entry points, the same ones
//! the README gives (they live in scripts/ so a fresh machine can run them
//! before any Rust is built).

use std::process::{exit, Command};

fn main() {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let script = match task.as_str() {
        "setup" => "scripts/setup.sh",
        "demo" => "scripts/demo.sh",
        "test" => "scripts/test.sh",
        "bench" => "scripts/bench.sh",
        _ => {
            eprintln!("usage: cargo run -p xtask -- setup|demo|test|bench [args]");
            exit(2);
        }
    };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = Command::new(format!("{root}/{script}"))
        .args(args)
        .current_dir(root)
        .status()
        .unwrap_or_else(|e| {
            eprintln!("cannot run {script}: {e}");
            exit(1)
        });
    exit(status.code().unwrap_or(1));
}

//! `cargo run -p xtask -- <task>`: the project's entry points, the same ones
//! the README gives (they live in scripts/ so a fresh machine can run them
//! before any Rust is built), and `gen-crds`, which writes the
//! CustomResourceDefinitions of `kube-watch/src/crds.rs` to
//! `manifest/crds/` (kube-watch's `tests/crds.rs` checks they are current).

use std::{
    path::Path,
    process::{exit, Command},
};

fn main() {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let script = match task.as_str() {
        "setup" => "scripts/setup.sh",
        "demo" => "scripts/demo.sh",
        "test" => "scripts/test.sh",
        "bench" => "scripts/bench.sh",
        "gen-crds" => {
            if let Err(e) = gen_crds(&Path::new(root).join("manifest/crds")) {
                eprintln!("gen-crds: {e}");
                exit(1);
            }
            exit(0);
        }
        _ => {
            eprintln!("usage: cargo run -p xtask -- setup|demo|test|bench|gen-crds [args]");
            exit(2);
        }
    };
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

/// Write one file per CRD into `dir` (created if missing) and remove the
/// `*.yaml` files there that are no longer generated.
fn gen_crds(dir: &Path) -> std::io::Result<()> {
    let files = kube_watch::crds::render_crds();
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if path.extension().is_some_and(|e| e == "yaml") && !files.iter().any(|(n, _)| *n == name) {
            std::fs::remove_file(&path)?;
            println!("removed {}", path.display());
        }
    }
    for (name, text) in &files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            println!("unchanged {}", path.display());
        } else {
            std::fs::write(&path, text)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

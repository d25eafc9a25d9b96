use anyhow::{anyhow, Context as _};
use aya_build::Package;

/// Build the benchmark's reference programs (loxilb-ebpf/ref) for the BPF
/// target; the object lands in OUT_DIR as `loxilb-ref` and only the
/// benchmark embeds it (the agent never loads or creates its maps).
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("loxilb-ebpf")
        .join("ref");
    let root = root
        .to_str()
        .context("workspace path is not UTF-8")?
        .to_owned();
    // The references take the datapath's conntrack key and value sizes.
    println!("cargo:rerun-if-changed={root}/../common/src");
    aya_build::build_ebpf(
        [Package {
            name: "loxilb-ebpf-ref",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

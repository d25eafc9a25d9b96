use anyhow::{anyhow, Context as _};
use aya_build::Package;

/// Build the eBPF datapath (loxilb-ebpf) for the BPF target with the
/// nightly toolchain and bpf-linker; the object lands in OUT_DIR and is
/// embedded into the agent.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("loxilb-ebpf");
    let root = root
        .to_str()
        .context("workspace path is not UTF-8")?
        .to_owned();
    // Rebuild when the shared map definitions change too.
    println!("cargo:rerun-if-changed={root}/common/src");
    aya_build::build_ebpf(
        [Package {
            name: "loxilb-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

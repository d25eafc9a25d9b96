use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use loxilb_agent::{
    config,
    datapath::{AttachMode, Datapath, PinnedMaps, DEFAULT_PIN_DIR},
    rules::Rules,
    show,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "loxilb-agent",
    version,
    about = "Service load balancer with an eBPF datapath"
)]
struct Cli {
    /// Where the datapath's maps (and, with --keep, its links) are pinned.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Standalone mode: attach to interfaces and serve the rules of a file.
    Run {
        /// Interface to attach the XDP datapath to (repeat for several).
        #[arg(long = "iface", short = 'i', required = true)]
        ifaces: Vec<String>,
        /// Rule file (YAML). Re-read on change and on SIGHUP.
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// XDP attach mode: auto (native if the driver can, else generic), native, generic.
        #[arg(long, default_value = "auto")]
        xdp_mode: AttachMode,
        /// On exit keep the program attached and the maps pinned, with their
        /// sessions, for the next agent to adopt.
        #[arg(long)]
        keep: bool,
        /// Hand translated packets to the kernel stack instead of XDP redirect.
        #[arg(long)]
        forward_via_stack: bool,
    },
    /// Show the rules in the running datapath.
    Rules,
    /// Show every endpoint with its state, active sessions and counters.
    Endpoints,
    /// Show the live session table.
    Sessions,
    /// Show datapath counters.
    Stats,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            ifaces,
            config,
            xdp_mode,
            keep,
            forward_via_stack,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(
                &cli.pin_dir,
                &ifaces,
                &config,
                xdp_mode,
                keep,
                forward_via_stack,
            ))
        }
        Cmd::Rules => {
            let m = PinnedMaps::open(&cli.pin_dir)?;
            print!(
                "{}",
                show::rules_table(&m.services()?, &m.endpoints()?, &m.rule_stats()?)
            );
            Ok(())
        }
        Cmd::Endpoints => {
            let m = PinnedMaps::open(&cli.pin_dir)?;
            let eps = m.endpoints()?;
            let idx: Vec<u32> = eps
                .values()
                .map(|e| e.stat_idx)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let stats = idx.iter().copied().zip(m.ep_stats(&idx)?).collect();
            print!("{}", show::endpoints_table(&m.services()?, &eps, &stats));
            Ok(())
        }
        Cmd::Sessions => {
            let m = PinnedMaps::open(&cli.pin_dir)?;
            print!(
                "{}",
                show::sessions_table(&m.sessions()?, show::monotonic_ns())
            );
            Ok(())
        }
        Cmd::Stats => {
            let m = PinnedMaps::open(&cli.pin_dir)?;
            print!("{}", show::stats_table(&m.stats()?));
            Ok(())
        }
    }
}

fn file_stamp(p: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

async fn run(
    pin_dir: &Path,
    ifaces: &[String],
    cfg_path: &Path,
    mode: AttachMode,
    keep: bool,
    forward_via_stack: bool,
) -> Result<()> {
    // Validate the rule file before touching the kernel.
    let desired = config::load(cfg_path)?;
    let mut dp = Datapath::load(Some(pin_dir))?;
    let mut rules = if dp.adopted() {
        let installed = dp.read_installed()?;
        info!(
            rules = installed.len(),
            sessions = dp.sessions()?.len() / 2,
            "adopted the datapath state pinned in {}",
            pin_dir.display()
        );
        Rules::adopt(installed)
    } else {
        Rules::adopt(vec![])
    };
    let mut cfg = dp.config()?;
    cfg.flags = if forward_via_stack {
        loxilb_common::cfg_flags::FORWARD_VIA_STACK
    } else {
        0
    };
    dp.set_config(cfg)?;
    let rep = rules.apply(&desired, &mut dp)?;
    info!(
        added = rep.added.len(),
        updated = rep.updated.len(),
        removed = rep.removed.len(),
        unchanged = rep.unchanged,
        "rules from {} applied",
        cfg_path.display()
    );
    for iface in ifaces {
        match dp.attach(iface, mode) {
            Ok(used) => info!("attached XDP to {iface}: {used} mode"),
            Err(e) => {
                error!("{e:#}");
                dp.shutdown(keep)?;
                return Err(e);
            }
        }
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stamp = file_stamp(cfg_path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut recount = tokio::time::interval(Duration::from_secs(10));
    info!(
        "serving; edit {} or send SIGHUP to reload",
        cfg_path.display()
    );
    loop {
        let reload = tokio::select! {
            _ = hup.recv() => { info!("SIGHUP: reloading {}", cfg_path.display()); true }
            _ = tick.tick() => {
                let s = file_stamp(cfg_path);
                if s != stamp { stamp = s; info!("{} changed: reloading", cfg_path.display()); true } else { false }
            }
            _ = recount.tick() => {
                // Active-session counts drift when the LRU evicts sessions;
                // re-count them from conntrack.
                if let Err(e) = dp.recount_active() {
                    warn!("re-counting active sessions failed: {e:#}");
                }
                false
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        if !reload {
            continue;
        }
        match config::load(cfg_path) {
            Ok(desired) => match rules.apply(&desired, &mut dp) {
                Ok(rep) => info!(
                    added = ?rep.added,
                    updated = ?rep.updated,
                    removed = ?rep.removed,
                    unchanged = rep.unchanged,
                    sessions_flushed = rep.sessions_flushed,
                    "reload applied"
                ),
                Err(e) => error!("reload failed while writing the maps: {e:#}"),
            },
            Err(e) => warn!("{e}; the rules already running are unchanged"),
        }
    }
    if keep {
        info!(
            "exiting; program stays attached and maps stay pinned in {} (--keep)",
            pin_dir.display()
        );
    } else {
        info!("exiting; detaching and unpinning");
    }
    dp.shutdown(keep).context("shutting the datapath down")
}

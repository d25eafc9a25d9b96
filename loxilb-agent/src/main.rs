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
        /// Source address of full-NAT sessions (kube-loxilb's `--setRoles`
        /// VIP); default: each service's own VIP.
        #[arg(long, value_name = "IPV4")]
        fullnat_source: Option<std::net::Ipv4Addr>,
        /// Source ports given to onearm/full-NAT sessions, `LO-HI`.
        #[arg(long, value_name = "LO-HI", default_value = "32768-60999", value_parser = parse_port_range)]
        snat_ports: (u16, u16),
    },
    /// Attach the IPIP decapsulator to interfaces (on the endpoints of a
    /// dsr-ipip rule, where the kernel has no ipip module); runs until
    /// stopped.
    Decap {
        #[arg(long = "iface", short = 'i', required = true)]
        ifaces: Vec<String>,
        #[arg(long, default_value = "auto")]
        xdp_mode: AttachMode,
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

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a port range like 32768-60999 (1..=65535, low <= high)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let lo: u16 = a.trim().parse().map_err(|_| bad())?;
    let hi: u16 = b.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// Load and fully check the rule file (syntax, values, and what depends
/// on this node: L2 DSR endpoints must be directly connected).
fn load_rules(path: &Path) -> Result<Vec<config::Rule>, config::ConfigError> {
    let rules = config::load(path)?;
    let routes = loxilb_agent::routes::read().map_err(|e| config::ConfigError {
        file: path.display().to_string(),
        field: String::new(),
        message: format!("cannot read the routing table (/proc/net/route): {e}"),
    })?;
    config::check_reachability(&path.display().to_string(), &rules, &routes)?;
    Ok(rules)
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
            fullnat_source,
            snat_ports,
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
                Knobs {
                    forward_via_stack,
                    fullnat_source,
                    snat_ports,
                },
            ))
        }
        Cmd::Decap { ifaces, xdp_mode } => {
            let mut dp = Datapath::load(None)?;
            for i in &ifaces {
                let used = dp.attach_program(i, xdp_mode, loxilb_common::prog_names::XDP_DECAP)?;
                info!("IPIP decapsulation attached to {i}: {used} mode");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut term = signal(SignalKind::terminate())?;
                let mut int = signal(SignalKind::interrupt())?;
                info!("decapsulating; stop with SIGTERM or Ctrl-C");
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                anyhow::Ok(())
            })?;
            dp.shutdown(false)
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

/// Kernel settings the datapath relies on: translated packets it hands to
/// the stack may carry one of this node's addresses as their source
/// (onearm, full-NAT), which the stack drops as martian unless
/// `accept_local` is on; FIB lookups need forwarding on.
fn host_setup(ifaces: &[String]) {
    for i in ifaces {
        let p = format!("/proc/sys/net/ipv4/conf/{i}/accept_local");
        match std::fs::write(&p, "1") {
            Ok(()) => info!("{p} = 1 (translated packets with a local source may be forwarded)"),
            Err(e) => warn!("cannot set {p}: {e}; onearm/full-NAT packets the stack must forward may be dropped"),
        }
    }
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "1" => {}
        _ => warn!(
            "net.ipv4.ip_forward is off: the datapath cannot forward (FIB lookups fail) and \
             passes packets to the stack, which drops them; enable it (sysctl -w net.ipv4.ip_forward=1)"
        ),
    }
}

/// Keep the kernel's neighbour entries of endpoints resolved (the datapath
/// reads them through the FIB but cannot trigger resolution itself): a
/// datagram to each endpoint's discard port makes the kernel resolve it.
fn nudge_neighbours(rules: &Rules) {
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return;
    };
    let mut seen = std::collections::BTreeSet::new();
    for r in rules.installed() {
        for e in &r.eps {
            if seen.insert(e.addr) {
                let ip = std::net::Ipv4Addr::from(e.addr.to_ne_bytes());
                let _ = sock.send_to(&[], (ip, 9));
            }
        }
    }
}

fn file_stamp(p: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Datapath-wide settings from the command line.
struct Knobs {
    forward_via_stack: bool,
    fullnat_source: Option<std::net::Ipv4Addr>,
    snat_ports: (u16, u16),
}

async fn run(
    pin_dir: &Path,
    ifaces: &[String],
    cfg_path: &Path,
    mode: AttachMode,
    keep: bool,
    knobs: Knobs,
) -> Result<()> {
    // Validate the rule file before touching the kernel.
    let desired = load_rules(cfg_path)?;
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
    cfg.flags = if knobs.forward_via_stack {
        loxilb_common::cfg_flags::FORWARD_VIA_STACK
    } else {
        0
    };
    cfg.fullnat_src = knobs
        .fullnat_source
        .map(|a| u32::from_ne_bytes(a.octets()))
        .unwrap_or(0);
    (cfg.snat_port_lo, cfg.snat_port_hi) = knobs.snat_ports;
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
    host_setup(ifaces);
    nudge_neighbours(&rules);
    for iface in ifaces {
        let r = dp.attach(iface, mode).and_then(|used| {
            info!("attached XDP to {iface}: {used} mode");
            dp.attach_egress(iface)
                .map(|how| info!("TC egress (ICMP error translation) on {iface}: {how}"))
        });
        if let Err(e) = r {
            error!("{e:#}");
            dp.shutdown(keep)?;
            return Err(e);
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
                nudge_neighbours(&rules);
                false
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        if !reload {
            continue;
        }
        match load_rules(cfg_path) {
            Ok(desired) => match rules.apply(&desired, &mut dp) {
                Ok(rep) => {
                    nudge_neighbours(&rules);
                    info!(
                    added = ?rep.added,
                    updated = ?rep.updated,
                    removed = ?rep.removed,
                    unchanged = rep.unchanged,
                    sessions_flushed = rep.sessions_flushed,
                    "reload applied"
                    )
                }
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

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use loxilb_agent::{
    bgp::BgpFlags,
    config,
    datapath::{AttachMode, Datapath, PinnedMaps, DEFAULT_PIN_DIR},
    devices::{self, ForwardMode},
    netlink,
    node::{KubeApplied, KubeRules, Node},
    owner, probe, roles,
    rules::Rules,
    show,
};
#[cfg(test)]
use serde::Deserialize;
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
    /// Output of the show commands: `table` or `json`.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

/// What every serving mode (`run`, `kube`) needs: the datapath's
/// interfaces and knobs, and BGP.
#[derive(clap::Args, Clone)]
struct NodeArgs {
    /// Interface to attach the XDP datapath to (repeat for several;
    /// required, except in `kube --loxiURL` mode, which has no datapath).
    #[arg(long = "iface", short = 'i')]
    ifaces: Vec<String>,
    /// XDP attach mode: auto (native if the driver can, else generic), native, generic.
    #[arg(long, default_value = "auto")]
    xdp_mode: AttachMode,
    /// On exit keep the program attached and the maps pinned, with their
    /// sessions, for the next agent to adopt.
    #[arg(long)]
    keep: bool,
    /// How translated packets leave: `auto` (per egress device, XDP
    /// redirect where the device takes XDP frames, the kernel stack
    /// elsewhere: bridges, bonds, VLANs, tunnels, veths whose peer runs no
    /// XDP), `xdp` (as auto, and refuse to start unless every --iface takes
    /// XDP redirects), `stack` (always the kernel stack).
    #[arg(long, value_enum, default_value = "auto")]
    forward: ForwardMode,
    /// Same as --forward=stack.
    #[arg(long)]
    forward_via_stack: bool,
    /// Source address of full-NAT sessions (kube-loxilb's `--setRoles`
    /// VIP); default: each service's own VIP.
    #[arg(long, value_name = "IPV4")]
    fullnat_source: Option<std::net::Ipv4Addr>,
    /// Source address of full-NAT sessions toward IPv6 endpoints; default:
    /// each service's own (IPv6) VIP.
    #[arg(long, value_name = "IPV6")]
    fullnat_source6: Option<std::net::Ipv6Addr>,
    /// Source ports given to onearm/full-NAT sessions, `LO-HI`.
    #[arg(long, value_name = "LO-HI", default_value = "32768-60999", value_parser = parse_port_range)]
    snat_ports: (u16, u16),
    /// New sessions each CPU may make per second (0: no limit). New flows
    /// beyond it are dropped and counted (`drop_new_flow_rate`), so a flood
    /// of new flows cannot churn the session table and evict established
    /// sessions; clients retransmit their SYN.
    #[arg(long, value_name = "PER_SEC", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=100_000_000))]
    max_new_flows: u32,
    /// New flows a CPU may take at once above --max-new-flows (default: a
    /// tenth of a second's worth, at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    new_flow_burst: Option<u32>,
    /// Local AS: announce every VIP over BGP (0 or absent: BGP off).
    #[arg(long = "setBGP", value_name = "AS", value_parser = kube_flag::set_bgp)]
    set_bgp: Option<u32>,
    /// BGP peers, `IP:AS[:PORT],...` (IPv6 peers in brackets).
    #[arg(long = "extBGPPeers", value_name = "PEERS", value_parser = kube_flag::ext_bgp_peers)]
    ext_bgp_peers: Option<kube_flag::Peers>,
    /// Port BGP peers connect to (default 179).
    #[arg(long = "listenBGPPort", value_name = "PORT", value_parser = kube_flag::listen_bgp_port)]
    listen_bgp_port: Option<u16>,
    /// Allow eBGP peers several hops away.
    #[arg(long = "eBGPMultiHop", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = kube_flag::ebgp_multihop)]
    ebgp_multihop: Option<bool>,
    /// Kubernetes mode with BGP: how a node announces the VIPs another
    /// node holds (`loxilb-agent roles`): `prepend[:N]` (default
    /// prepend:3; eBGP peers get the local AS N more times, iBGP peers
    /// LOCAL_PREF 50), `withdraw` (not announced), `ecmp` (announced like
    /// the active node's: routers spread flows over all nodes).
    #[arg(long = "bgp-backup-path", value_name = "prepend[:N]|withdraw|ecmp")]
    bgp_backup_path: Option<loxilb_agent::bgp::BackupPath>,
    /// Conntrack sync (Kubernetes mode): where this node, as a backup,
    /// accepts the active node's session stream (e.g. 0.0.0.0:22222).
    #[arg(long = "ctsync-listen", value_name = "ADDR:PORT")]
    ctsync_listen: Option<std::net::SocketAddr>,
    /// Conntrack sync: the other agents, `host[:port],...` (port 22222 by
    /// default), to which this node streams its sessions while it holds
    /// the VIPs; or `nodes`: every Node's InternalIP at the port of
    /// --ctsync-listen, following the Nodes as they come and go. This
    /// node's own address is left out, so one setting serves a DaemonSet.
    #[arg(long = "ctsync-peers", value_name = "PEERS|nodes")]
    ctsync_peers: Option<String>,
    /// Conntrack sync: `ca.crt`, `tls.crt`, `tls.key` (a mounted TLS
    /// Secret); peers must present a certificate of that CA.
    #[arg(
        long = "ctsync-tls",
        value_name = "DIR",
        default_value = "/etc/loxilb/ctsync"
    )]
    ctsync_tls: PathBuf,
    /// Serve `GET /healthz` and `/readyz` on this address (for the
    /// DaemonSet's liveness and readiness probes); off when absent.
    #[arg(long, value_name = "ADDR:PORT")]
    health_listen: Option<std::net::SocketAddr>,
}

/// The REST API of `run` (loxilb's `/netlox/v1`, what kube-loxilb and
/// loxicmd speak; see `loxilb_agent::api`).
#[derive(clap::Args, Clone)]
struct ApiArgs {
    /// Serve the REST API on this address (loxilb's port is 11111); off
    /// when absent. Rules created through it persist in the state
    /// directory and are served with the rule file's.
    #[arg(long, value_name = "ADDR:PORT")]
    api_listen: Option<std::net::SocketAddr>,
    /// TLS for the API: `tls.crt` and `tls.key`; with `ca.crt`, clients
    /// presenting a certificate of that CA may write.
    #[arg(long, value_name = "DIR")]
    api_tls: Option<PathBuf>,
    /// A file holding the token that lets a client write
    /// (`Authorization: Bearer <token>`).
    #[arg(long, value_name = "PATH")]
    api_token_file: Option<PathBuf>,
    /// Let clients write without credentials (and allow the API over
    /// plain HTTP, without --api-tls).
    #[arg(long)]
    insecure_api: bool,
}

/// A minimal HTTP endpoint: 200 on /healthz and /readyz while the agent
/// serves (it only starts once the datapath is attached), the Prometheus
/// metrics on /metrics, 404 else.
async fn serve_health(addr: std::net::SocketAddr, pin_dir: &Path) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--health-listen {addr}: cannot listen"))?;
    info!("health endpoint on http://{addr}/healthz, metrics on http://{addr}/metrics");
    let pin_dir = pin_dir.to_path_buf();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let pin_dir = pin_dir.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let resp = if path == "/healthz" || path == "/readyz" {
                    "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
                        .to_string()
                } else if path == "/metrics" {
                    // Map reads block: off the async workers.
                    let r = tokio::task::spawn_blocking(move || {
                        loxilb_agent::metrics::render(&pin_dir)
                    })
                    .await;
                    match r {
                        Ok(Ok(body)) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text; \
                             version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\n\
                             connection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        Ok(Err(e)) => {
                            let body = format!("cannot read the datapath: {e:#}\n");
                            format!(
                                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\n\
                                 connection: close\r\n\r\n{body}",
                                body.len()
                            )
                        }
                        Err(_) => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\
                                   connection: close\r\n\r\n"
                            .to_string(),
                    }
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}

// Parsed once at start-up: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Standalone mode: attach to interfaces and serve the rules of a file.
    Run {
        #[command(flatten)]
        node: NodeArgs,
        /// Rule file (YAML). Re-read on change and on SIGHUP.
        #[arg(long, short = 'c')]
        config: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Kubernetes mode: serve the LoadBalancer Services of our class (in
    /// cluster: the DaemonSet in manifest/in-cluster runs this).
    Kube {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        kube: KubeArgs,
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
    /// Show SCTP associations of multihomed rules (client addresses,
    /// each path's VIP and endpoint address).
    Associations,
    /// Show BGP neighbours (state, uptime, routes sent).
    Bgp,
    /// Show datapath counters and how translated packets leave through
    /// each device.
    Stats,
    /// Conntrack sync state (Kubernetes mode with --ctsync-*): role,
    /// peers, entries sent/applied/dropped, refusals (JSON).
    Sync,
    /// loxicmd's nouns: `get lb|ep|conntrack|bgpneigh|stats|roles`
    /// (`-o json` for JSON).
    Get {
        #[arg(value_enum)]
        what: Show,
    },
    /// Show each VIP's role on this node (active: it answers for the VIP;
    /// backup: another node does) and since when (Kubernetes mode).
    Roles,
    /// Remove what an agent left behind (after `--keep`, or a crash):
    /// detach its programs, unpin its maps, take its VIPs off `lo`. Run
    /// on a node after uninstalling, with no agent running.
    Cleanup,
}

/// How the show commands print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// What a show command shows (also by loxicmd's nouns, `get <noun>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Show {
    /// Rules (`loxilb-agent rules`).
    #[value(name = "lb", alias = "rules")]
    Rules,
    /// Endpoints (`loxilb-agent endpoints`).
    #[value(name = "ep", alias = "endpoints")]
    Endpoints,
    /// Sessions (`loxilb-agent sessions`).
    #[value(name = "conntrack", alias = "ct", alias = "sessions")]
    Sessions,
    /// BGP neighbours (`loxilb-agent bgp`).
    #[value(name = "bgpneigh", alias = "bgp")]
    Bgp,
    /// Counters and device forwarding (`loxilb-agent stats`).
    #[value(name = "stats")]
    Stats,
    /// VIP roles (`loxilb-agent roles`).
    #[value(name = "roles")]
    Roles,
    /// Multihomed SCTP associations (`loxilb-agent associations`).
    #[value(name = "associations")]
    Associations,
}

/// The value parsers of kube-loxilb's flags: kube-watch's (and the BGP
/// module's) strict parsers, so clap refuses a bad value at startup. Its
/// message names the flag and the value; the parser's says what is wrong
/// and what is allowed: `invalid value '7' for '--setLBMode <0-3>':
/// allowed values: 0 (default), 1 (onearm), 2 (fullnat), 3 (dsr)`.
mod kube_flag {
    use kube_watch::{flags as kf, ipam::PoolSpec};
    use loxilb_agent::bgp::flags as bf;

    fn bgp<T>(r: Result<T, bf::FlagError>) -> Result<T, String> {
        r.map_err(|e| e.message)
    }

    /// `--cidrPools`, `--cidr6Pools`, `--externalSecondaryCIDRs`.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Pools(pub Vec<PoolSpec>);

    pub fn cidr_pools(v: &str) -> Result<Pools, String> {
        kf::for_clap(kf::parse_cidr_pools(v)).map(Pools)
    }
    pub fn cidr6_pools(v: &str) -> Result<Pools, String> {
        kf::for_clap(kf::parse_cidr6_pools(v)).map(Pools)
    }
    pub fn secondary_cidrs(v: &str) -> Result<Pools, String> {
        kf::for_clap(kf::parse_secondary_cidrs(v)).map(Pools)
    }
    pub fn lb_mode(v: &str) -> Result<loxilb_model::Mode, String> {
        kf::for_clap(kf::parse_lb_mode(v))
    }
    /// Go's boolean spellings (`--setUniqueIP=false`, `=1`, `=T`, ...).
    pub fn boolean(v: &str) -> Result<bool, String> {
        kf::for_clap(kf::parse_bool("", v))
    }
    pub fn load_balancer_class(v: &str) -> Result<String, String> {
        kf::for_clap(kf::parse_load_balancer_class(v))
    }
    pub fn zone(v: &str) -> Result<String, String> {
        kf::for_clap(kf::parse_zone(v))
    }
    pub fn lease_duration(v: &str) -> Result<std::time::Duration, String> {
        kf::for_clap(kf::parse_duration(kf::FLAG_LEASE_DURATION, v))
    }
    /// `--loxiURL`: the remote load balancers of external mode.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Remotes(pub Vec<loxilb_agent::remote::Remote>);

    pub fn loxi_urls(v: &str) -> Result<Remotes, String> {
        loxilb_agent::remote::parse_urls(v).map(Remotes)
    }
    /// `--vipOwners`: `leader` or `pool`.
    pub fn vip_owners(v: &str) -> Result<kf::VipOwners, String> {
        kf::for_clap(kf::parse_vip_owners(v))
    }
    /// `--setRoles`: the full-NAT source VIP.
    pub fn role_vip(v: &str) -> Result<std::net::Ipv4Addr, String> {
        v.trim()
            .parse()
            .map_err(|_| "not an IPv4 address (the full-NAT source VIP, e.g. 10.0.0.9)".to_string())
    }
    pub fn set_bgp(v: &str) -> Result<u32, String> {
        bgp(bf::parse_set_bgp(v))
    }
    /// `--extBGPPeers`.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Peers(pub Vec<bf::PeerSpec>);

    pub fn ext_bgp_peers(v: &str) -> Result<Peers, String> {
        bgp(bf::parse_ext_bgp_peers(v)).map(Peers)
    }
    pub fn listen_bgp_port(v: &str) -> Result<u16, String> {
        bgp(bf::parse_listen_port(v))
    }
    pub fn ebgp_multihop(v: &str) -> Result<bool, String> {
        bgp(bf::parse_go_bool(v))
    }
}

/// kube-loxilb's flags, as it spells them, typed: each value is parsed by
/// clap ([`kube_flag`]); what is checked across flags is in
/// [`kube_settings`].
#[derive(clap::Args, Clone)]
struct KubeArgs {
    #[arg(long = "cidrPools", value_name = "POOLS", value_parser = kube_flag::cidr_pools)]
    cidr_pools: Option<kube_flag::Pools>,
    #[arg(long = "cidr6Pools", value_name = "POOLS", value_parser = kube_flag::cidr6_pools)]
    cidr6_pools: Option<kube_flag::Pools>,
    #[arg(long = "externalSecondaryCIDRs", value_name = "POOLS", value_parser = kube_flag::secondary_cidrs)]
    external_secondary_cidrs: Option<kube_flag::Pools>,
    #[arg(long = "setLBMode", value_name = "0-3", default_value = "0", value_parser = kube_flag::lb_mode)]
    set_lb_mode: loxilb_model::Mode,
    #[arg(long = "setUniqueIP", value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = kube_flag::boolean)]
    set_unique_ip: bool,
    #[arg(long = "loadBalancerClass", value_name = "CLASS", default_value = "loxilb.io/loxilb", value_parser = kube_flag::load_balancer_class)]
    load_balancer_class: String,
    #[arg(long = "usePodNetwork", value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = kube_flag::boolean)]
    use_pod_network: bool,
    #[arg(long = "monitor", value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = kube_flag::boolean)]
    monitor: bool,
    /// kube-loxilb's full-NAT source VIP (same as --fullnat-source), owned
    /// with the service VIPs; with --loxiURL: arbitrate the remotes'
    /// MASTER / BACKUP roles, this VIP sent with them (0.0.0.0: none).
    #[arg(long = "setRoles", value_name = "IPV4", value_parser = kube_flag::role_vip)]
    set_roles: Option<std::net::Ipv4Addr>,
    /// Who answers for the VIPs: `leader` (the leader Lease's holder owns
    /// every VIP) or `pool` (one Lease per address pool, spread over the
    /// agents; not with --setRoles or --loxiURL).
    #[arg(long = "vipOwners", value_name = "leader|pool", default_value = "leader", value_parser = kube_flag::vip_owners)]
    vip_owners: kube_watch::flags::VipOwners,
    /// External mode: program these remote agents (`loxilb-agent run
    /// --api-listen`) or loxilb through their REST API instead of a
    /// datapath on this node, `http(s)://host[:port],...` (port 11111 by
    /// default). Every URL gets every rule; only the leader programs them.
    /// No `--iface`: nothing is attached here and no VIP goes on `lo`.
    #[arg(long = "loxiURL", value_name = "URLS", value_parser = kube_flag::loxi_urls)]
    loxi_url: Option<kube_flag::Remotes>,
    /// External mode: PEM CA certificate(s) the https `--loxiURL` remotes'
    /// certificates must chain to (needed for https).
    #[arg(long = "loxiCA", value_name = "FILE")]
    loxi_ca: Option<PathBuf>,
    /// External mode: a file holding the token the remotes take for
    /// writes (their `--api-token-file`), sent as `Authorization: Bearer`.
    #[arg(long = "loxiTokenFile", value_name = "FILE")]
    loxi_token_file: Option<PathBuf>,
    /// kube-loxilb's BGP CRD switch.
    #[arg(long = "enableBGPCRDs", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = kube_flag::boolean)]
    enable_bgp_crds: Option<bool>,
    /// Write kube-loxilb's status form: `hostname: <zone>-<ip>` instead of
    /// `ip: <ip>` (drop-in compatibility with tools reading it).
    #[arg(long = "setLBHostnameStatus", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = kube_flag::boolean)]
    set_lb_hostname_status: Option<bool>,
    /// The hostname prefix of --setLBHostnameStatus (kube-loxilb's zone; default llb).
    #[arg(long = "zone", value_name = "NAME", value_parser = kube_flag::zone)]
    zone: Option<String>,
    /// kube-loxilb's switch: true writes plain IPs (this agent's default),
    /// false the hostnames.
    #[arg(long = "noZoneName", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = kube_flag::boolean)]
    no_zone_name: Option<bool>,
    /// How long the leader's Lease stays valid without renewal: a killed
    /// leader is replaced within this plus one retry period (default 4s;
    /// seconds, or 500ms/4s/1m; the Lease's seconds field rounded up, the
    /// exact value in its loxilb.io/lease-duration-ms annotation, which the
    /// agents go by: e.g. 600ms with 400ms / 100ms below for a sub-second
    /// takeover after a node dies).
    #[arg(long = "leaseDuration", value_name = "DURATION", value_parser = kube_flag::lease_duration)]
    lease_duration: Option<std::time::Duration>,
    /// A leader that could not renew for this long steps down (default 3s;
    /// shorter than --leaseDuration).
    #[arg(long = "leaseRenewDeadline", value_name = "DURATION", value_parser = kube_flag::lease_duration)]
    lease_renew_deadline: Option<std::time::Duration>,
    /// How often the leader renews and the others look (default 1s).
    #[arg(long = "leaseRetryPeriod", value_name = "DURATION", value_parser = kube_flag::lease_duration)]
    lease_retry_period: Option<std::time::Duration>,
    /// YAML file with the same settings as the flags (keys: the flag names
    /// without --); flags given here override it. Read before parsing (see
    /// kube_watch::config_file::expand_args); never set when this runs.
    #[arg(long = "config", value_name = "PATH")]
    config: Option<PathBuf>,
}

/// kube-loxilb flags that do not carry over as they are: an error that
/// says why, or their meaning here.
fn check_kube_compat(k: &KubeArgs, a: &NodeArgs) -> Result<Option<std::net::Ipv4Addr>> {
    match &k.loxi_url {
        Some(_) => {
            check_external(k, a)?;
            if k.vip_owners == kube_watch::flags::VipOwners::Pool {
                anyhow::bail!(
                    "--vipOwners=pool with --loxiURL: the remotes' roles are one MASTER and \
                     BACKUPs (--setRoles), not per pool; remove --vipOwners"
                );
            }
        }
        None => {
            for (flag, given) in [
                ("--loxiCA", k.loxi_ca.is_some()),
                ("--loxiTokenFile", k.loxi_token_file.is_some()),
            ] {
                if given {
                    anyhow::bail!(
                        "{flag} is for the remotes of --loxiURL; give --loxiURL or remove it"
                    );
                }
            }
            if a.ifaces.is_empty() {
                anyhow::bail!(
                    "--iface is required: the interface(s) to attach the XDP datapath to (or \
                     --loxiURL to program remote load balancers instead)"
                );
            }
        }
    }
    if k.enable_bgp_crds == Some(true) && !a.bgp_on() {
        anyhow::bail!(
            "--enableBGPCRDs: BGP peers from BGPPeerService objects need BGP on; give --setBGP=<AS>"
        );
    }
    let roles = k.set_roles;
    if let (Some(r), Some(f)) = (roles, a.fullnat_source) {
        if r != f {
            anyhow::bail!("--setRoles={r} and --fullnat-source={f} disagree; give one");
        }
    }
    Ok(roles)
}

/// External mode (`--loxiURL`) has no datapath here: the flags of the
/// node's own datapath, BGP speaker, conntrack sync and endpoint are
/// refused, naming them.
fn check_external(k: &KubeArgs, a: &NodeArgs) -> Result<()> {
    let given = [
        ("--iface", !a.ifaces.is_empty()),
        ("--keep", a.keep),
        ("--fullnat-source", a.fullnat_source.is_some()),
        ("--fullnat-source6", a.fullnat_source6.is_some()),
        ("--new-flow-burst", a.new_flow_burst.is_some()),
        ("--max-new-flows", a.max_new_flows != 0),
        ("--forward-via-stack", a.forward_via_stack),
        ("--extBGPPeers", a.ext_bgp_peers.is_some()),
        ("--listenBGPPort", a.listen_bgp_port.is_some()),
        ("--eBGPMultiHop", a.ebgp_multihop.is_some()),
        ("--bgp-backup-path", a.bgp_backup_path.is_some()),
        ("--ctsync-listen", a.ctsync_listen.is_some()),
        ("--ctsync-peers", a.ctsync_peers.is_some()),
        ("--health-listen", a.health_listen.is_some()),
        ("--enableBGPCRDs", k.enable_bgp_crds.is_some()),
    ];
    let bad: Vec<&str> = given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect();
    if !bad.is_empty() {
        anyhow::bail!(
            "{}: with --loxiURL this agent has no datapath, BGP speaker or conntrack sync of its \
             own (the remote load balancers do; configure them there); remove {}",
            bad.join(", "),
            if bad.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}

impl NodeArgs {
    /// Whether `--setBGP` turns BGP on (an AS other than 0).
    fn bgp_on(&self) -> bool {
        self.set_bgp.is_some_and(|n| n != 0)
    }

    /// `--forward`, with `--forward-via-stack` as its `stack` (the two
    /// must not disagree).
    fn forward_mode(&self) -> Result<ForwardMode> {
        match (self.forward_via_stack, self.forward) {
            (false, m) => Ok(m),
            (true, ForwardMode::Stack | ForwardMode::Auto) => Ok(ForwardMode::Stack),
            (true, m) => anyhow::bail!(
                "--forward-via-stack and --forward={} disagree; give one",
                format!("{m:?}").to_lowercase()
            ),
        }
    }

    /// `--max-new-flows` / `--new-flow-burst` as the datapath takes them:
    /// (ns between new flows on one CPU, burst); (0, 0) = no limit.
    fn new_flow_limit(&self) -> Result<(u32, u32)> {
        new_flow_limit(self.max_new_flows, self.new_flow_burst)
    }
}

fn new_flow_limit(rate: u32, burst: Option<u32>) -> Result<(u32, u32)> {
    match (rate, burst) {
        (0, None) => Ok((0, 0)),
        (0, Some(b)) => anyhow::bail!(
            "--new-flow-burst={b} needs --max-new-flows (the rate the burst is above)"
        ),
        (r, b) => Ok((1_000_000_000 / r, b.unwrap_or((r / 10).max(1)))),
    }
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
fn load_rules(path: &Path) -> Result<Vec<loxilb_model::Rule>, config::ConfigError> {
    let rules = config::load(path)?;
    check_on_node(&path.display().to_string(), &rules)?;
    Ok(rules)
}

/// What rules (of `file`: the rule file, or an API request) need of this
/// node: L2 DSR endpoints directly connected, through a device XDP can
/// send through.
fn check_on_node(file: &str, rules: &[loxilb_model::Rule]) -> Result<(), config::ConfigError> {
    // Only L2 DSR rules need anything of the host (an API request is one
    // rule: no routing table read for the others).
    if !rules.iter().any(|r| r.mode == loxilb_model::Mode::Dsr) {
        return Ok(());
    }
    let routes = loxilb_agent::routes::read().map_err(|e| config::ConfigError {
        file: file.to_string(),
        field: String::new(),
        message: format!("cannot read the routing table (rtnetlink): {e:#}"),
    })?;
    config::check_reachability(file, rules, &routes)?;
    let devs = devices::survey().map_err(|e| config::ConfigError {
        file: file.to_string(),
        field: String::new(),
        message: format!("cannot list the network devices: {e:#}"),
    })?;
    config::check_dsr_forwarding(file, rules, &routes, &devs)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into())
                // Its decoder warns about kernel attributes newer than it
                // knows (IFLA_INET6_CONF grows), which say nothing wrong.
                .add_directive("netlink_packet_route=error".parse().expect("a directive")),
        )
        .with_target(false)
        .init();
    let args = kube_watch::config_file::expand_args(std::env::args_os().collect())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cli = Cli::parse_from(args);
    match cli.cmd {
        Cmd::Run { node, config, api } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(&cli.pin_dir, &node, &config, &api))
        }
        Cmd::Kube { node, kube } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run_kube(&cli.pin_dir, &node, &kube))
        }
        Cmd::Decap { ifaces, xdp_mode } => {
            let mut dp = Datapath::load_decap()?;
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
        Cmd::Rules => show(&cli.pin_dir, Show::Rules, cli.output),
        Cmd::Endpoints => show(&cli.pin_dir, Show::Endpoints, cli.output),
        Cmd::Sessions => show(&cli.pin_dir, Show::Sessions, cli.output),
        Cmd::Associations => show(&cli.pin_dir, Show::Associations, cli.output),
        Cmd::Bgp => show(&cli.pin_dir, Show::Bgp, cli.output),
        Cmd::Stats => show(&cli.pin_dir, Show::Stats, cli.output),
        Cmd::Roles => show(&cli.pin_dir, Show::Roles, cli.output),
        Cmd::Get { what } => show(&cli.pin_dir, what, cli.output),
        Cmd::Sync => {
            let p = loxilb_agent::node::state_dir(&cli.pin_dir).join("ctsync.json");
            let v = loxilb_agent::ctsync::read_state(&p)
                .with_context(|| format!("no conntrack sync state in {} (is the agent running with --ctsync-listen or --ctsync-peers?)", p.display()))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Cleanup => {
            let links = loxilb_agent::datapath::remove_pins(&cli.pin_dir);
            let (lo, held) = lo_vips()?;
            for v in &held {
                netlink::del_addr(lo, *v)?;
            }
            println!(
                "detached {links} program link(s), unpinned the maps in {}, removed {} VIP(s) from lo",
                cli.pin_dir.display(),
                held.len()
            );
            Ok(())
        }
    }
}

/// Print `what` of the agent whose maps are pinned in `pin_dir`.
fn show(pin_dir: &Path, what: Show, output: Output) -> Result<()> {
    let json = output == Output::Json;
    let out = |v: serde_json::Value| -> Result<()> {
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    };
    if what == Show::Bgp {
        let opts = loxilb_agent::bgp::speaker::SpeakerOptions::in_dir(
            loxilb_agent::node::state_dir(pin_dir).join("bgp"),
        );
        let control = loxilb_agent::bgp::control::Control::new(&opts.socket_path());
        let n = loxilb_agent::bgp::speaker::query_neighbors(&control)
            .context("no BGP speaker answers for this agent (is it running with --setBGP?)")?;
        if json {
            return out(serde_json::Value::Array(
                n.iter()
                    .map(|x| {
                        serde_json::json!({
                            "address": x.address,
                            "remote_as": x.remote_as,
                            "local_as": x.local_as,
                            "state": format!("{:?}", x.state),
                            "uptime_s": x.uptime.map(|d| d.as_secs()),
                            "since_unix": x.since,
                            "routes_sent": x.routes_sent(),
                            "last_error": x.last_error,
                        })
                    })
                    .collect(),
            ));
        }
        print!("{}", show::bgp_table(&n));
        return Ok(());
    }
    let m = PinnedMaps::open(pin_dir)?;
    match what {
        Show::Rules => {
            let (svcs, eps, st, vips) = (
                m.services()?,
                m.endpoints()?,
                m.rule_stats()?,
                m.rule_vips()?,
            );
            if json {
                return out(serde_json::to_value(show::rule_rows(
                    &svcs, &eps, &st, &vips,
                ))?);
            }
            print!("{}", show::rules_table(&svcs, &eps, &st, &vips));
        }
        Show::Endpoints => {
            let eps = m.endpoints()?;
            let idx: Vec<u32> = eps
                .values()
                .map(|e| e.stat_idx)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let stats = idx.iter().copied().zip(m.ep_stats(&idx)?).collect();
            let probes = loxilb_agent::node::read_probe_state(pin_dir).unwrap_or_default();
            let (svcs, vips) = (m.services()?, m.rule_vips()?);
            if json {
                return out(serde_json::to_value(show::endpoint_rows(
                    &svcs, &eps, &stats, &probes, &vips,
                ))?);
            }
            print!(
                "{}",
                show::endpoints_table(&svcs, &eps, &stats, &probes, &vips)
            );
        }
        Show::Sessions => {
            let (s, now) = (m.sessions()?, show::monotonic_ns());
            if json {
                return out(serde_json::to_value(show::session_rows(&s, now))?);
            }
            print!("{}", show::sessions_table(&s, now));
        }
        Show::Associations => {
            let a = m.associations()?;
            if json {
                return out(serde_json::to_value(show::association_rows(&a))?);
            }
            print!("{}", show::associations_table(&a));
        }
        Show::Stats => {
            let (stats, devs) = (m.stats()?, m.dev_fwd()?);
            let flags = m.config()?.flags;
            let stack = flags & loxilb_common::cfg_flags::FORWARD_VIA_STACK != 0;
            let ep_nh = flags & loxilb_common::cfg_flags::EP_NH_CACHE != 0;
            if json {
                return out(serde_json::json!({
                    "counters": stats.iter().map(|(n, v)| (n.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                    "forward_via_stack": stack,
                    "next_hop_per_endpoint": ep_nh,
                    "devices": devs.iter().map(|(i, d)| serde_json::json!({
                        "ifindex": i,
                        "device": devices::name_of(d),
                        "xdp_redirect": d.mode == loxilb_common::dev_fwd::REDIRECT,
                        "why": loxilb_common::dev_fwd::WHY_NAMES.get(d.why as usize).copied().unwrap_or("?"),
                    })).collect::<Vec<_>>(),
                }));
            }
            print!("{}", show::stats_table(&stats));
            println!(
                "\nnext hop kept per endpoint for new sessions: {}",
                if ep_nh {
                    "on (the node's routing is plain)"
                } else {
                    "off (policy rules, multipath, source-specific or TOS routes: every new session asks the FIB)"
                }
            );
            if stack {
                println!(
                    "\n--forward=stack: every translated packet goes to the kernel stack \
                     (DSR frames use XDP where the device below allows)"
                );
            }
            print!("\n{}", show::devices_table(&devs));
        }
        Show::Roles => {
            let vips: Vec<std::net::IpAddr> = m
                .services()?
                .iter()
                .map(|(k, _)| loxilb_common::ip_from_addr(&k.addr))
                .collect();
            let r = roles::Roles::read(pin_dir);
            if json {
                return out(serde_json::json!({ "vips": vips, "roles": r }));
            }
            print!("{}", roles::table(&vips, r.as_ref(), roles::now_unix()));
        }
        Show::Bgp => unreachable!(),
    }
    Ok(())
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

fn file_stamp(p: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The BGP speaker's setup from the flags (`None`: BGP off); every BGP
/// flag checked, none ignored.
fn bgp_setup(a: &NodeArgs) -> Result<Option<loxilb_agent::bgp::BgpSetup>> {
    let mut setup = BgpFlags {
        set_bgp: a.set_bgp,
        ext_bgp_peers: a.ext_bgp_peers.clone().map(|p| p.0),
        listen_bgp_port: a.listen_bgp_port,
        ebgp_multihop: a.ebgp_multihop,
    }
    .setup()
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    match (setup.as_mut(), a.bgp_backup_path) {
        (Some(s), Some(b)) => s.config.backup = b,
        (None, Some(_)) => anyhow::bail!(
            "--bgp-backup-path: BGP is off; give --setBGP=<local AS> to use it, or remove the flag"
        ),
        _ => {}
    }
    Ok(setup)
}

/// Load the datapath (adopting pinned state), configure it, install the
/// first rule set (`None`: keep the adopted rules as they are, for the
/// first full Kubernetes sync to diff against), attach it; BGP and probes
/// ready.
fn start_node(
    pin_dir: &Path,
    a: &NodeArgs,
    first: Option<&[loxilb_model::Rule]>,
) -> Result<(
    Node,
    tokio::sync::mpsc::UnboundedReceiver<probe::Transition>,
)> {
    // Strict BGP flags before touching the kernel.
    let bgp = bgp_setup(a)?;
    let mut dp = Datapath::load(Some(pin_dir))?;
    let rules = if dp.adopted() {
        let installed = dp.read_installed()?;
        info!(
            rules = installed.len(),
            sessions = dp
                .sessions()?
                .iter()
                .filter(|(_, v)| v.dir == loxilb_common::ct_dir::FORWARD)
                .count(),
            "adopted the datapath state pinned in {}",
            pin_dir.display()
        );
        let mut rules = Rules::adopt(installed);
        rules.adopt_ep_index(dp.ep_index()?);
        rules
    } else {
        Rules::adopt(vec![])
    };
    let forward = a.forward_mode()?;
    let mut cfg = dp.config()?;
    cfg.flags = if forward == ForwardMode::Stack {
        loxilb_common::cfg_flags::FORWARD_VIA_STACK
    } else {
        0
    };
    cfg.fullnat_src = a
        .fullnat_source
        .map(|x| u32::from_ne_bytes(x.octets()))
        .unwrap_or(0);
    cfg.fullnat_src6 = a
        .fullnat_source6
        .map(|x| loxilb_common::addr_from_ip(x.into()))
        .unwrap_or([0; 4]);
    (cfg.snat_port_lo, cfg.snat_port_hi) = a.snat_ports;
    (cfg.new_flow_interval_ns, cfg.new_flow_burst) = a.new_flow_limit()?;
    dp.set_config(cfg)?;
    if let Err(e) = dp.check_routing() {
        warn!("reading the node's routing failed (rechecked every 10 s): {e:#}");
    }
    // Before anything is attached: which devices XDP can transmit
    // through; `--forward=xdp` refuses what it cannot reach.
    let devs = dp.update_devices()?;
    devices::log_changes(&devs, &Default::default());
    devices::check_attached(&a.ifaces, &devs, forward)?;
    let (prober, transitions) = probe::Prober::new(probe::DEFAULT_MAX_IN_FLIGHT);
    let mut node = Node::new(dp, rules, prober, bgp, pin_dir);
    match first {
        Some(first) => {
            let rep = node.apply(first)?;
            info!(
                added = rep.added.len(),
                updated = rep.updated.len(),
                removed = rep.removed.len(),
                unchanged = rep.unchanged,
                "rules applied"
            );
        }
        None => info!("the adopted rules stay as they are until the first full Kubernetes sync"),
    }
    host_setup(&a.ifaces);
    for iface in &a.ifaces {
        let r = node.dp.attach(iface, a.xdp_mode).and_then(|used| {
            info!("attached XDP to {iface}: {used} mode");
            node.dp
                .attach_egress(iface)
                .map(|how| info!("TC egress (ICMP error translation) on {iface}: {how}"))
        });
        if let Err(e) = r {
            error!("{e:#}");
            node.shutdown(a.keep)?;
            return Err(e);
        }
    }
    let known = devs.iter().map(|(l, d)| (l.index, *d)).collect();
    if let Err(e) = devices::watch(pin_dir, known) {
        warn!("cannot watch link events ({e:#}); devices are classified at start only");
    }
    Ok((node, transitions))
}

fn exit_note(pin_dir: &Path, keep: bool) {
    if keep {
        info!(
            "exiting; program stays attached and maps stay pinned in {} (--keep)",
            pin_dir.display()
        );
    } else {
        info!("exiting; detaching and unpinning");
    }
}

/// The node, reached through the thread that owns it (see
/// `loxilb_agent::owner`: no shared lock, no node work on the runtime's
/// threads); `Gone` ("the agent is stopping") once it stopped.
type NodeHandle = owner::Handle<Node>;

/// Start the thread owning `node`; jobs sent to `inbox`'s handles run
/// there, in order (the periodic upkeep and the probe results are sent
/// as jobs too).
fn own_node(inbox: owner::Inbox<Node>, node: Node) -> Result<owner::Owner<Node>> {
    inbox
        .spawn("loxilb-node", node)
        .context("starting the node's thread")
}

/// API rules go to the node's reconciler as changes (the path of the
/// Kubernetes mode's per-Service updates: same rule ids, endpoints,
/// probes, counters as a whole-set apply).
struct NodeSink(NodeHandle, PathBuf);

impl loxilb_agent::api::Sink for NodeSink {
    fn apply(
        &mut self,
        upserts: &[loxilb_model::Rule],
        removed: &[loxilb_model::Rule],
    ) -> Result<()> {
        let keys: Vec<_> = removed
            .iter()
            .map(|r| loxilb_agent::rules::svc_key(r.vip, r.port, r.protocol))
            .collect();
        let upserts = upserts.to_vec();
        self.0
            .call_blocking(move |node| node.apply_changes(&upserts, &keys))??;
        Ok(())
    }

    fn sessions(&mut self) -> Result<Vec<show::SessionRow>> {
        let sessions = self.0.call_blocking(|node| node.dp.sessions())??;
        Ok(show::session_rows(&sessions, show::monotonic_ns()))
    }

    fn set_master(&mut self, master: bool) -> Result<()> {
        self.0.call_blocking(move |node| {
            info!(
                "cluster role from the API (cistate): {}",
                if master { "MASTER" } else { "BACKUP" }
            );
            // MASTER: no roles, every VIP active; BACKUP: this node owns none.
            node.set_owned_vips((!master).then(Default::default));
        })?;
        Ok(())
    }

    fn probes(&mut self) -> Vec<loxilb_agent::probe::TargetStatus> {
        loxilb_agent::node::read_probe_state(&self.1).unwrap_or_default()
    }

    fn bgp_neighbors(&mut self) -> Result<Vec<loxilb_agent::bgp::Neighbor>> {
        let dir = loxilb_agent::node::state_dir(&self.1).join("bgp");
        let opts = loxilb_agent::bgp::speaker::SpeakerOptions::in_dir(dir);
        let control = loxilb_agent::bgp::control::Control::new(&opts.socket_path());
        loxilb_agent::bgp::speaker::query_neighbors(&control)
    }

    fn endpoints_down(&mut self) -> std::collections::HashSet<(String, std::net::IpAddr, u16)> {
        // What the node publishes for `loxilb-agent endpoints`; none
        // before the first probe.
        loxilb_agent::node::read_probe_state(&self.1)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| !t.up)
            .map(|t| (t.key.rule, t.key.addr, t.key.port))
            .collect()
    }
}

/// `run`'s refusals of flags that mean nothing there.
fn check_run_flags(a: &NodeArgs, api_args: &ApiArgs) -> Result<()> {
    if a.ifaces.is_empty() {
        anyhow::bail!("--iface is required: the interface(s) to attach the XDP datapath to");
    }
    if a.ctsync_listen.is_some() || a.ctsync_peers.is_some() {
        anyhow::bail!(
            "--ctsync-listen / --ctsync-peers: conntrack sync follows VIP ownership, which only \
             `loxilb-agent kube` has (the Lease); remove them from `run`"
        );
    }
    if a.bgp_backup_path.is_some() && api_args.api_listen.is_none() {
        anyhow::bail!(
            "--bgp-backup-path: `run` without --api-listen has no VIP roles (every VIP is \
             announced as active; kube-loxilb sets MASTER/BACKUP through the API's \
             /config/cistate); give --api-listen or remove the flag"
        );
    }
    Ok(())
}

async fn run(pin_dir: &Path, a: &NodeArgs, cfg_path: &Path, api_args: &ApiArgs) -> Result<()> {
    use loxilb_agent::api;
    check_run_flags(a, api_args)?;
    let listen = api::server::ApiListen::from_flags(
        api_args.api_listen,
        api_args.api_tls.as_deref(),
        api_args.api_token_file.as_deref(),
        api_args.insecure_api,
    )?;
    // Validate the rule file before touching the kernel.
    let file_rules = load_rules(cfg_path)?;
    // The API's sink needs the node's handle before the node exists (its
    // rules are part of the node's first set); nothing is sent to it
    // before the node's thread starts.
    let (node, inbox) = owner::channel::<Node>();
    let state_dir = loxilb_agent::node::state_dir(pin_dir);
    let api = match &listen {
        None => {
            let snap = state_dir.join(api::store::SNAPSHOT);
            if snap.exists() {
                warn!(
                    "{} holds rules created through the REST API; they are not served without \
                     --api-listen",
                    snap.display()
                );
            }
            None
        }
        Some(_) => {
            let (store, stored) = api::store::Store::open(&state_dir)?;
            let n = stored.len();
            let api = api::Api::new(
                Box::new(NodeSink(node.clone(), pin_dir.to_path_buf())),
                Box::new(|rules: &[loxilb_model::Rule]| check_on_node("request", rules)),
                store,
                stored,
                a.bgp_on(),
                &cfg_path.display().to_string(),
                file_rules.clone(),
            )?;
            info!(
                "{n} rule(s) created through the REST API restored from {}",
                state_dir.display()
            );
            Some(std::sync::Arc::new(std::sync::Mutex::new(api)))
        }
    };
    let desired = match &api {
        Some(api) => api.lock().expect("API lock").union(),
        None => file_rules,
    };
    let (started, mut transitions) = start_node(pin_dir, a, Some(&desired))?;
    // Every use of the node below goes through its thread, the API's too.
    let owner = own_node(inbox, started)?;
    if let Some(api) = &api {
        // The role kube-loxilb gave before a restart, until it posts one.
        api.lock().expect("API lock").restore_role()?;
    }
    if let Some(h) = a.health_listen {
        serve_health(h, pin_dir).await?;
    }
    if let (Some(l), Some(api)) = (listen, &api) {
        api::server::start(l, api.clone()).await?;
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stamp = file_stamp(cfg_path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut upkeep = tokio::time::interval(Duration::from_secs(10));
    info!(
        "serving; edit {} or send SIGHUP to reload",
        cfg_path.display()
    );
    loop {
        let reload = tokio::select! {
            _ = hup.recv() => { info!("SIGHUP: reloading {}", cfg_path.display()); true }
            _ = tick.tick() => {
                let s = file_stamp(cfg_path);
                if s == stamp {
                    false
                } else {
                    // Let a writer finish: read only once the file has
                    // stopped changing.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if file_stamp(cfg_path) != s {
                        false
                    } else {
                        stamp = s;
                        info!("{} changed: reloading", cfg_path.display());
                        true
                    }
                }
            }
            // Queued for the node's thread (an error only once it stopped).
            _ = upkeep.tick() => { let _ = node.send(Node::tick); false }
            Some(t) = transitions.recv() => { let _ = node.send(move |n| n.on_transition(t)); false }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        if !reload {
            continue;
        }
        // The file's rules with the API's (which they must not conflict
        // with), applied as one set.
        let merge = |file: &[loxilb_model::Rule]| -> Result<Vec<loxilb_model::Rule>, String> {
            match &api {
                Some(api) => {
                    let mut api = api.lock().expect("API lock");
                    api.set_file(file.to_vec()).map_err(|e| e.message)?;
                    Ok(api.union())
                }
                None => Ok(file.to_vec()),
            }
        };
        let applied = match config::reload(|| load_rules(cfg_path), merge) {
            Ok(Ok(desired)) => Ok(Ok(node
                .call(move |n| n.apply(&desired))
                .await
                .expect("the node runs until the loop ends"))),
            Ok(Err(conflict)) => Ok(Err(conflict)),
            Err(e) => Err(e),
        };
        match applied {
            Ok(Ok(Ok(rep))) => info!(
                added = ?rep.added,
                updated = ?rep.updated,
                removed = ?rep.removed,
                unchanged = rep.unchanged,
                sessions_flushed = rep.sessions_flushed,
                "reload applied"
            ),
            Ok(Ok(Err(e))) => error!("reload failed while writing the maps: {e:#}"),
            Ok(Err(conflict)) => warn!("{conflict}; the rules already running are unchanged"),
            Err(e) => warn!("{e}; the rules already running are unchanged"),
        }
    }
    exit_note(pin_dir, a.keep);
    // Jobs sent from now on (the API's) get "the agent is stopping".
    owner.stop().shutdown(a.keep)
}

/// BGPPeerService objects -> the speaker's peers (with the flag peers).
struct CrdPeers {
    node: NodeHandle,
    flag_peers: Vec<loxilb_agent::bgp::Peer>,
    multihop_ttl: Option<u8>,
}

impl kube_watch::bgp_peers::PeerSink for CrdPeers {
    fn set_peers(&mut self, peers: Vec<kube_watch::crds::PeerSpecPlain>) -> Result<()> {
        let mut all = self.flag_peers.clone();
        for p in peers {
            let mut x = loxilb_agent::bgp::Peer::new(p.ip, p.remote_as);
            x.port = p.port;
            x.multihop_ttl = if p.multihop {
                Some(loxilb_agent::bgp::config::DEFAULT_MULTIHOP_TTL)
            } else {
                self.multihop_ttl
            };
            // An object replaces a flag peer of the same address.
            all.retain(|f| f.address != x.address);
            all.push(x);
        }
        self.node.call_blocking(move |n| n.set_bgp_peers(all))?
    }

    fn status(&mut self) -> Vec<(std::net::IpAddr, kube_watch::bgp_peers::PeerStatusPlain)> {
        self.node
            .call_blocking(|n| n.bgp_neighbors())
            .unwrap_or_default()
            .into_iter()
            .map(|n| {
                (
                    n.address,
                    kube_watch::bgp_peers::PeerStatusPlain {
                        state: format!("{:?}", n.state),
                        since_unix: n.since,
                        prefixes_sent: Some(n.routes_sent()),
                        last_error: n.last_error.clone(),
                    },
                )
            })
            .collect()
    }
}

/// The agent's side of the Kubernetes controller: rules go to the node's
/// reconciler (per changed Service, see `KubeRules`); VIPs this node owns
/// go on `lo` (so it answers ARP for them).
struct KubeSink {
    /// Conntrack sync: streams the sessions of the VIPs this node holds.
    sync: Option<loxilb_agent::ctsync::Syncer>,
    /// `--ctsync-peers=nodes`: the sync peers are the other Nodes'
    /// InternalIPs at this port.
    discover_port: Option<u16>,
    node_name: String,
    node: NodeHandle,
    rules: KubeRules,
    /// The VIPs this agent holds on `lo` (renewed: see `lovips`).
    lo: std::sync::Arc<loxilb_agent::lovips::LoVips>,
    /// The attached interfaces: where a VIP taken over is announced.
    ifaces: Vec<String>,
    /// Each VIP's role on this node (for `loxilb-agent roles`).
    roles: roles::Roles,
    /// `--setRoles`: the full-NAT source VIP, owned with the service VIPs.
    role_vip: Option<std::net::IpAddr>,
    pin_dir: PathBuf,
    owned: std::collections::BTreeSet<std::net::IpAddr>,
}

impl kube_watch::controller::RuleSink for KubeSink {
    fn apply(
        &mut self,
        rules: Vec<kube_watch::translate::ServiceRule>,
    ) -> Result<kube_watch::controller::Applied> {
        let done = self.rules.full(&mut self.node, rules.iter())?;
        log_kube_applied(&done);
        Ok(applied(done))
    }

    /// Only the changed Services' rules are converted and installed,
    /// unless the update is full (the first after start). The rules
    /// refused go back to the controller, which raises Warning Events on
    /// their Services (and Normal ones on the Services programmed).
    fn update(
        &mut self,
        update: &kube_watch::controller::RuleUpdate<'_>,
    ) -> Result<kube_watch::controller::Applied> {
        let done = self.rules.update(&mut self.node, update)?;
        log_kube_applied(&done);
        Ok(applied(done))
    }

    fn own_vips(&mut self, vips: Vec<std::net::IpAddr>) -> Result<()> {
        self.own(vips)
    }

    fn node_addresses(&mut self, nodes: Vec<(String, std::net::IpAddr)>) {
        if let (Some(port), Some(sync)) = (self.discover_port, self.sync.as_ref()) {
            sync.set_peers(discovered_peers(&nodes, &self.node_name, port));
        }
    }
}

/// What the metrics endpoint shows of the controller.
fn kube_state_of(rec: &kube_watch::reconcile::Reconciler) -> loxilb_agent::kube_state::KubeState {
    let st = rec.stats();
    loxilb_agent::kube_state::KubeState {
        reconcile: loxilb_agent::kube_state::ReconcileCounts {
            reconciles: st.reconciles,
            conflicts: st.conflicts,
            errors: st.errors,
            seconds: st.seconds,
            sink_errors: st.sink_errors,
        },
        leader: rec.is_leader(),
        services: rec.known_services().len() as u64,
        pools: rec
            .ipam()
            .pool_usage()
            .into_iter()
            .map(|p| loxilb_agent::kube_state::PoolState {
                name: p.name,
                family: match p.family {
                    kube_watch::IpFamily::V4 => "ipv4".into(),
                    kube_watch::IpFamily::V6 => "ipv6".into(),
                },
                secondary: p.secondary,
                size: u64::try_from(p.size).unwrap_or(u64::MAX),
                used: p.used,
            })
            .collect(),
    }
}

/// The conntrack sync peers `--ctsync-peers=nodes` finds: every other
/// Node's InternalIP at `port`.
fn discovered_peers(
    nodes: &[(String, std::net::IpAddr)],
    me: &str,
    port: u16,
) -> Vec<std::net::SocketAddr> {
    nodes
        .iter()
        .filter(|(n, _)| n != me)
        .map(|(_, ip)| std::net::SocketAddr::new(*ip, port))
        .collect()
}

/// The refusals of `done`, for the controller's Events.
fn applied(done: KubeApplied) -> kube_watch::controller::Applied {
    kube_watch::controller::Applied {
        refused: done
            .refused
            .into_iter()
            .map(|(service, e)| kube_watch::controller::Refused {
                service,
                rule: e.rule,
                reason: e.reason,
            })
            .collect(),
    }
}

fn log_kube_applied(done: &KubeApplied) {
    for (svc, e) in &done.refused {
        warn!(service = %svc, "not installed: {e}");
    }
    let rep = &done.report;
    if done.full {
        info!(
            added = ?rep.added,
            updated = ?rep.updated,
            removed = ?rep.removed,
            unchanged = rep.unchanged,
            "Kubernetes rules applied (whole set)"
        );
    } else {
        info!(
            added = ?rep.added,
            updated = ?rep.updated,
            removed = ?rep.removed,
            unchanged = rep.unchanged,
            "Kubernetes rules applied (changed Services)"
        );
    }
}

impl KubeSink {
    /// Put the VIPs this node must own on `lo` (marked as the agent's, see
    /// [`netlink::ADDR_PROTO`]) and take off the others it put there.
    /// `owned` starts as what `lo` holds marked at start, so an agent
    /// restarted as a follower (after a crash, say) gives up the VIPs it
    /// held before.
    fn own(&mut self, vips: Vec<std::net::IpAddr>) -> Result<()> {
        let mut want: std::collections::BTreeSet<_> = vips.into_iter().collect();
        // kube-loxilb's --setRoles VIP (the full-NAT source endpoints reply
        // to) moves with the active role: held with the service VIPs.
        if let Some(r) = self.role_vip.filter(|_| !want.is_empty()) {
            want.insert(r);
        }
        // The sessions streamed to this node become its own before it
        // answers for the VIPs; it streams theirs from now on, and takes
        // every other VIP's from its owner.
        let gained = want.iter().any(|v| !self.owned.contains(v));
        if let Some(s) = self.sync.as_ref() {
            s.set_owned(loxilb_agent::ctsync::Owned::Vips(want.clone()));
            if gained {
                info!("conntrack sync: streaming the sessions of {want:?}");
                // The synced sessions count on their endpoints (lc) now,
                // not at the next periodic re-count.
                if let Ok(Err(e)) = self.node.call_blocking(|n| n.dp.recount_active()) {
                    warn!("re-counting active sessions at takeover: {e:#}");
                }
            } else if want.is_empty() && !self.owned.is_empty() {
                info!("conntrack sync: backup (receiving)");
            }
        }
        let mut added = vec![];
        // The --setRoles VIP first: the endpoints must answer to this node
        // before the clients' first packets arrive here, or their replies
        // go to the old owner (which, killed, may still hold the address).
        let order = self
            .role_vip
            .iter()
            .chain(want.iter().filter(|v| Some(**v) != self.role_vip));
        for v in order.filter(|v| want.contains(v) && !self.owned.contains(v)) {
            self.lo
                .add(*v)
                .with_context(|| format!("adding VIP {v} to lo"))?;
            info!(vip = %v, "VIP added to lo (this node answers ARP/ND for it)");
            added.push(*v);
        }
        // Neighbours whose entry names the previous owner switch now.
        loxilb_agent::announce::announce(self.ifaces.clone(), added);
        // Routers too: the active path is this node's now (or no longer).
        let owned = want.clone();
        self.node
            .call_blocking(move |n| n.set_owned_vips(Some(owned)))?;
        for (v, role) in self.roles.set_owned(&want, roles::now_unix()) {
            info!(vip = %v, "role: {role:?}");
        }
        if let Err(e) = self.roles.publish(&self.pin_dir) {
            warn!("publishing the VIP roles: {e:#}");
        }
        for v in self.owned.difference(&want) {
            match self.lo.remove(*v) {
                Ok(()) => info!(vip = %v, "VIP removed from lo"),
                Err(e) => warn!(vip = %v, "cannot remove the VIP from lo: {e:#}"),
            }
        }
        self.owned = want;
        Ok(())
    }
}

/// The index of `lo` and the VIPs the agent left on it (marked as its
/// own): what a new agent starts from.
fn lo_vips() -> Result<(u32, std::collections::BTreeSet<std::net::IpAddr>)> {
    let lo = netlink::ifindex("lo").context("no `lo` device in this network namespace")?;
    let held = netlink::marked_addrs(lo)
        .context("listing the VIPs on lo")?
        .into_iter()
        .collect();
    Ok((lo, held))
}

/// Every check of the `kube` command's flags that needs neither the
/// cluster nor the kernel, in one place, before anything starts: the
/// node's flags (with kube-loxilb's `--setRoles` as the full-NAT source)
/// and the controller's configuration, whose lease identity and node name
/// come from `env` (see [`kube_watch::controller::RunConfig::from_env`]).
fn kube_settings(
    a: &NodeArgs,
    k: &KubeArgs,
    env: impl FnOnce(kube_watch::flags::KubeConfig) -> Result<kube_watch::controller::RunConfig, String>,
) -> Result<(NodeArgs, kube_watch::controller::RunConfig)> {
    use kube_watch::flags as kf;
    let mut a = a.clone();
    let role_vip = check_kube_compat(k, &a)?;
    if let Some(r) = role_vip {
        a.fullnat_source = Some(r);
    }
    // The node's own checks (run again when it starts), before the cluster.
    bgp_setup(&a)?;
    a.forward_mode()?;
    a.new_flow_limit()?;
    let fe = |e: kf::FlagError| anyhow::anyhow!("{e}");
    let pools = |p: &Option<kube_flag::Pools>| p.clone().unwrap_or_default().0;
    let kube = kf::KubeConfig {
        cidr_pools: pools(&k.cidr_pools),
        cidr6_pools: pools(&k.cidr6_pools),
        secondary_pools: pools(&k.external_secondary_cidrs),
        lb_mode: k.set_lb_mode,
        unique_ip: k.set_unique_ip,
        load_balancer_class: k.load_balancer_class.clone(),
        use_pod_network: k.use_pod_network,
        monitor: k.monitor,
        vip_owners: k.vip_owners,
    };
    if kube.vip_owners == kf::VipOwners::Pool {
        if let Some(r) = role_vip {
            anyhow::bail!(
                "--vipOwners=pool with --setRoles={r}: the full-NAT source VIP has one owner, \
                 the pools several; use --vipOwners=leader, or drop --setRoles (with \
                 --fullnat-source set to each node's own address)"
            );
        }
        if kube.cidr_pools.is_empty() && kube.cidr6_pools.is_empty() {
            anyhow::bail!(
                "--vipOwners=pool needs address pools (--cidrPools / --cidr6Pools): \
                 each pool gets its own owner"
            );
        }
    }
    // Pools of different flags must not overlap either.
    kube.ipam().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut run_config = env(kube).map_err(|e| anyhow::anyhow!("{e}"))?;
    if run_config.kube.vip_owners == kf::VipOwners::Pool {
        let pools = run_config.kube.pool_names();
        kube_watch::groups::lease_names(&run_config.lease.name, &pools)
            .map_err(|e| anyhow::anyhow!("--vipOwners=pool: {e}"))?;
    }
    run_config.status_form =
        kf::status_form_of(k.set_lb_hostname_status, k.zone.clone(), k.no_zone_name).map_err(fe)?;
    let (d, r, p) = kf::lease_timings_of(
        run_config.lease.timings(),
        k.lease_duration,
        k.lease_renew_deadline,
        k.lease_retry_period,
    )
    .map_err(fe)?;
    run_config.lease.lease_duration = d;
    run_config.lease.renew_deadline = r;
    run_config.lease.retry_period = p;
    Ok((a, run_config))
}

async fn run_kube(pin_dir: &Path, a: &NodeArgs, k: &KubeArgs) -> Result<()> {
    let (a, run_config) = kube_settings(a, k, kube_watch::controller::RunConfig::from_env)?;
    if let Some(kube_flag::Remotes(remotes)) = &k.loxi_url {
        return run_kube_external(remotes.clone(), &a, k, run_config).await;
    }
    // `--setRoles`: the full-NAT source VIP, owned with the service VIPs.
    let role_vip = k.set_roles.as_ref().and(a.fullnat_source);
    let a = &a;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API (in cluster: the service account; outside: KUBECONFIG)")?;
    let (mut started, mut transitions) = start_node(pin_dir, a, None)?;
    if let Some(h) = a.health_listen {
        serve_health(h, pin_dir).await?;
    }
    let (lo, held) = lo_vips()?;
    if !held.is_empty() {
        info!(
            vips = ?held,
            "VIPs a previous agent left on lo: kept until the first sync says whether this node owns them"
        );
    }
    let mut vip_roles = roles::Roles::new(run_config.node_name.clone());
    vip_roles.set_owned(&held, roles::now_unix());
    // BGP follows the roles: until this node holds a VIP it announces it
    // as a backup (--bgp-backup-path).
    started.set_owned_vips(Some(held.clone()));
    if let Err(e) = vip_roles.publish(pin_dir) {
        warn!("publishing the VIP roles: {e:#}");
    }
    // `--ctsync-peers=nodes`: the peers are the Nodes' addresses at this
    // port (see KubeSink::node_addresses).
    let discover_port = match (a.ctsync_peers.as_deref(), a.ctsync_listen) {
        (Some("nodes"), Some(l)) => Some(l.port()),
        (Some("nodes"), None) => anyhow::bail!(
            "--ctsync-peers=nodes needs --ctsync-listen (its port is where the other nodes listen)"
        ),
        _ => None,
    };
    let sync = if a.ctsync_listen.is_some() || a.ctsync_peers.is_some() {
        let peers = a
            .ctsync_peers
            .as_deref()
            .filter(|p| *p != "nodes")
            .map(loxilb_agent::ctsync::parse_peers)
            .transpose()
            .context("--ctsync-peers")?
            .unwrap_or_default();
        let s = loxilb_agent::ctsync::Syncer::start(
            pin_dir,
            loxilb_agent::ctsync::Config {
                listen: a.ctsync_listen,
                peers,
                tls_dir: a.ctsync_tls.clone(),
                state_file: Some(loxilb_agent::node::state_dir(pin_dir).join("ctsync.json")),
                node_name: run_config.node_name.clone(),
                identity: run_config.lease.identity.clone(),
                ..Default::default()
            },
        )?;
        info!("conntrack sync on (backup until this node holds the VIPs)");
        Some(s)
    } else {
        None
    };
    let hints = sync.as_ref().and_then(|s| s.takeover_hints());
    let vips_on_lo = std::sync::Arc::new(loxilb_agent::lovips::LoVips::start(
        lo,
        held.clone(),
        loxilb_agent::lovips::lifetime_for(run_config.lease.lease_duration),
    )?);
    // From here on the node is reached through its thread only.
    let (node, inbox) = owner::channel::<Node>();
    let owner = own_node(inbox, started)?;
    let sink = KubeSink {
        discover_port,
        node_name: run_config.node_name.clone(),
        sync,
        node: node.clone(),
        rules: KubeRules::default(),
        lo: vips_on_lo.clone(),
        ifaces: a.ifaces.clone(),
        roles: vip_roles,
        role_vip: role_vip.map(std::net::IpAddr::V4),
        pin_dir: pin_dir.to_path_buf(),
        owned: held,
    };
    let upkeep_node = node.clone();
    let upkeep = tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(10));
        loop {
            // Queued for the node's thread: this task never waits for it.
            let _ = tokio::select! {
                _ = t.tick() => upkeep_node.send(Node::tick),
                Some(tr) = transitions.recv() => upkeep_node.send(move |n| n.on_transition(tr)),
            };
        }
    });
    let shutdown = || async {
        let mut term = signal(SignalKind::terminate()).expect("signal");
        let mut int = signal(SignalKind::interrupt()).expect("signal");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    };
    let crds_on = k.enable_bgp_crds == Some(true);
    let peers_task = if crds_on {
        let setup = node.call(|n| n.bgp_setup().cloned()).await?;
        let sink = CrdPeers {
            node: node.clone(),
            multihop_ttl: setup
                .as_ref()
                .and_then(|s| s.peers.iter().find_map(|p| p.multihop_ttl)),
            flag_peers: setup.map(|s| s.peers).unwrap_or_default(),
        };
        let name = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let node_name = name("NODE_NAME").unwrap_or_else(|| "node".into());
        let instance = name("POD_NAME").unwrap_or_else(|| node_name.clone());
        let cfg = kube_watch::bgp_peers::BgpPeerConfig::new(node_name, instance);
        info!("BGP peers also from BGPPeerService objects");
        Some(tokio::spawn(kube_watch::bgp_peers::watch_bgp_peers(
            client.clone(),
            cfg,
            sink,
            shutdown(),
        )))
    } else {
        None
    };
    info!("serving Kubernetes LoadBalancer Services");
    // The controller's figures for the metrics endpoint, published when
    // they change (the reconcile counts change with every round that
    // reconciled a Service: a write of a few hundred bytes beside that
    // round's API calls).
    let mut last_state: Option<loxilb_agent::kube_state::KubeState> = None;
    let state_dir = pin_dir.to_path_buf();
    let observe = move |rec: &kube_watch::reconcile::Reconciler| {
        let now = kube_state_of(rec);
        if last_state.as_ref() != Some(&now) {
            if let Err(e) = now.publish(&state_dir) {
                warn!("publishing the controller's state: {e:#}");
            }
            last_state = Some(now);
        }
    };
    let r = kube_watch::controller::run_with(client, run_config, sink, shutdown(), hints, observe)
        .await;
    // The tasks sending to the node end before it is taken back.
    upkeep.abort();
    let _ = upkeep.await;
    if let Some(t) = peers_task {
        t.abort();
        let _ = t.await;
    }
    exit_note(pin_dir, a.keep);
    vips_on_lo.stop();
    {
        // The controller gave the VIPs up as it stopped (before releasing
        // the Lease: another node takes them over, and two nodes must
        // never answer for one VIP); whatever is left marked on lo goes
        // too, --keep or not (a kept datapath still serves the packets
        // that arrive; ARP/ND for the VIPs is the new owner's).
        match lo_vips() {
            Ok((lo, held)) => {
                for v in held {
                    if let Err(e) = netlink::del_addr(lo, v) {
                        warn!(vip = %v, "cannot remove the VIP from lo: {e:#}");
                    }
                }
            }
            Err(e) => warn!("cannot list the VIPs on lo: {e:#}"),
        }
    }
    owner.stop().shutdown(a.keep)?;
    r
}

/// `kube --loxiURL`: the controller programs remote load balancers
/// through their REST API (see `loxilb_agent::remote`); nothing is loaded
/// or attached here.
async fn run_kube_external(
    remotes: Vec<loxilb_agent::remote::Remote>,
    a: &NodeArgs,
    k: &KubeArgs,
    run_config: kube_watch::controller::RunConfig,
) -> Result<()> {
    // `--setRoles=<VIP>` (kube_settings made it the full-NAT source): the
    // remotes' MASTER / BACKUP roles are arbitrated here.
    let roles = a.fullnat_source.filter(|_| k.set_roles.is_some());
    let token = match &k.loxi_token_file {
        None => None,
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("--loxiTokenFile {}: cannot read", p.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                anyhow::bail!(
                    "--loxiTokenFile {}: empty (give the remotes' --api-token-file token)",
                    p.display()
                );
            }
            Some(t)
        }
    };
    let sink = loxilb_agent::remote::RemoteSink::start(
        remotes.clone(),
        loxilb_agent::remote::Options {
            ca_file: k.loxi_ca.clone(),
            token,
            bgp: a.bgp_on(),
            roles,
            ..Default::default()
        },
    )?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API (in cluster: the service account; outside: KUBECONFIG)")?;
    let shutdown = async {
        let mut term = signal(SignalKind::terminate()).expect("signal");
        let mut int = signal(SignalKind::interrupt()).expect("signal");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    };
    info!(
        remotes = ?remotes.iter().map(|r| r.url.as_str()).collect::<Vec<_>>(),
        "serving Kubernetes LoadBalancer Services through remote load balancers (external mode)"
    );
    kube_watch::controller::run(client, run_config, sink, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_flow_limit_flags() {
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(
                ["loxilb-agent", "run", "-c", "r.yaml", "-i", "eth0"]
                    .iter()
                    .chain(extra),
            )
        };
        let limit = |extra: &[&str]| match parse(extra).unwrap().cmd {
            Cmd::Run { node, .. } => node.new_flow_limit(),
            _ => unreachable!(),
        };
        assert_eq!(limit(&[]).unwrap(), (0, 0), "no limit by default");
        assert_eq!(
            limit(&["--max-new-flows", "100000"]).unwrap(),
            (10_000, 10_000)
        );
        assert_eq!(limit(&["--max-new-flows", "5"]).unwrap(), (200_000_000, 1));
        assert_eq!(
            limit(&["--max-new-flows", "1000", "--new-flow-burst", "50"]).unwrap(),
            (1_000_000, 50)
        );
        let e = limit(&["--new-flow-burst", "50"]).unwrap_err().to_string();
        assert!(e.contains("--max-new-flows"), "{e}");
        for bad in [
            &["--max-new-flows", "-1"][..],
            &["--max-new-flows", "many"],
            &["--max-new-flows", "100000001"],
            &["--max-new-flows", "10", "--new-flow-burst", "0"],
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"))
                .to_string();
            assert!(
                e.contains(bad[bad.len() - 1]) || e.contains("--"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn ctsync_peers_discovered_from_the_nodes_leave_this_node_out() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let nodes = vec![
            ("node-a".to_string(), ip("10.0.0.11")),
            ("node-b".to_string(), ip("10.0.0.12")),
            ("node-c".to_string(), ip("fd00::13")),
        ];
        assert_eq!(
            discovered_peers(&nodes, "node-b", 22222),
            vec![
                "10.0.0.11:22222".parse().unwrap(),
                "[fd00::13]:22222".parse().unwrap()
            ]
        );
    }

    /// The in-cluster manifest runs a command line this agent accepts.
    #[test]
    fn manifest_args_parse() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifest/in-cluster/loxilb.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let ds = serde_norway::Deserializer::from_str(&text)
            .map(|d| serde_norway::Value::deserialize(d).unwrap())
            .find(|d| d["kind"] == "DaemonSet")
            .expect("a DaemonSet");
        let args: Vec<String> = ds["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let cli = Cli::try_parse_from(std::iter::once("loxilb-agent".to_string()).chain(args))
            .unwrap_or_else(|e| panic!("manifest args rejected: {e}"));
        assert!(matches!(cli.cmd, Cmd::Kube { .. }));
        assert!(Cli::try_parse_from(["loxilb-agent", "kube", "--iface=eth0", "--bogus"]).is_err());
    }

    #[test]
    fn kube_loxilb_flags_that_do_not_carry_over_are_refused_clearly() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["loxilb-agent", "kube", "--iface=eth0"];
            v.extend_from_slice(extra);
            match Cli::try_parse_from(v).unwrap().cmd {
                Cmd::Kube { node, kube } => check_kube_compat(&kube, &node),
                _ => unreachable!(),
            }
        };
        assert!(parse(&[]).unwrap().is_none());
        assert_eq!(
            parse(&["--setRoles=10.0.0.9"]).unwrap(),
            Some("10.0.0.9".parse().unwrap())
        );
        let e = Cli::try_parse_from(["loxilb-agent", "kube", "--iface=eth0", "--setRoles=nope"])
            .err()
            .expect("--setRoles=nope accepted")
            .to_string();
        assert!(
            e.contains("'nope'") && e.contains("--setRoles") && e.contains("not an IPv4 address"),
            "{e}"
        );
        assert!(
            parse(&["--loxiURL=http://1.2.3.4:11111"]).is_err(),
            "--iface with it"
        );
        // Typed by clap: a bad URL is refused while parsing, with the flag,
        // the value and what is wrong.
        for (url, why) in [
            ("1.2.3.4:11111", "has no scheme"),
            ("ftp://10.0.0.5", "neither http nor https"),
        ] {
            let e = Cli::try_parse_from(["loxilb-agent", "kube", &format!("--loxiURL={url}")])
                .err()
                .unwrap_or_else(|| panic!("--loxiURL={url} accepted"))
                .to_string();
            assert!(
                e.contains("--loxiURL") && e.contains(&format!("'{url}'")) && e.contains(why),
                "{e}"
            );
        }
        let e = parse(&["--loxiCA=/ca.pem"]).unwrap_err().to_string();
        assert!(e.contains("--loxiURL"), "{e}");
        let external = |extra: &[&str]| {
            let mut v = vec!["loxilb-agent", "kube", "--loxiURL=http://1.2.3.4:11111"];
            v.extend_from_slice(extra);
            match Cli::try_parse_from(v).unwrap().cmd {
                Cmd::Kube { node, kube } => check_kube_compat(&kube, &node),
                _ => unreachable!(),
            }
        };
        assert!(external(&[]).is_ok());
        assert!(external(&["--setBGP=65001", "--loxiCA=/ca.pem"]).is_ok());
        // --setRoles arbitrates the remotes' roles there.
        assert_eq!(
            external(&["--setRoles=0.0.0.0"]).unwrap(),
            Some(std::net::Ipv4Addr::UNSPECIFIED)
        );
        let e = external(&["--iface=eth0", "--ctsync-peers=nodes"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--iface, --ctsync-peers") && e.contains("no datapath"),
            "{e}"
        );
        let e = Cli::try_parse_from(["loxilb-agent", "kube"])
            .map(|c| match c.cmd {
                Cmd::Kube { node, kube } => check_kube_compat(&kube, &node),
                _ => unreachable!(),
            })
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--iface is required"), "{e}");
        let e = parse(&["--enableBGPCRDs"]).unwrap_err().to_string();
        assert!(e.contains("--setBGP"), "{e}");
        assert!(parse(&["--enableBGPCRDs", "--setBGP=65001"]).is_ok());
        assert!(parse(&["--enableBGPCRDs=false"]).is_ok());
        assert!(parse(&["--setRoles=10.0.0.9", "--fullnat-source=10.0.0.8"]).is_err());
    }

    /// kube-loxilb's flags are typed by clap, in the forms kube-loxilb's
    /// manifests write (`--setBGP=65100`, `--enableBGPCRDs=true`, a bare
    /// boolean flag, Go's boolean spellings), and a bad value is refused
    /// by clap naming the flag, the value and what is allowed.
    #[test]
    fn kube_loxilb_flags_are_typed_by_clap() {
        let kube = |extra: &[&str]| {
            let mut v = vec!["loxilb-agent", "kube", "--iface=eth0"];
            v.extend_from_slice(extra);
            Cli::try_parse_from(v).map(|c| match c.cmd {
                Cmd::Kube { node, kube } => (node, kube),
                _ => unreachable!(),
            })
        };
        let (node, k) = kube(&[]).unwrap();
        assert_eq!(k.set_lb_mode, loxilb_model::Mode::Default);
        assert!(!k.set_unique_ip && !k.use_pod_network && !k.monitor);
        assert_eq!(k.load_balancer_class, "loxilb.io/loxilb");
        assert_eq!(k.enable_bgp_crds, None);
        assert_eq!(node.set_bgp, None);
        let (node, k) = kube(&[
            "--setBGP=65100",
            "--extBGPPeers=10.0.0.2:65101,[fd00::2]:65102:1790",
            "--listenBGPPort=1179",
            "--eBGPMultiHop",
            "--enableBGPCRDs=true",
            "--setLBMode=2",
            "--setUniqueIP",
            "--usePodNetwork=F",
            "--monitor=1",
            "--cidrPools=defaultPool=192.0.2.0/24",
            "--cidr6Pools=defaultPool=fd00::/120",
            "--setRoles=10.0.0.9",
            "--leaseDuration=600ms",
            "--setLBHostnameStatus",
            "--zone=az1",
        ])
        .unwrap();
        assert_eq!(node.set_bgp, Some(65100));
        assert!(node.bgp_on());
        assert_eq!(node.ext_bgp_peers.as_ref().unwrap().0.len(), 2);
        assert_eq!(node.listen_bgp_port, Some(1179));
        assert_eq!(node.ebgp_multihop, Some(true));
        assert_eq!(k.enable_bgp_crds, Some(true));
        assert_eq!(k.set_lb_mode, loxilb_model::Mode::FullNat);
        assert!(k.set_unique_ip && !k.use_pod_network && k.monitor);
        assert_eq!(k.cidr_pools.as_ref().unwrap().0.len(), 1);
        assert_eq!(k.cidr6_pools.as_ref().unwrap().0.len(), 1);
        assert_eq!(k.set_roles, Some("10.0.0.9".parse().unwrap()));
        assert_eq!(
            k.lease_duration,
            Some(std::time::Duration::from_millis(600))
        );
        assert_eq!(k.set_lb_hostname_status, Some(true));
        assert_eq!(k.zone.as_deref(), Some("az1"));
        // A bare boolean before another flag, and the value as a separate
        // argument (kube-loxilb: `--setUniqueIP false` is not Go's form,
        // but was accepted here and still is).
        let (_, k) = kube(&["--enableBGPCRDs", "--setUniqueIP", "false"]).unwrap();
        assert_eq!(k.enable_bgp_crds, Some(true));
        assert!(!k.set_unique_ip);
        let (node, _) = kube(&["--setBGP=0"]).unwrap();
        assert!(!node.bgp_on(), "--setBGP=0: BGP off");
        for (bad, value, says) in [
            (
                &["--setLBMode=7"][..],
                "'7'",
                "allowed values: 0 (default), 1 (onearm)",
            ),
            (&["--setLBMode=4"], "'4'", "4 (fullproxy) is not supported"),
            (
                &["--setUniqueIP=yes"],
                "'yes'",
                "allowed values: true, false",
            ),
            (
                &["--enableBGPCRDs=ja"],
                "'ja'",
                "allowed values: true, false",
            ),
            (&["--setBGP=AS65001"], "'AS65001'", "not an AS number"),
            (
                &["--extBGPPeers=1.2.3.4"],
                "'1.2.3.4'",
                "expected IP:AS[:PORT]",
            ),
            (&["--listenBGPPort=0"], "'0'", "1..=65535"),
            (&["--eBGPMultiHop=maybe"], "'maybe'", "true or false"),
            (
                &["--cidrPools=p=10.0.0.1"],
                "'p=10.0.0.1'",
                "single address",
            ),
            (&["--leaseDuration=2h"], "'2h'", "at most 1h"),
            (&["--zone=Zone_A"], "'Zone_A'", "not a zone name"),
            (&["--loadBalancerClass=a/b/c"], "'a/b/c'", "label-style key"),
            (&["--setRoles=fd00::1"], "'fd00::1'", "not an IPv4 address"),
        ] {
            let e = kube(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"))
                .to_string();
            let flag = bad[0].split('=').next().unwrap();
            assert!(
                e.contains(flag) && e.contains(value) && e.contains(says),
                "{bad:?}: {e}"
            );
        }
    }

    /// `--bgp-backup-path`: typed values, refused where it would do
    /// nothing (BGP off, external mode, `run` without `--api-listen`).
    #[test]
    fn bgp_backup_path_flag() {
        use loxilb_agent::bgp::BackupPath;
        let kube = |extra: &[&str]| {
            let mut v = vec!["loxilb-agent", "kube", "--iface=eth0"];
            v.extend_from_slice(extra);
            Cli::try_parse_from(v).map(|c| match c.cmd {
                Cmd::Kube { node, .. } => node,
                _ => unreachable!(),
            })
        };
        let setup = |extra: &[&str]| bgp_setup(&kube(extra).unwrap());
        let backup = |extra: &[&str]| setup(extra).unwrap().unwrap().config.backup;
        assert_eq!(backup(&["--setBGP=65001"]), BackupPath::Prepend(3));
        assert_eq!(
            backup(&["--setBGP=65001", "--bgp-backup-path=prepend:5"]),
            BackupPath::Prepend(5)
        );
        assert_eq!(
            backup(&["--setBGP=65001", "--bgp-backup-path=withdraw"]),
            BackupPath::Withdraw
        );
        assert_eq!(
            backup(&["--setBGP=65001", "--bgp-backup-path=ecmp"]),
            BackupPath::Ecmp
        );
        let e = kube(&["--setBGP=65001", "--bgp-backup-path=prepend:99"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--bgp-backup-path") && e.contains("prepend:99"),
            "{e}"
        );
        let e = setup(&["--bgp-backup-path=withdraw"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--bgp-backup-path") && e.contains("--setBGP"),
            "{e}"
        );
        let ext = Cli::try_parse_from([
            "loxilb-agent",
            "kube",
            "--loxiURL=http://1.2.3.4:11111",
            "--bgp-backup-path=ecmp",
        ])
        .unwrap();
        let Cmd::Kube { node, kube } = ext.cmd else {
            unreachable!()
        };
        let e = check_kube_compat(&kube, &node).unwrap_err().to_string();
        assert!(e.contains("--bgp-backup-path"), "{e}");
        let run = |extra: &[&str]| {
            let mut v = vec!["loxilb-agent", "run", "-c", "r.yaml", "-i", "eth0"];
            v.extend_from_slice(extra);
            match Cli::try_parse_from(v).unwrap().cmd {
                Cmd::Run { node, api, .. } => check_run_flags(&node, &api),
                _ => unreachable!(),
            }
        };
        let e = run(&["--setBGP=65001", "--bgp-backup-path=withdraw"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--bgp-backup-path") && e.contains("--api-listen"),
            "{e}"
        );
        assert!(run(&[
            "--setBGP=65001",
            "--bgp-backup-path=withdraw",
            "--api-listen=127.0.0.1:11111"
        ])
        .is_ok());
    }

    /// The config file's keys are exactly the `kube` command's flags.
    #[test]
    fn config_file_keys_are_the_kube_flags() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let kube = cmd.find_subcommand("kube").unwrap();
        let mut flags: Vec<String> = kube
            .get_arguments()
            .chain(cmd.get_arguments())
            .filter_map(|a| a.get_long().map(str::to_string))
            .filter(|l| !["config", "help", "version", "output"].contains(&l.as_str()))
            .collect();
        flags.sort();
        flags.dedup();
        let mut keys: Vec<String> = kube_watch::config_file::SETTINGS
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        keys.sort();
        assert_eq!(keys, flags);
    }

    #[test]
    fn config_file_settings_parse_as_flags() {
        let dir = std::env::temp_dir().join(format!("agent-kube-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kube.yaml");
        std::fs::write(
            &path,
            "iface: [eth9]\nsetLBMode: 1\nsetExclIPAM: true\nsetLBHostnameStatus: true\nkeep: true\n",
        )
        .unwrap();
        let args: Vec<std::ffi::OsString> = ["loxilb-agent", "kube", "--config"]
            .iter()
            .map(Into::into)
            .chain([path.clone().into_os_string(), "--setLBMode=2".into()])
            .collect();
        let args = kube_watch::config_file::expand_args(args).unwrap();
        let Cmd::Kube { node, kube } = Cli::try_parse_from(args).unwrap().cmd else {
            unreachable!()
        };
        assert_eq!(node.ifaces, ["eth9"]);
        assert!(node.keep);
        assert_eq!(
            kube.set_lb_mode,
            loxilb_model::Mode::FullNat,
            "the flag overrides the file"
        );
        assert!(kube.set_unique_ip);
        assert_eq!(kube.set_lb_hostname_status, Some(true));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `kube` flag sets (proptest): valid flags, at most one of them with
    /// a bad value. A valid set passes every check that needs neither the
    /// cluster nor the kernel ([`kube_settings`]); a bad value is refused,
    /// by clap or by those checks, naming the flag and the value.
    mod kube_flags {
        use super::*;
        use proptest::prelude::*;

        /// (flag, valid values, bad values).
        const FLAGS: &[(&str, &[&str], &[&str])] = &[
            (
                "--setLBMode",
                &["0", "1", "2", "3"],
                &["4", "5", "9", "x", "-1", ""],
            ),
            (
                "--setUniqueIP",
                &["true", "false", "1", "F"],
                &["yes", "2", "on", ""],
            ),
            ("--usePodNetwork", &["true", "false"], &["no", "ja", "tRUE"]),
            ("--monitor", &["true", "false"], &["enabled", " "]),
            (
                "--loadBalancerClass",
                &["loxilb.io/loxilb", "example.com/lb", "lb"],
                &["a/b/c", "-x", "/x", "x/"],
            ),
            (
                "--cidrPools",
                &[
                    "defaultPool=192.0.2.0/24",
                    "192.0.2.0/28,p2=198.51.100.10-198.51.100.20",
                    "",
                ],
                &[
                    "defaultPool=192.0.2.0/33",
                    "p=10.0.0.1",
                    "p=fd00::/64",
                    "a=10.0.0.0/8,a=11.0.0.0/8",
                    "-p=10.0.0.0/8",
                    "x=10.0.0.0/8,y=10.1.0.0/16",
                ],
            ),
            (
                "--cidr6Pools",
                &["defaultPool=fd00::/120"],
                &["x=10.0.0.0/24", "fd00::1", "p=fd00::/129"],
            ),
            (
                "--externalSecondaryCIDRs",
                &["sec=203.0.113.0/24"],
                &["sec=203.0.113.0/24,sec=fd00:1::/64", "s=x"],
            ),
            (
                "--setRoles",
                &["10.0.0.9"],
                &["nope", "fd00::1", "10.0.0.300"],
            ),
            (
                "--leaseDuration",
                &["10s", "20", "1m"],
                &["0", "2h", "abc", "-3s", "2s"],
            ),
            (
                "--snat-ports",
                &["40000-50000", "1-65535"],
                &["0-10", "9-1", "1-70000", "x"],
            ),
            (
                "--max-new-flows",
                &["0", "1000"],
                &["-1", "many", "100000001"],
            ),
            (
                "--xdp-mode",
                &["auto", "native", "generic"],
                &["fast", "AUTO", ""],
            ),
            ("--forward", &["auto", "xdp", "stack"], &["kernel", "both"]),
            (
                "--fullnat-source",
                &["10.0.0.9"],
                &["300.1.1.1", "fd00::1", "x"],
            ),
            (
                "--setBGP",
                &["65001", "0"],
                &["AS65001", "-1", "4294967296"],
            ),
            (
                "--health-listen",
                &["127.0.0.1:9000", "[::1]:9000"],
                &["9000", "localhost:9000"],
            ),
            ("--zone", &["llb"], &["Zone_A", "-z"]),
        ];

        fn flag_set() -> impl Strategy<Value = (Vec<(usize, String)>, Option<usize>)> {
            let n = FLAGS.len();
            (
                prop::sample::subsequence((0..n).collect::<Vec<_>>(), 0..=n),
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                any::<bool>(),
            )
                .prop_flat_map(move |(picked, pick, bad, mutate)| {
                    let values: Vec<BoxedStrategy<(usize, String)>> = picked
                        .iter()
                        .map(|&i| {
                            prop::sample::select(FLAGS[i].1)
                                .prop_map(move |v| (i, v.to_string()))
                                .boxed()
                        })
                        .collect();
                    let mutated = (mutate && !picked.is_empty()).then(|| pick.index(picked.len()));
                    (values, Just(mutated), Just(bad))
                })
                .prop_map(|(mut values, mutated, bad)| {
                    if let Some(m) = mutated {
                        let i = values[m].0;
                        values[m].1 = bad.get(FLAGS[i].2).to_string();
                    }
                    (values, mutated)
                })
        }

        fn env(
            kube: kube_watch::flags::KubeConfig,
        ) -> Result<kube_watch::controller::RunConfig, String> {
            Ok(kube_watch::controller::RunConfig::new(
                kube,
                kube_watch::leader::LeaseConfig::new("kube-system", "agent-a"),
            ))
        }

        /// `--vipOwners`: `leader` or `pool`; `pool` needs pools and
        /// refuses `--setRoles` (one source VIP, several owners).
        #[test]
        fn vip_owners_pool_needs_pools_and_no_role_vip() {
            let settle = |extra: &[&str]| -> Result<kube_watch::flags::KubeConfig, String> {
                let mut args = vec!["loxilb-agent", "kube", "--iface=eth0"];
                args.extend_from_slice(extra);
                let cli = Cli::try_parse_from(&args).map_err(|e| e.to_string())?;
                match cli.cmd {
                    Cmd::Kube { node, kube } => kube_settings(&node, &kube, env)
                        .map(|(_, c)| c.kube)
                        .map_err(|e| format!("{e:#}")),
                    _ => unreachable!(),
                }
            };
            let pool = "--cidrPools=a=10.0.0.0/29,b=10.0.1.0/29";
            assert_eq!(
                settle(&[pool]).unwrap().vip_owners,
                kube_watch::flags::VipOwners::Leader
            );
            assert_eq!(
                settle(&[pool, "--vipOwners=pool"]).unwrap().vip_owners,
                kube_watch::flags::VipOwners::Pool
            );
            let e = settle(&[pool, "--vipOwners=pools"]).unwrap_err();
            assert!(e.contains("--vipOwners") && e.contains("`leader`"), "{e}");
            let e = settle(&["--vipOwners=pool"]).unwrap_err();
            assert!(e.contains("needs address pools"), "{e}");
            let e = settle(&[pool, "--vipOwners=pool", "--setRoles=10.9.0.1"]).unwrap_err();
            assert!(
                e.contains("--setRoles=10.9.0.1") && e.contains("one owner"),
                "{e}"
            );
            let e = settle(&[
                "--cidrPools=Pool_A=10.0.0.0/29,pool-a=10.0.1.0/29",
                "--vipOwners=pool",
            ])
            .unwrap_err();
            assert!(e.contains("would share the owner Lease"), "{e}");
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn kube_flag_sets_accept_the_valid_and_name_the_bad((flags, mutated) in flag_set()) {
                let mut args = vec!["loxilb-agent".to_string(), "kube".into(), "--iface=eth0".into()];
                // --zone names status hostnames: only with them on.
                if flags.iter().any(|(i, _)| FLAGS[*i].0 == "--zone") {
                    args.push("--setLBHostnameStatus=true".into());
                }
                args.extend(flags.iter().map(|(i, v)| format!("{}={v}", FLAGS[*i].0)));
                let result = Cli::try_parse_from(&args)
                    .map_err(|e| e.to_string())
                    .and_then(|cli| match cli.cmd {
                        Cmd::Kube { node, kube } => kube_settings(&node, &kube, env)
                            .map(|_| ())
                            .map_err(|e| format!("{e:#}")),
                        _ => unreachable!(),
                    });
                {
                    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
                    static N: AtomicUsize = AtomicUsize::new(0);
                    static REFUSED: AtomicUsize = AtomicUsize::new(0);
                    let n = N.fetch_add(1, Relaxed) + 1;
                    let r = REFUSED.fetch_add(usize::from(result.is_err()), Relaxed)
                        + usize::from(result.is_err());
                    let of = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
                    if n == of {
                        println!("bad input: kube flag sets: {n} cases, {n} inputs, {r} refused, 0 panics");
                    }
                }
                match (mutated, result) {
                    (None, Ok(())) => {}
                    (None, Err(e)) => {
                        // Valid values may still contradict each other.
                        let has = |f: &str| flags.iter().any(|(i, _)| FLAGS[*i].0 == f);
                        let explained = (has("--setRoles") && has("--fullnat-source") && e.contains("disagree"))
                            || (e.contains("overlap"))
                            || (has("--forward") && e.contains("--forward"));
                        prop_assert!(explained, "valid flags {:?} refused: {}", args, e);
                    }
                    (Some(m), Ok(())) => {
                        let (i, v) = &flags[m];
                        // Some "bad" values are bad only with others
                        // (a lease of 2s against the 3s renew deadline).
                        prop_assert!(false, "{}={:?} accepted ({:?})", FLAGS[*i].0, v, args);
                    }
                    (Some(m), Err(e)) => {
                        let (i, v) = &flags[m];
                        let flag = FLAGS[*i].0;
                        // Refused: for this flag, or another one it breaks
                        // (--setRoles against --fullnat-source, BGP flags).
                        let names_it = e.contains(flag) && (v.trim().is_empty() || e.contains(v.trim()));
                        let other = (flag == "--setRoles" || flag == "--fullnat-source") && e.contains("disagree")
                            || e.contains("overlap");
                        prop_assert!(names_it || other, "{}={:?}: {}", flag, v, e);
                    }
                }
            }
        }
    }

    #[test]
    fn port_range_is_strict() {
        assert_eq!(parse_port_range("1000-2000"), Ok((1000, 2000)));
        for bad in ["0-10", "20-10", "x-1", "100", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }
}

//! Control-plane benchmark at scale: how fast the Kubernetes path programs
//! the REAL datapath maps when 10,000 Services (100,000 pod endpoints) are
//! already loaded. Prints figures next to targets; never asserts on timing
//! (it does check that the maps end up with what was asked).
//!
//! The path timed is the agent's own, stage by stage (what
//! `kube_watch::reconcile` and the agent's `KubeSink` do for one event):
//!
//! 1. alloc: `translate::parse_annotations`, `alloc_request`,
//!    `Ipam::ensure` (the leader's allocation);
//! 2. translate: `kube_watch::translate::translate` (Service +
//!    EndpointSlice + Nodes -> `ServiceRule`s);
//! 3. commit: the rules committed into a real
//!    `kube_watch::reconcile::Reconciler` (`Reconciler::commit`);
//! 4. sink: what the controller's `Executor::sync_sink` hands the agent and
//!    the agent does with it: `Reconciler::rule_update` into
//!    `loxilb_agent::node::KubeRules::update` (the agent's `KubeSink::update`
//!    is exactly this call): `kube_rules::to_rule` on the changed Service's
//!    rules, `Node::apply_changes` (`Rules::apply_changes` into the real maps,
//!    probe targets, BGP announcements, neighbour nudges of the changed
//!    rules), then `rules_synced` and `owned_vips`.
//!
//! The datapath is `Datapath::load(None)` (private maps, nothing attached)
//! inside a `Node` (`Node::detached`: no BGP speaker, a prober on its own
//! runtime; no rule has probes). The benchmark runs in a network namespace
//! of its own, so the neighbour nudges (a datagram to each endpoint's
//! discard port) leave no trace on the host's network.
//!
//! Not included: the API server round trips (record annotation, status)
//! and the watch itself.
//!
//! Figures:
//! - (a) +1 Service: 100 Services added one at a time on top of 10,000,
//!   p50/p99/max of each stage and of the total;
//! - (b) full resync after an agent restart: IPAM rebuilt from the recorded
//!   allocations, every Service translated again, `read_installed` +
//!   `Rules::adopt` + a full update (all rules unchanged); and the
//!   from-scratch load of all 10,000 into empty maps (a full update);
//! - (c) the process RSS (VmRSS, VmHWM) and the live heap (bytes allocated
//!   and not freed, counted by this binary's allocator), per stage. BPF
//!   maps live in kernel memory and are not part of either.
//!
//! `bench_kube [--services N] [--adds M]` (defaults 10000 and 100). Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    process::exit,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::{
    api::{
        core::v1::{
            Node, NodeAddress, NodeCondition, NodeStatus, Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube_watch::{
    annotations::keys,
    flags::{parse_cidr_pools, KubeConfig},
    ipam::{Allocation, Ipam},
    reconcile::Reconciler,
    translate::{alloc_request, parse_annotations, service_key, translate, SERVICE_NAME_LABEL},
};
use loxilb_agent::{
    datapath::Datapath,
    node::{KubeRules, Node as AgentNode},
    rules::Rules,
};

/// The system allocator, counting the bytes live (allocated, not freed):
/// what the process really holds, apart from what the allocator keeps.
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        let q = unsafe { std::alloc::System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
            LIVE.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_kib() -> u64 {
    LIVE.load(std::sync::atomic::Ordering::Relaxed) as u64 / 1024
}

const NAMESPACE: &str = "bench";
const EPS_PER_SERVICE: u32 = 10;
const SVC_PORT: i32 = 80;
const POD_PORT: i32 = 8080;
/// Pod addresses: 10.64.0.0 upwards, one per endpoint.
const POD_BASE: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 0);
const POOL: &str = "defaultPool=10.200.0.0/16";
const NODES: usize = 3;

const TARGET_ADD_P99: Duration = Duration::from_millis(10);
const TARGET_RESYNC: Duration = Duration::from_secs(2);
const TARGET_RSS_KIB: u64 = 100 * 1024;

const USAGE: &str = "usage: bench_kube [--services N] [--adds M]";

struct Opts {
    services: usize,
    adds: usize,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        services: 10_000,
        adds: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{what} needs a value"))?
                .parse()
                .with_context(|| format!("{what}: not a number"))
        };
        match a.as_str() {
            "--services" => o.services = num("--services")?,
            "--adds" => o.adds = num("--adds")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(o.adds > 0, "--adds must be at least 1");
    let total = o.services + o.adds;
    ensure!(
        total <= loxilb_common::MAX_SERVICES as usize,
        "{total} Services (1 port each) exceed the datapath's {} rules",
        loxilb_common::MAX_SERVICES
    );
    ensure!(
        total * EPS_PER_SERVICE as usize <= loxilb_common::MAX_EP_STATS as usize,
        "{} endpoints exceed the datapath's {} endpoint counters",
        total * EPS_PER_SERVICE as usize,
        loxilb_common::MAX_EP_STATS
    );
    Ok(o)
}

// ---------------------------------------------------------------------------
// The Kubernetes objects, built in memory as the watchers would hold them.

fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(NAMESPACE.into()),
            name: Some(format!("svc-{i:05}")),
            annotations: Some(BTreeMap::from([(
                keys::USE_POD_NETWORK.to_string(),
                "yes".to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some(kube_watch::flags::DEFAULT_LOAD_BALANCER_CLASS.into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SVC_PORT,
                target_port: Some(IntOrString::Int(POD_PORT)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn pod_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POD_BASE) + n)
}

fn endpoint_slice(i: usize) -> EndpointSlice {
    let endpoints = (0..EPS_PER_SERVICE)
        .map(|j| Endpoint {
            addresses: vec![pod_ip(i as u32 * EPS_PER_SERVICE + j).to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(format!("node-{}", j as usize % NODES)),
            ..Default::default()
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(NAMESPACE.into()),
            name: Some(format!("svc-{i:05}-abcde")),
            labels: Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_string(),
                format!("svc-{i:05}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(POD_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn node(k: usize) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(format!("node-{k}")),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: format!("192.168.10.{}", k + 1),
            }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// The controller's state (what `Reconciler` keeps) and the stages.

/// The allocation table, and the committed rules in a real `Reconciler`
/// (its own table stays empty: it is not leader here).
struct Controller {
    config: KubeConfig,
    ipam: Ipam,
    rec: Reconciler,
}

/// Time of each stage of one event.
#[derive(Clone, Copy, Default)]
struct Stages {
    alloc: Duration,
    translate: Duration,
    commit: Duration,
    sink: Duration,
}

/// Picks one figure out of a sample.
type StageFn<'a> = &'a dyn Fn(&Stages) -> Duration;

impl Stages {
    fn total(&self) -> Duration {
        self.alloc + self.translate + self.commit + self.sink
    }
}

impl Controller {
    fn new(config: KubeConfig) -> Result<Self> {
        let ipam = config.ipam().map_err(|e| anyhow::anyhow!("{e}"))?;
        let rec = Reconciler::new(config.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Controller { config, ipam, rec })
    }

    /// Steps 1 to 3 for one Service: allocation, its rules, committed.
    fn on_service(
        &mut self,
        svc: &Service,
        slice: &EndpointSlice,
        nodes: &[Node],
        st: &mut Stages,
    ) -> Result<()> {
        let t0 = Instant::now();
        let (ann, _warnings) = parse_annotations(svc)
            .into_result()
            .map_err(|e| anyhow::anyhow!("annotations: {e:?}"))?;
        let (req, _) = alloc_request(svc, &ann, &self.config)?;
        let alloc: Allocation = self.ipam.ensure(&req).map_err(|e| anyhow::anyhow!("{e}"))?;
        let t1 = Instant::now();
        let tr = translate(
            svc,
            &ann,
            std::slice::from_ref(slice),
            nodes,
            &alloc,
            &self.config,
        )?;
        let t2 = Instant::now();
        ensure!(
            tr.rules.len() == 1 && tr.rules[0].rule.endpoints.len() == EPS_PER_SERVICE as usize,
            "{}: expected 1 rule with {EPS_PER_SERVICE} endpoints, got {:?}",
            req.service,
            tr.rules
        );
        self.rec.commit(&service_key(svc)?, tr.rules);
        let t3 = Instant::now();
        st.alloc += t1 - t0;
        st.translate += t2 - t1;
        st.commit += t3 - t2;
        Ok(())
    }

    /// Step 4: what `Executor::sync_sink` does, with the agent's sink.
    fn sync(
        &mut self,
        kube: &mut KubeRules,
        node: &mut AgentNode,
        full: bool,
    ) -> Result<loxilb_agent::node::KubeApplied> {
        let done = kube.update(node, &self.rec.rule_update(full))?;
        self.rec.rules_synced();
        std::hint::black_box(self.rec.owned_vips());
        ensure!(
            done.refused.is_empty(),
            "rules refused by the agent: {:?}",
            done.refused
        );
        Ok(done)
    }
}

// ---------------------------------------------------------------------------
// Reporting.

fn mem_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Nearest-rank percentile of a sorted list.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}

/// RSS, peak RSS and live heap now.
struct Mem {
    rss: u64,
    hwm: u64,
    live: u64,
}

fn print_mem(when: &str) -> Mem {
    let (rss, hwm) = mem_kib();
    let live = live_kib();
    println!(
        "  memory {when}: VmRSS {}, VmHWM {}, live heap {}",
        mib(rss),
        mib(hwm),
        mib(live)
    );
    Mem { rss, hwm, live }
}

/// A network namespace of this process's own: the neighbour nudges of the
/// agent's path go nowhere.
fn own_netns() -> Result<()> {
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "unshare(CLONE_NEWNET) failed: {} (needs root, CAP_SYS_ADMIN)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn run(o: &Opts) -> Result<()> {
    let n = o.services;
    let total = n + o.adds;
    own_netns()?;
    println!(
        "bench_kube: {n} Services x 1 port x {EPS_PER_SERVICE} pod endpoints \
         (loxilb.io/usepodnetwork: yes), {} adds, pool {POOL}, {} CPUs",
        o.adds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    let m_start = print_mem("at start");

    let t = Instant::now();
    let services: Vec<Service> = (0..total).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..total).map(endpoint_slice).collect();
    let nodes: Vec<Node> = (0..NODES).map(node).collect();
    println!(
        "objects: {total} Services + {total} EndpointSlices built in memory in {} \
         (the watchers' caches)",
        ms(t.elapsed())
    );
    let m_objects = print_mem("with the objects");

    let config = KubeConfig {
        cidr_pools: parse_cidr_pools(POOL).map_err(|e| anyhow::anyhow!("{e}"))?,
        ..KubeConfig::default()
    };

    let pin_dir = std::path::PathBuf::from(format!("/tmp/bench_kube-{}", std::process::id()));
    let state_dir = loxilb_agent::node::state_dir(&pin_dir);
    let t = Instant::now();
    let dp = Datapath::load(None).context("loading the datapath (private maps)")?;
    let mut node = AgentNode::detached(dp, Rules::adopt(vec![]), &pin_dir)?;
    println!("datapath: loaded (private maps) in {}", ms(t.elapsed()));
    let m_dp = print_mem("with the datapath loaded");
    println!();

    // ---- (b2) From scratch: all N Services into empty maps.
    println!("(b) from scratch: {n} Services into empty maps (one full update)");
    let mut ctl = Controller::new(config.clone())?;
    let mut kube = KubeRules::default();
    let mut st = Stages::default();
    for i in 0..n {
        ctl.on_service(&services[i], &slices[i], &nodes, &mut st)?;
    }
    let m_ctl = print_mem("with the controller's rules");
    let t = Instant::now();
    let done = ctl.sync(&mut kube, &mut node, true)?;
    st.sink = t.elapsed();
    ensure!(
        done.full && done.report.added.len() == n && done.report.unchanged == 0,
        "from scratch: {} added, {} unchanged (expected {n} added)",
        done.report.added.len(),
        done.report.unchanged
    );
    drop(done);
    let scratch = st;
    println!(
        "  alloc {}  translate {}  commit {}  sink (to_rule + Node::apply) {}  => total {}",
        secs(st.alloc),
        secs(st.translate),
        secs(st.commit),
        secs(st.sink),
        secs(st.total())
    );
    let n_eps: usize = node.rules.installed().map(|r| r.eps.len()).sum();
    println!(
        "  {} rules, {n_eps} endpoints written ({:.1} us per rule in the sink)",
        node.rules.len(),
        st.sink.as_secs_f64() * 1e6 / n.max(1) as f64
    );
    let m_loaded = print_mem("after loading");
    println!();

    // ---- (b1) Full resync after an agent restart.
    println!("(b) full resync after an agent restart: {n} Services, nothing changed");
    let records: Vec<_> = ctl
        .ipam
        .allocations()
        .map(|a| (a.service.clone(), a.record()))
        .collect();
    // The restarted agent: a new controller, the maps adopted.
    let dp = node.into_datapath();
    drop(kube);
    drop(ctl);
    let mut ctl = Controller::new(config.clone())?;
    let t = Instant::now();
    let problems = ctl.ipam.rebuild(records);
    let rebuild = t.elapsed();
    ensure!(
        problems.is_empty(),
        "IPAM rebuild: {} problems",
        problems.len()
    );
    let mut st = Stages {
        alloc: rebuild,
        ..Default::default()
    };
    for i in 0..n {
        ctl.on_service(&services[i], &slices[i], &nodes, &mut st)?;
    }
    let t = Instant::now();
    let installed = dp.read_installed()?;
    let read = t.elapsed();
    let t = Instant::now();
    let rules = Rules::adopt(installed);
    let adopt = t.elapsed();
    let mut node = AgentNode::detached(dp, rules, &pin_dir)?;
    let mut kube = KubeRules::default();
    let t = Instant::now();
    let done = ctl.sync(&mut kube, &mut node, true)?;
    let apply = t.elapsed();
    st.sink = read + adopt + apply;
    let rep = &done.report;
    ensure!(
        rep.unchanged == n && rep.added.is_empty() && rep.updated.is_empty(),
        "resync: {} unchanged, {} added, {} updated, {} removed (expected all {n} unchanged)",
        rep.unchanged,
        rep.added.len(),
        rep.updated.len(),
        rep.removed.len()
    );
    drop(done);
    let resync = st;
    println!(
        "  alloc (ipam rebuild {} + ensure) {}  translate {}  commit {}",
        ms(rebuild),
        secs(st.alloc),
        secs(st.translate),
        secs(st.commit),
    );
    println!(
        "  read_installed {}  adopt {}  full update {} ({n} unchanged)",
        secs(read),
        secs(adopt),
        secs(apply),
    );
    println!(
        "  => datapath side (read_installed + adopt + update) {}; total with translation {}",
        secs(read + adopt + apply),
        secs(st.total())
    );
    print_mem("after the resync");
    println!();

    // ---- (a) +1 Service, `adds` times.
    println!(
        "(a) +1 Service: {} adds on top of {n} (event -> maps written)",
        o.adds
    );
    let mut samples: Vec<Stages> = Vec::with_capacity(o.adds);
    for i in n..total {
        let mut s = Stages::default();
        ctl.on_service(&services[i], &slices[i], &nodes, &mut s)?;
        let t = Instant::now();
        let done = ctl.sync(&mut kube, &mut node, false)?;
        s.sink = t.elapsed();
        let rep = &done.report;
        ensure!(
            !done.full && rep.added.len() == 1 && rep.updated.is_empty() && rep.removed.is_empty(),
            "add {i}: {} added, {} updated, {} removed (expected 1 added, per Service)",
            rep.added.len(),
            rep.updated.len(),
            rep.removed.len()
        );
        samples.push(s);
    }
    let dist = |f: &dyn Fn(&Stages) -> Duration| {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort();
        (pct(&v, 50.0), pct(&v, 99.0), *v.last().expect("samples"))
    };
    let rows: [(&str, StageFn); 5] = [
        ("alloc (parse + request + ensure)", &|s| s.alloc),
        ("translate", &|s| s.translate),
        ("commit", &|s| s.commit),
        ("sink (KubeRules::update)", &|s| s.sink),
        ("TOTAL", &|s| s.total()),
    ];
    println!(
        "  {:<34} {:>12} {:>12} {:>12}",
        "stage", "p50", "p99", "max"
    );
    let (mut add_p50, mut add_p99) = (Duration::ZERO, Duration::ZERO);
    for (name, f) in rows {
        let (p50, p99, max) = dist(f);
        println!(
            "  {name:<34} {:>12} {:>12} {:>12}",
            ms(p50),
            ms(p99),
            ms(max)
        );
        (add_p50, add_p99) = (p50, p99);
    }
    let m_end = print_mem("at the end");

    // Sanity: the maps hold every rule, and the full path agrees with
    // what the per-Service updates left.
    let in_maps = node.dp.services()?.len();
    ensure!(
        in_maps == total,
        "the services map holds {in_maps} rules, expected {total}"
    );
    let done = ctl.sync(&mut kube, &mut node, true)?;
    ensure!(
        done.report.unchanged == total && done.report.added.is_empty(),
        "a full update after the adds changed {} rules (expected none)",
        total - done.report.unchanged
    );
    println!("  services map: {in_maps} rules; a full update after the adds changes none");
    println!();
    let _ = std::fs::remove_dir_all(&state_dir);

    // ---- Summary.
    println!("summary (targets are goals; nothing here fails on timing)");
    println!(
        "  +1 Service p50 / p99 (event -> maps) {:>9} / {}   target p99 < {}  (kube-proxy nftables ~141 ms at this size)  {}",
        ms(add_p50),
        ms(add_p99),
        ms(TARGET_ADD_P99),
        verdict(add_p99 < TARGET_ADD_P99)
    );
    println!(
        "  full resync after restart          {:>12}   target < {}  {}",
        secs(resync.total()),
        secs(TARGET_RESYNC),
        verdict(resync.total() < TARGET_RESYNC)
    );
    println!(
        "    of which read_installed+adopt+update {:>8}",
        secs(resync.sink)
    );
    println!(
        "  from-scratch load of {n:<6}        {:>12}   target < {}  {}",
        secs(scratch.total()),
        secs(TARGET_RESYNC),
        verdict(scratch.total() < TARGET_RESYNC)
    );
    println!(
        "    of which the agent's full update  {:>10}",
        secs(scratch.sink)
    );
    println!(
        "  RSS after loading                  {:>12}   target < {}  {}",
        mib(m_loaded.rss),
        mib(TARGET_RSS_KIB),
        verdict(m_loaded.rss < TARGET_RSS_KIB)
    );
    println!(
        "    RSS: at start {}; +objects {}; +datapath load {}; +controller state and rules {}",
        mib(m_start.rss),
        mib(m_objects.rss.saturating_sub(m_start.rss)),
        mib(m_dp.rss.saturating_sub(m_objects.rss)),
        mib(m_loaded.rss.saturating_sub(m_dp.rss))
    );
    println!(
        "    live heap: objects {}; datapath {}; controller (IPAM, committed rules) {}; agent rules {}",
        mib(m_objects.live.saturating_sub(m_start.live)),
        mib(m_dp.live.saturating_sub(m_objects.live)),
        mib(m_ctl.live.saturating_sub(m_dp.live)),
        mib(m_loaded.live.saturating_sub(m_ctl.live))
    );
    println!(
        "    (at the end RSS {}, peak VmHWM {} {}; BPF maps are kernel memory, not counted)",
        mib(m_end.rss),
        mib(m_end.hwm),
        verdict(m_end.hwm < TARGET_RSS_KIB)
    );
    let vip = ctl
        .rec
        .rule_update(false)
        .all()
        .map(|r| r.rule.vip)
        .max()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    println!("  (highest VIP allocated: {vip})");
    Ok(())
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench_kube: {e:#}\n{USAGE}");
            exit(2);
        }
    };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "bench_kube: needs root (it loads the BPF datapath and writes its maps); \
             run it as root, e.g. `sudo ./target/release/bench_kube`"
        );
        exit(2);
    }
    if let Err(e) = run(&opts) {
        eprintln!("bench_kube: {e:#}");
        exit(1);
    }
}

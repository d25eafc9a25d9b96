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
//!    EndpointSlice + Nodes -> `LbRule`s);
//! 3. collect: the rules committed into a real
//!    `kube_watch::reconcile::Reconciler`, handed over as the controller
//!    does (`Reconciler::rule_update`) and copied into one list, which is
//!    what the default `RuleSink::update` passes to `RuleSink::apply` (the
//!    agent's `KubeSink` implements only `apply`); the update also carries
//!    the one changed Service, checked here, and the time a per-Service
//!    sink would spend on it (`RuleUpdate::changed` + `to_rule`) is printed
//!    apart;
//! 4. to_rule: `loxilb_agent::kube_rules::to_rule` on every rule of that list
//!    (what `KubeSink::apply` does);
//! 5. apply: `loxilb_agent::rules::Rules::apply` into
//!    `loxilb_agent::datapath::Datapath::load(None)` (private maps, nothing
//!    attached).
//!
//! Not included: the API server round trips (record annotation, status),
//! health-probe target updates and BGP (monitor is off, no speaker).
//!
//! Figures:
//! - (a) +1 Service: 100 Services added one at a time on top of 10,000,
//!   p50/p99/max of each stage and of the total;
//! - (b) full resync after an agent restart: IPAM rebuilt from the recorded
//!   allocations, every Service translated again, `read_installed` +
//!   `Rules::adopt` + `apply` (all rules unchanged); and the from-scratch
//!   load of all 10,000 into empty maps;
//! - (c) the process RSS (VmRSS, VmHWM). BPF maps live in kernel memory
//!   and are not part of it.
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
    translate::{
        alloc_request, parse_annotations, service_key, translate, LbRule, SERVICE_NAME_LABEL,
    },
};
use loxilb_agent::{config::Rule, datapath::Datapath, kube_rules::to_rule, rules::Rules};

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
    collect: Duration,
    to_rule: Duration,
    apply: Duration,
    /// Not part of the path today: what a per-Service sink would do
    /// instead of collect + to_rule (`RuleUpdate::changed` + `to_rule`).
    delta: Duration,
}

/// Picks one figure out of a sample.
type StageFn<'a> = &'a dyn Fn(&Stages) -> Duration;

impl Stages {
    fn total(&self) -> Duration {
        self.alloc + self.translate + self.collect + self.to_rule + self.apply
    }
}

impl Controller {
    fn new(config: KubeConfig) -> Result<Self> {
        let ipam = config.ipam().map_err(|e| anyhow::anyhow!("{e}"))?;
        let rec = Reconciler::new(config.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Controller { config, ipam, rec })
    }

    /// Steps 1 and 2 for one Service: allocation, then its rules
    /// (committed). Returns (alloc time, translate time).
    fn on_service(
        &mut self,
        svc: &Service,
        slice: &EndpointSlice,
        nodes: &[Node],
    ) -> Result<(Duration, Duration)> {
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
            tr.rules.len() == 1 && tr.rules[0].endpoints.len() == EPS_PER_SERVICE as usize,
            "{}: expected 1 rule with {EPS_PER_SERVICE} endpoints, got {:?}",
            req.service,
            tr.rules
        );
        self.rec.commit(&service_key(svc)?, tr.rules);
        Ok((t1 - t0, t2 - t1))
    }

    /// Steps 3 and 4: every committed rule, as agent rules.
    fn agent_rules(&self) -> Result<(Vec<Rule>, Duration, Duration)> {
        let t0 = Instant::now();
        let all: Vec<LbRule> = self.rec.rule_update(false).all().cloned().collect();
        let t1 = Instant::now();
        let out = all
            .iter()
            .map(to_rule)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let t2 = Instant::now();
        Ok((out, t1 - t0, t2 - t1))
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

fn print_mem(when: &str) -> (u64, u64) {
    let (rss, hwm) = mem_kib();
    println!("  memory {when}: VmRSS {}, VmHWM {}", mib(rss), mib(hwm));
    (rss, hwm)
}

// ---------------------------------------------------------------------------

fn run(o: &Opts) -> Result<()> {
    let n = o.services;
    let total = n + o.adds;
    println!(
        "bench_kube: {n} Services x 1 port x {EPS_PER_SERVICE} pod endpoints \
         (loxilb.io/usepodnetwork: yes), {} adds, pool {POOL}, {} CPUs",
        o.adds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    let (rss_start, _) = print_mem("at start");

    let t = Instant::now();
    let services: Vec<Service> = (0..total).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..total).map(endpoint_slice).collect();
    let nodes: Vec<Node> = (0..NODES).map(node).collect();
    println!(
        "objects: {total} Services + {total} EndpointSlices built in memory in {}",
        ms(t.elapsed())
    );
    let (rss_objects, _) = print_mem("with the objects");

    let config = KubeConfig {
        cidr_pools: parse_cidr_pools(POOL).map_err(|e| anyhow::anyhow!("{e}"))?,
        ..KubeConfig::default()
    };

    let t = Instant::now();
    let mut dp = Datapath::load(None).context("loading the datapath (private maps)")?;
    println!("datapath: loaded (private maps) in {}", ms(t.elapsed()));
    let (rss_dp, _) = print_mem("with the datapath loaded");
    println!();

    // ---- (b2) From scratch: all N Services into empty maps.
    println!("(b) from scratch: {n} Services into empty maps");
    let mut ctl = Controller::new(config.clone())?;
    let mut st = Stages::default();
    for i in 0..n {
        let (a, tr) = ctl.on_service(&services[i], &slices[i], &nodes)?;
        st.alloc += a;
        st.translate += tr;
    }
    let (all, c, tr) = ctl.agent_rules()?;
    st.collect = c;
    st.to_rule = tr;
    ctl.rec.rules_synced();
    let mut rules = Rules::adopt(vec![]);
    let t = Instant::now();
    let rep = rules.apply(&all, &mut dp)?;
    st.apply = t.elapsed();
    ensure!(
        rep.added.len() == n && rep.unchanged == 0,
        "from scratch: {} added, {} unchanged (expected {n} added)",
        rep.added.len(),
        rep.unchanged
    );
    let scratch = st;
    println!(
        "  alloc {}  translate {}  collect {}  to_rule {}  apply {}  => total {}",
        secs(st.alloc),
        secs(st.translate),
        secs(st.collect),
        secs(st.to_rule),
        secs(st.apply),
        secs(st.total())
    );
    let n_eps: usize = all.iter().map(|r| r.endpoints.len()).sum();
    println!(
        "  {} rules, {n_eps} endpoints written ({:.1} us per rule in apply)",
        all.len(),
        st.apply.as_secs_f64() * 1e6 / all.len().max(1) as f64
    );
    let (rss_loaded, _) = print_mem("after loading");
    println!();

    // ---- (b1) Full resync after an agent restart.
    println!("(b) full resync after an agent restart: {n} Services, nothing changed");
    let records: Vec<_> = ctl
        .ipam
        .allocations()
        .map(|a| (a.service.clone(), a.record()))
        .collect();
    drop(rules);
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
        let (a, tr) = ctl.on_service(&services[i], &slices[i], &nodes)?;
        st.alloc += a;
        st.translate += tr;
    }
    let (all, c, tr) = ctl.agent_rules()?;
    st.collect = c;
    st.to_rule = tr;
    ctl.rec.rules_synced();
    let t = Instant::now();
    let installed = dp.read_installed()?;
    let read = t.elapsed();
    let t = Instant::now();
    let mut rules = Rules::adopt(installed);
    let adopt = t.elapsed();
    let t = Instant::now();
    let rep = rules.apply(&all, &mut dp)?;
    let apply = t.elapsed();
    st.apply = read + adopt + apply;
    ensure!(
        rep.unchanged == n && rep.added.is_empty() && rep.updated.is_empty(),
        "resync: {} unchanged, {} added, {} updated, {} removed (expected all {n} unchanged)",
        rep.unchanged,
        rep.added.len(),
        rep.updated.len(),
        rep.removed.len()
    );
    let resync = st;
    println!(
        "  alloc (ipam rebuild {} + ensure) {}  translate {}  collect {}  to_rule {}",
        ms(rebuild),
        secs(st.alloc),
        secs(st.translate),
        secs(st.collect),
        secs(st.to_rule)
    );
    println!(
        "  read_installed {}  adopt {}  apply {} ({} unchanged)",
        secs(read),
        secs(adopt),
        secs(apply),
        rep.unchanged
    );
    println!(
        "  => datapath side (read_installed + adopt + apply) {}; total with translation {}",
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
        let (a, tr) = ctl.on_service(&services[i], &slices[i], &nodes)?;
        s.alloc = a;
        s.translate = tr;
        let (all, c, tr) = ctl.agent_rules()?;
        s.collect = c;
        s.to_rule = tr;
        let t = Instant::now();
        let update = ctl.rec.rule_update(false);
        let changed = update
            .changed()
            .flat_map(|(_, rules)| rules.iter().map(to_rule))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.delta = t.elapsed();
        ensure!(
            update.changed().count() == 1 && changed.len() == 1,
            "add {i}: the update carries {} changed Services ({} rules), expected 1",
            update.changed().count(),
            changed.len()
        );
        ctl.rec.rules_synced();
        let t = Instant::now();
        let rep = rules.apply(&all, &mut dp)?;
        s.apply = t.elapsed();
        ensure!(
            rep.added.len() == 1 && rep.unchanged == i && rep.updated.is_empty(),
            "add {i}: {} added, {} unchanged, {} updated",
            rep.added.len(),
            rep.unchanged,
            rep.updated.len()
        );
        samples.push(s);
    }
    let dist = |f: &dyn Fn(&Stages) -> Duration| {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort();
        (pct(&v, 50.0), pct(&v, 99.0), *v.last().expect("samples"))
    };
    let rows: [(&str, StageFn); 6] = [
        ("alloc (parse + request + ensure)", &|s| s.alloc),
        ("translate", &|s| s.translate),
        ("collect all LbRules (clone)", &|s| s.collect),
        ("to_rule, all rules", &|s| s.to_rule),
        ("Rules::apply (real maps)", &|s| s.apply),
        ("TOTAL", &|s| s.total()),
    ];
    let no_copy = |s: &Stages| s.total() - s.collect;
    println!(
        "  {:<34} {:>12} {:>12} {:>12}",
        "stage", "p50", "p99", "max"
    );
    let mut add_p99 = Duration::ZERO;
    for (name, f) in rows {
        let (p50, p99, max) = dist(f);
        println!(
            "  {name:<34} {:>12} {:>12} {:>12}",
            ms(p50),
            ms(p99),
            ms(max)
        );
        add_p99 = p99;
    }
    let (d50, d99, dmax) = dist(&|s| s.delta);
    println!(
        "  {:<34} {:>12} {:>12} {:>12}",
        "(per-Service: changed + to_rule)",
        ms(d50),
        ms(d99),
        ms(dmax)
    );
    let (n50, n99, nmax) = dist(&no_copy);
    println!(
        "  {:<34} {:>12} {:>12} {:>12}",
        "(TOTAL without the copy)",
        ms(n50),
        ms(n99),
        ms(nmax)
    );
    let (rss_end, hwm_end) = print_mem("at the end");

    // Sanity: the maps hold every rule.
    let in_maps = dp.services()?.len();
    ensure!(
        in_maps == total,
        "the services map holds {in_maps} rules, expected {total}"
    );
    println!("  services map: {in_maps} rules");
    println!();

    // ---- Summary.
    println!("summary (targets are goals; nothing here fails on timing)");
    println!(
        "  +1 Service p99 (event -> maps)     {:>12}   target < {}  (kube-proxy nftables ~141 ms at this size)  {}",
        ms(add_p99),
        ms(TARGET_ADD_P99),
        verdict(add_p99 < TARGET_ADD_P99)
    );
    println!(
        "    without the copy of every rule     {:>12}   (an agent sink taking RuleUpdate by reference)  {}",
        ms(n99),
        verdict(n99 < TARGET_ADD_P99)
    );
    println!(
        "  full resync after restart          {:>12}   target < {}  {}",
        secs(resync.total()),
        secs(TARGET_RESYNC),
        verdict(resync.total() < TARGET_RESYNC)
    );
    println!(
        "    of which read_installed+adopt+apply {:>9}",
        secs(resync.apply)
    );
    println!(
        "  from-scratch load of {n:<6}        {:>12}   target < {}  {}",
        secs(scratch.total()),
        secs(TARGET_RESYNC),
        verdict(scratch.total() < TARGET_RESYNC)
    );
    let scratch_dp = scratch.collect + scratch.to_rule + scratch.apply;
    println!(
        "    without IPAM allocation            {:>12}   target < {}  {}",
        secs(scratch.total() - scratch.alloc),
        secs(TARGET_RESYNC),
        verdict(scratch.total() - scratch.alloc < TARGET_RESYNC)
    );
    println!(
        "    of which collect+to_rule+apply     {:>9}",
        secs(scratch_dp)
    );
    println!(
        "  RSS after loading                  {:>12}   target < {}  {}",
        mib(rss_loaded),
        mib(TARGET_RSS_KIB),
        verdict(rss_loaded < TARGET_RSS_KIB)
    );
    println!(
        "    (at start {}; +objects {}; +datapath load {}; +controller state and rules {})",
        mib(rss_start),
        mib(rss_objects.saturating_sub(rss_start)),
        mib(rss_dp.saturating_sub(rss_objects)),
        mib(rss_loaded.saturating_sub(rss_dp))
    );
    println!(
        "    (at the end RSS {}, peak VmHWM {} {}; BPF maps are kernel memory, not counted)",
        mib(rss_end),
        mib(hwm_end),
        verdict(hwm_end < TARGET_RSS_KIB)
    );
    let vip = ctl
        .rec
        .rule_update(false)
        .all()
        .map(|r| r.vip)
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

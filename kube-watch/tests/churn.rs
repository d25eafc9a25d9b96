//! Churn: randomised create / update / delete of Services and
//! EndpointSlices (a seeded PRNG) against the whole controller
//! ([`kube_watch::controller::run_observed`]) and the in-memory API server
//! (`fake_api`). After every `CHECK_EVERY` operations, and at the end, the
//! operations pause until the controller has caught up, and then:
//!
//! - no leaked address: the allocation table holds exactly the live
//!   LoadBalancer Services of our class that have an address, and each
//!   allocation is what the Service's record and status say;
//! - no double allocation: two Services share an address only with
//!   disjoint (port, protocol) pairs (shared mode, see `ipam.rs`), and
//!   every address is in the pool;
//! - no Service waits for an address while the pool has one its ports fit;
//! - no rule in the sink for a Service deleted or no longer ours, and every
//!   live Service's rules are its ports at its VIP with the ready
//!   endpoints of its EndpointSlices now;
//! - no Service stuck in deletion (the finalizer is removed).
//!
//! `CHURN_OPS` (default 10,000), `CHURN_SEED` (default 17) and
//! `CHURN_CHECK_EVERY` (default 1,000) change the run. The summary line is
//! printed (`cargo test -p kube-watch --test churn -- --nocapture`).

mod fake_api;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fake_api::{FakeApi, Running};
use kube_watch::{
    controller::{run_observed, Applied, RuleSink, RunConfig},
    flags::{parse_cidr_pools, KubeConfig},
    ipam::Allocation,
    leader::LeaseConfig,
    translate::ServiceRule,
};
use serde_json::{json, Value};

const CLASS: &str = "loxilb.io/loxilb";
const NS: &str = "churn";
/// 192.0.2.1 to .6: small enough that the pool runs out now and then.
const POOL: &str = "defaultPool=192.0.2.0/29";
const POOL_IPS: std::ops::RangeInclusive<u8> = 1..=6;
const SERVICES: usize = 30;
/// (port, protocol) a Service port is drawn from.
const PORTS: [(u16, &str); 4] = [(80, "TCP"), (443, "TCP"), (53, "UDP"), (8080, "TCP")];
const MODES: [&str; 3] = ["default", "onearm", "fullnat"];

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number")),
        Err(_) => default,
    }
}

/// splitmix64: small, seeded, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The datapath: the rule set last applied.
#[derive(Clone, Default)]
struct Sink {
    rules: Arc<Mutex<Vec<ServiceRule>>>,
    vips: Arc<Mutex<Vec<IpAddr>>>,
}

impl RuleSink for Sink {
    fn apply(&mut self, rules: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        *self.rules.lock().unwrap() = rules;
        Ok(Applied::all())
    }
    fn own_vips(&mut self, vips: Vec<IpAddr>) -> anyhow::Result<()> {
        *self.vips.lock().unwrap() = vips;
        Ok(())
    }
}

/// What the controller's allocation table held after its last round.
#[derive(Clone, Default)]
struct Observed {
    allocations: Arc<Mutex<Vec<Allocation>>>,
    rounds: Arc<Mutex<u64>>,
    stats: Arc<Mutex<kube_watch::reconcile::ReconcileStats>>,
}

fn svc_name(i: usize) -> String {
    format!("s{i:02}")
}

/// A Service spec and its user annotations, drawn at random: 1 or 2
/// ports, mostly a LoadBalancer of our class.
fn random_service(rng: &mut Rng) -> (Value, BTreeMap<String, Value>) {
    let n = 1 + rng.below(2) as usize;
    let mut picked: Vec<(u16, &str)> = Vec::new();
    while picked.len() < n {
        let p = PORTS[rng.below(PORTS.len() as u64) as usize];
        if !picked.contains(&p) {
            picked.push(p);
        }
    }
    let ports: Vec<Value> = picked
        .iter()
        .enumerate()
        .map(|(i, (port, proto))| {
            json!({"name": format!("p{i}"), "port": port, "targetPort": 9000 + i,
                   "protocol": proto})
        })
        .collect();
    let type_ = if rng.chance(90) {
        "LoadBalancer"
    } else {
        "ClusterIP"
    };
    let class = if rng.chance(90) { CLASS } else { "other.io/lb" };
    let spec = json!({"type": type_, "loadBalancerClass": class, "ports": ports});
    let mut ann = BTreeMap::new();
    ann.insert("loxilb.io/usepodnetwork".to_string(), json!("yes"));
    if rng.chance(40) {
        let m = MODES[rng.below(MODES.len() as u64) as usize];
        ann.insert("loxilb.io/lbmode".to_string(), json!(m));
    }
    if rng.chance(20) {
        ann.insert(
            "loxilb.io/timeout".to_string(),
            json!((1 + rng.below(3600)).to_string()),
        );
    }
    (spec, ann)
}

/// The user's annotation keys (the others are the agent's or nobody's).
const USER_KEYS: [&str; 3] = [
    "loxilb.io/usepodnetwork",
    "loxilb.io/lbmode",
    "loxilb.io/timeout",
];

fn random_slice(rng: &mut Rng, svc: &str, slice: &str) -> Value {
    let ports: Vec<Value> = (0..2)
        .map(|i| {
            let proto = if rng.chance(75) { "TCP" } else { "UDP" };
            json!({"name": format!("p{i}"), "port": 9000 + i, "protocol": proto})
        })
        .collect();
    let endpoints: Vec<Value> = (0..rng.below(5))
        .map(|_| {
            // A small address space: the same pod in two slices happens.
            let ip = format!("10.244.0.{}", 1 + rng.below(24));
            match rng.below(10) {
                0 => json!({"addresses": [ip], "conditions": {"ready": false}}),
                1 => json!({"addresses": [ip]}),
                _ => json!({"addresses": [ip], "conditions": {"ready": true}}),
            }
        })
        .collect();
    json!({
        "metadata": {"namespace": NS, "name": slice,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

#[derive(Default, Debug)]
struct Counts {
    creates: u64,
    updates: u64,
    deletes: u64,
}

/// One random operation on the cluster, as a user or another controller
/// would do it.
fn operate(api: &FakeApi, rng: &mut Rng, counts: &mut Counts) {
    let i = rng.below(SERVICES as u64) as usize;
    let name = svc_name(i);
    let cur = api.with(|s| s.get("services", NS, &name));
    // A Service being deleted waits for the agent (its finalizer): its
    // EndpointSlices change instead.
    let deleting = cur
        .as_ref()
        .is_some_and(|s| s["metadata"].get("deletionTimestamp").is_some());
    if rng.chance(50) && !deleting {
        match cur {
            None => {
                let (spec, ann) = random_service(rng);
                api.with(|s| {
                    s.put(
                        "services",
                        json!({"metadata": {"namespace": NS, "name": name, "generation": 1,
                                            "annotations": ann},
                               "spec": spec}),
                    )
                });
                counts.creates += 1;
            }
            Some(_) if rng.chance(30) => {
                api.with(|s| s.delete("services", NS, &name));
                counts.deletes += 1;
            }
            Some(_) => {
                let (spec, ann) = random_service(rng);
                let what = rng.below(3);
                api.with(|s| {
                    s.edit("services", NS, &name, |o| {
                        if what != 1 {
                            o["spec"] = spec;
                            let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                            o["metadata"]["generation"] = json!(g + 1);
                        }
                        if what != 0 {
                            let a = o["metadata"]["annotations"]
                                .as_object_mut()
                                .expect("annotations");
                            for k in USER_KEYS {
                                a.remove(k);
                            }
                            for (k, v) in ann {
                                a.insert(k, v);
                            }
                        }
                    })
                });
                counts.updates += 1;
            }
        }
    } else {
        let slice = format!("{name}-e{}", rng.below(2));
        let exists = api.with(|s| s.get("endpointslices", NS, &slice).is_some());
        if !exists {
            let v = random_slice(rng, &name, &slice);
            api.with(|s| s.put("endpointslices", v));
            counts.creates += 1;
        } else if rng.chance(30) {
            api.with(|s| s.delete_now("endpointslices", NS, &slice));
            counts.deletes += 1;
        } else {
            let v = random_slice(rng, &name, &slice);
            api.with(|s| s.put("endpointslices", v));
            counts.updates += 1;
        }
    }
}

fn ours(svc: &Value) -> bool {
    svc["spec"]["type"] == "LoadBalancer"
        && svc["spec"]["loadBalancerClass"] == CLASS
        && svc["metadata"].get("deletionTimestamp").is_none()
}

fn port_set(svc: &Value) -> BTreeSet<(u16, String)> {
    svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap() as u16,
                p["protocol"].as_str().unwrap().to_ascii_lowercase(),
            )
        })
        .collect()
}

/// The ready endpoints of `svc`'s port `name`/`proto` in its slices, as
/// (ip, port), sorted and without duplicates.
fn expected_endpoints(
    slices: &[Value],
    svc: &str,
    port_name: &str,
    proto: &str,
) -> Vec<(IpAddr, u16)> {
    let mut out = BTreeSet::new();
    for sl in slices {
        if sl["metadata"]["namespace"] != NS
            || sl["metadata"]["labels"]["kubernetes.io/service-name"] != svc
            || sl["addressType"] != "IPv4"
        {
            continue;
        }
        let Some(target) = sl["ports"].as_array().unwrap().iter().find_map(|p| {
            (p["name"] == port_name && p["protocol"] == proto).then(|| p["port"].as_u64().unwrap())
        }) else {
            continue;
        };
        for ep in sl["endpoints"].as_array().unwrap() {
            if ep["conditions"]["ready"] == json!(false) {
                continue;
            }
            let ip: IpAddr = ep["addresses"][0].as_str().unwrap().parse().unwrap();
            out.insert((ip, target as u16));
        }
    }
    out.into_iter().collect()
}

fn record_ip(svc: &Value) -> Option<IpAddr> {
    let rec = svc["metadata"]["annotations"]["loxilb.io/allocated"].as_str()?;
    let ips = rec.split(';').next()?.strip_prefix("ips=")?;
    ips.parse().ok()
}

fn ingress(svc: &Value) -> Vec<IpAddr> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["ip"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What one check found.
#[derive(Default, Debug)]
struct Found {
    live: usize,
    allocated: usize,
    pending: usize,
    /// Keeping their address for their previous ports.
    stuck: usize,
    rules: usize,
}

/// Every invariant of the module doc, on the API's objects, the sink and
/// the allocation table now; the first one broken, described.
fn check(api: &FakeApi, sink: &Sink, obs: &Observed) -> Result<Found, String> {
    let (services, slices) = api.with(|s| (s.all("services"), s.all("endpointslices")));
    let allocations = obs.allocations.lock().unwrap().clone();
    let rules = sink.rules.lock().unwrap().clone();
    let owned: BTreeSet<IpAddr> = sink.vips.lock().unwrap().iter().copied().collect();
    let mut found = Found::default();

    if let Some(s) = services
        .iter()
        .find(|s| s["metadata"].get("deletionTimestamp").is_some())
    {
        return Err(format!(
            "{} is still being deleted (finalizers {})",
            s["metadata"]["name"], s["metadata"]["finalizers"]
        ));
    }
    let live: BTreeMap<String, &Value> = services
        .iter()
        .filter(|s| ours(s))
        .map(|s| (s["metadata"]["name"].as_str().unwrap().to_string(), s))
        .collect();
    found.live = live.len();

    // The allocation table against the live Services.
    let mut by_service: BTreeMap<String, &Allocation> = BTreeMap::new();
    for a in &allocations {
        let name = &a.service.name;
        if a.service.namespace != NS || !live.contains_key(name) {
            return Err(format!(
                "leaked: {} holds {:?} but is not a live Service of ours",
                a.service, a.vips
            ));
        }
        if a.vips.len() != 1 || !a.secondary.is_empty() {
            return Err(format!("{}: unexpected allocation {a:?}", a.service));
        }
        let ip = a.vips[0].ip;
        let IpAddr::V4(v4) = ip else {
            return Err(format!("{}: {ip} is not IPv4", a.service));
        };
        let o = v4.octets();
        if o[..3] != [192, 0, 2] || !POOL_IPS.contains(&o[3]) {
            return Err(format!("{}: {ip} is outside the pool", a.service));
        }
        by_service.insert(name.clone(), a);
    }
    found.allocated = by_service.len();

    // Sharing: one address, disjoint (port, protocol) pairs.
    let mut by_ip: BTreeMap<IpAddr, Vec<&Allocation>> = BTreeMap::new();
    for a in by_service.values() {
        by_ip.entry(a.vips[0].ip).or_default().push(a);
    }
    for (ip, users) in &by_ip {
        for (i, a) in users.iter().enumerate() {
            for b in &users[..i] {
                if let Some(p) = a.ports.intersection(&b.ports).next() {
                    return Err(format!(
                        "double allocation: {ip} given to {} and {}, both with {p}",
                        a.service, b.service
                    ));
                }
            }
        }
    }

    // Services whose allocation is for their previous ports.
    let mut stuck = BTreeSet::new();
    for (name, svc) in &live {
        let want_ports = port_set(svc);
        match by_service.get(name) {
            Some(a) => {
                let ip = a.vips[0].ip;
                let ports: BTreeSet<(u16, String)> = a
                    .ports
                    .iter()
                    .map(|p| (p.port, p.protocol.as_str().to_string()))
                    .collect();
                if ports != want_ports {
                    // Its ports changed to ones another Service holds on
                    // its address: it keeps its address and its previous
                    // ports (an address is not moved under its clients;
                    // see ipam.rs), and is told so, until they are free.
                    found.stuck += 1;
                    stuck.insert(name.clone());
                    let others: BTreeSet<(u16, String)> = by_ip[&ip]
                        .iter()
                        .filter(|o| o.service.name != *name)
                        .flat_map(|o| {
                            o.ports
                                .iter()
                                .map(|p| (p.port, p.protocol.as_str().to_string()))
                        })
                        .collect();
                    if others.is_disjoint(&want_ports) {
                        return Err(format!(
                            "{name}: allocated {ip} for {ports:?}, its ports are {want_ports:?}, \
                             which are free there"
                        ));
                    }
                }
                if record_ip(svc) != Some(ip) {
                    return Err(format!(
                        "{name}: allocated {ip}, recorded {:?}",
                        svc["metadata"]["annotations"]["loxilb.io/allocated"]
                    ));
                }
                if ingress(svc) != [ip] {
                    return Err(format!(
                        "{name}: allocated {ip}, status says {:?}",
                        ingress(svc)
                    ));
                }
            }
            None => {
                found.pending += 1;
                if record_ip(svc).is_some() || !ingress(svc).is_empty() {
                    return Err(format!(
                        "{name}: no allocation, yet recorded {:?} with status {:?}",
                        record_ip(svc),
                        ingress(svc)
                    ));
                }
                no_room(name, &want_ports, &by_ip)?;
            }
        }
    }

    // The sink: rules of live, allocated Services only, and exactly theirs.
    let mut rules_of: BTreeMap<String, Vec<&ServiceRule>> = BTreeMap::new();
    for r in &rules {
        if r.service.namespace != NS || !by_service.contains_key(&r.service.name) {
            return Err(format!(
                "stale rule {} for {}, which is not a live allocated Service of ours",
                r.rule.name, r.service
            ));
        }
        rules_of.entry(r.service.name.clone()).or_default().push(r);
    }
    found.rules = rules.len();
    for (name, a) in &by_service {
        let svc = live[name];
        let vip = a.vips[0].ip;
        if stuck.contains(name) {
            // Its last rules stay, at its address, for ports it holds.
            for r in rules_of.get(name).into_iter().flatten() {
                let held = a
                    .ports
                    .iter()
                    .any(|p| p.port == r.rule.port && p.protocol == r.rule.protocol);
                if r.rule.vip != vip || !held {
                    return Err(format!(
                        "{name}: rule {} is not for its allocation {a:?}",
                        r.rule.name
                    ));
                }
            }
            continue;
        }
        let mode = svc["metadata"]["annotations"]["loxilb.io/lbmode"]
            .as_str()
            .unwrap_or("default");
        let mut want: Vec<String> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let proto = p["protocol"].as_str().unwrap();
                let eps = expected_endpoints(&slices, name, p["name"].as_str().unwrap(), proto);
                format!(
                    "{vip}:{}/{} {mode} {eps:?}",
                    p["port"],
                    proto.to_ascii_lowercase()
                )
            })
            .collect();
        let mut have: Vec<String> = rules_of
            .get(name)
            .into_iter()
            .flatten()
            .map(|r| {
                let eps: Vec<(IpAddr, u16)> =
                    r.rule.endpoints.iter().map(|e| (e.ip, e.port)).collect();
                format!(
                    "{}:{}/{} {} {eps:?}",
                    r.rule.vip, r.rule.port, r.rule.protocol, r.rule.mode
                )
            })
            .collect();
        want.sort();
        have.sort();
        if want != have {
            return Err(format!("{name}: rules {have:?}, expected {want:?}"));
        }
    }
    let rule_vips: BTreeSet<IpAddr> = rules.iter().map(|r| r.rule.vip).collect();
    if owned != rule_vips {
        return Err(format!(
            "owned VIPs {owned:?}, the rules' VIPs {rule_vips:?}"
        ));
    }
    Ok(found)
}

/// A Service that waits for an address does so only when no pool address
/// has `want` free: the addresses' users hold one of its pairs on each.
fn no_room(
    name: &str,
    want: &BTreeSet<(u16, String)>,
    by_ip: &BTreeMap<IpAddr, Vec<&Allocation>>,
) -> Result<(), String> {
    for last in POOL_IPS {
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, last));
        let taken: BTreeSet<(u16, String)> = by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(|a| a.service.name != name)
            .flat_map(|a| {
                a.ports
                    .iter()
                    .map(|p| (p.port, p.protocol.as_str().to_string()))
            })
            .collect();
        if taken.is_disjoint(want) {
            return Err(format!(
                "{name} waits for an address for {want:?}, but {ip} has those free"
            ));
        }
    }
    Ok(())
}

/// Wait (at most `limit`) until [`check`] passes; the last failure if not.
async fn settled(
    api: &FakeApi,
    sink: &Sink,
    obs: &Observed,
    limit: Duration,
) -> Result<Found, String> {
    let deadline = Instant::now() + limit;
    loop {
        match check(api, sink, obs) {
            Ok(f) => return Ok(f),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_services_and_endpoint_slices_leaks_nothing() {
    let ops = env_or("CHURN_OPS", 10_000);
    let seed = env_or("CHURN_SEED", 17);
    let every = env_or("CHURN_CHECK_EVERY", 1_000).max(1);
    let api = FakeApi::new();
    let kube = KubeConfig {
        cidr_pools: parse_cidr_pools(POOL).unwrap(),
        use_pod_network: true,
        ..KubeConfig::default()
    };
    let mut lease = LeaseConfig::new("kube-system", "agent-a");
    lease.lease_duration = Duration::from_secs(3);
    lease.renew_deadline = Duration::from_secs(2);
    lease.retry_period = Duration::from_millis(200);
    let mut config = RunConfig::new(kube, lease);
    config.retry_min = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(200);
    let sink = Sink::default();
    let obs = Observed::default();
    let client = api.client("agent-a");
    let (s, o) = (sink.clone(), obs.clone());
    let agent = Running::spawn(move |shutdown| {
        run_observed(client, config, s, shutdown, move |r| {
            *o.allocations.lock().unwrap() = r.ipam().allocations().cloned().collect();
            *o.rounds.lock().unwrap() += 1;
            *o.stats.lock().unwrap() = r.stats().clone();
        })
    });
    fake_api::until("agent-a leads", || {
        api.with(|s| s.get("leases", "kube-system", "loxilb-agent"))
            .is_some_and(|l| l["spec"]["holderIdentity"] == "agent-a")
    })
    .await;

    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut counts = Counts::default();
    let mut checks = 0u64;
    let mut most_live = 0usize;
    let mut most_pending = 0usize;
    let mut most_stuck = 0usize;
    for n in 1..=ops {
        operate(&api, &mut rng, &mut counts);
        // Let the controller interleave: sometimes it sees every step,
        // sometimes a burst at once.
        match rng.below(20) {
            0 => tokio::time::sleep(Duration::from_millis(2)).await,
            1..=9 => tokio::task::yield_now().await,
            _ => {}
        }
        if n % every == 0 || n == ops {
            let f = settled(&api, &sink, &obs, Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| {
                    let who = e.split([' ', ':']).next().unwrap_or("");
                    let (svc, events) = api.with(|s| {
                        (
                            s.get("services", NS, who),
                            s.all("events")
                                .into_iter()
                                .filter(|v| v["regarding"]["name"] == who)
                                .map(|v| format!("{} {}: {}", v["type"], v["reason"], v["note"]))
                                .collect::<Vec<_>>(),
                        )
                    });
                    panic!(
                        "after {n} operations (seed {seed}): {e}\n{who}: {}\nits Events:\n{}",
                        svc.map(|v| v.to_string()).unwrap_or_default(),
                        events.join("\n")
                    );
                });
            checks += 1;
            most_live = most_live.max(f.live);
            most_pending = most_pending.max(f.pending);
            most_stuck = most_stuck.max(f.stuck);
        }
    }
    let elapsed = started.elapsed();
    let rounds = *obs.rounds.lock().unwrap();
    let stats = obs.stats.lock().unwrap().clone();
    agent.stop("the controller").await;
    println!(
        "churn: {ops} ops ({} creates, {} updates, {} deletes) on {SERVICES} Services and their \
         EndpointSlices, seed {seed}; {checks} checks: 0 leaked IPs, 0 double allocations, 0 \
         stale rules, every live Service's rules match its endpoints (up to {most_live} live, \
         {most_pending} waiting for an address, {most_stuck} keeping theirs for their previous \
         ports); {rounds} controller rounds, {} reconciles ({} conflicts, {} errors, {} datapath \
         errors, {:.2} s in them); {:.1} s",
        counts.creates,
        counts.updates,
        counts.deletes,
        stats.reconciles,
        stats.conflicts,
        stats.errors,
        stats.sink_errors,
        stats.seconds,
        elapsed.as_secs_f64()
    );
    assert_eq!(counts.creates + counts.updates + counts.deletes, ops);
    assert!(checks >= ops / every, "{checks} checks");
    // Every operation touches a Service: each was reconciled at least
    // once (bursts share a reconcile), and the in-memory API and the sink
    // never fail.
    assert!(
        stats.reconciles >= ops / 10 && stats.seconds > 0.0,
        "{stats:?}"
    );
    assert_eq!((stats.errors, stats.sink_errors), (0, 0), "{stats:?}");
}

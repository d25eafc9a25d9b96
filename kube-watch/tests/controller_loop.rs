//! The whole controller ([`kube_watch::controller::run`]) against an
//! in-memory API server (`fake_api`): real kube-runtime watchers and
//! reflectors over list + watch streams, real Lease election, real writes.
//! The tests drive the cluster like a user (create, edit, delete Services,
//! a Node going NotReady) and check what the API server and the datapath
//! (a recording [`RuleSink`]) end up with. Every request is then checked
//! against the RBAC rules of `manifest/in-cluster/loxilb.yaml`, and every
//! verb those rules grant must have been used.

mod fake_api;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_api::{
    check_field_managers, check_rbac, check_rbac_except, until, FakeApi, Logged, Running,
};
use kube_watch::{
    controller::{run, Applied, RuleSink, RunConfig},
    flags::{parse_cidr_pools, KubeConfig, VipOwners},
    groups,
    leader::LeaseConfig,
    translate::ServiceRule,
};
use loxilb_model::Mode;
use serde_json::{json, Value};

#[derive(Clone, Default)]
struct Datapath {
    rules: Arc<Mutex<Vec<ServiceRule>>>,
    vips: Arc<Mutex<Vec<IpAddr>>>,
    /// Every rule set applied, in order.
    applied: Arc<Mutex<Vec<Vec<ServiceRule>>>>,
}

impl RuleSink for Datapath {
    fn apply(&mut self, rules: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        *self.rules.lock().unwrap() = rules.clone();
        self.applied.lock().unwrap().push(rules);
        Ok(Applied::all())
    }
    fn own_vips(&mut self, vips: Vec<IpAddr>) -> anyhow::Result<()> {
        *self.vips.lock().unwrap() = vips;
        Ok(())
    }
}

impl Datapath {
    fn rules(&self) -> Vec<ServiceRule> {
        self.rules.lock().unwrap().clone()
    }
    fn rule_of(&self, svc: &str) -> Option<ServiceRule> {
        self.rules().into_iter().find(|r| r.service.name == svc)
    }
    fn vips(&self) -> Vec<String> {
        self.vips
            .lock()
            .unwrap()
            .iter()
            .map(IpAddr::to_string)
            .collect()
    }
}

struct Agent {
    datapath: Datapath,
    run: Running,
}

impl Agent {
    fn start(api: &FakeApi, identity: &str, pools: &str) -> Agent {
        Self::start_as(api, identity, pools, VipOwners::Leader)
    }

    fn start_as(api: &FakeApi, identity: &str, pools: &str, vip_owners: VipOwners) -> Agent {
        let kube = KubeConfig {
            cidr_pools: parse_cidr_pools(pools).unwrap(),
            vip_owners,
            ..KubeConfig::default()
        };
        let mut lease = LeaseConfig::new("kube-system", identity);
        lease.lease_duration = Duration::from_secs(3);
        lease.renew_deadline = Duration::from_secs(2);
        lease.retry_period = Duration::from_millis(200);
        let mut config = RunConfig::new(kube, lease);
        config.retry_min = Duration::from_millis(50);
        config.retry_max = Duration::from_millis(500);
        let datapath = Datapath::default();
        let client = api.client(identity);
        let sink = datapath.clone();
        let run = Running::spawn(move |shutdown| run(client, config, sink, shutdown));
        Agent { datapath, run }
    }

    async fn stop(self) {
        self.run.stop("the controller").await;
    }
}

fn service(name: &str, port: u16, annotations: Value) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name, "generation": 1, "annotations": annotations},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "loxilb.io/loxilb",
                 "ports": [{"name": "p", "port": port, "targetPort": 8080,
                            "nodePort": 30000 + (port % 1000), "protocol": "TCP"}]},
    })
}

fn node(name: &str, addr: &str, ready: bool) -> Value {
    json!({
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": addr}],
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

fn svc_of(api: &FakeApi, name: &str) -> Option<Value> {
    api.with(|s| s.get("services", "default", name))
}

fn record(api: &FakeApi, name: &str) -> Option<String> {
    svc_of(api, name)?["metadata"]["annotations"]["loxilb.io/allocated"]
        .as_str()
        .map(String::from)
}

fn ingress(api: &FakeApi, name: &str) -> Vec<String> {
    svc_of(api, name)
        .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i["ip"].as_str().map(String::from))
        .collect()
}

fn condition(api: &FakeApi, name: &str, type_: &str) -> Option<Value> {
    svc_of(api, name)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// (type, reason, note) of the Events about a Service.
fn events(api: &FakeApi, name: &str) -> Vec<(String, String, String)> {
    api.with(|s| s.all("events"))
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name)
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
                e["note"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has_event(api: &FakeApi, name: &str, reason: &str, note_part: &str) -> bool {
    events(api, name)
        .iter()
        .any(|(_, r, n)| r == reason && n.contains(note_part))
}

fn log(api: &FakeApi) -> Vec<Logged> {
    api.with(|s| s.log.clone())
}

fn writes_to(api: &FakeApi, path: &str) -> usize {
    log(api)
        .iter()
        .filter(|l| l.method != "GET" && l.path == path)
        .count()
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    api.with(|s| s.get("leases", "kube-system", "loxilb-agent"))
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

fn seed(api: &FakeApi) {
    api.with(|s| {
        s.put("nodes", node("n1", "10.0.0.1", true));
        s.put("nodes", node("n2", "10.0.0.2", true));
        s.put("services", service("web", 80, json!({})));
        // Not ours: never written to.
        let mut other = service("other", 80, json!({}));
        other["spec"]["loadBalancerClass"] = json!("other.io/lb");
        s.put("services", other);
        s.put(
            "endpointslices",
            json!({
                "metadata": {"namespace": "default", "name": "web-x1",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": "n1"}],
            }),
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_of_services_through_the_controller() {
    let api = FakeApi::new();
    seed(&api);
    // Two addresses: 192.0.2.1 and .2.
    let agent = Agent::start(&api, "agent-a", "defaultPool=192.0.2.0/30");
    let dp = agent.datapath.clone();

    // Elected, allocated, recorded, programmed, reported.
    until("agent-a leads", || {
        lease_holder(&api).as_deref() == Some("agent-a")
    })
    .await;
    until("web programmed", || dp.rule_of("web").is_some()).await;
    until("web status", || ingress(&api, "web") == ["192.0.2.1"]).await;
    let web = svc_of(&api, "web").unwrap();
    assert_eq!(
        web["metadata"]["finalizers"],
        json!(["loxilb.io/loadbalancer"])
    );
    assert_eq!(
        record(&api, "web").as_deref(),
        Some("ips=192.0.2.1;ports=80/tcp")
    );
    let rule = dp.rule_of("web").unwrap();
    assert_eq!(rule.rule.vip.to_string(), "192.0.2.1");
    let eps: Vec<String> = rule
        .rule
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.ip, e.port))
        .collect();
    assert_eq!(eps, ["10.0.0.1:30080", "10.0.0.2:30080"]);
    until("VIP owned", || dp.vips() == ["192.0.2.1"]).await;
    assert_eq!(
        condition(&api, "web", "loxilb.io/Allocated").unwrap()["status"],
        "True"
    );
    until("Allocated event", || {
        has_event(
            &api,
            "web",
            "Allocated",
            "192.0.2.1 (pool defaultPool) for 80/tcp",
        )
    })
    .await;

    // Two more on port 80: one fits, one finds the pool exhausted.
    api.with(|s| {
        s.put("services", service("web2", 80, json!({})));
        s.put("services", service("web3", 80, json!({})));
    });
    until("web2 allocated", || ingress(&api, "web2") == ["192.0.2.2"]).await;
    until("web3 exhausted event", || {
        has_event(
            &api,
            "web3",
            "PoolExhausted",
            "pool `defaultPool` (192.0.2.0/30) is exhausted",
        )
    })
    .await;
    until("web3 condition", || {
        condition(&api, "web3", "loxilb.io/Allocated")
            .is_some_and(|c| c["status"] == "False" && c["reason"] == "PoolExhausted")
    })
    .await;
    assert!(record(&api, "web3").is_none() && ingress(&api, "web3").is_empty());
    assert!(dp.rule_of("web3").is_none());

    // Editing an annotation changes the rule in place.
    let web_meta_writes = writes_to(&api, "/api/v1/namespaces/default/services/web");
    api.with(|s| {
        s.edit("services", "default", "web", |o| {
            o["metadata"]["annotations"]["loxilb.io/lbmode"] = json!("fullnat");
        })
    });
    until("web in fullnat", || {
        dp.rule_of("web")
            .is_some_and(|r| r.rule.mode == Mode::FullNat)
    })
    .await;
    let r = dp.rule_of("web").unwrap();
    assert_eq!(
        (r.rule.name.as_str(), r.rule.vip.to_string()),
        (rule.rule.name.as_str(), "192.0.2.1".into())
    );
    assert_eq!(
        writes_to(&api, "/api/v1/namespaces/default/services/web"),
        web_meta_writes,
        "the allocation is unchanged: no record rewritten"
    );

    // An invalid value: a Warning naming annotation, value and allowed
    // values; the rule stays as it was. An unknown annotation: a Warning.
    api.with(|s| {
        s.edit("services", "default", "web", |o| {
            o["metadata"]["annotations"]["loxilb.io/lbmode"] = json!("bogus");
            o["metadata"]["annotations"]["loxilb.io/frobnicate"] = json!("1");
        })
    });
    until("invalid annotation event", || {
        has_event(
            &api,
            "web",
            "InvalidAnnotation",
            "loxilb.io/lbmode: \"bogus\": allowed values: default, onearm, fullnat, dsr",
        )
    })
    .await;
    until("unknown annotation event", || {
        has_event(
            &api,
            "web",
            "AnnotationWarning",
            "loxilb.io/frobnicate: \"1\": unknown loxilb.io annotation",
        )
    })
    .await;
    until("Configured=False", || {
        condition(&api, "web", "loxilb.io/Configured")
            .is_some_and(|c| c["status"] == "False" && c["reason"] == "InvalidAnnotation")
    })
    .await;
    assert_eq!(
        dp.rule_of("web").unwrap().rule.mode,
        Mode::FullNat,
        "last good rule kept"
    );
    let warnings_before = events(&api, "web").len();

    // A node goes NotReady: endpoints follow (the last good mode stays),
    // and the known problem is not reported again.
    api.with(|s| s.put("nodes", node("n2", "10.0.0.2", false)));
    until("n2 out", || {
        dp.rule_of("web")
            .is_some_and(|r| r.rule.endpoints.len() == 1)
    })
    .await;
    assert_eq!(dp.rule_of("web").unwrap().rule.mode, Mode::FullNat);
    assert_eq!(
        events(&api, "web").len(),
        warnings_before,
        "no repeated Warning"
    );

    // Fixed: Configured=True again.
    api.with(|s| {
        s.edit("services", "default", "web", |o| {
            o["metadata"]["annotations"]["loxilb.io/lbmode"] = json!("default");
        })
    });
    until("web back to default", || {
        dp.rule_of("web")
            .is_some_and(|r| r.rule.mode == Mode::Default)
    })
    .await;
    until("Configured=True", || {
        condition(&api, "web", "loxilb.io/Configured").is_some_and(|c| c["status"] == "True")
    })
    .await;

    // Deleted: rules removed, address released, finalizer removed, object
    // gone; the pending Service gets the address.
    api.with(|s| s.delete("services", "default", "web"));
    until("web gone from the API", || svc_of(&api, "web").is_none()).await;
    assert!(dp.rule_of("web").is_none());
    until("web3 allocated", || ingress(&api, "web3") == ["192.0.2.1"]).await;
    assert_eq!(
        record(&api, "web3").as_deref(),
        Some("ips=192.0.2.1;ports=80/tcp")
    );
    until("web3 programmed", || dp.rule_of("web3").is_some()).await;
    until("VIPs", || dp.vips() == ["192.0.2.1", "192.0.2.2"]).await;

    // A Service that stops being a LoadBalancer is handed back clean.
    api.with(|s| {
        s.edit("services", "default", "web2", |o| {
            o["spec"]["type"] = json!("ClusterIP");
            o["spec"]["loadBalancerClass"] = Value::Null;
        })
    });
    until("web2 handed back", || {
        let s = svc_of(&api, "web2").unwrap();
        s["metadata"]["finalizers"] == json!([])
            && s["metadata"]["annotations"]
                .get("loxilb.io/allocated")
                .is_none()
            && s["status"]["conditions"] == json!([])
    })
    .await;
    assert!(dp.rule_of("web2").is_none());

    agent.stop().await;
    assert_eq!(lease_holder(&api), None, "Lease released on shutdown");

    let log = log(&api);
    assert!(
        !log.iter()
            .any(|l| l.path.contains("/services/other") || l.body["regarding"]["name"] == "other"),
        "a Service of another class is never touched"
    );
    no_polling(&log);
    assert_eq!(
        check_field_managers(&log),
        [
            "PATCH services",
            "PATCH services/status",
            "POST events",
            "POST leases",
            "PUT leases"
        ]
        .map(String::from)
        .into(),
        "every kind of write the controller makes, each with the field manager"
    );
    // No Service has loxilb.io/multus-nets: no Pod watch at all.
    assert!(
        !log.iter().any(|l| l.path.contains("/pods")),
        "pods are watched only for Services with loxilb.io/multus-nets"
    );
    check_rbac_except(
        &log,
        &[
            "",
            "discovery.k8s.io",
            "events.k8s.io",
            "coordination.k8s.io",
        ],
        &["pods"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_handover_keeps_every_address() {
    let api = FakeApi::new();
    seed(&api);
    api.with(|s| s.put("services", service("web2", 443, json!({}))));
    let a = Agent::start(&api, "agent-a", "defaultPool=192.0.2.0/29");
    until("agent-a leads", || {
        lease_holder(&api).as_deref() == Some("agent-a")
    })
    .await;
    until("both recorded", || {
        record(&api, "web").is_some() && record(&api, "web2").is_some()
    })
    .await;
    let b = Agent::start(&api, "agent-b", "defaultPool=192.0.2.0/29");

    // The follower programs the same rules from the records, owns no VIP,
    // and writes nothing but its Lease reads.
    until("b has the rules", || {
        let mut x = b.datapath.rules();
        let mut y = a.datapath.rules();
        x.sort_by(|p, q| p.rule.name.cmp(&q.rule.name));
        y.sort_by(|p, q| p.rule.name.cmp(&q.rule.name));
        x.len() == 2 && x == y
    })
    .await;
    assert!(b.datapath.vips().is_empty());
    assert_eq!(
        b.datapath.applied.lock().unwrap()[0].len(),
        2,
        "the datapath of an agent starting up gets every rule at once, never a partial set"
    );
    let recorded = (record(&api, "web"), record(&api, "web2"));

    // a stops (releases the Lease); b takes over without reallocating.
    a.stop().await;
    until("agent-b leads", || {
        lease_holder(&api).as_deref() == Some("agent-b")
    })
    .await;
    until("b owns the VIPs", || b.datapath.vips().len() == 1).await;
    assert_eq!((record(&api, "web"), record(&api, "web2")), recorded);
    // Each Service tells who answers for its VIPs now: agent-a gave them
    // up as it stopped, agent-b took them.
    for svc in ["web", "web2"] {
        until(&format!("{svc}: VIPActive from agent-b"), || {
            has_event(
                &api,
                svc,
                "VIPActive",
                "node agent-b now answers for 192.0.2.1",
            )
        })
        .await;
        assert!(
            has_event(&api, svc, "VIPBackup", "node agent-a gave up 192.0.2.1"),
            "{svc}: {:?}",
            events(&api, svc)
        );
    }
    // A new Service gets an address nobody holds.
    api.with(|s| s.put("services", service("web3", 80, json!({}))));
    until("web3 allocated", || record(&api, "web3").is_some()).await;
    let taken: BTreeSet<String> = ["web", "web2", "web3"]
        .iter()
        .flat_map(|n| ingress(&api, n))
        .collect();
    assert_eq!(
        record(&api, "web3").as_deref(),
        Some("ips=192.0.2.2;ports=80/tcp"),
        "web (80) and web2 (443) share .1; 80 is taken there"
    );
    assert_eq!(taken.len(), 2);
    b.stop().await;

    let log = log(&api);
    let takeover = log
        .iter()
        .position(|x| {
            x.agent == "agent-b"
                && x.method == "PUT"
                && x.body["spec"]["holderIdentity"] == "agent-b"
        })
        .expect("agent-b's takeover");
    let own_rule_event = |l: &Logged| {
        l.method == "POST"
            && l.path.ends_with("/events")
            && l.body["reason"] == "RuleProgrammed"
            && l.body["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("node agent-b: "))
    };
    for l in &log[..takeover] {
        assert!(
            l.agent != "agent-b" || l.method == "GET" || own_rule_event(l),
            "a follower writes nothing but Events on its own datapath: {} {} {}",
            l.method,
            l.path,
            l.body
        );
    }
    assert!(
        log[..takeover]
            .iter()
            .any(|l| l.agent == "agent-b" && own_rule_event(l)),
        "the follower reports the rules its datapath took"
    );
    no_polling(&log);
    check_rbac(&log, &[]);
}

/// Watches, not polling: each agent lists each collection once (then
/// watches it); it never reads a single Service.
fn no_polling(log: &[Logged]) {
    let agents: BTreeSet<&str> = log.iter().map(|l| l.agent.as_str()).collect();
    for agent in agents {
        for path in [
            "/api/v1/services",
            "/api/v1/nodes",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ] {
            let of = |watch: bool| {
                log.iter()
                    .filter(|l| {
                        l.agent == agent
                            && l.method == "GET"
                            && l.path == path
                            && l.query.contains_key("watch") == watch
                    })
                    .count()
            };
            assert_eq!(of(false), 1, "{agent} lists {path} once");
            assert!(of(true) >= 1, "{agent} watches {path}");
        }
        assert!(
            !log.iter().any(|l| l.agent == agent
                && l.method == "GET"
                && l.path.starts_with("/api/v1/namespaces/")),
            "{agent} reads no single Service"
        );
    }
}

/// A sink that records each call: `update full|delta: <Service>=<rules>
/// ...` (every rule with its endpoint count) and `own_vips [..]`.
#[derive(Clone, Default)]
struct CallSink {
    calls: Arc<Mutex<Vec<String>>>,
}

impl RuleSink for CallSink {
    fn apply(&mut self, _: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        unreachable!("update is overridden")
    }
    fn update(&mut self, u: &kube_watch::controller::RuleUpdate<'_>) -> anyhow::Result<Applied> {
        let rules: Vec<String> = u
            .all()
            .map(|r| format!("{} ({} endpoints)", r.rule.name, r.rule.endpoints.len()))
            .collect();
        self.calls.lock().unwrap().push(format!(
            "update {}: [{}]",
            if u.is_full() { "full" } else { "delta" },
            rules.join(", ")
        ));
        Ok(Applied::all())
    }
    fn own_vips(&mut self, vips: Vec<IpAddr>) -> anyhow::Result<()> {
        let v: Vec<String> = vips.iter().map(IpAddr::to_string).collect();
        self.calls
            .lock()
            .unwrap()
            .push(format!("own_vips [{}]", v.join(", ")));
        Ok(())
    }
}

impl CallSink {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

/// An agent with the sink `sink`, retrying failed Services after
/// `retry_min` (doubling, at most 4 times that).
fn start_with<S: RuleSink + 'static>(
    api: &FakeApi,
    identity: &str,
    pools: &str,
    sink: S,
    retry_min: Duration,
) -> Running {
    let kube = KubeConfig {
        cidr_pools: parse_cidr_pools(pools).unwrap(),
        ..KubeConfig::default()
    };
    let mut lease = LeaseConfig::new("kube-system", identity);
    lease.retry_period = Duration::from_millis(200);
    let mut config = RunConfig::new(kube, lease);
    config.retry_min = retry_min;
    config.retry_max = retry_min * 4;
    let client = api.client(identity);
    Running::spawn(move |shutdown| run(client, config, sink, shutdown))
}

/// The Lease held by another agent for an hour: whoever starts follows.
fn lease_held_by(holder: &str) -> Value {
    json!({
        "metadata": {"namespace": "kube-system", "name": "loxilb-agent"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600,
                 "acquireTime": "2026-05-01T10:00:00.000000Z",
                 "renewTime": "2026-05-01T10:00:00.000000Z", "leaseTransitions": 0},
    })
}

/// An EndpointSlice of `svc` with ready pods `10.244.0.<n>` for `n` in
/// `pods`.
fn slice(svc: &str, pods: &[u8]) -> Value {
    let eps: Vec<Value> = pods
        .iter()
        .map(|n| json!({"addresses": [format!("10.244.0.{n}")], "nodeName": "n1"}))
        .collect();
    json!({
        "metadata": {"namespace": "default", "name": format!("{svc}-x1"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

/// An agent that starts as follower (it may have led before the restart
/// and still own addresses and rules): its datapath gets nothing until the
/// initial lists of Services, EndpointSlices and Nodes are complete, then
/// the whole rule set (even an empty one) and no VIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_gets_the_whole_set_once_listed_then_no_vips() {
    for with_service in [true, false] {
        let api = FakeApi::new();
        api.with(|s| {
            s.put("leases", lease_held_by("agent-x"));
            s.put("nodes", node("n1", "10.0.0.1", true));
            if with_service {
                // Allocated by the leader, with its pods' addresses.
                let mut web = service(
                    "web",
                    80,
                    json!({"loxilb.io/usepodnetwork": "yes",
                           "loxilb.io/allocated": "ips=192.0.2.1;ports=80/tcp"}),
                );
                web["metadata"]["finalizers"] = json!(["loxilb.io/loadbalancer"]);
                s.put("services", web);
                s.put("endpointslices", slice("web", &[5, 6, 7]));
            }
            s.hold_list("endpointslices");
        });
        let sink = CallSink::default();
        let agent = start_with(
            &api,
            "agent-b",
            "defaultPool=192.0.2.0/30",
            sink.clone(),
            Duration::from_millis(50),
        );
        until("Services and Nodes listed, the Lease read", || {
            let log = log(&api);
            ["/api/v1/services", "/api/v1/nodes", LEASE]
                .iter()
                .all(|p| log.iter().any(|l| l.path == *p))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sink.calls(),
            Vec::<String>::new(),
            "nothing before the EndpointSlices are listed"
        );
        api.with(|s| s.release_list("endpointslices"));
        until("the first update and the VIPs", || sink.calls().len() >= 2).await;
        let rules = if with_service {
            "default/web:80/tcp@192.0.2.1 (3 endpoints)"
        } else {
            ""
        };
        assert_eq!(
            sink.calls()[..2],
            [format!("update full: [{rules}]"), "own_vips []".to_string()],
            "with_service: {with_service}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink.calls().len(), 2, "{:?}", sink.calls());
        agent.stop("the controller").await;
        assert_eq!(lease_holder(&api).as_deref(), Some("agent-x"));
        check_rbac(&log(&api), &[]);
    }
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/loxilb-agent";

/// The `--cidrPools` value of `manifest/in-cluster/loxilb.yaml`'s
/// DaemonSet.
fn manifest_cidr_pools() -> String {
    use serde::Deserialize;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifest/in-cluster/loxilb.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let ds = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str()?.strip_prefix("--cidrPools="))
        .map(String::from)
        .next()
        .expect("the manifest sets --cidrPools")
}

/// `--vipOwners=pool` with the manifest's own pools: the pool's Lease has
/// one holder, which owns the pool's VIP (the other agent none); both
/// agents beat in the members Lease; when the holder stops (releasing its
/// Leases) the other one owns the VIP. Every request, to the leader's,
/// the members and the pool's Lease, is granted by the manifest's Role,
/// and every Lease verb it grants was used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_owners_elect_with_leases_the_manifest_grants() {
    let api = FakeApi::new();
    seed(&api);
    let pools = manifest_cidr_pools();
    let lease_of = |name: &str| api.with(|s| s.get("leases", "kube-system", name));
    let holder_of = |name: &str| {
        lease_of(name)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
            .filter(|h| !h.is_empty())
    };
    let pool_names = KubeConfig {
        cidr_pools: parse_cidr_pools(&pools).unwrap(),
        ..KubeConfig::default()
    }
    .pool_names();
    let pool_leases = groups::lease_names("loxilb-agent", &pool_names).unwrap();
    assert_eq!(pool_leases, ["loxilb-agent-pool-defaultpool"]);
    let members = groups::members_lease_name("loxilb-agent");
    let a = Agent::start_as(&api, "agent-a", &pools, VipOwners::Pool);
    until("agent-a leads", || {
        lease_holder(&api).as_deref() == Some("agent-a")
    })
    .await;
    let b = Agent::start_as(&api, "agent-b", &pools, VipOwners::Pool);
    until("web allocated", || ingress(&api, "web").len() == 1).await;
    let vip = ingress(&api, "web")[0].clone();
    let agents = [("agent-a", &a), ("agent-b", &b)];
    let mut owner = String::new();
    until(
        "the pool's holder owns its VIP, the other agent none",
        || {
            let Some(h) = holder_of(&pool_leases[0]) else {
                return false;
            };
            owner = h;
            agents.iter().all(|(id, ag)| {
                let v = ag.datapath.vips();
                if *id == owner {
                    v == [vip.clone()]
                } else {
                    v.is_empty()
                }
            })
        },
    )
    .await;
    until("both agents beat in the members Lease", || {
        lease_of(&members)
            .and_then(|l| {
                l["metadata"]["annotations"][groups::MEMBERS_ANNOTATION]
                    .as_str()
                    .map(String::from)
            })
            .is_some_and(|m| m.contains("\"agent-a\"") && m.contains("\"agent-b\""))
    })
    .await;
    // The holder stops: the other agent takes the pool's Lease and owns
    // the VIP.
    let (gone, stays, other) = if owner == "agent-a" {
        (a, b, "agent-b")
    } else {
        (b, a, "agent-a")
    };
    gone.stop().await;
    until("the other agent owns the VIP", || {
        holder_of(&pool_leases[0]).as_deref() == Some(other)
            && stays.datapath.vips() == [vip.clone()]
    })
    .await;
    stays.stop().await;
    let log = log(&api);
    for name in pool_leases.iter().chain([&members]) {
        assert!(
            log.iter()
                .any(|l| l.method == "PUT" && l.path.ends_with(&format!("/leases/{name}"))),
            "{name} written"
        );
    }
    check_rbac(&log, &["coordination.k8s.io"]);
}

/// The EndpointSlice comes just after the Service, before the watch brought
/// the agent's own writes to it (the status write changed its
/// resourceVersion again): the Service is planned again on the version its
/// writes returned. No 409, nothing retried (a retry would come only after
/// 30 s), and the Events tell the endpoints once they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_ahead_of_the_watch_cause_no_conflict() {
    let api = FakeApi::new();
    api.with(|s| {
        s.put("nodes", node("n1", "10.0.0.1", true));
    });
    let dp = Datapath::default();
    let agent = start_with(
        &api,
        "agent-a",
        "defaultPool=192.0.2.0/30",
        dp.clone(),
        Duration::from_secs(30),
    );
    until("agent-a leads", || {
        lease_holder(&api).as_deref() == Some("agent-a")
    })
    .await;
    api.with(|s| {
        s.put(
            "services",
            service("web", 80, json!({"loxilb.io/usepodnetwork": "yes"})),
        );
        s.hold_watch("services");
    });
    until("web allocated", || ingress(&api, "web") == ["192.0.2.1"]).await;
    until("web programmed, no endpoints yet", || {
        dp.rule_of("web")
            .is_some_and(|r| r.rule.endpoints.is_empty())
    })
    .await;
    let meta_writes = writes_to(&api, "/api/v1/namespaces/default/services/web");
    api.with(|s| s.put("endpointslices", slice("web", &[5, 6, 7])));
    until("web programmed with its endpoints", || {
        dp.rule_of("web")
            .is_some_and(|r| r.rule.endpoints.len() == 3)
    })
    .await;
    api.with(|s| s.release_watch("services"));
    until("the Events tell the endpoints", || {
        has_event(&api, "web", "RuleProgrammed", "-> 3 endpoints programmed")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.stop("the controller").await;
    let log = log(&api);
    let refused: Vec<String> = log
        .iter()
        .filter(|l| l.method != "GET" && l.status >= 400)
        .map(|l| format!("{} {} {}", l.method, l.path, l.status))
        .collect();
    assert_eq!(refused, Vec::<String>::new(), "no write refused");
    assert_eq!(
        writes_to(&api, "/api/v1/namespaces/default/services/web"),
        meta_writes,
        "the record and finalizer are not written again"
    );
    let notes: Vec<String> = events(&api, "web")
        .into_iter()
        .filter(|(_, r, _)| r == "RuleProgrammed")
        .map(|(_, _, n)| n)
        .collect();
    assert_eq!(
        notes,
        [
            "node agent-a: 192.0.2.1:80/tcp -> 0 endpoints programmed",
            "node agent-a: 192.0.2.1:80/tcp -> 3 endpoints programmed"
        ]
    );
    check_rbac(&log, &[]);
}

/// A Service deleted before the agent's writes reached it, the watch not
/// having brought the deletion yet: the 404 drops its work (no retry, no
/// second write); once the deletion arrives, the next Service gets its
/// address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_gone_before_its_writes_is_not_retried() {
    let api = FakeApi::new();
    api.with(|s| {
        s.put("nodes", node("n1", "10.0.0.1", true));
    });
    let dp = Datapath::default();
    // One address; a retry would come after 50 ms.
    let agent = start_with(
        &api,
        "agent-a",
        "defaultPool=192.0.2.1/32",
        dp.clone(),
        Duration::from_millis(50),
    );
    until("agent-a leads", || {
        lease_holder(&api).as_deref() == Some("agent-a")
    })
    .await;
    const BRIEF: &str = "/api/v1/namespaces/default/services/brief";
    api.with(|s| {
        s.put("services", service("brief", 80, json!({})));
        s.hold_watch("services");
        s.delete("services", "default", "brief");
    });
    until("the write to brief", || writes_to(&api, BRIEF) > 0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let to_brief: Vec<(String, u16)> = log(&api)
        .iter()
        .filter(|l| l.method != "GET" && l.path.starts_with(BRIEF))
        .map(|l| (l.path.clone(), l.status))
        .collect();
    assert_eq!(
        to_brief,
        [(BRIEF.to_string(), 404)],
        "one write, not retried"
    );
    // The deletion reaches the watch before the next Service: that one
    // gets the only address.
    api.with(|s| {
        s.put("services", service("next", 80, json!({})));
        s.release_watch("services");
    });
    until("next allocated", || ingress(&api, "next") == ["192.0.2.1"]).await;
    assert!(dp.rule_of("brief").is_none());
    agent.stop("the controller").await;
    check_rbac(&log(&api), &[]);
}

/// Someone else changes the Service between the version the agent planned
/// on and its metadata patch: the patch is refused (the precondition that
/// keeps the finalizer list and the allocation record safe), and the
/// Service gets its address as soon as the watch brings the new version,
/// not after the back-off (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_is_planned_again_at_the_watch_event() {
    let api = FakeApi::new();
    api.with(|s| {
        s.put("nodes", node("n1", "10.0.0.1", true));
    });
    let agent = start_with(
        &api,
        "agent-a",
        "defaultPool=192.0.2.0/30",
        Datapath::default(),
        Duration::from_secs(30),
    );
    until("agent-a leads", || {
        lease_holder(&api).as_deref() == Some("agent-a")
    })
    .await;
    const WEB: &str = "/api/v1/namespaces/default/services/web";
    api.with(|s| {
        s.put("services", service("web", 80, json!({})));
        s.hold_watch("services");
        s.edit("services", "default", "web", |o| {
            o["metadata"]["labels"] = json!({"team": "a"});
        });
    });
    until("the refused patch", || {
        log(&api).iter().any(|l| l.path == WEB && l.status == 409)
    })
    .await;
    api.with(|s| s.release_watch("services"));
    until("web allocated", || ingress(&api, "web") == ["192.0.2.1"]).await;
    let web = svc_of(&api, "web").unwrap();
    assert_eq!(
        web["metadata"]["labels"],
        json!({"team": "a"}),
        "the edit kept"
    );
    assert_eq!(
        web["metadata"]["finalizers"],
        json!(["loxilb.io/loadbalancer"])
    );
    agent.stop("the controller").await;
}

/// `k8s.v1.cni.cncf.io/network-status` of a pod on the cluster network and
/// on `default/<net>` with `ips`.
fn network_status(net: &str, ips: &[&str]) -> Value {
    json!([
        {"name": "cbr0", "interface": "eth0", "ips": ["10.244.0.99"], "default": true},
        {"name": format!("default/{net}"), "interface": "net1", "ips": ips},
    ])
}

fn multus_pod(name: &str, status: Option<Value>, pod_ip: &str) -> Value {
    let ann = match status {
        Some(v) => json!({"k8s.v1.cni.cncf.io/network-status": v.to_string(), "other": "x"}),
        None => json!({"other": "x"}),
    };
    fake_api::pod("default", name, ann, pod_ip)
}

fn eps_of(dp: &Datapath, svc: &str) -> Vec<String> {
    dp.rule_of(svc)
        .map(|r| {
            r.rule
                .endpoints
                .iter()
                .map(|e| format!("{}:{}", e.ip, e.port))
                .collect()
        })
        .unwrap_or_default()
}

/// A Service with `loxilb.io/multus-nets` through the whole controller:
/// the Pod watch starts (metadata only) because of it, the rules handed to
/// the datapath carry the pods' addresses on the secondary network (not the
/// EndpointSlice's pod IPs), a pod's annotation change updates them, a
/// malformed or missing annotation or a pod elsewhere is a
/// `MultusEndpointSkipped` Warning naming the pod (once, not at every
/// event), other changes of a pod and changes of a pod no multus Service
/// refers to change nothing and tell nothing again, and the Service goes
/// back to node endpoints when the annotation is removed (the Pod watch
/// then stops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multus_endpoints_follow_the_pods_network_status() {
    let api = FakeApi::new();
    api.with(|s| {
        s.put("nodes", node("n1", "10.0.0.1", true));
        let mut svc = service("mweb", 80, json!({"loxilb.io/multus-nets": "macvlan1"}));
        svc["spec"]["ports"][0]
            .as_object_mut()
            .unwrap()
            .remove("nodePort");
        s.put("services", svc);
        s.put(
            "endpointslices",
            json!({
                "metadata": {"namespace": "default", "name": "mweb-1",
                             "labels": {"kubernetes.io/service-name": "mweb"}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.244.0.5"], "targetRef": {"kind": "Pod", "namespace": "default", "name": "m1"}},
                    {"addresses": ["10.244.0.6"], "targetRef": {"kind": "Pod", "namespace": "default", "name": "m2"}},
                ],
            }),
        );
        s.put(
            "pods",
            multus_pod(
                "m1",
                Some(network_status("macvlan1", &["192.168.50.5", "fd00:50::5"])),
                "10.244.0.5",
            ),
        );
        s.put(
            "pods",
            multus_pod(
                "m2",
                Some(network_status("macvlan1", &["192.168.50.6"])),
                "10.244.0.6",
            ),
        );
        s.put("pods", multus_pod("unrelated", None, "10.244.0.7"));
    });
    let agent = Agent::start(&api, "agent-a", "defaultPool=192.0.2.0/30");
    let dp = agent.datapath.clone();
    until("mweb programmed with the secondary addresses", || {
        eps_of(&dp, "mweb") == ["192.168.50.5:8080", "192.168.50.6:8080"]
    })
    .await;
    until("mweb status", || ingress(&api, "mweb") == ["192.0.2.1"]).await;
    assert_eq!(api.with(|s| s.watching("pods")), 1, "one Pod watch");
    // The first rule set with mweb's rule already had them (the plans
    // waited for the Pod list).
    let first = dp
        .applied
        .lock()
        .unwrap()
        .iter()
        .find(|set| !set.is_empty())
        .cloned()
        .unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].rule.endpoints.len(), 2, "{first:?}");

    // m2 moves to another address on the network.
    api.with(|s| {
        s.edit("pods", "default", "m2", |p| {
            p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] =
                json!(network_status("macvlan1", &["192.168.50.66"]).to_string());
        })
    });
    until("m2's new address", || {
        eps_of(&dp, "mweb") == ["192.168.50.5:8080", "192.168.50.66:8080"]
    })
    .await;

    // m2's annotation broken: it leaves, with a Warning naming it.
    api.with(|s| {
        s.edit("pods", "default", "m2", |p| {
            p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] =
                json!("[{\"name\": \"default/macvlan1\", \"ips\": [\"192.168.50.666\"]}]");
        })
    });
    until("m2 skipped", || {
        eps_of(&dp, "mweb") == ["192.168.50.5:8080"]
    })
    .await;
    until("a Warning about m2", || {
        has_event(
            &api,
            "mweb",
            "MultusEndpointSkipped",
            "pod default/m2 is not an endpoint of default/mweb: its k8s.v1.cni.cncf.io/network-status annotation is malformed: entry 0 (default/macvlan1): \"192.168.50.666\" in `ips` is not an IP address",
        )
    })
    .await;
    // Other changes of m2 (labels: the watch brings them) and of a pod no
    // Service refers to re-plan nothing and tell nothing again.
    let plans_before = dp.applied.lock().unwrap().len();
    api.with(|s| {
        s.edit("pods", "default", "m2", |p| {
            p["metadata"]["labels"]["touched"] = json!("1");
        });
        s.edit("pods", "default", "unrelated", |p| {
            p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] =
                json!(network_status("macvlan1", &["192.168.50.7"]).to_string());
        });
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warnings = events(&api, "mweb")
        .into_iter()
        .filter(|(_, r, _)| r == "MultusEndpointSkipped")
        .count();
    assert_eq!(warnings, 1, "told once: {:#?}", events(&api, "mweb"));
    assert_eq!(dp.applied.lock().unwrap().len(), plans_before);

    // m2 on another network only, m1's annotation gone: both told, no
    // endpoint left.
    api.with(|s| {
        s.edit("pods", "default", "m2", |p| {
            p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] =
                json!(network_status("macvlan2", &["192.168.51.6"]).to_string());
        });
        s.edit("pods", "default", "m1", |p| {
            p["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove("k8s.v1.cni.cncf.io/network-status");
        });
    });
    until("no endpoint left", || {
        dp.rule_of("mweb")
            .is_some_and(|r| r.rule.endpoints.is_empty())
    })
    .await;
    until("Warnings about m1 and m2", || {
        has_event(
            &api,
            "mweb",
            "MultusEndpointSkipped",
            "pod default/m1 is not an endpoint of default/mweb: it has no k8s.v1.cni.cncf.io/network-status annotation",
        ) && has_event(
            &api,
            "mweb",
            "MultusEndpointSkipped",
            "pod default/m2 is not an endpoint of default/mweb: no IPv4 address on default/macvlan1 in its k8s.v1.cni.cncf.io/network-status (networks there: cbr0 (IPv4), default/macvlan2 (IPv4))",
        )
    })
    .await;

    // A new pod in the EndpointSlice: the slice re-plans, the pod's address
    // joins (and the pod index follows the slice).
    api.with(|s| {
        s.put(
            "pods",
            multus_pod(
                "m3",
                Some(network_status("macvlan1", &["192.168.50.8"])),
                "10.244.0.8",
            ),
        );
        s.edit("endpointslices", "default", "mweb-1", |sl| {
            sl["endpoints"].as_array_mut().unwrap().push(json!(
                {"addresses": ["10.244.0.8"], "targetRef": {"kind": "Pod", "namespace": "default", "name": "m3"}}
            ));
        });
    });
    until("m3 joins", || eps_of(&dp, "mweb") == ["192.168.50.8:8080"]).await;
    api.with(|s| {
        s.edit("pods", "default", "m3", |p| {
            p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] =
                json!(network_status("macvlan1", &["192.168.50.9"]).to_string());
        })
    });
    until("m3's new address", || {
        eps_of(&dp, "mweb") == ["192.168.50.9:8080"]
    })
    .await;
    // A pod deleted: its address leaves.
    api.with(|s| s.delete_now("pods", "default", "m3"));
    until("m3 gone", || {
        dp.rule_of("mweb")
            .is_some_and(|r| r.rule.endpoints.is_empty())
    })
    .await;

    // The Pod watch was metadata only.
    let pod_requests: Vec<Logged> = log(&api)
        .into_iter()
        .filter(|l| l.path == "/api/v1/pods")
        .collect();
    assert!(
        pod_requests.len() >= 2,
        "a list and a watch: {pod_requests:?}"
    );
    assert!(
        pod_requests.iter().all(|l| l.metadata_only()),
        "metadata only: {:?}",
        pod_requests.iter().map(|l| &l.accept).collect::<Vec<_>>()
    );
    // No Service with the annotation any more: the Pod watch stops (a pod
    // event then reaches nobody); the Service is served from the node
    // network again.
    api.with(|s| {
        s.edit("services", "default", "mweb", |svc| {
            svc["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove("loxilb.io/multus-nets");
            svc["spec"]["ports"][0]["nodePort"] = json!(30080);
        })
    });
    until("node endpoints", || {
        eps_of(&dp, "mweb") == ["10.0.0.1:30080"]
    })
    .await;
    until("the Pod watch closed", || {
        api.with(|s| s.watching("pods")) == 0
    })
    .await;
    agent.stop().await;
    check_rbac(&log(&api), &["", "discovery.k8s.io"]);
}

/// Without RBAC on pods (an old ClusterRole) a Service with
/// `loxilb.io/multus-nets` cannot get its endpoints: the other Services
/// are served all the same (after a short wait for the Pod list at start),
/// the multus one gets a `PodWatchFailed` Warning saying what to grant, and
/// once the pods can be listed it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multus_without_rbac_on_pods_is_told_and_blocks_nothing_else() {
    let api = FakeApi::new();
    seed(&api);
    api.with(|s| {
        s.forbid("pods");
        s.put(
            "services",
            service("mweb", 81, json!({"loxilb.io/multus-nets": "macvlan1"})),
        );
        s.put(
            "endpointslices",
            json!({
                "metadata": {"namespace": "default", "name": "mweb-1",
                             "labels": {"kubernetes.io/service-name": "mweb"}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.244.0.5"], "targetRef": {"kind": "Pod", "namespace": "default", "name": "m1"}},
                ],
            }),
        );
        s.put(
            "pods",
            multus_pod(
                "m1",
                Some(network_status("macvlan1", &["192.168.50.5"])),
                "10.244.0.5",
            ),
        );
    });
    let kube = KubeConfig {
        cidr_pools: parse_cidr_pools("defaultPool=192.0.2.0/30").unwrap(),
        ..KubeConfig::default()
    };
    let mut lease = LeaseConfig::new("kube-system", "agent-a");
    lease.retry_period = Duration::from_millis(200);
    let mut config = RunConfig::new(kube, lease);
    config.retry_min = Duration::from_millis(50);
    config.retry_max = Duration::from_millis(500);
    config.pod_list_grace = Duration::from_millis(300);
    let dp = Datapath::default();
    let client = api.client("agent-a");
    let sink = dp.clone();
    let agent = Running::spawn(move |shutdown| run(client, config, sink, shutdown));

    until("web served while the pods cannot be listed", || {
        dp.rule_of("web").is_some()
    })
    .await;
    until("a PodWatchFailed Warning on mweb", || {
        events(&api, "mweb").iter().any(|(t, r, n)| {
            t == "Warning"
                && r == "PodWatchFailed"
                && n.contains("forbidden")
                && n.contains("grant list and watch on pods to the agent's ClusterRole")
        })
    })
    .await;
    assert!(dp.rule_of("mweb").is_none());
    assert!(events(&api, "web")
        .iter()
        .all(|(_, r, _)| r != "PodWatchFailed"));

    api.with(|s| s.allow("pods"));
    until("mweb served once the pods are listed", || {
        eps_of(&dp, "mweb") == ["192.168.50.5:8080"]
    })
    .await;
    let told = events(&api, "mweb")
        .into_iter()
        .filter(|(_, r, _)| r == "PodWatchFailed")
        .count();
    assert_eq!(told, 1, "told once per failure streak");
    agent.stop("the controller").await;
    check_rbac(&log(&api), &[]);
}

//! End-to-end: a Service with `loxilb.io/multus-nets` served by the real
//! agent in `kube` mode (kube-watch's in-memory API double over HTTP, see
//! `loxilb_tests::kube_api`). Each backend has a "secondary network"
//! address (a second subnet on its link to the load balancer, as a macvlan
//! attachment would give it) that its pod's
//! `k8s.v1.cni.cncf.io/network-status` lists; the EndpointSlice names
//! other pod IPs, which nothing routes. Traffic through the VIP reaches the
//! backends on their secondary addresses; a pod's annotation change moves
//! its endpoint; a malformed annotation drops the pod with a Warning Event.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use loxilb_tests::{
    kube_api::{
        fake_api::{self, check_rbac},
        node, service, wait_until, ApiServer, Checks, KubeAgent, KubeAgentSpec, WHOLE_SET,
    },
    need_root,
    netns::{Conn, PinDirGuard, Servers, Topology},
};
use serde_json::{json, Value};

/// The VIP pool (the client routes 20.0.0.0/24 to the LB).
const POOLS: &str = "defaultPool=20.0.0.100-20.0.0.103";
const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";

/// Backend `i`'s address on the secondary network `10.11.i.0/24` (host
/// `host`), the LB being `.1` on that subnet.
fn secondary(i: usize, host: u8) -> String {
    format!("10.11.{i}.{host}")
}

/// The pod IP the EndpointSlice names for backend `i`: not routed anywhere.
fn pod_ip(i: usize) -> String {
    format!("10.244.0.{}", 10 + i)
}

fn status(ips: &[String]) -> String {
    json!([
        {"name": "cbr0", "interface": "eth0", "ips": ["10.244.0.99"], "default": true},
        {"name": "default/macvlan1", "interface": "net1", "ips": ips},
    ])
    .to_string()
}

fn pod(i: usize, status: &str) -> Value {
    fake_api::pod(
        "default",
        &format!("web-{i}"),
        json!({ NETWORK_STATUS: status }),
        &pod_ip(i),
    )
}

/// The Service's EndpointSlice: the pods by their (unrouted) pod IPs.
fn slice(n: usize) -> Value {
    let eps: Vec<Value> = (1..=n)
        .map(|i| {
            json!({"addresses": [pod_ip(i)], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("web-{i}")}})
        })
        .collect();
    json!({
        "metadata": {"namespace": "default", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

fn rules_of(agent: &KubeAgent) -> String {
    agent.cli("rules").unwrap_or_default()
}

/// The backends that answered `n` connections through `vip:80`.
fn backends_reached(t: &Topology, vip: &str, n: usize, agent: &KubeAgent) -> BTreeSet<String> {
    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let mut c = Conn::open(&t.client, to).unwrap_or_else(|e| {
            panic!(
                "connect through the VIP: {e:#}\nrules:\n{}\nagent log:\n{}",
                rules_of(agent),
                agent.log_text()
            )
        });
        let r = c.ask(&format!("m-{i}")).unwrap();
        assert_eq!(r.echo, format!("m-{i}"));
        assert_eq!(r.client.ip(), t.client_ip(), "the backend sees the client");
        seen.insert(r.backend);
    }
    seen
}

#[test]
fn multus_service_reaches_the_backends_on_their_secondary_addresses() {
    let name = "multus_service_reaches_the_backends_on_their_secondary_addresses";
    if !need_root(name) {
        return;
    }
    let started = Instant::now();
    let t = Topology::new("lxmu1", 2).expect("topology");
    t.route_from_client("20.0.0.0/24")
        .expect("route to the pool");
    // The secondary network: a second subnet on each backend link (b2 has
    // two addresses there, for the move below).
    for (i, b) in t.backends.iter().enumerate() {
        let i = i + 1;
        b.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", secondary(i, 2)),
            "dev",
            "b0",
        ])
        .unwrap();
        t.lb.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", secondary(i, 1)),
            "dev",
            &format!("lbb{i}"),
        ])
        .unwrap();
    }
    t.backends[1]
        .sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", secondary(2, 3)),
            "dev",
            "b0",
        ])
        .unwrap();
    let _servers: Vec<Servers> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Servers::start(b, &format!("b{}", i + 1), 8080, 5353).unwrap())
        .collect();
    let _pins = PinDirGuard(t.pin_dir());

    let api = ApiServer::new();
    api.api.with(|s| {
        s.put("nodes", node("node-a", "10.10.0.1"));
        let mut svc = service("web", 80);
        svc["metadata"]["annotations"] = json!({"loxilb.io/multus-nets": "macvlan1"});
        s.put("services", svc);
        s.put("endpointslices", slice(2));
        s.put("pods", pod(1, &status(&[secondary(1, 2)])));
        s.put("pods", pod(2, &status(&[secondary(2, 2)])));
    });
    let mut agent =
        KubeAgent::start(&t, &api, &KubeAgentSpec::new("node-a", "node-a", POOLS)).expect("agent");
    let mut checks = Checks::default();

    let mut vip = None;
    wait_until("web's status names a VIP", Duration::from_secs(20), || {
        vip = api.ingress("web").into_iter().next();
        vip.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_text()));
    let vip = vip.unwrap();
    let want = |agent: &KubeAgent, eps: &[String]| {
        let r = rules_of(agent);
        r.contains(&format!("{vip}:80")) && eps.iter().all(|e| r.contains(&format!("{e}:8080")))
    };
    wait_until(
        "the rule with both secondary addresses in the datapath",
        Duration::from_secs(20),
        || want(&agent, &[secondary(1, 2), secondary(2, 2)]),
    )
    .unwrap_or_else(|e| panic!("{e}\nrules:\n{}\n{}", rules_of(&agent), agent.log_text()));
    agent
        .wait_for_log(WHOLE_SET, Duration::from_secs(10))
        .unwrap();
    let rules = rules_of(&agent);
    assert!(
        !rules.contains("10.244.0."),
        "the EndpointSlice's pod IPs are no endpoints:\n{rules}"
    );
    assert!(
        agent.log_text().contains("watching Pods (metadata only)"),
        "{}",
        agent.log_text()
    );

    // Traffic through the VIP reaches both backends, on the secondary
    // network (the pod IPs are routed nowhere).
    let seen = backends_reached(&t, &vip, 8, &agent);
    assert_eq!(
        seen,
        ["b1", "b2"].map(String::from).into(),
        "connections spread over both pods"
    );

    // web-2 moves to another address on the network: its endpoint follows.
    api.api.with(|s| {
        s.edit("pods", "default", "web-2", |p| {
            p["metadata"]["annotations"][NETWORK_STATUS] = json!(status(&[secondary(2, 3)]));
        })
    });
    wait_until(
        "web-2's endpoint moved to its new address",
        Duration::from_secs(10),
        || {
            want(&agent, &[secondary(1, 2), secondary(2, 3)])
                && !rules_of(&agent).contains(&format!("{}:8080", secondary(2, 2)))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nrules:\n{}\n{}", rules_of(&agent), agent.log_text()));
    let seen = backends_reached(&t, &vip, 8, &agent);
    checks.check(seen.len() == 2, || {
        format!("after the move, both backends answer: {seen:?}")
    });

    // web-2's annotation malformed: it is no endpoint any more, and the
    // Service has a Warning naming it.
    api.api.with(|s| {
        s.edit("pods", "default", "web-2", |p| {
            p["metadata"]["annotations"][NETWORK_STATUS] = json!("[{\"name\": ");
        })
    });
    wait_until("web-2 dropped", Duration::from_secs(10), || {
        let r = rules_of(&agent);
        want(&agent, &[secondary(1, 2)]) && !r.contains(&format!("{}:8080", secondary(2, 3)))
    })
    .unwrap_or_else(|e| panic!("{e}\nrules:\n{}\n{}", rules_of(&agent), agent.log_text()));
    let warned = || {
        api.api.with(|s| s.all("events")).into_iter().any(|e| {
            e["regarding"]["name"] == "web"
                && e["type"] == "Warning"
                && e["reason"] == "MultusEndpointSkipped"
                && e["note"].as_str().is_some_and(|n| {
                    n.starts_with("pod default/web-2 is not an endpoint of default/web: its k8s.v1.cni.cncf.io/network-status annotation is malformed: not JSON")
                })
        })
    };
    wait_until(
        "a MultusEndpointSkipped Warning on web",
        Duration::from_secs(10),
        warned,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    let seen = backends_reached(&t, &vip, 4, &agent);
    checks.check(seen == ["b1".to_string()].into(), || {
        format!("with web-2 dropped only b1 answers: {seen:?}")
    });

    let st = agent.stop().expect("the agent exits on SIGTERM");
    checks.check(st.success(), || {
        format!("SIGTERM: exit status {st}:\n{}", agent.log_text())
    });
    // The agent's requests (the Pod list and watch among them) are granted
    // by the manifest's RBAC.
    let log = api.log();
    checks.check(
        log.iter()
            .any(|l| l.path == "/api/v1/pods" && l.metadata_only()),
        || "the agent watched the pods, metadata only".to_string(),
    );
    check_rbac(&log, &[]);
    checks.check(api.errors().is_empty(), || {
        format!("fake API errors: {:?}", api.errors())
    });
    eprintln!("{name}: {:?}", started.elapsed());
    checks.finish(name);
}

//! End-to-end in `kube` mode: the real agent binary, in the LB namespace of
//! a network-namespace topology, serves LoadBalancer Services it reads from
//! kube-watch's in-memory API double, which the test serves over HTTP on a
//! listener inside that namespace (see `loxilb_tests::kube_api`). Real TCP
//! traffic from the client namespace to the allocated VIP; SIGTERM, a
//! `--keep` restart under an open connection, and two agents sharing one
//! Lease.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use loxilb_tests::{
    kube_api::{
        endpoint_slice, fake_api::check_rbac, lo_addrs, log_field, node, service, wait_until,
        write_kubeconfig, ApiServer, Checks, KubeAgent, KubeAgentSpec, WHOLE_SET,
    },
    need_root,
    netns::{Conn, Netns, PinDirGuard, Servers, Topology},
};
use serde_json::json;

/// The VIP pool of every test (the client routes 20.0.0.0/24 to the LB).
const POOLS: &str = "defaultPool=20.0.0.100-20.0.0.103";

/// A topology with `n` backends serving TCP on 8080, the client routing the
/// pool to the LB, and the pin directory removed at the end.
struct KubeScene {
    t: Topology,
    _servers: Vec<Servers>,
    _pins: PinDirGuard,
}

impl KubeScene {
    fn new(prefix: &str, n: usize) -> Self {
        let t = Topology::new(prefix, n).expect("topology");
        t.route_from_client("20.0.0.0/24")
            .expect("route to the pool");
        let servers = t
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Servers::start(b, &format!("b{}", i + 1), 8080, 5353).unwrap())
            .collect();
        let pins = PinDirGuard(t.pin_dir());
        KubeScene {
            t,
            _servers: servers,
            _pins: pins,
        }
    }

    fn backends(&self) -> Vec<Ipv4Addr> {
        (1..=self.t.backends.len())
            .map(|i| self.t.backend_ip(i))
            .collect()
    }
}

/// Service `web` (TCP 80 -> 8080) with `backends` as its ready pods, and
/// the Nodes.
fn seed(api: &ApiServer, nodes: &[(&str, &str)], backends: &[Ipv4Addr]) {
    api.api.with(|s| {
        for (name, addr) in nodes {
            s.put("nodes", node(name, addr));
        }
        s.put("services", service("web", 80));
        s.put("endpointslices", endpoint_slice("web", backends));
    });
}

/// The VIP the controller wrote into web's status.
fn wait_vip(api: &ApiServer, agent: &KubeAgent) -> String {
    let mut vip = None;
    wait_until("web's status names a VIP", Duration::from_secs(20), || {
        vip = api.ingress("web").into_iter().next();
        vip.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_text()));
    let vip = vip.unwrap();
    // The status is written by the leader's plan, the rule reaches this
    // node's datapath through the sink: wait for both before traffic.
    wait_until(
        "the VIP's rule in the datapath",
        Duration::from_secs(20),
        || {
            agent
                .cli("rules")
                .is_ok_and(|r| r.contains(&format!("{vip}:80")))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_text()));
    vip
}

fn vip_addr(vip: &str, port: u16) -> SocketAddr {
    format!("{vip}:{port}").parse().unwrap()
}

/// Lines of `agent`'s log reporting rules applied whose `removed` field is
/// not empty (a count other than 0, or a non-empty list).
fn removals(agent: &KubeAgent) -> Vec<String> {
    agent
        .log_lines("rules applied")
        .into_iter()
        .filter(|l| log_field(l, "removed").is_some_and(|v| v != "0" && v != "[]" && !v.is_empty()))
        .collect()
}

/// The harness alone: a kube client in a namespace reaches the fake API on
/// the listener there (list, watch streaming an event that happens after
/// it started, a merge patch), and the request log names the listener.
#[test]
fn harness_serves_the_fake_api_over_http_inside_a_namespace() {
    if !need_root("harness_serves_the_fake_api_over_http_inside_a_namespace") {
        return;
    }
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};

    let ns = Netns::new("lxk0").expect("namespace");
    let server = ApiServer::new();
    server.api.with(|s| s.put("services", service("web", 80)));
    let port = server.listen(&ns, "probe").unwrap();
    let kc = std::env::temp_dir().join("lxk0.kubeconfig");
    write_kubeconfig(&kc, port).unwrap();
    let api = server.api.clone();
    let kc2 = kc.clone();
    let (listed, watched, patched) = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kubeconfig = kube::config::Kubeconfig::read_from(&kc2).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(config).unwrap();
            let all: Api<Service> = Api::all(client.clone());
            let list = all.list(&ListParams::default()).await.unwrap();
            let listed: Vec<String> = list
                .items
                .iter()
                .map(|s| s.metadata.name.clone().unwrap())
                .collect();
            let rv = list.metadata.resource_version.unwrap();
            let mut stream = all
                .watch(&WatchParams::default(), &rv)
                .await
                .unwrap()
                .boxed();
            api.with(|s| s.put("services", service("db", 5432)));
            let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
                .await
                .expect("a watch event within 5 s")
                .unwrap();
            let watched = match ev {
                Some(WatchEvent::Added(s)) => s.metadata.name.unwrap(),
                other => panic!("unexpected {other:?}"),
            };
            let ns_api: Api<Service> = Api::namespaced(client, "default");
            let patched = ns_api
                .patch(
                    "web",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
                )
                .await
                .unwrap();
            (
                listed,
                watched,
                patched.metadata.annotations.unwrap()["x"].clone(),
            )
        })
    });
    let _ = std::fs::remove_file(&kc);
    assert_eq!(listed, ["web"]);
    assert_eq!(watched, "db");
    assert_eq!(patched, "y");
    let log = server.log();
    assert!(
        log.len() >= 3 && log.iter().all(|l| l.agent == "probe"),
        "{log:?}"
    );
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

/// (a) `kube` mode: the Service gets a VIP from --cidrPools, the leader
/// (the only agent) owns it on `lo`, real TCP connections through the VIP
/// reach the backends with the client's address kept; SIGTERM: exit status
/// 0, nothing left pinned, no VIP left on `lo`. Every request the agent
/// sent is one the manifest's RBAC grants.
#[test]
fn kube_mode_serves_a_service_and_exits_clean_on_sigterm() {
    let name = "kube_mode_serves_a_service_and_exits_clean_on_sigterm";
    if !need_root(name) {
        return;
    }
    let started = Instant::now();
    let e = KubeScene::new("lxk1", 2);
    // The client learns neighbours from gratuitous ARP (its entry for the
    // VIP then shows who announced it).
    e.t.client
        .sh(&["sysctl", "-qw", "net.ipv4.conf.c0.arp_accept=1"])
        .unwrap();
    let api = ApiServer::new();
    seed(&api, &[("node-a", "10.10.0.1")], &e.backends());
    let mut agent = KubeAgent::start(&e.t, &api, &KubeAgentSpec::new("node-a", "node-a", POOLS))
        .expect("agent");
    let mut checks = Checks::default();

    let vip = wait_vip(&api, &agent);
    assert!(
        vip.starts_with("20.0.0.10"),
        "VIP {vip} not from the pool {POOLS}"
    );
    agent
        .wait_for_log(WHOLE_SET, Duration::from_secs(10))
        .unwrap();
    wait_until(
        &format!("the leader owns {vip} on lo"),
        Duration::from_secs(10),
        || lo_addrs(&e.t.lb).contains(&vip),
    )
    .unwrap_or_else(|err| panic!("{err}\n{}", agent.log_text()));
    assert_eq!(api.lease_holder().as_deref(), Some("node-a"));
    // Taking the VIP, the node announced it on its interfaces: the client
    // on lbc's segment has an entry for the VIP with lbc's MAC.
    let lbc_mac = e.t.lb.sh(&["cat", "/sys/class/net/lbc/address"]).unwrap();
    wait_until(
        "the client learnt the VIP from a gratuitous ARP",
        Duration::from_secs(5),
        || {
            e.t.client
                .sh(&["ip", "neigh", "show", &vip, "dev", "c0"])
                .is_ok_and(|n| n.contains(lbc_mac.trim()))
        },
    )
    .unwrap_or_else(|err| panic!("{err}\n{}", agent.log_text()));

    let client_ip = e.t.client_ip();
    let mut seen = BTreeSet::new();
    for i in 0..8 {
        let mut c = Conn::open(&e.t.client, vip_addr(&vip, 80)).unwrap_or_else(|err| {
            panic!(
                "connect through the VIP: {err:#}\nrules:\n{}\nagent log:\n{}",
                agent.cli("rules").unwrap_or_default(),
                agent.log_text()
            )
        });
        let r = c.ask(&format!("tcp-{i}")).unwrap();
        assert_eq!(r.echo, format!("tcp-{i}"));
        assert_eq!(r.client.ip(), client_ip, "the backend sees the client");
        seen.insert(r.backend);
    }
    assert_eq!(seen.len(), 2, "connections spread over both pods: {seen:?}");
    let rules = agent.cli("rules").unwrap();
    assert!(rules.contains(&format!("{vip}:80")), "{rules}");

    let st = agent.stop().expect("the agent exits on SIGTERM");
    checks.check(st.success(), || {
        format!(
            "SIGTERM: the agent exited with {st}, not 0:\n{}",
            agent.log_text()
        )
    });
    checks.check(!e.t.pin_dir().exists(), || {
        format!(
            "after SIGTERM (no --keep) {} still exists: {:?}",
            e.t.pin_dir().display(),
            std::fs::read_dir(e.t.pin_dir())
                .map(|d| d
                    .filter_map(|x| x.ok())
                    .map(|x| x.file_name())
                    .collect::<Vec<_>>())
                .unwrap_or_default()
        )
    });
    let lo = lo_addrs(&e.t.lb);
    checks.check(!lo.contains(&vip), || {
        format!("after SIGTERM the VIP is still on lo: {lo:?}")
    });
    let link = e.t.lb.sh(&["ip", "link", "show", "lbc"]).unwrap();
    checks.check(!link.contains("xdp"), || {
        format!("after SIGTERM XDP is still attached: {link}")
    });
    check_rbac(&api.log(), &[]);
    checks.check(api.errors().is_empty(), || {
        format!("fake API errors: {:?}", api.errors())
    });
    eprintln!("{name}: {:?}", started.elapsed());
    checks.finish(name);
}

/// (b) `kube --keep`: a TCP stream through the VIP survives a restart
/// (SIGTERM, no agent for a while, start again with --keep), and the
/// restarted agent adopts the pinned rules as they are: no rule removed and
/// re-added (neither by a first, empty apply nor by the whole set), the
/// stream's session still in the table.
#[test]
fn kube_keep_restart_adopts_the_rules_and_an_open_stream_survives() {
    let name = "kube_keep_restart_adopts_the_rules_and_an_open_stream_survives";
    if !need_root(name) {
        return;
    }
    let started = Instant::now();
    let e = KubeScene::new("lxk2", 2);
    let api = ApiServer::new();
    seed(&api, &[("node-a", "10.10.0.1")], &e.backends());
    let spec = KubeAgentSpec::new("node-a", "node-a#1", POOLS).arg("--keep");
    let mut agent = KubeAgent::start(&e.t, &api, &spec).expect("agent");
    let mut checks = Checks::default();
    let vip = wait_vip(&api, &agent);
    agent
        .wait_for_log(WHOLE_SET, Duration::from_secs(10))
        .unwrap();

    let mut c = Conn::open(&e.t.client, vip_addr(&vip, 80))
        .unwrap_or_else(|err| panic!("connect: {err:#}\n{}", agent.log_text()));
    let b = c.ask("before").unwrap().backend;
    let local = c.local_addr();
    assert!(agent.has_session_of(local).unwrap());

    let st = agent.stop().expect("the agent exits on SIGTERM");
    checks.check(st.success(), || {
        format!(
            "SIGTERM with --keep: exit status {st}, not 0:\n{}",
            agent.log_text()
        )
    });
    assert!(
        e.t.pin_dir().join("LB_CT").exists(),
        "--keep leaves the maps pinned:\n{}",
        agent.log_text()
    );
    let link = e.t.lb.sh(&["ip", "link", "show", "lbc"]).unwrap();
    checks.check(link.contains("xdp"), || {
        format!("--keep: XDP is no longer attached to lbc after the exit: {link}")
    });
    // No agent: the pinned datapath keeps serving the stream.
    match c.ask("between") {
        Ok(r) => checks.check(r.backend == b, || {
            format!(
                "while no agent runs the stream moved from {b} to {}",
                r.backend
            )
        }),
        Err(err) => checks.check(false, || {
            format!("while no agent runs the stream broke: {err:#}")
        }),
    }

    let spec2 = KubeAgentSpec::new("node-a", "node-a#2", POOLS).arg("--keep");
    let mut agent2 = KubeAgent::start(&e.t, &api, &spec2).expect("agent restart");
    assert!(
        agent2.log_text().contains("adopted the datapath state"),
        "{}",
        agent2.log_text()
    );
    agent2
        .wait_for_log(WHOLE_SET, Duration::from_secs(15))
        .unwrap();
    // The stream, right after the restarted agent applied its rules.
    match c.ask("after") {
        Ok(r) => checks.check(r.backend == b, || {
            format!(
                "after the restart the stream moved from {b} to {}",
                r.backend
            )
        }),
        Err(err) => checks.check(false, || {
            format!(
                "after the restart the stream broke: {err:#}\n{}",
                agent2.log_text()
            )
        }),
    }
    let sessions = agent2.cli("sessions").unwrap_or_default();
    checks.check(sessions.contains(&local.to_string()), || {
        format!(
            "the stream's session {local} is gone from the table after the restart:\n{sessions}"
        )
    });
    let removed = removals(&agent2);
    checks.check(removed.is_empty(), || {
        format!(
            "the restarted agent removed adopted rules:\n{}",
            removed.join("\n")
        )
    });
    let whole = agent2.log_lines(WHOLE_SET);
    checks.check(
        whole.iter().all(|l| {
            log_field(l, "added").as_deref() == Some("[]")
                && log_field(l, "updated").as_deref() == Some("[]")
                && log_field(l, "removed").as_deref() == Some("[]")
                && log_field(l, "unchanged").is_some_and(|n| n != "0")
        }),
        || {
            format!(
                "the restarted agent's whole set should find the adopted rules unchanged:\n{}",
                whole.join("\n")
            )
        },
    );
    // Still working a while later (a late flush would show here).
    std::thread::sleep(Duration::from_secs(2));
    match c.ask("later") {
        Ok(r) => checks.check(r.backend == b, || {
            format!("later the stream moved from {b} to {}", r.backend)
        }),
        Err(err) => checks.check(false, || format!("later the stream broke: {err:#}")),
    }
    check_rbac(&api.log(), &[]);
    let st = agent2.stop().expect("the restarted agent exits on SIGTERM");
    checks.check(st.success(), || {
        format!(
            "restarted agent: SIGTERM exit status {st}, not 0:\n{}",
            agent2.log_text()
        )
    });
    checks.check(api.errors().is_empty(), || {
        format!("fake API errors: {:?}", api.errors())
    });
    eprintln!(
        "{name}: restarted agent's log:\n{}\n{name}: {:?}",
        agent2.log_text(),
        started.elapsed()
    );
    checks.finish(name);
}

/// (c) Two agents as two nodes (each its own LB namespace, pin directory
/// and NODE_NAME), one Lease: the leader holds the VIP on `lo`, the
/// follower none. SIGKILL the leader: the other takes over the Lease and the
/// VIP. Restart the killed one: it comes back as a follower and drops the
/// VIP its killed self left on `lo`; only the new leader holds it.
#[test]
fn two_agents_one_lease_only_the_leader_holds_the_vips() {
    let name = "two_agents_one_lease_only_the_leader_holds_the_vips";
    if !need_root(name) {
        return;
    }
    let started = Instant::now();
    let ea = KubeScene::new("lxk3a", 1);
    let eb = KubeScene::new("lxk3b", 1);
    let api = ApiServer::new();
    // Same addressing in both topologies: the pod is 10.10.1.2 in each.
    seed(
        &api,
        &[("node-a", "10.10.0.1"), ("node-b", "10.10.0.11")],
        &ea.backends(),
    );
    let mut checks = Checks::default();
    let mut a = KubeAgent::start(
        &ea.t,
        &api,
        &KubeAgentSpec::new("node-a", "node-a#1", POOLS),
    )
    .expect("agent a");
    wait_until("node-a leads", Duration::from_secs(10), || {
        api.lease_holder().as_deref() == Some("node-a")
    })
    .unwrap_or_else(|err| panic!("{err}\n{}", a.log_text()));
    let vip = wait_vip(&api, &a);
    let mut b = KubeAgent::start(&eb.t, &api, &KubeAgentSpec::new("node-b", "node-b", POOLS))
        .expect("agent b");
    b.wait_for_log(WHOLE_SET, Duration::from_secs(15)).unwrap();
    wait_until("node-a owns the VIP on lo", Duration::from_secs(10), || {
        lo_addrs(&ea.t.lb).contains(&vip)
    })
    .unwrap_or_else(|err| panic!("{err}\n{}", a.log_text()));
    // node-b has tried the Lease a few times (1 s period) as follower.
    wait_until(
        "node-b asked for the Lease twice",
        Duration::from_secs(10),
        || api.lease_requests_from("node-b") >= 2,
    )
    .unwrap();
    assert_eq!(api.lease_holder().as_deref(), Some("node-a"));
    let lo_b = lo_addrs(&eb.t.lb);
    checks.check(lo_b.is_empty(), || {
        format!("the follower node-b holds addresses on lo: {lo_b:?}")
    });
    // Both datapaths carry the rule (every node programs it).
    for (who, ag) in [("node-a", &a), ("node-b", &b)] {
        let rules = ag.cli("rules").unwrap_or_default();
        checks.check(rules.contains(&format!("{vip}:80")), || {
            format!("{who}'s datapath lacks {vip}:80:\n{rules}")
        });
    }

    // The leader crashes: node-b takes over after the Lease expires (by
    // default within 5 s: a 4 s Lease, looked at every 1 s).
    a.kill();
    let t_kill = Instant::now();
    wait_until(
        "node-b takes over the Lease",
        Duration::from_secs(40),
        || api.lease_holder().as_deref() == Some("node-b"),
    )
    .unwrap_or_else(|err| panic!("{err}\n{}", b.log_text()));
    eprintln!("{name}: takeover {:?} after the kill", t_kill.elapsed());
    wait_until("node-b owns the VIP on lo", Duration::from_secs(10), || {
        lo_addrs(&eb.t.lb).contains(&vip)
    })
    .unwrap_or_else(|err| panic!("{err}\n{}", b.log_text()));
    // Nothing cleans up after a killed agent, but its VIP was added with a
    // lifetime it no longer renews: the kernel takes it off its lo within
    // about 3-4 s of the kill (loxilb_agent::lovips).
    wait_until(
        "the killed leader's VIP expires",
        Duration::from_secs(8),
        || !lo_addrs(&ea.t.lb).contains(&vip),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", lo_addrs(&ea.t.lb)));
    assert!(
        t_kill.elapsed() >= loxilb_agent::lovips::LIFETIME - Duration::from_secs(1),
        "gone {:?} after the kill, before its lifetime could end",
        t_kill.elapsed()
    );

    // The killed one comes back (same node, same identity): a follower.
    let mut a2 = KubeAgent::start(
        &ea.t,
        &api,
        &KubeAgentSpec::new("node-a", "node-a#2", POOLS),
    )
    .expect("agent a restart");
    a2.wait_for_log(WHOLE_SET, Duration::from_secs(15)).unwrap();
    wait_until(
        "node-a#2 asked for the Lease twice",
        Duration::from_secs(10),
        || api.lease_requests_from("node-a#2") >= 2,
    )
    .unwrap();
    checks.check(api.lease_holder().as_deref() == Some("node-b"), || {
        format!("the Lease moved back to {:?}", api.lease_holder())
    });
    let gone = wait_until(
        "the restarted follower drops the VIP from its lo",
        Duration::from_secs(10),
        || !lo_addrs(&ea.t.lb).contains(&vip),
    );
    checks.check(gone.is_ok(), || {
        format!(
            "the restarted follower node-a still holds {vip} on lo ({:?}) while node-b leads:\n{}",
            lo_addrs(&ea.t.lb),
            a2.log_text()
        )
    });
    let lo_b = lo_addrs(&eb.t.lb);
    checks.check(lo_b.contains(&vip), || {
        format!("the leader node-b lost the VIP: {lo_b:?}")
    });
    // `loxilb-agent roles` on each node: active where the VIP is held.
    let role_of = |ag: &KubeAgent| {
        let t = ag.cli("roles").unwrap_or_default();
        t.lines()
            .find(|l| l.split_whitespace().next() == Some(vip.as_str()))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_else(|| format!("{vip} not listed in:\n{t}"))
    };
    checks.check(role_of(&b) == "active", || {
        format!("node-b's roles: {}", role_of(&b))
    });
    checks.check(role_of(&a2) == "backup", || {
        format!("node-a#2's roles: {}", role_of(&a2))
    });
    for label in ["node-a#1", "node-b", "node-a#2"] {
        checks.check(api.requests_from(label) > 0, || {
            format!("no request logged from {label}")
        });
    }
    check_rbac(&api.log(), &[]);
    checks.check(a2.running() && b.running(), || {
        "an agent exited".to_string()
    });
    checks.check(api.errors().is_empty(), || {
        format!("fake API errors: {:?}", api.errors())
    });
    eprintln!("{name}: {:?}", started.elapsed());
    checks.finish(name);
}

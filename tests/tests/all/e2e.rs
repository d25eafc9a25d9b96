//! End-to-end: client, load-balancer node and backends as network
//! namespaces joined by veth, the agent attached with XDP in the LB
//! namespace, real TCP connections and UDP exchanges through it.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use loxilb_tests::{
    need_root,
    netns::{udp_ask, Agent, Conn, Scene, Topology, VIP},
};

fn rules_yaml(t: &Topology, backends: &[usize]) -> String {
    let eps = |port: u16| {
        backends
            .iter()
            .map(|i| format!("      - {{ ip: {}, port: {port} }}\n", t.backend_ip(*i)))
            .collect::<String>()
    };
    format!(
        "rules:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    timeout: 300\n    endpoints:\n{}  - name: dns\n    vip: {VIP}\n    port: 53\n    protocol: udp\n    endpoints:\n{}",
        eps(8080),
        eps(5353)
    )
}

fn env(prefix: &str, n: usize) -> Scene {
    let all: Vec<usize> = (1..=n).collect();
    Scene::new(prefix, n, (8080, 5353), |_, _| {}, |t| rules_yaml(t, &all))
}

fn vip(port: u16) -> SocketAddr {
    Scene::vip(port)
}

#[test]
fn tcp_and_udp_balanced_over_all_backends_client_ip_kept() {
    if !need_root("tcp_and_udp_balanced_over_all_backends_client_ip_kept") {
        return;
    }
    let e = env("lxe1", 3);
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let client_ip = e.t.client_ip();

    let mut seen = BTreeSet::new();
    for i in 0..12 {
        let mut c = Conn::open(&e.t.client, vip(80)).expect("connect through the VIP");
        let r = c.ask(&format!("tcp-{i}")).unwrap();
        assert_eq!(r.echo, format!("tcp-{i}"));
        assert_eq!(
            r.client.ip(),
            client_ip,
            "backend must see the client's own address"
        );
        assert_eq!(
            r.client.port(),
            c.local_addr().port(),
            "client port kept too"
        );
        seen.insert(r.backend);
    }
    assert_eq!(
        seen.len(),
        3,
        "TCP connections must spread over all backends: {seen:?}"
    );

    let mut useen = BTreeSet::new();
    for i in 0..9 {
        let r = udp_ask(&e.t.client, vip(53), &format!("udp-{i}")).unwrap();
        assert_eq!(r.echo, format!("udp-{i}"));
        assert_eq!(r.client.ip(), client_ip);
        useen.insert(r.backend);
    }
    assert_eq!(
        useen.len(),
        3,
        "UDP flows must spread over all backends: {useen:?}"
    );

    // The session table and counters show what happened.
    let mut c = Conn::open(&e.t.client, vip(80)).unwrap();
    c.ask("hold").unwrap();
    let sessions = agent.cli("sessions").unwrap();
    let local = c.local_addr();
    assert!(
        sessions.contains(&format!("{}:{}", client_ip, local.port())),
        "open connection missing from the session table:\n{sessions}"
    );
    let stats = agent.cli("stats").unwrap();
    let get = |n: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.split_whitespace().next() == Some(n))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(get("new_session") >= 22, "{stats}");
    assert!(get("fwd_redirect") > 0, "XDP redirect never used:\n{stats}");
    // The agent found the namespace's routing plain: new sessions take
    // the next hop kept per endpoint.
    assert!(
        stats.contains("next hop kept per endpoint for new sessions: on"),
        "{stats}"
    );
    let rules = agent.cli("rules").unwrap();
    assert!(
        rules.contains("20.0.0.100:80") && rules.contains("tcp"),
        "{rules}"
    );
    agent.stop().unwrap();
    assert!(!e.t.pin_dir().exists(), "a clean exit unpins everything");
    let link = e.t.lb.sh(&["ip", "link", "show", "lbc"]).unwrap();
    assert!(!link.contains("xdp"), "a clean exit detaches XDP: {link}");
}

#[test]
fn health_endpoint_answers_while_serving() {
    if !need_root("health_endpoint_answers_while_serving") {
        return;
    }
    let e = env("lxe6", 1);
    let mut agent =
        Agent::start(&e.t, &e.cfg, &["--health-listen", "127.0.0.1:19435"]).expect("agent");
    let get = |path: &'static str| {
        e.t.lb.run(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("127.0.0.1:19435").unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    };
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").starts_with("HTTP/1.1 200"));
    assert!(get("/nope").starts_with("HTTP/1.1 404"));
    agent.stop().unwrap();
}

#[test]
fn open_connection_keeps_its_backend_when_endpoints_change() {
    if !need_root("open_connection_keeps_its_backend_when_endpoints_change") {
        return;
    }
    let e = env("lxe2", 3);
    // Start with backends 1 and 2 only.
    std::fs::write(&e.cfg, rules_yaml(&e.t, &[1, 2])).unwrap();
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let mut c = Conn::open(&e.t.client, vip(80)).unwrap();
    let first = c.ask("a").unwrap().backend;
    let other = if first == "b1" { 2 } else { 1 };
    let mine: usize = first[1..].parse().unwrap();

    // Add backend 3: the open connection stays where it is.
    agent.reload(&e.cfg, &rules_yaml(&e.t, &[1, 2, 3]));
    assert_eq!(c.ask("b").unwrap().backend, first);
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        seen.insert(
            Conn::open(&e.t.client, vip(80))
                .unwrap()
                .ask("n")
                .unwrap()
                .backend,
        );
    }
    assert!(
        seen.contains("b3"),
        "new connections reach the added endpoint: {seen:?}"
    );

    // Remove the other original endpoint: still the same backend.
    let remaining: Vec<usize> = [1, 2, 3].into_iter().filter(|i| *i != other).collect();
    agent.reload(&e.cfg, &rules_yaml(&e.t, &remaining));
    assert_eq!(c.ask("c").unwrap().backend, first);
    for _ in 0..6 {
        let b = Conn::open(&e.t.client, vip(80))
            .unwrap()
            .ask("n")
            .unwrap()
            .backend;
        assert_ne!(
            b,
            format!("b{other}"),
            "removed endpoint still gets new connections"
        );
    }
    assert!(remaining.contains(&mine));
    agent.stop().unwrap();
}

#[test]
fn bad_config_on_reload_is_reported_and_rules_keep_running() {
    if !need_root("bad_config_on_reload_is_reported_and_rules_keep_running") {
        return;
    }
    let e = env("lxe3", 2);
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let mut c = Conn::open(&e.t.client, vip(80)).unwrap();
    let b = c.ask("x").unwrap().backend;
    let good = std::fs::read_to_string(&e.cfg).unwrap();
    std::fs::write(&e.cfg, good.replacen("port: 80", "port: 99999", 1)).unwrap();
    agent.signal(libc::SIGHUP);
    let want = format!("{}: rules[0].port: 99999 is not a port", e.cfg.display());
    agent
        .wait_for_log(&want, Duration::from_secs(10))
        .expect("the error names file, field and value");
    assert!(agent
        .log_text()
        .contains("the rules already running are unchanged"));
    assert_eq!(c.ask("y").unwrap().backend, b, "open connection unaffected");
    Conn::open(&e.t.client, vip(80))
        .unwrap()
        .ask("z")
        .expect("new connections still served by the old rules");
    assert!(udp_ask(&e.t.client, vip(53), "u").is_ok());
    agent.stop().unwrap();
}

#[test]
fn restart_with_keep_adopts_maps_and_open_connection_survives() {
    if !need_root("restart_with_keep_adopts_maps_and_open_connection_survives") {
        return;
    }
    let e = env("lxe4", 2);
    let mut agent = Agent::start(&e.t, &e.cfg, &["--keep"]).expect("agent");
    let mut c = Conn::open(&e.t.client, vip(80)).unwrap();
    let b = c.ask("before").unwrap().backend;
    agent.stop().unwrap();
    assert!(
        e.t.pin_dir().join("LB_CT").exists(),
        "--keep leaves maps pinned"
    );
    // No agent running: the program stays attached, the session works,
    // and new connections are served too (the pinned tail-call arrays keep
    // the new-flow program reachable).
    assert_eq!(c.ask("between").unwrap().backend, b);
    Conn::open(&e.t.client, vip(80))
        .unwrap()
        .ask("new-while-down")
        .expect("a new connection while no agent runs");
    let mut agent2 = Agent::start(&e.t, &e.cfg, &[]).expect("agent restart");
    assert!(
        agent2.log_text().contains("adopted the datapath state"),
        "{}",
        agent2.log_text()
    );
    assert!(agent2
        .log_text()
        .contains("adopted (program replaced in place)"));
    assert_eq!(
        c.ask("after").unwrap().backend,
        b,
        "same backend after restart"
    );
    let sessions = agent2.cli("sessions").unwrap();
    assert!(
        sessions.contains(&c.local_addr().port().to_string()),
        "{sessions}"
    );
    agent2.stop().unwrap();
    assert!(!e.t.pin_dir().exists());
    let _ = &mut agent2;
}

#[test]
fn bad_config_at_start_refuses_to_start_and_touches_nothing() {
    if !need_root("bad_config_at_start_refuses_to_start_and_touches_nothing") {
        return;
    }
    let e = env("lxe5", 1);
    std::fs::write(
        &e.cfg,
        "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, endpoints: [{ip: 10.10.1.2, port: 8080}], mode: fullproxy}\n",
    )
    .unwrap();
    let err = match Agent::start(&e.t, &e.cfg, &[]) {
        Ok(_) => panic!("agent started with a bad rule file"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains(&format!(
            "{}: rules[0].mode: \"fullproxy\" is not supported",
            e.cfg.display()
        )),
        "{err}"
    );
    assert!(!e.t.pin_dir().exists(), "nothing pinned");
    let link = e.t.lb.sh(&["ip", "link", "show", "lbc"]).unwrap();
    assert!(!link.contains("xdp"), "nothing attached: {link}");
}

/// The README's demo, run as a test: real traffic balanced over the
/// backends, printed, and everything cleaned up.
#[test]
fn demo_shows_traffic_balanced_and_cleans_up() {
    if !need_root("demo_shows_traffic_balanced_and_cleans_up") {
        return;
    }
    let text = loxilb_tests::netns::run_test_bin("demo", &[]);
    for b in ["b1", "b2", "b3"] {
        assert!(
            text.contains(&format!("answered by {b} (backend saw client 10.10.0.2:")),
            "{text}"
        );
    }
    assert!(
        text.contains("20.0.0.100:80          10.10."),
        "session table missing:\n{text}"
    );
    let ns = loxilb_tests::netns::sh(&["ip", "netns", "list"]).unwrap();
    assert!(!ns.contains("lxdemo"), "demo left namespaces behind: {ns}");
    assert!(!std::path::Path::new("/sys/fs/bpf/loxilb-lxdemo").exists());
}

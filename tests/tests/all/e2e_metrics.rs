//! The agent's Prometheus metrics with real traffic: `/metrics` on the
//! health listener, parsed by a Prometheus text-format parser, values
//! checked against what the test sent.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use loxilb_tests::{
    need_root,
    netns::{agent_bin, sh, udp_ask, Agent, Conn, Netns, Scene, Topology, VIP},
};

fn rules(t: &Topology) -> String {
    let eps = |port: u16| {
        (1..=t.backends.len())
            .map(|i| format!("      - {{ ip: {}, port: {port} }}\n", t.backend_ip(i)))
            .collect::<String>()
    };
    format!(
        "rules:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    endpoints:\n{}  - name: dns\n    vip: {VIP}\n    port: 53\n    protocol: udp\n    endpoints:\n{}",
        eps(8080),
        eps(5353)
    )
}

const LISTEN: &str = "127.0.0.1:19435";

fn scrape(ns: &Netns) -> String {
    ns.run(|| {
        let mut s = TcpStream::connect(LISTEN).expect("connect to the metrics listener");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

/// (metric name, sorted labels) -> value.
type Samples = BTreeMap<(String, Vec<(String, String)>), f64>;

/// The samples of a Prometheus text body.
fn parse(body: &str) -> Samples {
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text body");
    let mut out = BTreeMap::new();
    for s in scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        out.insert((s.metric, labels), v);
    }
    out
}

fn get(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    *m.get(&(name.to_string(), want.clone())).unwrap_or_else(|| {
        panic!(
            "{name} {want:?} not scraped; have: {:?}",
            m.keys()
                .map(|k| &k.0)
                .collect::<std::collections::BTreeSet<_>>()
        )
    })
}

#[test]
fn metrics_count_the_traffic_sent() {
    if !need_root("metrics_count_the_traffic_sent") {
        return;
    }
    let e = Scene::new("lxme", 2, (8080, 5353), |_, _| {}, rules);
    let mut agent = Agent::start(&e.t, &e.cfg, &["--health-listen", LISTEN]).expect("agent");
    let before = parse(&body_of(&scrape(&e.t.lb)));
    let tcp = ("service", "20.0.0.100:80/tcp");
    assert_eq!(
        get(
            &before,
            "loxilb_rule_sessions_total",
            &[tcp, ("vip", VIP), ("port", "80"), ("protocol", "tcp")]
        ),
        0.0
    );

    // 6 TCP connections (one session each), 4 UDP exchanges from one
    // socket each (one session each).
    let mut open = vec![];
    for i in 0..6 {
        let mut c = Conn::open(&e.t.client, SocketAddr::new(VIP.parse().unwrap(), 80)).unwrap();
        c.ask(&format!("m{i}")).unwrap();
        open.push(c);
    }
    for i in 0..4 {
        udp_ask(
            &e.t.client,
            SocketAddr::new(VIP.parse().unwrap(), 53),
            &format!("u{i}"),
        )
        .unwrap();
    }
    let m = parse(&body_of(&scrape(&e.t.lb)));
    let rl = |svc: &'static str, port: &'static str, proto: &'static str| {
        vec![
            ("service", svc),
            ("vip", VIP),
            ("port", port),
            ("protocol", proto),
        ]
    };
    assert_eq!(
        get(
            &m,
            "loxilb_rule_sessions_total",
            &rl("20.0.0.100:80/tcp", "80", "tcp")
        ),
        6.0
    );
    assert_eq!(
        get(
            &m,
            "loxilb_rule_sessions_total",
            &rl("20.0.0.100:53/udp", "53", "udp")
        ),
        4.0
    );
    assert!(
        get(
            &m,
            "loxilb_rule_packets_total",
            &rl("20.0.0.100:80/tcp", "80", "tcp")
        ) >= 6.0 * 4.0
    );
    assert_eq!(
        get(
            &m,
            "loxilb_datapath_events_total",
            &[("event", "new_session")]
        ),
        10.0
    );
    // Per endpoint: the 6 TCP sessions spread over both, all still open.
    let mut sessions = 0.0;
    let mut active = 0.0;
    for i in 1..=2 {
        let ep = format!("{}:8080", e.t.backend_ip(i));
        let l = [("service", "20.0.0.100:80/tcp"), ("endpoint", ep.as_str())];
        sessions += get(&m, "loxilb_endpoint_sessions_total", &l);
        active += get(&m, "loxilb_endpoint_active_sessions", &l);
        assert_eq!(get(&m, "loxilb_endpoint_up", &l), 1.0);
    }
    assert_eq!(sessions, 6.0);
    assert_eq!(active, 6.0, "the 6 connections are open");
    // 10 sessions of one entry each: their endpoints serve one service
    // each, so the agent indexed them.
    assert!(get(&m, "loxilb_conntrack_entries", &[]) >= 10.0);
    assert!(get(&m, "loxilb_conntrack_capacity", &[]) > 0.0);
    assert_eq!(
        get(&m, "loxilb_device_xdp_redirect", &[("device", "lbc")]),
        1.0
    );
    // The CLI's JSON forms (loxicmd's nouns) tell the same.
    let get = |noun: &str| -> serde_json::Value {
        let out = sh(&[
            agent_bin().to_str().unwrap(),
            "--pin-dir",
            e.t.pin_dir().to_str().unwrap(),
            "-o",
            "json",
            "get",
            noun,
        ])
        .unwrap();
        serde_json::from_str(&out).unwrap_or_else(|err| panic!("{noun}: {err}: {out}"))
    };
    let lb = get("lb");
    let web = lb
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port"] == 80)
        .expect("the web rule");
    assert_eq!(web["sessions"], 6);
    assert_eq!(web["protocol"], "tcp");
    assert_eq!(web["endpoints"].as_array().unwrap().len(), 2);
    let ct = get("conntrack");
    assert_eq!(ct.as_array().unwrap().len(), 10, "{ct}");
    let ep = get("ep");
    assert_eq!(
        ep.as_array().unwrap().len(),
        4,
        "2 endpoints of 2 rules: {ep}"
    );
    let stats = get("stats");
    assert_eq!(stats["counters"]["new_session"], 10);
    assert!(stats["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["device"] == "lbc" && d["xdp_redirect"] == true));
    drop(open);
    // Not a 404 for the probes' paths.
    assert!(scrape_path(&e.t.lb, "/healthz").starts_with("HTTP/1.1 200"));
    agent.stop().unwrap();
}

fn body_of(resp: &str) -> String {
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("content-type: application/openmetrics-text"),
        "{resp}"
    );
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn scrape_path(ns: &Netns, path: &'static str) -> String {
    ns.run(move || {
        let mut s = TcpStream::connect(LISTEN).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

//! The agent's REST API (loxilb's `/netlox/v1`) end to end: the real
//! agent serves it over TLS in the load balancer's namespace; a rule
//! created over HTTP carries real TCP traffic from the client to the
//! backends, survives a restart of the agent, and once deleted over HTTP
//! the VIP no longer answers. And the create rate for 10,000 rules.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use loxilb_tests::{
    bgp_peer::eventually,
    certs::Certs,
    need_root,
    netns::{Agent, Conn, Scene, StateDir, Topology, VIP},
};
use serde_json::{json, Value};

const API: &str = "127.0.0.1:11111";
const LB: &str = "/netlox/v1/config/loadbalancer";
const TOKEN: &str = "e2e-token-7f3a";

/// One request on `s` (HTTP/1.1, kept alive): status and JSON body.
fn exchange<S: Read + Write>(
    s: &mut S,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // Head, then exactly content-length bytes.
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&b[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&buf[..head_end]).unwrap();
    let status = resp.code.unwrap();
    let len: usize = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&b[..n]);
    }
    let body = &buf[head_end..head_end + len];
    (status, serde_json::from_slice(body).unwrap_or(Value::Null))
}

/// A TLS client of the API (the CA of `certs`, no client certificate:
/// writes need the token).
struct Client {
    tls: Arc<rustls::ClientConfig>,
    t_lb: String,
}

impl Client {
    fn new(certs: &Certs, t: &Topology) -> Self {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(certs.dirs[0].join("ca.crt")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Client {
            tls: Arc::new(tls),
            t_lb: t.lb.name.clone(),
        }
    }

    /// One request over a new TLS connection made in the LB namespace.
    fn call(&self, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let (tls, ns) = (self.tls.clone(), self.t_lb.clone());
        let (method, path, body, token) = (
            method.to_string(),
            path.to_string(),
            body.to_string(),
            token.map(str::to_string),
        );
        std::thread::spawn(move || {
            loxilb_tests::netns::enter(&format!("/var/run/netns/{ns}")).unwrap();
            let tcp =
                TcpStream::connect_timeout(&API.parse().unwrap(), Duration::from_secs(3)).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let conn =
                rustls::ClientConnection::new(tls, "loxilb-api".try_into().unwrap()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            exchange(&mut s, &method, &path, &body, token.as_deref())
        })
        .join()
        .unwrap()
    }
}

fn rule(t: &Topology, name: &str, vip: &str, backends: &[usize]) -> Value {
    json!({
        "serviceArguments": {
            "externalIP": vip, "port": 80, "protocol": "tcp", "sel": 0, "mode": 0,
            "BGP": false, "Monitor": false, "inactiveTimeOut": 0, "managed": true,
            "name": name,
        },
        "endpoints": backends.iter().map(|i| json!({
            "endpointIP": t.backend_ip(*i).to_string(), "targetPort": 8080, "weight": 1, "state": ""
        })).collect::<Vec<_>>(),
    })
}

#[test]
fn a_rule_created_over_the_api_carries_traffic_persists_and_goes() {
    if !need_root("a_rule_created_over_the_api_carries_traffic_persists_and_goes") {
        return;
    }
    let s = Scene::new(
        "lxap1",
        2,
        (8080, 5353),
        |_, _| {},
        |_| "rules: []\n".into(),
    );
    let state = StateDir::of(&s.t);
    let certs = Certs::new(&["loxilb-api"]);
    let token = std::env::temp_dir().join(format!("lxap1-token-{}", std::process::id()));
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let tls_dir = certs.dirs[0].to_str().unwrap().to_string();
    let args = [
        "--api-listen",
        API,
        "--api-tls",
        &tls_dir,
        "--api-token-file",
        token.to_str().unwrap(),
    ];
    let mut agent = Agent::start(&s.t, &s.cfg, &args).expect("agent");
    agent
        .wait_for_log(
            "REST API on https://127.0.0.1:11111",
            Duration::from_secs(5),
        )
        .unwrap();
    let api = Client::new(&certs, &s.t);
    assert_eq!(
        api.call("GET", "/", "", None),
        (200, json!({"status": "ok", "rules": {"file": 0, "api": 0}}))
    );
    // Nothing serves the VIP yet.
    assert!(Conn::open(&s.t.client, Scene::vip(80))
        .and_then(|mut c| c.ask("x"))
        .is_err());
    let web = rule(&s.t, "default_web:llb-inst0", VIP, &[1, 2]).to_string();
    // Without the token: refused, nothing installed.
    let (st, v) = api.call("POST", LB, &web, None);
    assert_eq!(st, 401, "{v}");
    let (st, v) = api.call("POST", LB, &web, Some("wrong"));
    assert_eq!(st, 403, "{v}");
    assert!(!agent.cli("rules").unwrap().contains(VIP));
    // Created: real traffic through the VIP reaches both backends.
    assert_eq!(
        api.call("POST", LB, &web, Some(TOKEN)),
        (200, json!({"result": "Success"}))
    );
    let seen = eventually("both backends serve", Duration::from_secs(5), || {
        let b = s.backends_reached(Scene::vip(80), 6);
        if b.len() == 2 {
            Ok(b)
        } else {
            Err(format!("{b:?}"))
        }
    });
    assert_eq!(seen, BTreeSet::from(["b1".into(), "b2".into()]));
    let rules = agent.cli("rules").unwrap();
    assert!(rules.contains(VIP), "{rules}");
    // A session, as loxilb lists it.
    let mut open = Conn::open(&s.t.client, Scene::vip(80)).unwrap();
    open.ask("held").unwrap();
    let (st, ct) = api.call("GET", "/netlox/v1/config/conntrack/all", "", None);
    assert_eq!(st, 200);
    let client_port = open.local_addr().port();
    let mine: Vec<&Value> = ct["ctAttr"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["sourcePort"] == json!(client_port))
        .collect();
    assert_eq!(mine.len(), 1, "{ct}");
    assert_eq!(mine[0]["destinationIP"], json!(VIP));
    assert_eq!(
        mine[0]["servName"],
        json!("default_web:llb-inst0@20.0.0.100:80/tcp")
    );
    drop(open);
    let (_, all) = api.call("GET", &format!("{LB}/all"), "", None);
    assert_eq!(all["lbAttr"].as_array().unwrap().len(), 1, "{all}");
    // A probed rule whose endpoint is closed: listed inactive.
    let mut probed = rule(&s.t, "default_probed:llb-inst0", VIP, &[2]);
    probed["serviceArguments"]["port"] = json!(81);
    probed["endpoints"][0]["targetPort"] = json!(9);
    for (k, v) in [
        ("Monitor", json!(true)),
        ("probetype", json!("tcp")),
        ("probeRetries", json!(1)),
        ("probeTimeout", json!(1)),
    ] {
        probed["serviceArguments"][k] = v;
    }
    assert_eq!(
        api.call("POST", LB, &probed.to_string(), Some(TOKEN)).0,
        200
    );
    let states = |all: &Value| -> Vec<String> {
        all["lbAttr"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["endpoints"][0]["state"].as_str().unwrap().to_string())
            .collect()
    };
    eventually(
        "the closed endpoint is listed inactive",
        Duration::from_secs(15),
        || {
            let (_, all) = api.call("GET", &format!("{LB}/all"), "", None);
            let st = states(&all);
            if st == ["active", "inactive"] {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            }
        },
    );
    assert_eq!(
        api.call(
            "DELETE",
            &format!("{LB}/externalipaddress/{VIP}/port/81/protocol/tcp"),
            "",
            Some(TOKEN)
        )
        .0,
        200
    );

    // Restart: the API rule comes back from the state directory.
    agent.stop().unwrap();
    assert!(Conn::open(&s.t.client, Scene::vip(80))
        .and_then(|mut c| c.ask("x"))
        .is_err());
    let mut agent = Agent::start(&s.t, &s.cfg, &args).expect("agent again");
    agent
        .wait_for_log(
            "1 rule(s) created through the REST API restored",
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(s.backends_reached(Scene::vip(80), 6).len(), 2);
    let (_, again) = api.call("GET", &format!("{LB}/all"), "", None);
    assert_eq!(again, all);

    // A rule file taking the API rule's VIP and port: the reload is
    // refused naming both, the API rule keeps serving.
    let clash = format!(
        "rules:\n  - name: file-web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    \
         endpoints: [{{ ip: {}, port: 8080 }}]\n",
        s.t.backend_ip(1)
    );
    std::fs::write(&s.cfg, clash).unwrap();
    agent.signal(libc::SIGHUP);
    agent
        .wait_for_log(
            "by the API rule \"default_web:llb-inst0@20.0.0.100:80/tcp\"",
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(agent.log_text().contains("\"file-web\" of the rule file"));
    assert_eq!(s.backends_reached(Scene::vip(80), 6).len(), 2);
    // A good reload installs the file's rules with the API's: the API
    // rule stays.
    agent.reload(&s.cfg, "rules: []\n");
    assert_eq!(s.backends_reached(Scene::vip(80), 6).len(), 2);

    // Deleted by name: the VIP no longer answers.
    assert_eq!(
        api.call(
            "DELETE",
            &format!("{LB}/name/default_web:llb-inst0"),
            "",
            Some(TOKEN)
        ),
        (200, json!({"result": "Success"}))
    );
    eventually(
        "the VIP stops answering",
        Duration::from_secs(5),
        || match Conn::open(&s.t.client, Scene::vip(80)).and_then(|mut c| c.ask("x")) {
            Err(_) => Ok(()),
            Ok(r) => Err(format!("still served by {}", r.backend)),
        },
    );
    assert!(!agent.cli("rules").unwrap().contains(VIP));
    assert_eq!(
        api.call(
            "DELETE",
            &format!("{LB}/name/default_web:llb-inst0"),
            "",
            Some(TOKEN)
        )
        .0,
        404
    );
    // And stays deleted across a restart; created again by tuple-delete
    // round trip.
    agent.stop().unwrap();
    let mut agent = Agent::start(&s.t, &s.cfg, &args).expect("agent, third start");
    agent
        .wait_for_log(
            "0 rule(s) created through the REST API restored",
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(s.backends_reached(Scene::vip(80), 2).is_empty());
    assert_eq!(api.call("POST", LB, &web, Some(TOKEN)).0, 200);
    assert_eq!(s.backends_reached(Scene::vip(80), 6).len(), 2);
    assert_eq!(
        api.call(
            "DELETE",
            &format!("{LB}/externalipaddress/{VIP}/port/80/protocol/tcp"),
            "",
            Some(TOKEN)
        ),
        (200, json!({"result": "Success"}))
    );
    eventually(
        "the VIP stops answering",
        Duration::from_secs(5),
        || match Conn::open(&s.t.client, Scene::vip(80)).and_then(|mut c| c.ask("x")) {
            Err(_) => Ok(()),
            Ok(r) => Err(format!("still served by {}", r.backend)),
        },
    );
    agent.stop().unwrap();
    let _ = std::fs::remove_file(&token);
    drop(state);
}

/// How fast rules are created over the API into the real datapath: 10,000
/// rules (each its own VIP, one endpoint), one after another on one
/// kept-alive connection (plain HTTP, --insecure-api: the figure is the
/// API and the datapath, not TLS). Prints rules/s; asserts only that all
/// of them are there. `API_BENCH_RULES` changes the count.
#[test]
fn api_create_rate_for_10000_rules() {
    if !need_root("api_create_rate_for_10000_rules") {
        return;
    }
    let n: usize = std::env::var("API_BENCH_RULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let s = Scene::new(
        "lxap2",
        1,
        (8080, 5353),
        |_, _| {},
        |_| "rules: []\n".into(),
    );
    let state = StateDir::of(&s.t);
    let mut agent =
        Agent::start(&s.t, &s.cfg, &["--api-listen", API, "--insecure-api"]).expect("agent");
    agent
        .wait_for_log("REST API on http://127.0.0.1:11111", Duration::from_secs(5))
        .unwrap();
    let backend = s.t.backend_ip(1).to_string();
    let lb = s.t.lb.name.clone();
    let (elapsed, listed) = std::thread::spawn(move || {
        loxilb_tests::netns::enter(&format!("/var/run/netns/{lb}")).unwrap();
        let addr: SocketAddr = API.parse().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_nodelay(true).unwrap();
        let bodies: Vec<String> = (0..n)
            .map(|i| {
                json!({
                    "serviceArguments": {
                        "externalIP": format!("30.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                        "port": 80, "protocol": "tcp", "sel": 0, "mode": 0,
                        "name": format!("bench_{i}"),
                    },
                    "endpoints": [{"endpointIP": backend, "targetPort": 8080, "weight": 1}],
                })
                .to_string()
            })
            .collect();
        let t0 = Instant::now();
        for b in &bodies {
            let (st, v) = exchange(&mut c, "POST", LB, b, None);
            assert_eq!(st, 200, "{v}");
        }
        let el = t0.elapsed();
        let (st, all) = exchange(&mut c, "GET", &format!("{LB}/all"), "", None);
        assert_eq!(st, 200);
        (el, all["lbAttr"].as_array().unwrap().len())
    })
    .join()
    .unwrap();
    assert_eq!(listed, n);
    let rows: Value = serde_json::from_str(
        &loxilb_tests::netns::sh(&[
            loxilb_tests::netns::agent_bin().to_str().unwrap(),
            "--pin-dir",
            s.t.pin_dir().to_str().unwrap(),
            "-o",
            "json",
            "rules",
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["vip"].as_str().unwrap().starts_with("30."))
            .count(),
        n,
        "every rule in the datapath"
    );
    println!(
        "REST API create rate: {n} rules in {:.2} s = {:.0} rules/s (one connection, sequential, \
         {} build of the agent, persisted, into the datapath)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    agent.stop().unwrap();
    drop(state);
}

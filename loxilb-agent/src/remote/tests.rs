//! The kube rule -> API JSON mapping, and the sync through the agent's
//! real REST API server on loopback (its rules go to a recording sink).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use loxilb_model::{Endpoint, Mode, ProbeKind, ProbeSpec, Rule, Selection};
use serde_json::json;

use super::*;
use crate::{
    api::{server, store::Store, Api},
    config,
};

/// The "datapath" of the API under test: nothing to do.
struct NoDatapath;

impl api::Sink for NoDatapath {
    fn apply(&mut self, _: &[Rule], _: &[Rule]) -> anyhow::Result<()> {
        Ok(())
    }
    fn sessions(&mut self) -> anyhow::Result<Vec<crate::show::SessionRow>> {
        Ok(vec![])
    }
    fn endpoints_down(&mut self) -> HashSet<(String, IpAddr, u16)> {
        HashSet::new()
    }
    fn set_master(&mut self, _: bool) -> anyhow::Result<()> {
        Ok(())
    }
    fn probes(&mut self) -> Vec<crate::probe::TargetStatus> {
        vec![]
    }
    fn bgp_neighbors(&mut self) -> anyhow::Result<Vec<crate::bgp::Neighbor>> {
        anyhow::bail!("no BGP here")
    }
}

const FILE_RULES: &str = "rules:\n  - name: file-web\n    vip: 20.0.0.9\n    port: 80\n    protocol: tcp\n    endpoints: [{ ip: 10.0.1.10, port: 8080 }]\n";

fn fresh_api() -> Api {
    Api::new(
        Box::new(NoDatapath),
        Box::new(|_: &[Rule]| Ok(())),
        Store::in_memory(),
        vec![],
        false,
        "rules.yaml",
        config::parse("rules.yaml", FILE_RULES).unwrap(),
    )
    .unwrap()
}

async fn serve(auth: server::Auth) -> (String, Arc<Mutex<Api>>) {
    let api = Arc::new(Mutex::new(fresh_api()));
    let cfg = server::ApiListen {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        auth,
    };
    let addr = server::start(cfg, api.clone()).await.unwrap();
    (format!("http://{addr}"), api)
}

fn insecure() -> server::Auth {
    server::Auth {
        insecure: true,
        ..Default::default()
    }
}

/// A port nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    format!("http://{a}")
}

fn kube_rule(svc: &str, vip: &str, port: u16) -> KubeRule {
    let mut rule = Rule::new(vip.parse().unwrap(), port, Protocol::Tcp);
    rule.name = format!("default/{svc}:{port}/tcp@{vip}");
    rule.mode = Mode::FullNat;
    rule.selection = Selection::LeastConn;
    rule.timeout_s = 60;
    rule.endpoints = vec![
        Endpoint {
            ip: "10.0.0.5".parse().unwrap(),
            port: 30080,
            weight: 2,
        },
        Endpoint {
            ip: "10.0.0.6".parse().unwrap(),
            port: 30080,
            weight: 1,
        },
    ];
    rule.source_ranges = vec!["192.168.0.0/16".parse().unwrap()];
    KubeRule {
        service: ServiceKey::new("default", svc),
        rule,
    }
}

/// Our rules the API holds, as listed: (VIP:port, name, endpoint IPs).
fn held(api: &Arc<Mutex<Api>>) -> Vec<(String, String, Vec<String>)> {
    let v = api.lock().unwrap().list();
    v["lbAttr"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["serviceArguments"]["managed"] == true)
        .map(|r| {
            let s = &r["serviceArguments"];
            (
                format!("{}:{}", s["externalIP"].as_str().unwrap(), s["port"]),
                s["name"].as_str().unwrap().to_string(),
                r["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["endpointIP"].as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn fast() -> Options {
    Options {
        resync: Duration::from_millis(200),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        request_timeout: Duration::from_secs(2),
        wait: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_kube_rule_maps_to_loxilbs_json() {
    let mut r = kube_rule("web", "20.0.0.1", 80);
    r.rule.probe = Some(ProbeSpec {
        port: Some(8080),
        request: Some("/healthz".into()),
        response: Some("ok".into()),
        timeout: Duration::from_secs(3),
        retries: 2,
        ..ProbeSpec::new(ProbeKind::Http)
    });
    let v = serde_json::to_value(to_api(&r, true).unwrap()).unwrap();
    assert_eq!(
        v,
        json!({
            "serviceArguments": {
                "externalIP": "20.0.0.1",
                "port": 80,
                "protocol": "tcp",
                "sel": 4,
                "mode": 2,
                "BGP": true,
                "Monitor": true,
                "inactiveTimeOut": 60,
                "managed": true,
                "probetype": "http",
                "probeport": 8080,
                "probereq": "/healthz",
                "proberesp": "ok",
                "probeRetries": 2,
                "probeTimeout": 3,
                "name": "default_web",
            },
            "allowedSources": [{"prefix": "192.168.0.0/16"}],
            "endpoints": [
                {"endpointIP": "10.0.0.5", "targetPort": 30080, "weight": 2},
                {"endpointIP": "10.0.0.6", "targetPort": 30080, "weight": 1},
            ],
        })
    );
    // What this datapath cannot do is refused before anything is sent.
    let mut dsr = kube_rule("dsr", "20.0.0.2", 80);
    dsr.rule.mode = Mode::Dsr;
    let e = to_api(&dsr, false).unwrap_err();
    assert!(e.reason.contains("service port 80"), "{}", e.reason);
}

#[test]
fn urls_are_checked() {
    let r = parse_urls("http://10.0.0.5:11111, https://lb.example:8443,http://[fd00::5]").unwrap();
    assert_eq!(
        r.iter()
            .map(|r| (r.https, r.host.as_str(), r.port))
            .collect::<Vec<_>>(),
        vec![
            (false, "10.0.0.5", 11111),
            (true, "lb.example", 8443),
            (false, "fd00::5", DEFAULT_PORT)
        ]
    );
    assert_eq!(r[2].authority(), "[fd00::5]:11111");
    for (bad, why) in [
        ("10.0.0.5:11111", "scheme"),
        ("ftp://10.0.0.5", "neither http nor https"),
        ("http://10.0.0.5:11111/netlox/v1", "path"),
        ("http://a:1,", "empty entry"),
        ("http://a:1,http://a:1", "twice"),
        ("http://u:p@a:1", "user information"),
    ] {
        let e = parse_urls(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_posted_deleted_refused_and_resynced_after_a_restart() {
    let (url, api) = serve(insecure()).await;
    let down = closed_port();
    let remotes = parse_urls(&format!("{url},{down}")).unwrap();
    let mut sink = RemoteSink::start(remotes, fast()).unwrap();
    let web = kube_rule("web", "20.0.0.1", 80);
    let db = kube_rule("db", "20.0.0.2", 5432);

    // A follower leaves the remotes alone.
    let a = sink.apply(vec![web.clone()]).unwrap();
    assert!(a.refused.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(held(&api).is_empty());

    // The leader programs them; one of the two being down is no error.
    sink.leading(true);
    let a = sink.apply(vec![web.clone(), db.clone()]).unwrap();
    assert!(a.refused.is_empty(), "{a:?}");
    assert_eq!(
        held(&api),
        vec![
            (
                "20.0.0.1:80".into(),
                "default_web".into(),
                vec!["10.0.0.5".into(), "10.0.0.6".into()]
            ),
            (
                "20.0.0.2:5432".into(),
                "default_db".into(),
                vec!["10.0.0.5".into(), "10.0.0.6".into()]
            ),
        ]
    );

    // The VIP, port and protocol of the remote's rule file: its 409
    // reaches the controller, on that rule only.
    let clash = kube_rule("clash", "20.0.0.9", 80);
    let mut web2 = web.clone();
    web2.rule.endpoints.truncate(1);
    let a = sink
        .apply(vec![web2.clone(), db.clone(), clash.clone()])
        .unwrap();
    assert_eq!(a.refused.len(), 1, "{a:?}");
    assert_eq!(a.refused[0].rule, clash.rule.name);
    assert_eq!(a.refused[0].service, clash.service);
    assert!(
        a.refused[0].reason.contains(&url)
            && a.refused[0].reason.contains("409")
            && a.refused[0].reason.contains("file-web"),
        "{}",
        a.refused[0].reason
    );
    assert_eq!(held(&api)[0].2, vec!["10.0.0.5".to_string()], "updated");

    // A removed rule is deleted; the rule file's is never touched.
    let a = sink.apply(vec![web2.clone()]).unwrap();
    assert!(a.refused.is_empty());
    assert_eq!(held(&api).len(), 1);
    assert_eq!(
        api.lock().unwrap().list()["lbAttr"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The remote restarts without its state: re-synced on the next list.
    *api.lock().unwrap() = fresh_api();
    assert!(held(&api).is_empty());
    eventually("the rule back after the restart", || held(&api).len() == 1).await;

    // Someone else's rule of ours (managed) that we do not want goes.
    let (st, _) = api.lock().unwrap().handle(
        &http::Method::POST,
        "/netlox/v1/config/loadbalancer",
        &serde_json::to_vec(&to_api(&db, false).unwrap()).unwrap(),
    );
    assert_eq!(st, 200);
    assert_eq!(held(&api).len(), 2);
    eventually("the extra rule deleted", || held(&api).len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_comes_up_late_gets_every_rule() {
    // Its port is known before it listens.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let mut sink =
        RemoteSink::start(parse_urls(&format!("http://{addr}")).unwrap(), fast()).unwrap();
    sink.leading(true);
    let e = sink
        .apply(vec![kube_rule("web", "20.0.0.1", 80)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no loxilb API is reachable") && e.contains(&addr.to_string()),
        "{e}"
    );
    let api = Arc::new(Mutex::new(fresh_api()));
    let cfg = server::ApiListen {
        addr,
        tls: None,
        auth: insecure(),
    };
    server::start(cfg, api.clone()).await.unwrap();
    eventually("the rule on the remote once it is up", || {
        held(&api).len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_ca_and_a_token() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = std::env::temp_dir().join(format!("lxremote-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(p, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();
    std::fs::write(dir.join("token"), "s3cret\n").unwrap();
    let cfg = server::ApiListen::from_flags(
        Some("127.0.0.1:0".parse().unwrap()),
        Some(&dir),
        Some(&dir.join("token")),
        false,
    )
    .unwrap()
    .unwrap();
    let api = Arc::new(Mutex::new(fresh_api()));
    let addr = server::start(cfg, api.clone()).await.unwrap();
    let url = format!("https://localhost:{}", addr.port());

    // https without a CA is refused at start.
    let e = RemoteSink::start(parse_urls(&url).unwrap(), fast())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--loxiCA"), "{e}");

    // Without the token: the remote refuses our writes (401).
    let with_ca = Options {
        ca_file: Some(dir.join("ca.pem")),
        ..fast()
    };
    let mut sink = RemoteSink::start(parse_urls(&url).unwrap(), with_ca.clone()).unwrap();
    sink.leading(true);
    let e = sink
        .apply(vec![kube_rule("web", "20.0.0.1", 80)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("credentials") && e.contains("--loxiTokenFile"),
        "{e}"
    );
    drop(sink);

    let mut sink = RemoteSink::start(
        parse_urls(&url).unwrap(),
        Options {
            token: Some("s3cret".into()),
            ..with_ca
        },
    )
    .unwrap();
    sink.leading(true);
    let a = sink.apply(vec![kube_rule("web", "20.0.0.1", 80)]).unwrap();
    assert!(a.refused.is_empty(), "{a:?}");
    assert_eq!(held(&api).len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP forwarder to a remote that can be cut (connection refused, open
/// connections dropped) and started again on the same port: a remote that
/// dies and comes back.
struct Proxy {
    addr: std::net::SocketAddr,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(to: &str, at: Option<std::net::SocketAddr>) -> Proxy {
        let to: std::net::SocketAddr = to.trim_start_matches("http://").parse().unwrap();
        let l = tokio::net::TcpListener::bind(at.unwrap_or("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                });
                t.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy { addr, tasks }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// The role `api` holds for the default instance, and its VIP.
fn role(api: &Arc<Mutex<Api>>) -> Option<(String, String)> {
    let (st, v) =
        api.lock()
            .unwrap()
            .handle(&http::Method::GET, "/netlox/v1/config/cistate/all", b"");
    assert_eq!(st, 200, "{v}");
    v["Attr"].as_array().unwrap().iter().find_map(|a| {
        (a["instance"] == ROLE_INSTANCE).then(|| {
            (
                a["state"].as_str().unwrap().to_string(),
                a["vip"].as_str().unwrap().to_string(),
            )
        })
    })
}

fn is(api: &Arc<Mutex<Api>>, state: &str) -> bool {
    role(api).is_some_and(|(s, _)| s == state)
}

fn with_roles() -> Options {
    Options {
        roles: Some("10.0.0.9".parse().unwrap()),
        role_interval: Duration::from_millis(100),
        role_timeout: Duration::from_millis(500),
        ..fast()
    }
}

/// `--setRoles` in external mode: one live remote MASTER, the others
/// BACKUP; a restarted remote is told again; the MASTER's death promotes
/// the next; the old one comes back as BACKUP; a new leader keeps the
/// MASTER the remotes report instead of flipping to the first URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_roles_keeps_one_live_master() {
    let (url_a, api_a) = serve(insecure()).await;
    let (url_b, api_b) = serve(insecure()).await;
    let pa = Proxy::start(&url_a, None).await;
    let urls = format!("{},{url_b}", pa.url());
    let mut sink = RemoteSink::start(parse_urls(&urls).unwrap(), with_roles()).unwrap();

    // A follower sets no roles.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!((role(&api_a), role(&api_b)), (None, None));
    assert!(sink.roles().iter().all(|r| r.state.is_none()));

    sink.leading(true);
    eventually("A MASTER, B BACKUP", || {
        is(&api_a, "MASTER") && is(&api_b, "BACKUP")
    })
    .await;
    assert_eq!(role(&api_a).unwrap().1, "10.0.0.9", "the --setRoles VIP");
    eventually("the report", || {
        sink.roles()
            .iter()
            .map(|r| r.state.clone())
            .collect::<Vec<_>>()
            == [Some("MASTER".to_string()), Some("BACKUP".to_string())]
    })
    .await;
    assert_eq!(sink.roles()[0].url, pa.url());

    // B restarts without its state: told BACKUP again.
    *api_b.lock().unwrap() = fresh_api();
    assert_eq!(role(&api_b), None);
    eventually("B BACKUP again", || is(&api_b, "BACKUP")).await;

    // The MASTER dies: B is promoted, A reported down.
    pa.kill();
    let t = Instant::now();
    eventually("B promoted", || is(&api_b, "MASTER")).await;
    eprintln!("promoted {:?} after the MASTER's death", t.elapsed());
    eventually("A down in the report", || sink.roles()[0].state.is_none()).await;

    // A comes back, still MASTER on its side: told BACKUP; B stays.
    assert!(is(&api_a, "MASTER"));
    let pa2 = Proxy::start(&url_a, Some(pa.addr)).await;
    eventually("A demoted", || is(&api_a, "BACKUP")).await;
    assert!(is(&api_b, "MASTER"));

    // A new leader (this agent restarted) keeps B, though A comes first.
    drop(sink);
    let mut sink = RemoteSink::start(parse_urls(&urls).unwrap(), with_roles()).unwrap();
    sink.leading(true);
    eventually("the new leader's report", || {
        sink.roles().iter().all(|r| r.state.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(is(&api_a, "BACKUP") && is(&api_b, "MASTER"));
    assert_eq!(sink.roles()[1].state.as_deref(), Some("MASTER"));
    pa2.kill();
}

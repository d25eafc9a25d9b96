//! Conformance of the REST API, through its real HTTP server on loopback
//! (no datapath: the rules go to a recording sink): recorded request /
//! response pairs for every endpoint, refusals that change nothing,
//! authentication, persistence.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{server, store::Store, *};

/// What the "datapath" holds: rules by name, and every call.
#[derive(Default)]
struct Installed {
    rules: BTreeMap<String, Rule>,
    calls: usize,
    fail: bool,
    down: std::collections::HashSet<(String, IpAddr, u16)>,
    master: Option<bool>,
    probes: Vec<crate::probe::TargetStatus>,
    /// The BGP sessions, or why the speaker does not answer (`None`: no
    /// speaker at all).
    bgp: Option<Result<Vec<crate::bgp::Neighbor>, String>>,
    /// How often the sessions were asked for.
    bgp_asked: usize,
}

struct MemSink(Arc<Mutex<Installed>>);

impl Sink for MemSink {
    fn apply(&mut self, upserts: &[Rule], removed: &[Rule]) -> anyhow::Result<()> {
        let mut i = self.0.lock().unwrap();
        if i.fail {
            anyhow::bail!("the maps are full");
        }
        i.calls += 1;
        for r in removed {
            i.rules.remove(&r.name);
        }
        for r in upserts {
            i.rules.insert(r.name.clone(), r.clone());
        }
        Ok(())
    }

    fn sessions(&mut self) -> anyhow::Result<Vec<crate::show::SessionRow>> {
        Ok(vec![crate::show::SessionRow {
            protocol: "tcp".into(),
            client: "10.0.0.1:40000".parse().unwrap(),
            service: "20.0.0.1:80".parse().unwrap(),
            endpoint: "10.0.1.10:8080".parse().unwrap(),
            state: "active",
            idle_s: 1,
            packets_in: 3,
            packets_out: 2,
        }])
    }

    fn endpoints_down(&mut self) -> std::collections::HashSet<(String, IpAddr, u16)> {
        self.0.lock().unwrap().down.clone()
    }

    fn probes(&mut self) -> Vec<crate::probe::TargetStatus> {
        self.0.lock().unwrap().probes.clone()
    }

    fn bgp_neighbors(&mut self) -> anyhow::Result<Vec<crate::bgp::Neighbor>> {
        let mut i = self.0.lock().unwrap();
        i.bgp_asked += 1;
        match i.bgp.clone() {
            None => anyhow::bail!("no speaker socket"),
            Some(r) => r.map_err(|e| anyhow::anyhow!(e)),
        }
    }

    fn set_master(&mut self, master: bool) -> anyhow::Result<()> {
        let mut i = self.0.lock().unwrap();
        if i.fail {
            anyhow::bail!("the node is stopping");
        }
        i.master = Some(master);
        Ok(())
    }
}

const FILE_RULES: &str = "rules:\n  - name: file-web\n    vip: 20.0.0.9\n    port: 80\n    protocol: tcp\n    endpoints: [{ ip: 10.0.1.10, port: 8080 }]\n";

fn api_with(store: Store, stored: Vec<LbRule>, file: &str) -> (Api, Arc<Mutex<Installed>>) {
    let inst = Arc::new(Mutex::new(Installed::default()));
    let api = Api::new(
        Box::new(MemSink(inst.clone())),
        Box::new(|_: &[Rule]| Ok(())),
        store,
        stored,
        false,
        "rules.yaml",
        config::parse("rules.yaml", file).unwrap(),
    )
    .unwrap();
    // What `run` does at start: install the union.
    inst.lock().unwrap().rules = api
        .union()
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    (api, inst)
}

struct Server {
    addr: SocketAddr,
    api: Arc<Mutex<Api>>,
    inst: Arc<Mutex<Installed>>,
}

async fn serve(auth: server::Auth) -> Server {
    let (api, inst) = api_with(Store::in_memory(), vec![], FILE_RULES);
    let api = Arc::new(Mutex::new(api));
    let cfg = server::ApiListen {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        auth,
    };
    let addr = server::start(cfg, api.clone()).await.unwrap();
    Server { addr, api, inst }
}

fn token_auth() -> server::Auth {
    server::Auth {
        token: Some("s3cret".into()),
        client_certs: false,
        insecure: false,
    }
}

/// One HTTP/1.1 exchange over a new connection: status and JSON body.
async fn call<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nContent-Type: \
         application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

impl Server {
    async fn req(&self, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        call(s, method, path, body, token).await
    }

    async fn write(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        self.req(method, path, body, Some("s3cret")).await
    }

    async fn all(&self) -> Value {
        let (st, v) = self
            .req("GET", "/netlox/v1/config/loadbalancer/all", "", None)
            .await;
        assert_eq!(st, 200);
        v
    }

    fn installed(&self) -> Vec<String> {
        self.inst.lock().unwrap().rules.keys().cloned().collect()
    }
}

fn web(port: u16, name: &str, eps: &[(&str, u16)]) -> Value {
    json!({
        "serviceArguments": {
            "externalIP": "20.0.0.1", "port": port, "protocol": "tcp", "sel": 0, "mode": 2,
            "BGP": false, "Monitor": false, "inactiveTimeOut": 0, "managed": true,
            "name": name,
        },
        "secondaryIPs": null,
        "endpoints": eps.iter().map(|(ip, p)| json!({"endpointIP": ip, "targetPort": p, "weight": 1, "state": ""})).collect::<Vec<_>>(),
    })
}

const OK: fn() -> Value = || json!({"result": "Success"});
const LB: &str = "/netlox/v1/config/loadbalancer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_as_recorded() {
    let s = serve(token_auth()).await;
    // Health.
    assert_eq!(
        s.req("GET", "/", "", None).await,
        (200, json!({"status": "ok", "rules": {"file": 1, "api": 0}}))
    );
    assert_eq!(
        s.req("GET", "/netlox/v1/status", "", None).await,
        (200, json!({"status": "ok", "rules": {"file": 1, "api": 0}}))
    );
    // Create (kube-loxilb's shape: null lists, empty state).
    let r80 = web(80, "default_web:llb-inst0", &[("10.0.1.10", 8080)]);
    assert_eq!(s.write("POST", LB, &r80.to_string()).await, (200, OK()));
    assert_eq!(
        s.installed(),
        vec!["default_web:llb-inst0@20.0.0.1:80/tcp", "file-web"]
    );
    {
        let i = s.inst.lock().unwrap();
        let r = &i.rules["default_web:llb-inst0@20.0.0.1:80/tcp"];
        assert_eq!(r.mode, Mode::FullNat);
        assert_eq!(r.selection, Selection::RoundRobin);
        assert_eq!(r.timeout_s, loxilb_model::DEFAULT_TIMEOUT_S);
        assert_eq!(r.endpoints.len(), 1);
        assert!(r.probe.is_none());
    }
    // Second port of the same Service (same name).
    let r443 = web(443, "default_web:llb-inst0", &[("10.0.1.10", 8443)]);
    assert_eq!(s.write("POST", LB, &r443.to_string()).await, (200, OK()));
    // GET all: the file's rule, then the API's as stored.
    // The 443 endpoint's probe finds it down.
    s.inst.lock().unwrap().down.insert((
        "default_web:llb-inst0@20.0.0.1:443/tcp".into(),
        "10.0.1.10".parse().unwrap(),
        8443,
    ));
    let all = s.all().await;
    assert_eq!(
        all,
        json!({"lbAttr": [
            {"serviceArguments": {"externalIP": "20.0.0.9", "port": 80, "protocol": "tcp",
              "sel": 0, "mode": 0, "BGP": false, "Monitor": false, "inactiveTimeOut": 1800,
              "managed": false, "name": "file-web"},
             "endpoints": [{"endpointIP": "10.0.1.10", "targetPort": 8080, "weight": 1, "state": "active"}]},
            {"serviceArguments": {"externalIP": "20.0.0.1", "port": 80, "protocol": "tcp",
              "sel": 0, "mode": 2, "BGP": false, "Monitor": false, "inactiveTimeOut": 0,
              "managed": true, "name": "default_web:llb-inst0"},
             "endpoints": [{"endpointIP": "10.0.1.10", "targetPort": 8080, "weight": 1, "state": "active"}]},
            {"serviceArguments": {"externalIP": "20.0.0.1", "port": 443, "protocol": "tcp",
              "sel": 0, "mode": 2, "BGP": false, "Monitor": false, "inactiveTimeOut": 0,
              "managed": true, "name": "default_web:llb-inst0"},
             "endpoints": [{"endpointIP": "10.0.1.10", "targetPort": 8443, "weight": 1, "state": "inactive"}]},
        ]})
    );
    // Update: endpoints replaced, a probe, hash selection.
    let mut upd = web(
        80,
        "default_web:llb-inst0",
        &[("10.0.1.11", 8080), ("10.0.1.12", 8080)],
    );
    upd["serviceArguments"]["sel"] = json!(1);
    upd["serviceArguments"]["Monitor"] = json!(true);
    upd["serviceArguments"]["probetype"] = json!("http");
    upd["serviceArguments"]["probereq"] = json!("/healthz");
    upd["serviceArguments"]["probeTimeout"] = json!(3);
    assert_eq!(s.write("POST", LB, &upd.to_string()).await, (200, OK()));
    {
        let i = s.inst.lock().unwrap();
        let r = &i.rules["default_web:llb-inst0@20.0.0.1:80/tcp"];
        assert_eq!(r.selection, Selection::Hash);
        assert_eq!(
            r.endpoints
                .iter()
                .map(|e| e.ip.to_string())
                .collect::<Vec<_>>(),
            ["10.0.1.11", "10.0.1.12"]
        );
        let p = r.probe.as_ref().unwrap();
        assert_eq!(p.kind, crate::probe::ProbeKind::Http);
        assert_eq!(p.request.as_deref(), Some("/healthz"));
        assert_eq!(p.timeout, std::time::Duration::from_secs(3));
    }
    // The same again: nothing to do, not even a call.
    let calls = s.inst.lock().unwrap().calls;
    assert_eq!(s.write("POST", LB, &upd.to_string()).await, (200, OK()));
    assert_eq!(s.inst.lock().unwrap().calls, calls);
    // kube-loxilb's attach (oper 1) and detach (oper 2) of endpoints.
    let mut att = web(80, "default_web:llb-inst0", &[("10.0.1.13", 8080)]);
    for (k, v) in [
        ("oper", json!(1)),
        ("sel", json!(1)),
        ("Monitor", json!(true)),
        ("probetype", json!("http")),
        ("probereq", json!("/healthz")),
        ("probeTimeout", json!(3)),
    ] {
        att["serviceArguments"][k] = v;
    }
    assert_eq!(s.write("POST", LB, &att.to_string()).await, (200, OK()));
    let mut det = att.clone();
    det["serviceArguments"]["oper"] = json!(2);
    det["endpoints"] = json!([{"endpointIP": "10.0.1.11", "targetPort": 8080}]);
    assert_eq!(s.write("POST", LB, &det.to_string()).await, (200, OK()));
    {
        let i = s.inst.lock().unwrap();
        let r = &i.rules["default_web:llb-inst0@20.0.0.1:80/tcp"];
        assert_eq!(
            r.endpoints
                .iter()
                .map(|e| e.ip.to_string())
                .collect::<Vec<_>>(),
            ["10.0.1.12", "10.0.1.13"]
        );
    }
    // Sessions, loxilb's shape.
    assert_eq!(
        s.req("GET", "/netlox/v1/config/conntrack/all", "", None)
            .await,
        (
            200,
            json!({"ctAttr": [{"protocol": "tcp", "sourceIP": "10.0.0.1", "sourcePort": 40000,
                "destinationIP": "20.0.0.1", "destinationPort": 80, "conntrackState": "active",
                "conntrackAct": "endpoint 10.0.1.10:8080", "packets": 5,
                "servName": "default_web:llb-inst0@20.0.0.1:80/tcp"}]})
        )
    );
    // Delete by tuple, then by name; deleting again: 404.
    let del80 = format!("{LB}/externalipaddress/20.0.0.1/port/80/protocol/tcp");
    assert_eq!(s.write("DELETE", &del80, "").await, (200, OK()));
    assert_eq!(
        s.installed(),
        vec!["default_web:llb-inst0@20.0.0.1:443/tcp", "file-web"]
    );
    assert_eq!(
        s.write("DELETE", &del80, "").await,
        (
            404,
            json!({"code": 404, "message": "no rule for 20.0.0.1:80/tcp", "fields": []})
        )
    );
    let by_name = format!("{LB}/name/default_web%3Allb-inst0");
    assert_eq!(s.write("DELETE", &by_name, "").await, (200, OK()));
    assert_eq!(s.installed(), vec!["file-web"]);
    assert_eq!(
        s.write("DELETE", &by_name, "").await,
        (
            404,
            json!({"code": 404, "message": "no rule named \"default_web:llb-inst0\"", "fields": []})
        )
    );
    assert_eq!(s.api.lock().unwrap().len(), 0);
}

/// Each refused request: its status, the field it names, words of the
/// message; and afterwards nothing changed (rules listed, rules
/// installed, no call to the datapath).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_name_the_field_and_change_nothing() {
    let s = serve(token_auth()).await;
    let base = web(80, "default_web:llb-inst0", &[("10.0.1.10", 8080)]);
    assert_eq!(s.write("POST", LB, &base.to_string()).await, (200, OK()));
    let with = |path: &[&str], v: Value| {
        let mut r = base.clone();
        let mut at = &mut r;
        for p in &path[..path.len() - 1] {
            at = match p.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*p],
            };
        }
        at[path[path.len() - 1]] = v;
        r.to_string()
    };
    let other_name = with(&["serviceArguments", "name"], json!("default_other"));
    let file_vip = with(&["serviceArguments", "externalIP"], json!("20.0.0.9"));
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        // (what, body, status, field, words of the message)
        (
            "bad JSON",
            "{\"serviceArguments\": {".into(),
            400,
            "",
            "bad request body: EOF while parsing",
        ),
        (
            "trailing bytes",
            format!("{base} x"),
            400,
            "",
            "trailing characters",
        ),
        (
            "unknown field",
            with(&["serviceArguments", "portMax"], json!(90)),
            400,
            "serviceArguments.portMax",
            "unknown field `portMax`",
        ),
        (
            "wrong type",
            with(&["serviceArguments", "port"], json!("80")),
            400,
            "serviceArguments.port",
            "invalid type: string \"80\", expected u16",
        ),
        (
            "port out of range",
            with(&["serviceArguments", "port"], json!(70000)),
            400,
            "serviceArguments.port",
            "expected u16",
        ),
        (
            "port 0",
            with(&["serviceArguments", "port"], json!(0)),
            400,
            "serviceArguments.port",
            "0 is not a port",
        ),
        (
            "missing field",
            json!({"serviceArguments": {"port": 80, "protocol": "tcp"}}).to_string(),
            400,
            "serviceArguments",
            "missing field `externalIP`",
        ),
        (
            "bad VIP",
            with(&["serviceArguments", "externalIP"], json!("20.0.0")),
            400,
            "serviceArguments.externalIP",
            "\"20.0.0\" is not an IP address",
        ),
        (
            "bad protocol",
            with(&["serviceArguments", "protocol"], json!("icmp")),
            400,
            "serviceArguments.protocol",
            "\"icmp\" is not supported; use tcp, udp or sctp",
        ),
        (
            "fullproxy",
            with(&["serviceArguments", "mode"], json!(4)),
            400,
            "serviceArguments.mode",
            "4 (fullproxy): \"fullproxy\" is not supported by this load balancer",
        ),
        (
            "hostonearm",
            with(&["serviceArguments", "mode"], json!(5)),
            400,
            "serviceArguments.mode",
            "5 (hostonearm)",
        ),
        (
            "no such mode",
            with(&["serviceArguments", "mode"], json!(9)),
            400,
            "serviceArguments.mode",
            "9 is not a loxilb mode",
        ),
        (
            "priority",
            with(&["serviceArguments", "sel"], json!(2)),
            400,
            "serviceArguments.sel",
            "2 (priority): \"priority\" is not a selection",
        ),
        (
            "n3",
            with(&["serviceArguments", "sel"], json!(6)),
            400,
            "serviceArguments.sel",
            "6 (n3)",
        ),
        (
            "proxy protocol",
            with(&["serviceArguments", "proxyprotocolv2"], json!(true)),
            400,
            "serviceArguments.proxyprotocolv2",
            "PROXY protocol v2",
        ),
        (
            "egress",
            with(&["serviceArguments", "egress"], json!(true)),
            400,
            "serviceArguments.egress",
            "not supported",
        ),
        (
            "private IP",
            with(&["serviceArguments", "privateIP"], json!("10.0.0.5")),
            400,
            "serviceArguments.privateIP",
            "not supported",
        ),
        (
            "BGP without BGP",
            with(&["serviceArguments", "BGP"], json!(true)),
            400,
            "serviceArguments.BGP",
            "without BGP (--setBGP)",
        ),
        (
            "probe without Monitor",
            with(&["serviceArguments", "probetype"], json!("tcp")),
            400,
            "serviceArguments.Monitor",
            "set Monitor to true",
        ),
        (
            "bad probe type",
            with(&["serviceArguments", "Monitor"], json!(true))
                .replace("\"managed\"", "\"probetype\":\"dns\",\"managed\""),
            400,
            "serviceArguments.probetype",
            "\"dns\" is not a probe type",
        ),
        (
            "bad endpoint",
            with(&["endpoints", "0", "endpointIP"], json!("10.0.1")),
            400,
            "endpoints[0].endpointIP",
            "\"10.0.1\" is not an IP address",
        ),
        (
            "weight 0",
            with(&["endpoints", "0", "weight"], json!(0)),
            400,
            "endpoints[0].weight",
            "0 is not a weight",
        ),
        (
            "IPv6 endpoint of IPv4 VIP",
            with(&["endpoints", "0", "endpointIP"], json!("2001:db8::1")),
            400,
            "endpoints[0].endpointIP",
            "NAT46 is not supported",
        ),
        (
            "secondary IPs on TCP",
            with(&["secondaryIPs"], json!([{"secondaryIP": "20.0.0.2"}])),
            400,
            "secondaryIPs",
            "only SCTP rules can have secondary VIPs",
        ),
        (
            "bad prefix",
            with(&["allowedSources"], json!([{"prefix": "10.0.0.1/8"}])),
            400,
            "allowedSources[0].prefix",
            "has host bits set",
        ),
        (
            "unknown endpoint field",
            with(&["endpoints", "0", "nodeName"], json!("n1")),
            400,
            "endpoints[0].nodeName",
            "unknown field `nodeName`",
        ),
        (
            "same tuple, other name",
            other_name,
            409,
            "serviceArguments.name",
            "is the rule of \"default_web:llb-inst0\", not \"default_other\"",
        ),
        (
            "tuple of the rule file",
            file_vip,
            409,
            "serviceArguments.externalIP",
            "served by rule \"file-web\" of the rule file rules.yaml",
        ),
    ];
    let before = (s.all().await, s.installed(), s.inst.lock().unwrap().calls);
    for (what, body, status, field, words) in cases {
        let (st, v) = s.write("POST", LB, &body).await;
        assert_eq!(st, status, "{what}: {v}");
        assert_eq!(v["code"], json!(status), "{what}: {v}");
        let fields: Vec<&str> = if field.is_empty() {
            vec![]
        } else {
            vec![field]
        };
        assert_eq!(v["fields"], json!(fields), "{what}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(words), "{what}: {msg}");
        if !field.is_empty() {
            assert!(msg.starts_with(&format!("{field}: ")), "{what}: {msg}");
        }
        let after = (s.all().await, s.installed(), s.inst.lock().unwrap().calls);
        assert_eq!(after, before, "{what} changed something");
    }
    // Deletes refused.
    for (path, status, words) in [
        (
            format!("{LB}/externalipaddress/20.0.0.9/port/80/protocol/tcp"),
            409,
            "rule \"file-web\" of the rule file rules.yaml",
        ),
        (
            format!("{LB}/name/file-web"),
            409,
            "a rule of the rule file",
        ),
        (
            format!("{LB}/externalipaddress/20.0.0.1/port/81/protocol/tcp"),
            404,
            "no rule for 20.0.0.1:81/tcp",
        ),
        (
            format!("{LB}/externalipaddress/20.0.0.1/port/http/protocol/tcp"),
            400,
            "port: \"http\" is not a port",
        ),
        (
            format!("{LB}/externalipaddress/20.0.0.1/port/80/protocol/gre"),
            400,
            "protocol: \"gre\" is not a protocol",
        ),
        (format!("{LB}/name/nobody"), 404, "no rule named \"nobody\""),
    ] {
        let (st, v) = s.write("DELETE", &path, "").await;
        assert_eq!(st, status, "{path}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(words),
            "{path}: {v}"
        );
        let after = (s.all().await, s.installed(), s.inst.lock().unwrap().calls);
        assert_eq!(after, before, "DELETE {path} changed something");
    }
    // Unknown path, wrong method.
    assert_eq!(
        s.req("GET", "/netlox/v1/config/nothing", "", None).await.0,
        404
    );
    assert_eq!(s.write("PUT", LB, &base.to_string()).await.0, 405);
    assert_eq!(
        s.write("DELETE", "/netlox/v1/config/loadbalancer/all", "")
            .await
            .0,
        405
    );
    // A body over 1 MiB.
    let huge = format!("{{\"x\": \"{}\"}}", "a".repeat(MAX_BODY + 10));
    assert_eq!(s.write("POST", LB, &huge).await.0, 413);
    // The datapath failing: 500, nothing recorded.
    s.inst.lock().unwrap().fail = true;
    let (st, v) = s
        .write(
            "POST",
            LB,
            &web(81, "x", &[("10.0.1.10", 8080)]).to_string(),
        )
        .await;
    assert_eq!(st, 500, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("the maps are full"),
        "{v}"
    );
    s.inst.lock().unwrap().fail = false;
    let after = (s.all().await, s.installed(), s.inst.lock().unwrap().calls);
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_credentials_reads_do_not() {
    let s = serve(token_auth()).await;
    let r = web(80, "a", &[("10.0.1.10", 8080)]).to_string();
    let before = s.all().await;
    let (st, v) = s.req("POST", LB, &r, None).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(
        v,
        json!({"code": 401, "fields": [],
               "message": "POST changes rules and needs the API token (Authorization: Bearer <token>)"})
    );
    let (st, v) = s.req("POST", LB, &r, Some("guess")).await;
    assert_eq!(st, 403, "{v}");
    let del = format!("{LB}/name/a");
    assert_eq!(s.req("DELETE", &del, "", None).await.0, 401);
    assert_eq!(s.all().await, before);
    assert!(s.installed() == vec!["file-web"]);
    // kube-loxilb sends the bare token.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "POST {LB} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nAuthorization: s3cret\r\n\
         Content-Length: {}\r\n\r\n{r}",
        r.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(s.api.lock().unwrap().len(), 1);
    // --insecure-api: no credentials needed, a wrong token still refused.
    let open = serve(server::Auth {
        token: Some("s3cret".into()),
        client_certs: false,
        insecure: true,
    })
    .await;
    assert_eq!(open.req("POST", LB, &r, None).await.0, 200);
    assert_eq!(open.req("POST", LB, &r, Some("guess")).await.0, 403);
}

#[test]
fn unsafe_flag_sets_are_refused_at_start() {
    let addr = Some("127.0.0.1:11111".parse().unwrap());
    let e = server::ApiListen::from_flags(addr, None, None, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("plain HTTP") && e.contains("--insecure-api"),
        "{e}"
    );
    let e = server::ApiListen::from_flags(None, None, None, true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("add --api-listen"), "{e}");
    let dir = std::env::temp_dir().join(format!("lxapi-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("t"), "\n").unwrap();
    let e = server::ApiListen::from_flags(addr, None, Some(&dir.join("t")), true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("the file is empty"), "{e}");
    // TLS without ca.crt and no token: nothing authenticates writes.
    let certs = TestCerts::new(&dir, false);
    let e = server::ApiListen::from_flags(addr, Some(&certs.dir), None, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nothing authenticates writes"), "{e}");
    assert!(server::ApiListen::from_flags(addr, None, None, true)
        .unwrap()
        .is_some());
    assert!(server::ApiListen::from_flags(None, None, None, false)
        .unwrap()
        .is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA, a server certificate for `localhost` and a client certificate.
struct TestCerts {
    dir: std::path::PathBuf,
    ca: String,
    client: (String, String),
}

impl TestCerts {
    fn new(parent: &std::path::Path, with_ca: bool) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(p, ca_key);
        let dir = parent.join(if with_ca { "tls-ca" } else { "tls" });
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        if with_ca {
            std::fs::write(dir.join("ca.crt"), &ca).unwrap();
        }
        let ckey = KeyPair::generate().unwrap();
        let ccert = CertificateParams::new(vec!["kube-loxilb".into()])
            .unwrap()
            .signed_by(&ckey, &issuer)
            .unwrap();
        TestCerts {
            dir,
            ca,
            client: (ccert.pem(), ckey.serialize_pem()),
        }
    }

    fn client_config(&self, with_cert: bool) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.as_bytes()).unwrap())
            .unwrap();
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        Arc::new(if with_cert {
            b.with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(self.client.0.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(self.client.1.as_bytes()).unwrap(),
            )
            .unwrap()
        } else {
            b.with_no_client_auth()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_authenticate_writes() {
    let dir = std::env::temp_dir().join(format!("lxapi-tls-{}", std::process::id()));
    let certs = TestCerts::new(&dir, true);
    let cfg = server::ApiListen::from_flags(
        Some("127.0.0.1:0".parse().unwrap()),
        Some(&certs.dir),
        None,
        false,
    )
    .unwrap()
    .unwrap();
    assert!(cfg.auth.client_certs);
    let (api, inst) = api_with(Store::in_memory(), vec![], FILE_RULES);
    let api = Arc::new(Mutex::new(api));
    let addr = server::start(cfg, api.clone()).await.unwrap();
    let tls = |with_cert: bool| {
        let c = tokio_rustls::TlsConnector::from(certs.client_config(with_cert));
        async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                s,
            )
            .await
            .unwrap()
        }
    };
    let r = web(80, "a", &[("10.0.1.10", 8080)]).to_string();
    // Without a certificate: reads yes, writes no.
    assert_eq!(call(tls(false).await, "GET", "/", "", None).await.0, 200);
    assert_eq!(call(tls(false).await, "POST", LB, &r, None).await.0, 401);
    assert_eq!(api.lock().unwrap().len(), 0);
    // With one of the CA: writes.
    assert_eq!(
        call(tls(true).await, "POST", LB, &r, None).await,
        (200, OK())
    );
    assert_eq!(api.lock().unwrap().len(), 1);
    assert!(inst.lock().unwrap().rules.contains_key("a@20.0.0.1:80/tcp"));
    // Plain HTTP to the TLS port gets nothing.
    let plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut plain = plain;
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out).await;
    assert!(!String::from_utf8_lossy(&out).contains("\"status\""));
    let _ = std::fs::remove_dir_all(&dir);
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "lxapi-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Why an API over the store in `dir`, with rule file `file`, refuses to
/// start.
fn start_refused(dir: &std::path::Path, file: &str) -> String {
    let (store, stored) = Store::open(dir).unwrap();
    Api::new(
        Box::new(MemSink(Default::default())),
        Box::new(|_: &[Rule]| Ok(())),
        store,
        stored,
        false,
        "rules.yaml",
        config::parse("rules.yaml", file).unwrap(),
    )
    .err()
    .unwrap()
    .to_string()
}

fn post(api: &mut Api, v: &Value) -> (u16, Value) {
    api.handle(&http::Method::POST, LB, v.to_string().as_bytes())
}

#[test]
fn api_rules_persist_and_come_back() {
    let dir = temp_dir("persist");
    let (store, stored) = Store::open(&dir).unwrap();
    assert!(stored.is_empty());
    let (mut api, _) = api_with(store, stored, FILE_RULES);
    for p in [80, 81, 82] {
        assert_eq!(post(&mut api, &web(p, "s", &[("10.0.1.10", 8080)])).0, 200);
    }
    let del = format!("{LB}/externalipaddress/20.0.0.1/port/81/protocol/tcp");
    assert_eq!(api.handle(&http::Method::DELETE, &del, b"").0, 200);
    let mut upd = web(82, "s", &[("10.0.1.11", 8080)]);
    upd["serviceArguments"]["inactiveTimeOut"] = json!(60);
    assert_eq!(post(&mut api, &upd).0, 200);
    let listed = api.list();
    let union = api.union();
    drop(api);
    // A new agent: the same rules, the same union.
    let (store, stored) = Store::open(&dir).unwrap();
    assert_eq!(stored.len(), 2);
    let (mut api, inst) = api_with(store, stored, FILE_RULES);
    assert_eq!(api.list(), listed);
    assert_eq!(api.union(), union);
    assert_eq!(api.union()[2].timeout_s, 60);
    // Nothing installed by Api::new: the caller installs the union.
    assert_eq!(inst.lock().unwrap().calls, 0);
    // Compacted at open: the snapshot holds them, the journal is empty.
    let snap: Value =
        serde_json::from_slice(&std::fs::read(dir.join(store::SNAPSHOT)).unwrap()).unwrap();
    assert_eq!(snap["lbAttr"].as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read(dir.join(store::JOURNAL)).unwrap().len(), 0);
    drop(api);
    // A rule file that now conflicts with a stored rule: the start is
    // refused, naming both.
    let clash = "rules:\n  - name: mine\n    vip: 20.0.0.1\n    port: 80\n    protocol: tcp\n";
    let e = start_refused(&dir, clash);
    assert!(
        e.contains("\"mine\" of the rule file rules.yaml") && e.contains("\"s@20.0.0.1:80/tcp\""),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_journal_line_cut_short_is_dropped_a_bad_one_stops_the_start() {
    let dir = temp_dir("journal");
    let (store, stored) = Store::open(&dir).unwrap();
    let (mut api, _) = api_with(store, stored, FILE_RULES);
    assert_eq!(post(&mut api, &web(80, "s", &[("10.0.1.10", 8080)])).0, 200);
    drop(api);
    let j = dir.join(store::JOURNAL);
    let good = std::fs::read_to_string(&j).unwrap();
    assert_eq!(good.lines().count(), 1);
    std::fs::write(&j, format!("{good}{{\"put\": {{\"serviceArg")).unwrap();
    let (_, stored) = Store::open(&dir).unwrap();
    assert_eq!(stored.len(), 1);
    // Compacted: a bad line in the middle of the journal now.
    std::fs::write(&j, "{\"put\": 1}\n{\"del\": {}}\n").unwrap();
    let e = Store::open(&dir).err().unwrap().to_string();
    assert!(e.contains("api-rules.journal: line 1"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_journal_is_compacted_as_it_grows() {
    let dir = temp_dir("compact");
    let (store, stored) = Store::open(&dir).unwrap();
    let (mut api, _) = api_with(store, stored, FILE_RULES);
    for i in 0..1500u32 {
        let mut r = web(1000 + (i % 300) as u16, "s", &[("10.0.1.10", 8080)]);
        r["serviceArguments"]["inactiveTimeOut"] = json!(i + 1);
        assert_eq!(post(&mut api, &r).0, 200);
    }
    let lines = std::fs::read_to_string(dir.join(store::JOURNAL))
        .unwrap()
        .lines()
        .count();
    assert!(lines < 1000, "{lines} journal lines");
    let listed = api.list();
    drop(api);
    let (store, stored) = Store::open(&dir).unwrap();
    assert_eq!(stored.len(), 300);
    let (mut api, _) = api_with(store, stored, FILE_RULES);
    assert_eq!(api.list(), listed);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rule_file_conflicting_with_api_rules_is_refused_naming_both() {
    let (mut api, _) = api_with(Store::in_memory(), vec![], FILE_RULES);
    assert_eq!(
        post(&mut api, &web(80, "svc", &[("10.0.1.10", 8080)])).0,
        200
    );
    let union = api.union();
    let clash = config::parse(
        "rules.yaml",
        "rules:\n  - name: new\n    vip: 20.0.0.1\n    port: 80\n    protocol: tcp\n",
    )
    .unwrap();
    let e = api.set_file(clash).unwrap_err();
    assert_eq!(e.status, 409);
    assert!(
        e.message.contains("\"new\" of the rule file rules.yaml")
            && e.message.contains("API rule \"svc@20.0.0.1:80/tcp\""),
        "{}",
        e.message
    );
    assert_eq!(api.union(), union);
    let same_name = config::parse(
        "rules.yaml",
        "rules:\n  - name: svc@20.0.0.1:80/tcp\n    vip: 20.0.0.7\n    port: 80\n    protocol: tcp\n",
    )
    .unwrap();
    assert_eq!(api.set_file(same_name).unwrap_err().status, 409);
    // A file without the clash: taken.
    api.set_file(vec![]).unwrap();
    assert_eq!(api.union().len(), 1);
}

#[test]
fn the_node_checks_of_the_rule_file_apply_to_api_rules() {
    // The agent passes its L2 DSR reachability check (main.rs
    // check_on_node); here one that refuses every dsr endpoint.
    let inst = Arc::new(Mutex::new(Installed::default()));
    let mut api = Api::new(
        Box::new(MemSink(inst.clone())),
        Box::new(|rules: &[Rule]| config::check_reachability("request", rules, &[]).map(|_| ())),
        Store::in_memory(),
        vec![],
        false,
        "rules.yaml",
        vec![],
    )
    .unwrap();
    let mut dsr = web(80, "d", &[("10.0.1.10", 80)]);
    dsr["serviceArguments"]["mode"] = json!(3);
    let (st, v) = post(&mut api, &dsr);
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["fields"], json!(["endpoints[0].endpointIP"]), "{v}");
    assert!(inst.lock().unwrap().rules.is_empty());
    // DSR's own rule-file check: the endpoint listens on the service port.
    let (st, v) = post(
        &mut Api::new(
            Box::new(MemSink(inst.clone())),
            Box::new(|_: &[Rule]| Ok(())),
            Store::in_memory(),
            vec![],
            false,
            "rules.yaml",
            vec![],
        )
        .unwrap(),
        &{
            let mut r = web(80, "d", &[("10.0.1.10", 8080)]);
            r["serviceArguments"]["mode"] = json!(3);
            r
        },
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["fields"], json!(["endpoints[0].targetPort"]), "{v}");
}

#[test]
fn a_secondary_vip_taken_by_another_rule_is_a_conflict_at_its_path() {
    let (mut api, inst) = api_with(Store::in_memory(), vec![], FILE_RULES);
    let sctp = |vip: &str, secondary: &[&str], name: &str| {
        json!({
            "serviceArguments": {"externalIP": vip, "port": 38412, "protocol": "sctp",
                                 "mode": 2, "name": name},
            "secondaryIPs": secondary.iter().map(|a| json!({"secondaryIP": a})).collect::<Vec<_>>(),
            "endpoints": [{"endpointIP": "10.0.1.10", "targetPort": 38412}],
        })
    };
    assert_eq!(
        post(&mut api, &sctp("20.0.0.1", &["20.0.0.2"], "amf")).0,
        200
    );
    let before = (api.list(), inst.lock().unwrap().rules.clone());
    let (st, v) = post(
        &mut api,
        &sctp("20.0.0.3", &["20.0.0.4", "20.0.0.2"], "amf2"),
    );
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["fields"], json!(["secondaryIPs[1].secondaryIP"]), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("20.0.0.2:38412/sctp is served by the API rule \"amf@20.0.0.1:38412/sctp\""),
        "{v}"
    );
    // Its primary VIP being another rule's secondary one.
    let (st, v) = post(&mut api, &sctp("20.0.0.2", &[], "amf3"));
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["fields"], json!(["serviceArguments.externalIP"]), "{v}");
    assert_eq!((api.list(), inst.lock().unwrap().rules.clone()), before);
}

/// kube-loxilb's `--setRoles` calls: `POST /config/cistate` sets the
/// agent's role (the node is told MASTER / BACKUP), `GET
/// /config/cistate/all` reports it in loxilb's shape; bad bodies are
/// refused naming the field, and change nothing.
#[test]
fn cistate_sets_the_role_and_reads_back() {
    let (mut api, inst) = api_with(Store::in_memory(), vec![], FILE_RULES);
    const CI: &str = "/netlox/v1/config/cistate";
    let send = |api: &mut Api, body: &str| api.handle(&http::Method::POST, CI, body.as_bytes());
    let get = |api: &mut Api| api.handle(&http::Method::GET, &format!("{CI}/all"), b"").1;
    assert_eq!(get(&mut api), json!({ "Attr": [] }));
    assert_eq!(inst.lock().unwrap().master, None, "no role until told");
    let (code, body) = send(
        &mut api,
        r#"{"instance":"llb-inst0","state":"BACKUP","vip":"10.31.0.100"}"#,
    );
    assert_eq!((code, body), (200, json!({ "result": "Success" })));
    assert_eq!(inst.lock().unwrap().master, Some(false));
    assert_eq!(
        get(&mut api),
        json!({ "Attr": [{ "instance": "llb-inst0", "state": "BACKUP", "sync": 0, "vip": "10.31.0.100" }] })
    );
    assert_eq!(
        send(&mut api, r#"{"instance":"llb-inst0","state":"MASTER"}"#).0,
        200
    );
    assert_eq!(inst.lock().unwrap().master, Some(true));
    assert_eq!(get(&mut api)["Attr"][0]["vip"], "0.0.0.0");
    for (body, field) in [
        (r#"{"instance":"llb-inst0","state":"FAULT"}"#, "state"),
        (r#"{"instance":"","state":"BACKUP"}"#, "instance"),
        (r#"{"instance":"x","state":"BACKUP","vip":"ten"}"#, "vip"),
        (r#"{"instance":"x","state":"BACKUP","extra":1}"#, "extra"),
        (r#"{"instance":"x"}"#, ""),
    ] {
        let (code, e) = send(&mut api, body);
        assert_eq!(code, 400, "{body}: {e}");
        if !field.is_empty() {
            assert!(e.to_string().contains(field), "{body}: {e}");
        }
        assert_eq!(
            inst.lock().unwrap().master,
            Some(true),
            "{body} changed the role"
        );
    }
    assert_eq!(api.handle(&http::Method::DELETE, CI, b"").0, 405);
    // The node refuses: 500, the state reported is the one in force.
    inst.lock().unwrap().fail = true;
    assert_eq!(
        send(&mut api, r#"{"instance":"llb-inst0","state":"BACKUP"}"#).0,
        500
    );
    assert_eq!(get(&mut api)["Attr"][0]["state"], "MASTER");
}

/// The role kube-loxilb posted survives an agent restart: stored in the
/// state directory, reported again, and applied to the node by
/// `restore_role` (nothing stored: the node is not told anything). A
/// role that cannot be stored is undone on the node (500); a stored file
/// that is not ours stops the start, naming it.
#[test]
fn cistate_persists_across_a_restart() {
    const CI: &str = "/netlox/v1/config/cistate";
    let dir = temp_dir("cistate");
    let (store, stored) = Store::open(&dir).unwrap();
    let (mut api, inst) = api_with(store, stored, FILE_RULES);
    api.restore_role().unwrap();
    assert_eq!(inst.lock().unwrap().master, None, "nothing stored");
    let (code, _) = api.handle(
        &http::Method::POST,
        CI,
        br#"{"instance":"default","state":"BACKUP","vip":"10.0.0.9"}"#,
    );
    assert_eq!(code, 200);
    let listed = api.handle(&http::Method::GET, &format!("{CI}/all"), b"").1;
    drop(api);

    let (store, stored) = Store::open(&dir).unwrap();
    let (mut api, inst) = api_with(store, stored, FILE_RULES);
    assert_eq!(
        api.handle(&http::Method::GET, &format!("{CI}/all"), b"").1,
        listed
    );
    assert_eq!(
        inst.lock().unwrap().master,
        None,
        "Api::new installs nothing"
    );
    api.restore_role().unwrap();
    assert_eq!(inst.lock().unwrap().master, Some(false), "BACKUP restored");

    // The file cannot be written (a directory in its place): 500, the node
    // is back at its role, the reported role unchanged.
    std::fs::remove_file(dir.join(store::CISTATE)).unwrap();
    std::fs::create_dir(dir.join(format!("{}.tmp", store::CISTATE))).unwrap();
    let (code, e) = api.handle(
        &http::Method::POST,
        CI,
        br#"{"instance":"default","state":"MASTER"}"#,
    );
    assert_eq!(code, 500, "{e}");
    assert!(e.to_string().contains("not stored"), "{e}");
    assert_eq!(inst.lock().unwrap().master, Some(false), "undone");
    assert_eq!(
        api.handle(&http::Method::GET, &format!("{CI}/all"), b"").1,
        listed
    );
    drop(api);
    std::fs::remove_dir(dir.join(format!("{}.tmp", store::CISTATE))).unwrap();

    // Not our file: the start is refused, naming it.
    std::fs::write(
        dir.join(store::CISTATE),
        br#"{"Attr":[{"instance":"x","state":"FAULT","vip":""}]}"#,
    )
    .unwrap();
    let e = start_refused(&dir, FILE_RULES);
    assert!(e.contains("cistate.json") && e.contains("FAULT"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// loxicmd's `get ep` and `get bgpneighbor`: `GET /config/endpoint/all`
/// (loxilb's `EndPointState`, from the probe states and the rule's probe)
/// and `GET /config/bgp/neigh/all` (`BGPNeighborEntry`); BGP off: an empty
/// list; the speaker not answering: 503 with why; other methods: 405.
#[test]
fn endpoint_and_bgp_neighbor_lists() {
    use crate::{
        bgp::{BgpState, Neighbor},
        probe::{TargetKey, TargetStatus},
    };
    let file = "rules:\n  - name: probed\n    vip: 20.0.0.9\n    port: 80\n    protocol: tcp\n    endpoints: [{ ip: 10.0.1.10, port: 8080 }, { ip: 10.0.1.11, port: 8080 }]\n    probe: {type: http, port: 8081, request: healthz, response: ok, timeout: 0.5, retries: 3, interval: 2}\n";
    let (mut api, inst) = api_with(Store::in_memory(), vec![], file);
    let get = |api: &mut Api, path: &str| api.handle(&http::Method::GET, path, b"");
    const EP: &str = "/netlox/v1/config/endpoint/all";
    const NEI: &str = "/netlox/v1/config/bgp/neigh/all";
    assert_eq!(get(&mut api, EP), (200, json!({ "Attr": [] })));
    let target = |ip: &str, up: bool, latency_us: Option<u64>, result: &str| TargetStatus {
        key: TargetKey::new("probed", ip.parse().unwrap(), 8080),
        kind: loxilb_model::ProbeKind::Http,
        probe_addr: format!("{ip}:8081").parse().unwrap(),
        up,
        probed: true,
        last_result: result.into(),
        last_ok: Some(up),
        last_latency: latency_us.map(std::time::Duration::from_micros),
        consecutive_failures: if up { 0 } else { 3 },
        probes: 9,
        failures: if up { 0 } else { 3 },
        last_probe: None,
        last_change: None,
    };
    inst.lock().unwrap().probes = vec![
        target("10.0.1.11", false, None, "connection refused"),
        target("10.0.1.10", true, Some(1250), "HTTP 200"),
    ];
    assert_eq!(
        get(&mut api, EP),
        (
            200,
            json!({ "Attr": [
                {"hostName": "10.0.1.10", "description": "rule probed port 8080",
                 "inactiveReTries": 3, "probeType": "http", "probeReq": "healthz",
                 "probeResp": "ok", "probeDuration": 2, "probePort": 8081,
                 "minDelay": "", "avgDelay": "", "maxDelay": "", "lastDelay": "1.250ms",
                 "currState": "ok", "lastResult": "HTTP 200", "probed": true},
                {"hostName": "10.0.1.11", "description": "rule probed port 8080",
                 "inactiveReTries": 3, "probeType": "http", "probeReq": "healthz",
                 "probeResp": "ok", "probeDuration": 2, "probePort": 8081,
                 "minDelay": "", "avgDelay": "", "maxDelay": "", "lastDelay": "",
                 "currState": "nok", "lastResult": "connection refused", "probed": true},
            ]})
        )
    );

    // BGP off (no --setBGP): an empty list; the sink is not asked.
    assert_eq!(get(&mut api, NEI), (200, json!({ "bgpNeiAttr": [] })));
    assert_eq!(inst.lock().unwrap().bgp_asked, 0);
    let inst = Arc::new(Mutex::new(Installed::default()));
    let mut api = Api::new(
        Box::new(MemSink(inst.clone())),
        Box::new(|_: &[Rule]| Ok(())),
        Store::in_memory(),
        vec![],
        true,
        "rules.yaml",
        config::parse("rules.yaml", file).unwrap(),
    )
    .unwrap();
    // BGP on and no speaker answering: 503, not an empty list.
    assert_eq!(get(&mut api, NEI).0, 503);
    assert_eq!(inst.lock().unwrap().bgp_asked, 1);
    let neighbor = |ip: &str, state: BgpState, up_s: Option<u64>| Neighbor {
        name: format!("peer_{ip}"),
        address: ip.parse().unwrap(),
        remote_as: Some(65002),
        local_as: Some(65001),
        state,
        uptime: up_s.map(std::time::Duration::from_secs),
        since: None,
        internal: Some(false),
        multihop: false,
        source_address: None,
        router_id: None,
        hold_time: None,
        keepalive: None,
        last_error: None,
        info: String::new(),
        channels: vec![],
    };
    inst.lock().unwrap().bgp = Some(Ok(vec![
        neighbor("10.99.0.2", BgpState::Established, Some(3725)),
        neighbor("10.99.0.3", BgpState::Active, None),
    ]));
    assert_eq!(
        get(&mut api, NEI),
        (
            200,
            json!({ "bgpNeiAttr": [
                {"ipAddress": "10.99.0.2", "remoteAs": 65002, "state": "established", "updowntime": "1:02:05"},
                {"ipAddress": "10.99.0.3", "remoteAs": 65002, "state": "active", "updowntime": ""},
            ]})
        )
    );
    inst.lock().unwrap().bgp = Some(Err("connection refused".into()));
    let (code, e) = get(&mut api, NEI);
    assert_eq!(code, 503, "{e}");
    assert!(e.to_string().contains("connection refused"), "{e}");
    for path in [EP, NEI] {
        assert_eq!(
            api.handle(&http::Method::POST, path, b"{}").0,
            405,
            "{path}"
        );
    }
}

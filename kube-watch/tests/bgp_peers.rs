//! [`watch_bgp_peers`] against the in-memory API server (`fake_api`): the
//! peers handed to a recording [`PeerSink`] as BGPPeerService objects are
//! created, edited and deleted; the Warning Event of an invalid one; the
//! status each agent writes; the exact requests; the manifest's RBAC.

mod fake_api;

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_api::{check_field_managers, check_rbac, until, FakeApi, Logged, Running};
use kube_watch::{
    bgp_peers::{watch_bgp_peers, BgpPeerConfig, PeerSink, PeerStatusPlain},
    crds::PeerSpecPlain,
};
use serde_json::{json, Value};

#[derive(Clone, Default)]
struct Speaker {
    /// Every peer set handed over, in order.
    calls: Arc<Mutex<Vec<Vec<PeerSpecPlain>>>>,
    sessions: Arc<Mutex<Vec<(IpAddr, PeerStatusPlain)>>>,
    /// Fail the next `set_peers` calls.
    fail: Arc<Mutex<u32>>,
}

impl PeerSink for Speaker {
    fn set_peers(&mut self, peers: Vec<PeerSpecPlain>) -> anyhow::Result<()> {
        let mut f = self.fail.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            anyhow::bail!("BIRD is not answering");
        }
        self.calls.lock().unwrap().push(peers);
        Ok(())
    }
    fn status(&mut self) -> Vec<(IpAddr, PeerStatusPlain)> {
        self.sessions.lock().unwrap().clone()
    }
}

impl Speaker {
    fn calls(&self) -> Vec<Vec<String>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                c.iter()
                    .map(|p| format!("{}/{}/{}/{}", p.ip, p.remote_as, p.port, p.multihop))
                    .collect()
            })
            .collect()
    }
    fn last(&self) -> Option<Vec<String>> {
        self.calls().last().cloned()
    }
}

struct Agent {
    speaker: Speaker,
    run: Running,
}

impl Agent {
    fn start(api: &FakeApi, node: &str, speaker: Speaker) -> Agent {
        let mut config = BgpPeerConfig::new(node, format!("agent-{node}"));
        config.status_period = Duration::from_millis(100);
        config.retry = Duration::from_millis(100);
        let client = api.client(node);
        let sink = speaker.clone();
        let run = Running::spawn(move |shutdown| watch_bgp_peers(client, config, sink, shutdown));
        Agent { speaker, run }
    }

    async fn stop(self) {
        self.run.stop("the watcher").await;
    }
}

fn peer(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "generation": 1}, "spec": spec})
}

fn get(api: &FakeApi, name: &str) -> Option<Value> {
    api.with(|s| s.get("bgppeerservices", "", name))
}

fn node_status(api: &FakeApi, name: &str, node: &str) -> Option<Value> {
    get(api, name)?["status"]["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == node)
        .cloned()
}

fn events(api: &FakeApi) -> Vec<Value> {
    api.with(|s| s.all("events"))
}

fn log(api: &FakeApi) -> Vec<Logged> {
    api.with(|s| s.log.clone())
}

const LIST: &str = "/apis/bgppeer.loxilb.io/v1/bgppeerservices";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_follow_the_objects() {
    let api = FakeApi::new();
    api.with(|s| {
        s.put(
            "bgppeerservices",
            peer(
                "core1",
                json!({"ipAddress": "10.0.0.254", "remoteAs": 65000}),
            ),
        );
        s.put(
            "bgppeerservices",
            peer("bad-as", json!({"ipAddress": "10.0.0.253", "remoteAs": 0})),
        );
    });
    let speaker = Speaker::default();
    *speaker.fail.lock().unwrap() = 1;
    let a = Agent::start(&api, "n1", speaker);
    let sp = a.speaker.clone();

    // The valid one reaches the speaker (after one failed attempt, retried);
    // the invalid one is skipped with one Warning naming field and value.
    until("core1 peered", || sp.calls().len() == 1).await;
    assert_eq!(sp.calls(), [["10.0.0.254/65000/179/false"]]);
    assert_eq!(
        *sp.fail.lock().unwrap(),
        0,
        "the failed attempt was retried"
    );
    until("Warning on bad-as", || events(&api).len() == 1).await;
    let ev = &events(&api)[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "InvalidBGPPeer");
    assert_eq!(ev["metadata"]["namespace"], "default");
    assert_eq!(
        ev["note"],
        "spec.remoteAs: \"0\": AS 0 is not a valid AS number (1..=4294967295); this peer is skipped"
    );
    assert_eq!(ev["regarding"]["kind"], "BGPPeerService");
    assert_eq!(ev["regarding"]["name"], "bad-as");
    assert_eq!(ev["regarding"]["uid"], "uid-bad-as");
    assert_eq!(ev["reportingController"], "loxilb.io/loxilb-agent");
    assert_eq!(ev["reportingInstance"], "agent-n1");

    // Status: Pending until the speaker reports the session, Invalid for
    // the bad one.
    until("core1 Pending", || {
        node_status(&api, "core1", "n1").is_some_and(|n| n["state"] == "Pending")
    })
    .await;
    until("bad-as Invalid", || {
        get(&api, "bad-as").is_some_and(|o| o["status"]["state"] == "Invalid")
    })
    .await;
    assert_eq!(
        node_status(&api, "bad-as", "n1").unwrap(),
        json!({"node": "n1", "state": "Invalid",
               "lastError": "spec.remoteAs: \"0\": AS 0 is not a valid AS number (1..=4294967295)"})
    );
    sp.sessions.lock().unwrap().push((
        "10.0.0.254".parse().unwrap(),
        PeerStatusPlain {
            state: "Established".into(),
            since_unix: Some(1_777_629_600),
            prefixes_sent: Some(2),
            last_error: None,
        },
    ));
    until("core1 Established", || {
        get(&api, "core1").is_some_and(|o| o["status"]["state"] == "Established")
    })
    .await;
    assert_eq!(
        get(&api, "core1").unwrap()["status"],
        json!({"state": "Established", "nodes": [{"node": "n1", "state": "Established",
               "since": "2026-05-01T10:00:00Z", "prefixesSent": 2}]})
    );

    // Nothing changes: no writes (status is written on change only, the
    // Warning once).
    let writes = |api: &FakeApi| log(api).iter().filter(|l| l.method != "GET").count();
    let before = writes(&api);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(writes(&api), before, "no writes while nothing changes");
    assert_eq!(events(&api).len(), 1);

    // Add, modify, fix, delete.
    api.with(|s| {
        s.put(
            "bgppeerservices",
            peer(
                "core2",
                json!({"ipAddress": "2001:db8::1", "remoteAs": 4200000000u64, "remotePort": 1179,
                       "setMultiHop": true}),
            ),
        )
    });
    until("core2 added", || {
        sp.last()
            == Some(vec![
                "10.0.0.254/65000/179/false".into(),
                "2001:db8::1/4200000000/1179/true".into(),
            ])
    })
    .await;
    api.with(|s| {
        s.edit("bgppeerservices", "", "core1", |o| {
            o["spec"]["remoteAs"] = json!(65100);
            o["metadata"]["generation"] = json!(2);
        })
    });
    until("core1 modified", || {
        sp.last()
            == Some(vec![
                "10.0.0.254/65100/179/false".into(),
                "2001:db8::1/4200000000/1179/true".into(),
            ])
    })
    .await;
    api.with(|s| {
        s.edit("bgppeerservices", "", "bad-as", |o| {
            o["spec"]["remoteAs"] = json!(65010);
            o["metadata"]["generation"] = json!(2);
        })
    });
    until("bad-as fixed", || {
        sp.last()
            .is_some_and(|l| l.contains(&"10.0.0.253/65010/179/false".to_string()))
    })
    .await;
    until("bad-as no longer Invalid", || {
        node_status(&api, "bad-as", "n1")
            .is_some_and(|n| n == json!({"node": "n1", "state": "Pending"}))
    })
    .await;
    // A duplicate address: the first by name is used, the other reported.
    api.with(|s| {
        s.put(
            "bgppeerservices",
            peer(
                "zz-dup",
                json!({"ipAddress": "10.0.0.254", "remoteAs": 65999}),
            ),
        )
    });
    until("duplicate reported", || events(&api).len() == 2).await;
    assert!(events(&api)
        .iter()
        .any(|e| e["regarding"]["name"] == "zz-dup"
            && e["note"].as_str().unwrap().starts_with(
                "spec.ipAddress: \"10.0.0.254\": the same neighbour as BGPPeerService \"core1\""
            )));
    api.with(|s| s.delete("bgppeerservices", "", "core2"));
    api.with(|s| s.delete("bgppeerservices", "", "zz-dup"));
    until("core2 removed", || {
        sp.last()
            == Some(vec![
                "10.0.0.253/65010/179/false".into(),
                "10.0.0.254/65100/179/false".into(),
            ])
    })
    .await;
    a.stop().await;

    // Exact requests: one list, watches, status applies, Event creates.
    let log = log(&api);
    for l in &log {
        match (l.method.as_str(), l.path.as_str()) {
            ("GET", LIST) => {}
            ("POST", EVENTS) => assert_eq!(l.status, 201),
            ("PATCH", p) => {
                let name = p
                    .strip_prefix(&format!("{LIST}/"))
                    .and_then(|r| r.strip_suffix("/status"))
                    .unwrap_or_else(|| panic!("unexpected PATCH {p}"));
                assert_eq!(l.content_type, "application/apply-patch+yaml");
                assert_eq!(
                    l.query.get("fieldManager").map(String::as_str),
                    Some("loxilb-agent%40n1")
                );
                assert_eq!(l.query.get("force").map(String::as_str), Some("true"));
                assert_eq!(l.body["apiVersion"], "bgppeer.loxilb.io/v1");
                assert_eq!(l.body["kind"], "BGPPeerService");
                assert_eq!(l.body["metadata"], json!({"name": name}));
                let nodes = l.body["status"]["nodes"].as_array().unwrap();
                assert_eq!(nodes.len(), 1, "only this node's entry");
                assert_eq!(nodes[0]["node"], "n1");
                assert_eq!(
                    l.body.as_object().unwrap().keys().collect::<Vec<_>>(),
                    ["apiVersion", "kind", "metadata", "status"]
                );
            }
            (m, p) => panic!("unexpected request {m} {p}"),
        }
    }
    let lists = log
        .iter()
        .filter(|l| l.path == LIST && !l.query.contains_key("watch"))
        .count();
    assert_eq!(lists, 1, "listed once, then watched");
    assert!(log
        .iter()
        .any(|l| l.path == LIST && l.query.get("watch").map(String::as_str) == Some("true")));
    assert_eq!(
        check_field_managers(&log),
        ["PATCH bgppeerservices/status", "POST events"]
            .map(String::from)
            .into(),
        "every kind of write the BGPPeerService watcher makes, each with its field manager"
    );
    check_rbac(&log, &["bgppeer.loxilb.io"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_share_status_and_events() {
    let api = FakeApi::new();
    api.with(|s| {
        s.put(
            "bgppeerservices",
            peer(
                "core1",
                json!({"ipAddress": "10.0.0.254", "remoteAs": 65000}),
            ),
        );
        s.put(
            "bgppeerservices",
            peer(
                "bad-ip",
                json!({"ipAddress": "10.0.0.300", "remoteAs": 65000}),
            ),
        );
    });
    let established = |state: &str| {
        let s = Speaker::default();
        s.sessions.lock().unwrap().push((
            "10.0.0.254".parse().unwrap(),
            PeerStatusPlain {
                state: state.into(),
                ..Default::default()
            },
        ));
        s
    };
    let a = Agent::start(&api, "n1", established("Established"));
    let b = Agent::start(&api, "n2", established("Active"));
    until("both entries", || {
        get(&api, "core1").is_some_and(|o| {
            o["status"]["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2)
        })
    })
    .await;
    until("Mixed", || {
        get(&api, "core1").is_some_and(|o| o["status"]["state"] == "Mixed")
    })
    .await;
    assert_eq!(
        node_status(&api, "core1", "n1").unwrap()["state"],
        "Established"
    );
    assert_eq!(node_status(&api, "core1", "n2").unwrap()["state"], "Active");
    // The n2 session comes up: the summary follows.
    b.speaker.sessions.lock().unwrap()[0].1.state = "Established".into();
    until("Established", || {
        get(&api, "core1").is_some_and(|o| o["status"]["state"] == "Established")
    })
    .await;
    // One Event between the two agents; the second one's create is refused.
    until("bad-ip reported by both", || {
        log(&api).iter().filter(|l| l.method == "POST").count() == 2
    })
    .await;
    assert_eq!(events(&api).len(), 1);
    let codes: Vec<u16> = log(&api)
        .iter()
        .filter(|l| l.method == "POST")
        .map(|l| l.status)
        .collect();
    assert_eq!(codes, [201, 409]);
    assert!(events(&api)[0]["note"]
        .as_str()
        .unwrap()
        .starts_with("spec.ipAddress: \"10.0.0.300\": not an IP address"));
    a.stop().await;
    b.stop().await;
    check_rbac(&log(&api), &[]);
}

//! The controller's API I/O against a mocked API server (`tower-test` behind
//! `kube::Client::new`): every request is taken off the mock in order and
//! its method, path, query, content type and body asserted exactly.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use k8s_openapi::{
    api::core::v1::{Node, Service},
    jiff::{SignedDuration, Timestamp},
};
use kube::{client::Body, Client};
use kube_watch::{
    controller::{Applied, Executor, Refused, RuleSink, ServiceWriter},
    events::{actions, reasons, service_reference, EventPublisher, EventSpec},
    flags::{parse_cidr_pools, KubeConfig, VipOwners},
    leader::{LeaderElector, LeaseConfig},
    reconcile::{Reconciler, Step},
    translate::ServiceRule,
    ServiceKey,
};
use loxilb_model::Endpoint;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

type MockHandle = Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (Client, MockHandle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// One request as the API server sees it.
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Value,
}

async fn next(handle: &mut MockHandle) -> (Seen, SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a request within 10 s")
        .expect("a request");
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let content_type = req
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON body")
    };
    (
        Seen {
            method,
            path,
            query,
            content_type,
            body,
        },
        send,
    )
}

fn respond(send: SendResponse<Response<Body>>, code: StatusCode, body: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("mock: {reason}"), "reason": reason, "code": code})
}

fn t(secs: i64) -> Timestamp {
    "2026-05-01T10:00:00Z"
        .parse::<Timestamp>()
        .unwrap()
        .checked_add(SignedDuration::from_secs(secs))
        .unwrap()
}

fn service(name: &str, annotations: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": name, "uid": format!("uid-{name}"),
                     "resourceVersion": "100", "generation": 1,
                     "creationTimestamp": "2026-05-01T09:00:00Z", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "loxilb.io/loxilb",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                            "nodePort": 30080, "protocol": "TCP"}]},
    }))
    .unwrap()
}

fn nodes() -> Vec<Node> {
    vec![serde_json::from_value(json!({
        "metadata": {"name": "n1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .unwrap()]
}

fn config() -> KubeConfig {
    KubeConfig {
        cidr_pools: parse_cidr_pools("defaultPool=192.0.2.0/29").unwrap(),
        ..KubeConfig::default()
    }
}

/// A sink that logs into the same log as the mock server, so the order of
/// API writes and datapath updates can be asserted.
#[derive(Clone)]
struct LogSink {
    log: Arc<Mutex<Vec<String>>>,
    fail: Arc<Mutex<bool>>,
}

impl RuleSink for LogSink {
    fn apply(&mut self, rules: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        if *self.fail.lock().unwrap() {
            anyhow::bail!("datapath refused");
        }
        let names: Vec<String> = rules.iter().map(|r| r.rule.name.clone()).collect();
        self.log
            .lock()
            .unwrap()
            .push(format!("datapath {}", names.join(",")));
        Ok(Applied::all())
    }
    fn own_vips(&mut self, vips: Vec<IpAddr>) -> anyhow::Result<()> {
        let v: Vec<String> = vips.iter().map(IpAddr::to_string).collect();
        self.log
            .lock()
            .unwrap()
            .push(format!("vips {}", v.join(",")));
        Ok(())
    }
}

#[tokio::test]
async fn metadata_patch_is_a_conditional_merge_patch() {
    let (client, mut handle) = mock_client();
    let writer = ServiceWriter::new(client, "agent-1");
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let svc = service("web", json!({}));
    let key = ServiceKey::new("default", "web");
    let plan = r.plan(&key, Some(&svc), &[], &nodes(), t(0));
    let Step::PatchMetadata(p) = &plan.steps[0] else {
        panic!("{plan:?}")
    };
    let (res, ()) = tokio::join!(writer.patch_metadata(&key, p), async {
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "PATCH");
        assert_eq!(seen.path, "/api/v1/namespaces/default/services/web");
        assert_eq!(
            seen.query.get("fieldManager").map(String::as_str),
            Some("loxilb-agent"),
            "managedFields name the agent, not `unknown`"
        );
        assert_eq!(seen.content_type, "application/merge-patch+json");
        assert_eq!(
            seen.body,
            json!({"metadata": {
                "resourceVersion": "100",
                "finalizers": ["loxilb.io/loadbalancer"],
                "annotations": {"loxilb.io/allocated": "ips=192.0.2.1;ports=80/tcp"},
            }})
        );
        respond(send, StatusCode::OK, &serde_json::to_value(&svc).unwrap());
    });
    res.unwrap();
}

#[tokio::test]
async fn status_is_server_side_applied_with_the_ingress_ip() {
    let (client, mut handle) = mock_client();
    let writer = ServiceWriter::new(client, "agent-1");
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let svc = service("web", json!({}));
    let key = ServiceKey::new("default", "web");
    let plan = r.plan(&key, Some(&svc), &[], &nodes(), t(0));
    let Some(Step::PatchStatus(u)) = plan.steps.last() else {
        panic!("{plan:?}")
    };
    let (res, ()) = tokio::join!(writer.patch_status(&key, u), async {
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "PATCH");
        assert_eq!(seen.path, "/api/v1/namespaces/default/services/web/status");
        assert_eq!(
            seen.query.get("fieldManager").map(String::as_str),
            Some("loxilb-agent")
        );
        assert_eq!(seen.query.get("force").map(String::as_str), Some("true"));
        assert_eq!(seen.content_type, "application/apply-patch+yaml");
        assert_eq!(seen.body["apiVersion"], "v1");
        assert_eq!(seen.body["kind"], "Service");
        assert_eq!(
            seen.body["metadata"],
            json!({"name": "web", "namespace": "default"})
        );
        assert_eq!(
            seen.body["status"]["loadBalancer"],
            json!({"ingress": [{"ip": "192.0.2.1", "ipMode": "VIP",
                "ports": [{"port": 80, "protocol": "TCP"}]}]})
        );
        let conds = seen.body["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds[0]["type"], "loxilb.io/Allocated");
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(conds[1]["type"], "loxilb.io/Configured");
        respond(send, StatusCode::OK, &serde_json::to_value(&svc).unwrap());
    });
    res.unwrap();
}

#[tokio::test]
async fn warning_event_names_annotation_value_and_allowed_values() {
    let (client, mut handle) = mock_client();
    let publisher = EventPublisher::new(client, "agent-1");
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let svc = service("web", json!({"loxilb.io/lbmode": "nat"}));
    let key = ServiceKey::new("default", "web");
    let plan = r.plan(&key, Some(&svc), &[], &nodes(), t(0));
    assert_eq!(plan.events.len(), 1, "{:?}", plan.events);
    let ev: &EventSpec = &plan.events[0];
    let regarding = service_reference(&svc);
    let (res, ()) = tokio::join!(publisher.publish(ev, &regarding, t(0)), async {
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "POST");
        assert_eq!(
            seen.path,
            "/apis/events.k8s.io/v1/namespaces/default/events"
        );
        assert_eq!(seen.content_type, "application/json");
        assert_eq!(
            seen.query.get("fieldManager").map(String::as_str),
            Some("loxilb-agent")
        );
        let b = &seen.body;
        assert_eq!(b["apiVersion"], "events.k8s.io/v1");
        assert_eq!(b["kind"], "Event");
        assert_eq!(b["type"], "Warning");
        assert_eq!(b["reason"], "InvalidAnnotation");
        assert_eq!(b["action"], "Configure");
        assert_eq!(
            b["note"],
            "loxilb.io/lbmode: \"nat\": allowed values: default, onearm, fullnat, dsr; \
             the Service gets no rules until this is fixed"
        );
        assert_eq!(b["regarding"]["kind"], "Service");
        assert_eq!(b["regarding"]["name"], "web");
        assert_eq!(b["regarding"]["uid"], "uid-web");
        assert_eq!(b["reportingController"], "loxilb.io/loxilb-agent");
        assert_eq!(b["reportingInstance"], "agent-1");
        assert_eq!(b["eventTime"], "2026-05-01T10:00:00.000000Z");
        respond(send, StatusCode::CREATED, b);
    });
    res.unwrap();
}

fn log_server(log: Arc<Mutex<Vec<String>>>, seen: &Seen) {
    log.lock()
        .unwrap()
        .push(format!("{} {}", seen.method, seen.path));
}

#[tokio::test]
async fn executor_records_before_programming_and_programs_before_status() {
    let (client, mut handle) = mock_client();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = LogSink {
        log: log.clone(),
        fail: Arc::default(),
    };
    let mut ex = Executor::new(ServiceWriter::new(client, "agent-1"), sink);
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let svc = service("web", json!({"loxilb.io/frobnicate": "1"}));
    let key = ServiceKey::new("default", "web");
    let plan = r.plan(&key, Some(&svc), &[], &nodes(), t(0));
    let svc_json = serde_json::to_value(&svc).unwrap();
    let (res, ()) = tokio::join!(ex.execute(&mut r, &key, Some(&svc), &plan, t(0)), async {
        for _ in 0..4 {
            let (seen, send) = next(&mut handle).await;
            log_server(log.clone(), &seen);
            if seen.method == "POST" {
                log.lock()
                    .unwrap()
                    .push(format!("  {} {}", seen.body["type"], seen.body["reason"]));
                respond(send, StatusCode::CREATED, &seen.body);
            } else {
                respond(send, StatusCode::OK, &svc_json);
            }
        }
    });
    res.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "PATCH /api/v1/namespaces/default/services/web",
            "datapath default/web:80/tcp@192.0.2.1",
            "vips 192.0.2.1",
            "PATCH /api/v1/namespaces/default/services/web/status",
            "POST /apis/events.k8s.io/v1/namespaces/default/events",
            "  \"Normal\" \"Allocated\"",
            "POST /apis/events.k8s.io/v1/namespaces/default/events",
            "  \"Warning\" \"AnnotationWarning\"",
        ]
    );
    assert_eq!(r.rules().len(), 1);
}

#[tokio::test]
async fn held_executor_hands_the_datapath_one_rule_set_per_batch() {
    let (client, mut handle) = mock_client();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = LogSink {
        log: log.clone(),
        fail: Arc::default(),
    };
    let mut ex = Executor::new(ServiceWriter::new(client, "agent-1"), sink);
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    ex.set_hold(true);
    for name in ["a", "b"] {
        let svc = service(name, json!({}));
        let key = ServiceKey::new("default", name);
        let plan = r.plan(&key, Some(&svc), &[], &nodes(), t(0));
        assert!(!plan.waits_for_datapath());
        let svc_json = serde_json::to_value(&svc).unwrap();
        let (res, ()) = tokio::join!(ex.execute(&mut r, &key, Some(&svc), &plan, t(0)), async {
            // metadata, status, one Event
            for _ in 0..3 {
                let (seen, send) = next(&mut handle).await;
                log_server(log.clone(), &seen);
                respond(send, StatusCode::OK, &svc_json);
            }
        });
        res.unwrap();
    }
    assert!(
        !log.lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("datapath")),
        "held: nothing handed over yet"
    );
    assert_eq!(r.rules().len(), 2, "both committed");
    ex.set_hold(false);
    ex.sync_sink(&mut r).unwrap();
    let datapath: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("datapath") || l.starts_with("vips"))
        .cloned()
        .collect();
    assert_eq!(
        datapath,
        [
            "datapath default/a:80/tcp@192.0.2.1,default/b:80/tcp@192.0.2.2",
            "vips 192.0.2.1,192.0.2.2"
        ]
    );
    // Nothing new: no second hand-over.
    ex.sync_sink(&mut r).unwrap();
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("datapath"))
            .count(),
        1
    );
}

#[tokio::test]
async fn failed_record_write_programs_nothing() {
    let (client, mut handle) = mock_client();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = LogSink {
        log: log.clone(),
        fail: Arc::default(),
    };
    let mut ex = Executor::new(ServiceWriter::new(client, "agent-1"), sink);
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let svc = service("web", json!({}));
    let key = ServiceKey::new("default", "web");
    let plan = r.plan(&key, Some(&svc), &[], &nodes(), t(0));
    let (res, ()) = tokio::join!(ex.execute(&mut r, &key, Some(&svc), &plan, t(0)), async {
        let (seen, send) = next(&mut handle).await;
        log_server(log.clone(), &seen);
        respond(send, StatusCode::CONFLICT, &status(409, "Conflict"));
    });
    let e = res.unwrap_err();
    assert!(e.to_string().contains("Conflict"), "{e}");
    // No datapath update, no status, and no "Allocated" Event for what
    // was not recorded.
    assert_eq!(
        *log.lock().unwrap(),
        ["PATCH /api/v1/namespaces/default/services/web"]
    );
    assert!(r.rules().is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), handle.next_request())
            .await
            .is_err(),
        "no further request"
    );
}

#[tokio::test]
async fn deletion_removes_rules_before_the_finalizer() {
    let (client, mut handle) = mock_client();
    let log = Arc::new(Mutex::new(Vec::new()));
    let fail = Arc::new(Mutex::new(false));
    let sink = LogSink {
        log: log.clone(),
        fail: fail.clone(),
    };
    let mut ex = Executor::new(ServiceWriter::new(client, "agent-1"), sink);
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let key = ServiceKey::new("default", "web");
    // Allocated and programmed (the writes are not what this test is about).
    let svc = service("web", json!({}));
    let plan = r.plan(&key, Some(&svc), &[], &nodes(), t(0));
    for s in &plan.steps {
        if let Step::SetRules(rules) = s {
            r.commit(&key, rules.clone());
        }
    }
    let mut deleting = service(
        "web",
        json!({"loxilb.io/allocated": "ips=192.0.2.1;ports=80/tcp"}),
    );
    deleting.metadata.finalizers = Some(vec!["loxilb.io/loadbalancer".into()]);
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(5)));
    deleting.metadata.resource_version = Some("200".into());
    let svc_json = serde_json::to_value(&deleting).unwrap();

    // The datapath refuses first: the finalizer stays.
    *fail.lock().unwrap() = true;
    let plan = r.plan(&key, Some(&deleting), &[], &nodes(), t(5));
    let res = ex.execute(&mut r, &key, Some(&deleting), &plan, t(5)).await;
    assert!(res.unwrap_err().to_string().contains("datapath refused"));
    assert!(log.lock().unwrap().is_empty(), "no API write");
    assert!(
        r.ipam().allocation(&key).is_some(),
        "the address is not released while a rule may still use it"
    );

    *fail.lock().unwrap() = false;
    let plan = r.plan(&key, Some(&deleting), &[], &nodes(), t(6));
    let (res, ()) = tokio::join!(
        ex.execute(&mut r, &key, Some(&deleting), &plan, t(6)),
        async {
            let (seen, send) = next(&mut handle).await;
            log_server(log.clone(), &seen);
            assert_eq!(
                seen.body,
                json!({"metadata": {"resourceVersion": "200", "finalizers": []}})
            );
            respond(send, StatusCode::OK, &svc_json);
        }
    );
    res.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "datapath ",
            "vips ",
            "PATCH /api/v1/namespaces/default/services/web"
        ]
    );
    assert!(r.ipam().allocation(&key).is_none(), "address released");
}

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/loxilb-agent";

fn lease_json(holder: Option<&str>, rv: &str, transitions: i32) -> Value {
    let mut spec = json!({"leaseDurationSeconds": 15,
                          "acquireTime": "2026-05-01T09:00:00.000000Z",
                          "renewTime": "2026-05-01T09:00:00.000000Z",
                          "leaseTransitions": transitions});
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "loxilb-agent", "namespace": "kube-system", "resourceVersion": rv},
           "spec": spec})
}

#[tokio::test]
async fn lease_create_then_renew_then_release() {
    let (client, mut handle) = mock_client();
    let mut el = LeaderElector::new(client, client_go_lease("agent-a"));

    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(0)), async {
        let (seen, send) = next(&mut handle).await;
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            ("GET", LEASE_PATH)
        );
        respond(send, StatusCode::NOT_FOUND, &status(404, "NotFound"));
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "POST");
        assert_eq!(
            seen.path,
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
        );
        assert_eq!(
            seen.body,
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": "loxilb-agent", "namespace": "kube-system",
                                "annotations": {"loxilb.io/lease-duration-ms": "15000"}},
                   "spec": {"holderIdentity": "agent-a", "leaseDurationSeconds": 15,
                            "acquireTime": "2026-05-01T10:00:00.000000Z",
                            "renewTime": "2026-05-01T10:00:00.000000Z",
                            "leaseTransitions": 0}})
        );
        let mut created = seen.body.clone();
        created["metadata"]["resourceVersion"] = json!("1");
        respond(send, StatusCode::CREATED, &created);
    });
    assert!(res.unwrap(), "leader after creating the Lease");

    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(2)), async {
        let (seen, send) = next(&mut handle).await;
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            ("GET", LEASE_PATH)
        );
        let mut current = lease_json(Some("agent-a"), "1", 0);
        current["spec"]["acquireTime"] = json!("2026-05-01T10:00:00.000000Z");
        respond(send, StatusCode::OK, &current);
        let (seen, send) = next(&mut handle).await;
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            ("PUT", LEASE_PATH)
        );
        assert_eq!(seen.body["metadata"]["resourceVersion"], "1", "optimistic");
        assert_eq!(seen.body["spec"]["holderIdentity"], "agent-a");
        assert_eq!(
            seen.body["spec"]["renewTime"],
            "2026-05-01T10:00:02.000000Z"
        );
        assert_eq!(
            seen.body["spec"]["acquireTime"], "2026-05-01T10:00:00.000000Z",
            "kept on renewal"
        );
        assert_eq!(seen.body["spec"]["leaseTransitions"], 0);
        assert_eq!(
            seen.body["metadata"]["annotations"]["loxilb.io/lease-duration-ms"], "15000",
            "the exact duration on every write"
        );
        let mut renewed = seen.body.clone();
        renewed["metadata"]["resourceVersion"] = json!("2");
        respond(send, StatusCode::OK, &renewed);
    });
    assert!(res.unwrap(), "renewed");

    let (res, ()) = tokio::join!(el.release(t(3)), async {
        let (seen, send) = next(&mut handle).await;
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            ("PUT", LEASE_PATH)
        );
        assert_eq!(seen.body["metadata"]["resourceVersion"], "2");
        assert_eq!(seen.body["spec"].get("holderIdentity"), None, "released");
        assert_eq!(seen.body["spec"]["leaseDurationSeconds"], 1);
        respond(send, StatusCode::OK, &seen.body);
    });
    assert!(res.unwrap());
}

#[tokio::test]
async fn lease_takeover_after_expiry_and_lost_race() {
    let (client, mut handle) = mock_client();
    let (took, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let mut el = LeaderElector::new(client, client_go_lease("agent-b")).with_takeover_reports(took);
    let held = lease_json(Some("agent-a"), "5", 3);

    // Held by a, first seen now: wait, no write.
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(0)), async {
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "GET");
        respond(send, StatusCode::OK, &held);
    });
    assert!(!res.unwrap());
    // Unchanged 14 s later: still not expired.
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(14)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::OK, &held);
    });
    assert!(!res.unwrap());
    // Unchanged 15 s after first seen: take over, but another agent won.
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(15)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::OK, &held);
        let (seen, send) = next(&mut handle).await;
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            ("PUT", LEASE_PATH)
        );
        assert_eq!(seen.body["metadata"]["resourceVersion"], "5");
        assert_eq!(seen.body["spec"]["holderIdentity"], "agent-b");
        assert_eq!(seen.body["spec"]["leaseTransitions"], 4);
        assert_eq!(
            seen.body["spec"]["acquireTime"],
            "2026-05-01T10:00:15.000000Z"
        );
        respond(send, StatusCode::CONFLICT, &status(409, "Conflict"));
    });
    assert!(
        !res.unwrap(),
        "a lost race is not an error and not leadership"
    );
    assert!(reports.try_recv().is_err(), "a lost race took nothing over");
    // The winner's record is new: wait again.
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(16)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::OK, &lease_json(Some("agent-c"), "6", 4));
    });
    assert!(!res.unwrap());
    // c released it: take it at once.
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(17)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::OK, &lease_json(None, "7", 4));
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "PUT");
        assert_eq!(seen.body["spec"]["holderIdentity"], "agent-b");
        assert_eq!(seen.body["metadata"]["resourceVersion"], "7");
        respond(send, StatusCode::OK, &seen.body);
    });
    assert!(res.unwrap());
    assert!(
        reports.try_recv().is_err(),
        "a released Lease was taken from nobody"
    );
}

/// A Lease taken over from its holder once it expired: the holder's
/// identity is reported (presumed dead); renewing our own is not.
#[tokio::test]
async fn a_lease_taken_over_from_its_holder_is_reported() {
    let (client, mut handle) = mock_client();
    let (took, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let mut el = LeaderElector::new(client, client_go_lease("agent-b")).with_takeover_reports(took);
    let held = lease_json(Some("agent-a"), "5", 3);
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(0)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::OK, &held);
    });
    assert!(!res.unwrap());
    assert!(reports.try_recv().is_err(), "waiting takes nothing over");
    let mut ours = Value::Null;
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(15)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::OK, &held);
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "PUT");
        assert_eq!(seen.body["spec"]["holderIdentity"], "agent-b");
        ours = seen.body.clone();
        ours["metadata"]["resourceVersion"] = json!("6");
        respond(send, StatusCode::OK, &ours);
    });
    assert!(res.unwrap());
    assert_eq!(reports.try_recv().ok().as_deref(), Some("agent-a"));
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(16)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::OK, &ours);
        let (seen, send) = next(&mut handle).await;
        assert_eq!(seen.method, "PUT");
        respond(send, StatusCode::OK, &seen.body);
    });
    assert!(res.unwrap());
    assert!(reports.try_recv().is_err(), "a renewal is no takeover");
}

#[tokio::test]
async fn api_errors_are_errors() {
    let (client, mut handle) = mock_client();
    let mut el = LeaderElector::new(client, client_go_lease("agent-a"));
    let (res, ()) = tokio::join!(el.try_acquire_or_renew(t(0)), async {
        let (_, send) = next(&mut handle).await;
        respond(send, StatusCode::FORBIDDEN, &status(403, "Forbidden"));
    });
    let e = res.unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.is_forbidden()), "{e}");
}

#[test]
fn reasons_are_upper_camel_case() {
    for r in [
        reasons::INVALID_ANNOTATION,
        reasons::ANNOTATION_WARNING,
        reasons::INVALID_SERVICE,
        reasons::CONFIGURATION_WARNING,
        reasons::POOL_EXHAUSTED,
        reasons::UNKNOWN_POOL,
        reasons::ADDRESS_IN_USE,
        reasons::ALLOCATION_FAILED,
        reasons::RECORD_NOT_ADOPTED,
        reasons::ALLOCATED,
        actions::ALLOCATE,
        actions::CONFIGURE,
    ] {
        assert!(r.chars().next().unwrap().is_ascii_uppercase(), "{r}");
        assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
    }
}

/// One update: full, `service=rule count` per changed Service, all rules.
type Call = (bool, Vec<String>, usize);

/// A sink that takes per-Service updates: what each call carried.
#[derive(Clone, Default)]
struct DeltaSink {
    calls: Arc<Mutex<Vec<Call>>>,
    fail: Arc<Mutex<bool>>,
    /// The owned VIPs of every `own_vips` call.
    vips: Arc<Mutex<Vec<Vec<IpAddr>>>>,
}

impl RuleSink for DeltaSink {
    fn apply(&mut self, _: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        unreachable!("update is overridden")
    }
    fn update(&mut self, u: &kube_watch::controller::RuleUpdate<'_>) -> anyhow::Result<Applied> {
        if *self.fail.lock().unwrap() {
            anyhow::bail!("datapath refused");
        }
        let changed = u
            .changed()
            .map(|(k, rules)| format!("{}={}", k.name, rules.len()))
            .collect();
        self.calls
            .lock()
            .unwrap()
            .push((u.is_full(), changed, u.all().count()));
        Ok(Applied::all())
    }
    fn own_vips(&mut self, vips: Vec<IpAddr>) -> anyhow::Result<()> {
        self.vips.lock().unwrap().push(vips);
        Ok(())
    }
}

/// The rules `svc`'s plan would set.
fn planned_rules(r: &mut Reconciler, name: &str) -> Vec<ServiceRule> {
    planned_rules_with(r, name, json!({}))
}

/// [`planned_rules`] of a Service with `annotations`.
fn planned_rules_with(r: &mut Reconciler, name: &str, annotations: Value) -> Vec<ServiceRule> {
    let svc = service(name, annotations);
    let key = ServiceKey::new("default", name);
    r.plan(&key, Some(&svc), &[], &nodes(), t(0))
        .steps
        .into_iter()
        .find_map(|s| match s {
            Step::SetRules(rules) => Some(rules),
            _ => None,
        })
        .expect("rules planned")
}

/// `--vipOwners=pool`, as the controller loop does it: the owned VIPs
/// computed once per round for both [`Executor::sink_pending`] and
/// [`Executor::sync_sink_owning`]; the sink gets the VIPs of the pools
/// held each time they change, and nothing is pending after.
#[tokio::test]
async fn owner_groups_vips_reach_the_sink_as_the_held_pools_change() {
    let (client, _handle) = mock_client();
    let sink = DeltaSink::default();
    let mut ex = Executor::new(ServiceWriter::new(client, "agent-1"), sink.clone());
    let mut c = config();
    c.cidr_pools = parse_cidr_pools("p1=192.0.2.0/29,p2=198.51.100.0/29").unwrap();
    c.vip_owners = VipOwners::Pool;
    let mut r = Reconciler::new(c).unwrap();
    r.become_leader([]);
    for (n, pool) in [("a", "p1"), ("b", "p2")] {
        let rules = planned_rules_with(&mut r, n, json!({"loxilb.io/poolSelect": pool}));
        r.commit(&ServiceKey::new("default", n), rules);
    }
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let (va, vb) = (ip("192.0.2.1"), ip("198.51.100.1"));
    let round = |ex: &mut Executor<DeltaSink>, r: &mut Reconciler| {
        let vips = r.owned_vips();
        let pending = ex.sink_pending(r, &vips);
        if pending {
            ex.sync_sink_owning(r, vips).unwrap();
        }
        assert!(!ex.sink_pending(r, &r.owned_vips()), "nothing left");
        pending
    };
    assert!(round(&mut ex, &mut r), "the first round hands everything");
    assert!(!round(&mut ex, &mut r), "nothing changed");
    r.set_owner_groups(["p2".to_string()].into());
    assert!(round(&mut ex, &mut r));
    r.set_owner_groups(["p1".to_string(), "p2".to_string()].into());
    assert!(round(&mut ex, &mut r));
    assert!(!round(&mut ex, &mut r));
    r.set_owner_groups(Default::default());
    assert!(round(&mut ex, &mut r));
    assert_eq!(
        *sink.vips.lock().unwrap(),
        [vec![], vec![vb], vec![va, vb], vec![]]
    );
    assert_eq!(sink.calls.lock().unwrap().len(), 1, "the rules once");
}

#[tokio::test]
async fn sink_gets_the_whole_set_first_then_only_changed_services() {
    let (client, _handle) = mock_client();
    let sink = DeltaSink::default();
    let mut ex = Executor::new(ServiceWriter::new(client, "agent-1"), sink.clone());
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let key = |n: &str| ServiceKey::new("default", n);
    for n in ["a", "b"] {
        let rules = planned_rules(&mut r, n);
        r.commit(&key(n), rules);
    }
    ex.sync_sink(&mut r).unwrap();
    // One more Service: only it is handed over, the set is lent whole.
    let rules = planned_rules(&mut r, "c");
    r.commit(&key("c"), rules);
    ex.sync_sink(&mut r).unwrap();
    // Nothing changed: no call.
    ex.sync_sink(&mut r).unwrap();
    // A failed call is retried with every change since the last success.
    *sink.fail.lock().unwrap() = true;
    r.commit(&key("a"), vec![]);
    assert!(ex.sync_sink(&mut r).is_err());
    assert!(ex.sink_pending(&r, &r.owned_vips()));
    let rules = planned_rules(&mut r, "d");
    r.commit(&key("d"), rules);
    *sink.fail.lock().unwrap() = false;
    ex.sync_sink(&mut r).unwrap();
    assert!(!ex.sink_pending(&r, &r.owned_vips()));
    assert_eq!(
        *sink.calls.lock().unwrap(),
        [
            (true, vec!["a=1".to_string(), "b=1".to_string()], 2),
            (false, vec!["c=1".to_string()], 3),
            (false, vec!["a=0".to_string(), "d=1".to_string()], 3),
        ]
    );
}

/// A sink that refuses the rules of one Service (as the agent's
/// `to_rule` does) or fails the whole update (a map write failure).
#[derive(Clone, Default)]
struct RefusingSink {
    /// (Service name, reason).
    refuse: Arc<Mutex<Option<(String, String)>>>,
    fail: Arc<Mutex<bool>>,
}

impl RuleSink for RefusingSink {
    fn apply(&mut self, rules: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        if *self.fail.lock().unwrap() {
            anyhow::bail!("writing the service map: no space left");
        }
        let refuse = self.refuse.lock().unwrap().clone();
        Ok(Applied {
            refused: rules
                .iter()
                .filter_map(|r| {
                    let (svc, why) = refuse.as_ref()?;
                    (r.service.name == *svc).then(|| Refused {
                        service: r.service.clone(),
                        rule: r.rule.name.clone(),
                        reason: why.clone(),
                    })
                })
                .collect(),
        })
    }
    fn own_vips(&mut self, _: Vec<IpAddr>) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Publish the queued Events on rules; exactly `n` are expected (more
/// time out the publisher, fewer time out the mock).
async fn rule_events<S: RuleSink>(
    ex: &mut Executor<S>,
    handle: &mut MockHandle,
    n: usize,
) -> Vec<Value> {
    let regarding = |k: &ServiceKey| Some(service_reference(&service(&k.name, json!({}))));
    let mut seen = vec![];
    {
        let publish = tokio::time::timeout(
            Duration::from_secs(5),
            ex.publish_rule_events(regarding, t(0)),
        );
        tokio::pin!(publish);
        loop {
            tokio::select! {
                res = &mut publish => {
                    res.expect("the Events published in time");
                    break;
                }
                (req, send) = next(handle) => {
                    assert_eq!(req.method, "POST");
                    assert_eq!(
                        req.path,
                        "/apis/events.k8s.io/v1/namespaces/default/events"
                    );
                    respond(send, StatusCode::CREATED, &req.body);
                    seen.push(req.body);
                }
            }
        }
    }
    assert!(!ex.rule_events_pending());
    // The VIP role Events (this node took the VIPs) are told apart.
    let rules: Vec<Value> = seen
        .into_iter()
        .filter(|e| e["reason"] != "VIPActive" && e["reason"] != "VIPBackup")
        .collect();
    assert_eq!(rules.len(), n, "{rules:?}");
    rules
}

fn with_endpoint(mut rules: Vec<ServiceRule>, last_octet: u8) -> Vec<ServiceRule> {
    for r in &mut rules {
        r.rule.endpoints.push(Endpoint {
            ip: IpAddr::from([10, 1, 0, last_octet]),
            port: 8080,
            weight: 1,
        });
        r.rule.endpoints.sort();
    }
    rules
}

#[tokio::test]
async fn rule_events_tell_each_change_of_what_the_datapath_took() {
    let (client, mut handle) = mock_client();
    let sink = RefusingSink::default();
    let mut ex = Executor::new(ServiceWriter::new(client, "agent-1"), sink.clone());
    ex.set_node_name("n1");
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let key = |n: &str| ServiceKey::new("default", n);

    // (a) Programmed: one Normal Event naming the node and the rules.
    let a = with_endpoint(planned_rules(&mut r, "a"), 1);
    r.commit(&key("a"), a.clone());
    ex.sync_sink(&mut r).unwrap();
    let evs = rule_events(&mut ex, &mut handle, 1).await;
    assert_eq!(evs[0]["type"], "Normal");
    assert_eq!(evs[0]["reason"], "RuleProgrammed");
    assert_eq!(evs[0]["action"], "Program");
    assert_eq!(
        evs[0]["note"],
        "node n1: 192.0.2.1:80/tcp -> 2 endpoints programmed"
    );
    assert_eq!(evs[0]["regarding"]["name"], "a");
    assert_eq!(evs[0]["reportingInstance"], "agent-1");
    // A resync with nothing changed, and an endpoint change of the same
    // frontends: nothing to tell.
    r.commit(&key("a"), a.clone());
    ex.sync_sink(&mut r).unwrap();
    rule_events(&mut ex, &mut handle, 0).await;
    let a = with_endpoint(a, 2);
    r.commit(&key("a"), a.clone());
    ex.sync_sink(&mut r).unwrap();
    rule_events(&mut ex, &mut handle, 0).await;

    // (b) Refused by the agent: a Warning with the reason, once.
    *sink.refuse.lock().unwrap() = Some(("b".into(), "SCTP multihoming is not done".into()));
    let b = planned_rules(&mut r, "b");
    r.commit(&key("b"), b.clone());
    ex.sync_sink(&mut r).unwrap();
    let evs = rule_events(&mut ex, &mut handle, 1).await;
    assert_eq!(evs[0]["type"], "Warning");
    assert_eq!(evs[0]["reason"], "RuleNotProgrammed");
    assert_eq!(evs[0]["regarding"]["name"], "b");
    assert_eq!(
        evs[0]["note"],
        format!(
            "node n1: not programmed: {}: SCTP multihoming is not done",
            b[0].rule.name
        )
    );
    let b = with_endpoint(b, 1);
    r.commit(&key("b"), b.clone());
    ex.sync_sink(&mut r).unwrap();
    rule_events(&mut ex, &mut handle, 0).await;

    // (c) A failed map write: a Warning on the Services of the update;
    // the retry that succeeds: Normal again. The refusal lifted: Normal.
    *sink.fail.lock().unwrap() = true;
    let a = with_endpoint(a, 3);
    r.commit(&key("a"), a.clone());
    assert!(ex.sync_sink(&mut r).is_err());
    let evs = rule_events(&mut ex, &mut handle, 1).await;
    assert_eq!(
        (&evs[0]["type"], &evs[0]["regarding"]["name"]),
        (&json!("Warning"), &json!("a"))
    );
    assert_eq!(
        evs[0]["note"],
        "node n1: datapath update failed: writing the service map: no space left"
    );
    // The same failure again (a retry): nothing new.
    assert!(ex.sync_sink(&mut r).is_err());
    rule_events(&mut ex, &mut handle, 0).await;
    *sink.fail.lock().unwrap() = false;
    ex.sync_sink(&mut r).unwrap();
    let evs = rule_events(&mut ex, &mut handle, 1).await;
    assert_eq!(
        (&evs[0]["type"], &evs[0]["reason"], &evs[0]["note"]),
        (
            &json!("Normal"),
            &json!("RuleProgrammed"),
            &json!("node n1: 192.0.2.1:80/tcp -> 4 endpoints programmed")
        )
    );
    *sink.refuse.lock().unwrap() = None;
    r.commit(&key("b"), with_endpoint(b, 2));
    ex.sync_sink(&mut r).unwrap();
    let evs = rule_events(&mut ex, &mut handle, 1).await;
    assert_eq!(
        (&evs[0]["type"], &evs[0]["regarding"]["name"]),
        (&json!("Normal"), &json!("b"))
    );
    // A Service whose rules are gone is forgotten without an Event.
    r.commit(&key("b"), vec![]);
    ex.sync_sink(&mut r).unwrap();
    rule_events(&mut ex, &mut handle, 0).await;
}

/// The EndpointSlice comes just after the Service: the Event that said
/// `0 endpoints` is followed by one with the endpoints; the number of
/// endpoints changing is not told again, all of them gone is.
#[tokio::test]
async fn rule_events_tell_when_endpoints_come_and_go() {
    let (client, mut handle) = mock_client();
    let mut ex = Executor::new(
        ServiceWriter::new(client, "agent-1"),
        RefusingSink::default(),
    );
    ex.set_node_name("n1");
    let mut r = Reconciler::new(config()).unwrap();
    r.become_leader([]);
    let key = ServiceKey::new("default", "c");
    let mut told = Vec::new();
    let mut none = planned_rules(&mut r, "c");
    none[0].rule.endpoints.clear();
    let three = with_endpoint(with_endpoint(with_endpoint(none.clone(), 1), 2), 3);
    let four = with_endpoint(three.clone(), 4);
    for (rules, events) in [
        (&none, 1),
        (&none, 0),
        (&three, 1),
        (&three, 0),
        (&four, 0),
        (&none, 1),
    ] {
        r.commit(&key, rules.clone());
        ex.sync_sink(&mut r).unwrap();
        for ev in rule_events(&mut ex, &mut handle, events).await {
            assert_eq!(
                (&ev["type"], &ev["reason"]),
                (&json!("Normal"), &json!("RuleProgrammed"))
            );
            told.push(ev["note"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        told,
        [
            "node n1: 192.0.2.1:80/tcp -> 0 endpoints programmed",
            "node n1: 192.0.2.1:80/tcp -> 3 endpoints programmed",
            "node n1: 192.0.2.1:80/tcp -> 0 endpoints programmed",
        ]
    );
}

/// client-go's Lease timings (15 s), which these exchanges were recorded
/// with.
fn client_go_lease(me: &str) -> LeaseConfig {
    let mut c = LeaseConfig::new("kube-system", me);
    c.lease_duration = Duration::from_secs(15);
    c.renew_deadline = Duration::from_secs(10);
    c.retry_period = Duration::from_secs(2);
    c
}

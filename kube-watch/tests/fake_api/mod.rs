//! A small in-memory Kubernetes API server behind `kube::Client::new`: list
//! and watch (newline-delimited JSON, replayed from the list's
//! resourceVersion) of Services, EndpointSlices, Nodes and Pods (Pods also
//! as metadata only, `PartialObjectMetadata`, when the client asks for it
//! in `Accept`, as the API server does); merge patch of a
//! Service (with the resourceVersion precondition the API server applies);
//! server-side apply of a Service's status (emulated for one field
//! manager); deletion with finalizers; Leases (get, create, update with
//! optimistic concurrency); Event creation (a name taken is
//! `AlreadyExists`); list and watch of BGPPeerServices and server-side
//! apply of their status (one field manager per node). Every request is
//! logged with the agent that sent it, and [`check_rbac`] checks the log
//! against the manifest's RBAC.

#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use kube::{client::Body, Client};
use serde::Deserialize;
use serde_json::{json, Value};

/// One request, as logged.
#[derive(Clone, Debug)]
pub struct Logged {
    pub agent: String,
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    /// The `Accept` header (metadata-only requests say
    /// `as=PartialObjectMetadata...`).
    pub accept: String,
    pub body: Value,
    pub status: u16,
}

impl Logged {
    /// A list or watch asking for metadata only.
    pub fn metadata_only(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }
}

impl Logged {
    /// The RBAC view of the request: (apiGroup, resource[/subresource],
    /// verb, namespace, name).
    pub fn rbac(&self) -> (String, String, String, Option<String>, Option<String>) {
        let parts: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match parts[0] {
            "api" => ("".to_string(), &parts[2..]),
            _ => (parts[1].to_string(), &parts[3..]),
        };
        let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
            (Some(rest[1].to_string()), &rest[2..])
        } else {
            (None, rest)
        };
        let resource = match rest.len() {
            3 => format!("{}/{}", rest[0], rest[2]),
            _ => rest[0].to_string(),
        };
        let name = rest.get(1).map(|s| s.to_string());
        let verb = match (self.method.as_str(), &name) {
            ("GET", _) if self.query.get("watch").map(String::as_str) == Some("true") => "watch",
            ("GET", None) => "list",
            ("GET", Some(_)) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            (m, _) => panic!("unexpected method {m}"),
        };
        (group, resource, verb.to_string(), ns, name)
    }
}

type Key = (String, String); // (namespace, name); "" namespace for cluster objects

#[derive(Default)]
pub struct State {
    rv: u64,
    /// kind (plural) -> objects
    objects: BTreeMap<String, BTreeMap<Key, Value>>,
    /// (rv, kind, type, object)
    history: Vec<(u64, String, String, Value)>,
    /// (kind, metadata only, sender)
    watchers: Vec<(String, bool, mpsc::UnboundedSender<Bytes>)>,
    /// kind -> (the last resourceVersion delivered, the events held back):
    /// the watch lags ([`State::hold_watch`]).
    held_watch: BTreeMap<String, (u64, Vec<(String, Value)>)>,
    /// Kinds whose list requests wait ([`State::hold_list`]).
    held_lists: BTreeSet<String>,
    /// Kinds whose list and watch are refused with 403 ([`State::forbid`]).
    forbidden: BTreeSet<String>,
    pub log: Vec<Logged>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    pub state: Arc<Mutex<State>>,
}

pub type RespBody = UnsyncBoxBody<Bytes, Infallible>;

fn full(code: StatusCode, v: &Value) -> Response<RespBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed_unsync())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn key_of(obj: &Value) -> Key {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or("").to_string(),
        m["name"].as_str().unwrap().to_string(),
    )
}

/// What the API server sends for an object to a client that asked for
/// metadata only.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": obj["metadata"].clone(),
    })
}

/// A pod as the cluster has it: in `namespace`, with the annotations
/// given (e.g. `k8s.v1.cni.cncf.io/network-status`), running at `ip`.
pub fn pod(namespace: &str, name: &str, annotations: Value, ip: &str) -> Value {
    json!({
        "metadata": {"namespace": namespace, "name": name, "annotations": annotations,
                     "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "web"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// One watch event line.
fn watch_line(type_: &str, obj: &Value, meta_only: bool) -> Bytes {
    let obj = if meta_only {
        partial_metadata(obj)
    } else {
        obj.clone()
    };
    Bytes::from(format!(
        "{}\n",
        serde_json::to_string(&json!({"type": type_, "object": obj})).unwrap()
    ))
}

fn api_version(kind: &str) -> &'static str {
    match kind {
        "endpointslices" => "discovery.k8s.io/v1",
        "leases" => "coordination.k8s.io/v1",
        "events" => "events.k8s.io/v1",
        "bgppeerservices" => "bgppeer.loxilb.io/v1",
        _ => "v1",
    }
}

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "nodes" => "Node",
        "pods" => "Pod",
        "leases" => "Lease",
        "events" => "Event",
        "bgppeerservices" => "BGPPeerService",
        _ => panic!("{kind}"),
    }
}

impl State {
    fn bump(&mut self, obj: &mut Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }

    fn emit(&mut self, kind: &str, type_: &str, obj: &Value) {
        self.history
            .push((self.rv, kind.into(), type_.into(), obj.clone()));
        if let Some((_, held)) = self.held_watch.get_mut(kind) {
            held.push((type_.into(), obj.clone()));
            return;
        }
        self.send(kind, type_, obj);
    }

    fn send(&mut self, kind: &str, type_: &str, obj: &Value) {
        self.watchers.retain(|(k, meta, tx)| {
            k != kind || tx.unbounded_send(watch_line(type_, obj, *meta)).is_ok()
        });
    }

    /// From now on the watches of `kind` lag: the API server accepts and
    /// answers writes (with the new resourceVersion) but their events are
    /// held back until [`State::release_watch`], as when the watch cache
    /// is behind the writes (an agent's own writes reach it later than
    /// their responses).
    pub fn hold_watch(&mut self, kind: &str) {
        let rv = self.rv;
        self.held_watch
            .entry(kind.into())
            .or_insert_with(|| (rv, Vec::new()));
    }

    /// Deliver the events held back, in order; the watches follow again.
    pub fn release_watch(&mut self, kind: &str) {
        let Some((_, held)) = self.held_watch.remove(kind) else {
            return;
        };
        for (type_, obj) in held {
            self.send(kind, &type_, &obj);
        }
    }

    /// How many watches of `kind` are open (their client still reads).
    pub fn watching(&self, kind: &str) -> usize {
        self.watchers
            .iter()
            .filter(|(k, _, tx)| k == kind && !tx.is_closed())
            .count()
    }

    /// List and watch of `kind` are refused (403 Forbidden, as the API
    /// server answers without RBAC for them) until [`State::allow`].
    pub fn forbid(&mut self, kind: &str) {
        self.forbidden.insert(kind.into());
    }

    pub fn allow(&mut self, kind: &str) {
        self.forbidden.remove(kind);
    }

    /// List requests for `kind` wait until [`State::release_list`] (a
    /// slow initial list).
    pub fn hold_list(&mut self, kind: &str) {
        self.held_lists.insert(kind.into());
    }

    pub fn release_list(&mut self, kind: &str) {
        self.held_lists.remove(kind);
    }

    /// Create or replace an object (as a user or another controller would).
    pub fn put(&mut self, kind: &str, mut obj: Value) -> Value {
        obj["apiVersion"] = json!(api_version(kind));
        obj["kind"] = json!(kind_name(kind));
        if obj["metadata"].get("uid").is_none() {
            obj["metadata"]["uid"] =
                json!(format!("uid-{}", obj["metadata"]["name"].as_str().unwrap()));
        }
        if obj["metadata"].get("creationTimestamp").is_none() {
            obj["metadata"]["creationTimestamp"] =
                json!(format!("2026-05-01T10:00:{:02}Z", self.rv % 60));
        }
        self.bump(&mut obj);
        let k = key_of(&obj);
        let existed = self
            .objects
            .entry(kind.into())
            .or_default()
            .insert(k, obj.clone())
            .is_some();
        self.emit(kind, if existed { "MODIFIED" } else { "ADDED" }, &obj);
        obj
    }

    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .get(kind)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn all(&self, kind: &str) -> Vec<Value> {
        self.objects
            .get(kind)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Edit an object in place (a user's `kubectl edit`).
    pub fn edit(&mut self, kind: &str, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut obj = self.get(kind, ns, name).expect("object to edit");
        f(&mut obj);
        self.put(kind, obj);
    }

    /// `kubectl delete`: with finalizers, only mark it.
    pub fn delete(&mut self, kind: &str, ns: &str, name: &str) {
        let mut obj = self.get(kind, ns, name).expect("object to delete");
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            obj["metadata"]["deletionTimestamp"] = json!("2026-05-01T11:00:00Z");
            self.put(kind, obj);
        } else {
            self.remove(kind, obj);
        }
    }

    fn remove(&mut self, kind: &str, mut obj: Value) {
        self.objects.get_mut(kind).unwrap().remove(&key_of(&obj));
        self.bump(&mut obj);
        self.emit(kind, "DELETED", &obj);
    }

    fn list(&self, kind: &str, meta_only: bool) -> Value {
        if meta_only {
            let items: Vec<Value> = self.all(kind).iter().map(partial_metadata).collect();
            return json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadataList",
                "metadata": {"resourceVersion": self.rv.to_string()},
                "items": items,
            });
        }
        json!({
            "apiVersion": api_version(kind),
            "kind": format!("{}List", kind_name(kind)),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": self.all(kind),
        })
    }

    /// Delete an object now (no finalizers: pods in these tests).
    pub fn delete_now(&mut self, kind: &str, ns: &str, name: &str) {
        let obj = self.get(kind, ns, name).expect("object to delete");
        self.remove(kind, obj);
    }

    fn watch(&mut self, kind: &str, since: u64, meta_only: bool) -> mpsc::UnboundedReceiver<Bytes> {
        let (tx, rx) = mpsc::unbounded();
        // While held, the events after the hold come at the release.
        let until = self.held_watch.get(kind).map_or(u64::MAX, |(rv, _)| *rv);
        for (rv, k, t, o) in &self.history {
            if k == kind && *rv > since && *rv <= until {
                tx.unbounded_send(watch_line(t, o, meta_only)).unwrap();
            }
        }
        self.watchers.push((kind.into(), meta_only, tx));
        rx
    }

    fn patch_service(
        &mut self,
        ns: &str,
        name: &str,
        status_subresource: bool,
        body: &Value,
    ) -> (StatusCode, Value) {
        let Some(mut obj) = self.get("services", ns, name) else {
            return (StatusCode::NOT_FOUND, status_nf(name));
        };
        let before = obj.clone();
        if status_subresource {
            // Server-side apply by one field manager: our fields are the
            // ones given; loadBalancer is ours entirely; conditions merge
            // by type (ours replaced, others kept).
            let st = &body["status"];
            obj["status"]["loadBalancer"] = st.get("loadBalancer").cloned().unwrap_or(json!({}));
            let ours: Vec<Value> = st["conditions"].as_array().cloned().unwrap_or_default();
            let mut conds: Vec<Value> = obj["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|c| !c["type"].as_str().unwrap_or("").starts_with("loxilb.io/"))
                .collect();
            conds.extend(ours);
            obj["status"]["conditions"] = json!(conds);
        } else {
            if let Some(rv) = body["metadata"].get("resourceVersion") {
                if *rv != obj["metadata"]["resourceVersion"] {
                    return (
                        StatusCode::CONFLICT,
                        status(409, "Conflict", "the object has been modified"),
                    );
                }
            }
            merge(&mut obj, body);
        }
        if obj == before {
            // As the API server does: a write that changes nothing is not
            // stored (same resourceVersion, no watch event).
            return (StatusCode::OK, obj);
        }
        self.bump(&mut obj);
        let deleting = obj["metadata"].get("deletionTimestamp").is_some();
        let finalizers_left = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            self.objects
                .get_mut("services")
                .unwrap()
                .remove(&key_of(&obj));
            self.emit("services", "DELETED", &obj);
        } else {
            self.objects
                .get_mut("services")
                .unwrap()
                .insert(key_of(&obj), obj.clone());
            self.emit("services", "MODIFIED", &obj);
        }
        (StatusCode::OK, obj)
    }

    /// Server-side apply of a BGPPeerService's status, as the CRD's schema
    /// makes the API server do it for one manager per node: `state` is
    /// set, `nodes` is a list-map keyed by `node` (the entries applied
    /// replace theirs, the others stay).
    fn apply_peer_status(&mut self, name: &str, body: &Value) -> (StatusCode, Value) {
        let Some(mut obj) = self.get("bgppeerservices", "", name) else {
            return (StatusCode::NOT_FOUND, status_nf(name));
        };
        let st = &body["status"];
        if let Some(s) = st.get("state") {
            obj["status"]["state"] = s.clone();
        }
        let mut nodes: Vec<Value> = obj["status"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for n in st["nodes"].as_array().cloned().unwrap_or_default() {
            nodes.retain(|x| x["node"] != n["node"]);
            nodes.push(n);
        }
        nodes.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        obj["status"]["nodes"] = json!(nodes);
        self.bump(&mut obj);
        self.objects
            .get_mut("bgppeerservices")
            .unwrap()
            .insert(key_of(&obj), obj.clone());
        self.emit("bgppeerservices", "MODIFIED", &obj);
        (StatusCode::OK, obj)
    }

    fn lease(
        &mut self,
        method: &str,
        ns: &str,
        name: Option<&str>,
        body: &Value,
    ) -> (StatusCode, Value) {
        match (method, name) {
            ("GET", Some(n)) => match self.get("leases", ns, n) {
                Some(l) => (StatusCode::OK, l),
                None => (StatusCode::NOT_FOUND, status_nf(n)),
            },
            ("POST", None) => {
                let n = body["metadata"]["name"].as_str().unwrap();
                if self.get("leases", ns, n).is_some() {
                    return (
                        StatusCode::CONFLICT,
                        status(409, "AlreadyExists", "lease exists"),
                    );
                }
                (StatusCode::CREATED, self.put("leases", body.clone()))
            }
            ("PUT", Some(n)) => {
                let cur = self.get("leases", ns, n).expect("lease to update");
                if body["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                    return (
                        StatusCode::CONFLICT,
                        status(409, "Conflict", "the object has been modified"),
                    );
                }
                (StatusCode::OK, self.put("leases", body.clone()))
            }
            _ => panic!("lease {method} {name:?}"),
        }
    }
}

fn status_nf(name: &str) -> Value {
    status(404, "NotFound", &format!("\"{name}\" not found"))
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// A client whose requests are logged as sent by `agent`.
    pub fn client(&self, agent: &str) -> Client {
        let fake = self.clone();
        let agent = agent.to_string();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let fake = fake.clone();
            let agent = agent.clone();
            async move { Ok::<_, Infallible>(fake.handle(&agent, req).await) }
        });
        Client::new(svc, "default")
    }

    pub async fn handle(&self, agent: &str, req: Request<Body>) -> Response<RespBody> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query: BTreeMap<String, String> = req
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
        let accept = req
            .headers()
            .get("accept")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let meta_only = accept.contains("as=PartialObjectMetadata");
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let watch = query.get("watch").map(String::as_str) == Some("true");
        if method == "GET" && !watch {
            // A held list waits (the other requests go on).
            while self.with(|s| {
                s.held_lists
                    .iter()
                    .any(|k| path.ends_with(&format!("/{k}")))
            }) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let mut st = self.state.lock().unwrap();
        let kind_of_collection = match parts.as_slice() {
            ["api", "v1", "services"] => Some("services"),
            ["api", "v1", "nodes"] => Some("nodes"),
            ["api", "v1", "pods"] => Some("pods"),
            ["apis", "discovery.k8s.io", "v1", "endpointslices"] => Some("endpointslices"),
            ["apis", "bgppeer.loxilb.io", "v1", "bgppeerservices"] => Some("bgppeerservices"),
            _ => None,
        };
        let (code, resp): (StatusCode, Option<Value>) = if let Some(kind) = kind_of_collection {
            assert_eq!(method, "GET");
            if st.forbidden.contains(kind) {
                let v = status(
                    403,
                    "Forbidden",
                    &format!("{kind} is forbidden: User \"system:serviceaccount:kube-system:loxilb-agent\" cannot list resource \"{kind}\" in API group \"\" at the cluster scope"),
                );
                st.log.push(Logged {
                    agent: agent.into(),
                    method,
                    path,
                    query,
                    content_type,
                    accept,
                    body,
                    status: 403,
                });
                return full(StatusCode::FORBIDDEN, &v);
            }
            if watch {
                let since: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let rx = st.watch(kind, since, meta_only);
                st.log.push(Logged {
                    agent: agent.into(),
                    method,
                    path,
                    query,
                    content_type,
                    accept,
                    body,
                    status: 200,
                });
                let stream = futures::StreamExt::map(rx, |b| Ok::<_, Infallible>(Frame::data(b)));
                return Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap();
            }
            (StatusCode::OK, Some(st.list(kind, meta_only)))
        } else {
            match parts.as_slice() {
                ["api", "v1", "namespaces", ns, "services", name] => {
                    assert_eq!(method, "PATCH");
                    assert_eq!(content_type, "application/merge-patch+json");
                    let (c, v) = st.patch_service(ns, name, false, &body);
                    (c, Some(v))
                }
                ["api", "v1", "namespaces", ns, "services", name, "status"] => {
                    assert_eq!(method, "PATCH");
                    assert_eq!(content_type, "application/apply-patch+yaml");
                    let (c, v) = st.patch_service(ns, name, true, &body);
                    (c, Some(v))
                }
                ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"] => {
                    let (c, v) = st.lease(&method, ns, None, &body);
                    (c, Some(v))
                }
                ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name] => {
                    let (c, v) = st.lease(&method, ns, Some(name), &body);
                    (c, Some(v))
                }
                ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"] => {
                    assert_eq!(method, "POST");
                    let name = body["metadata"]["name"].as_str().unwrap_or("");
                    if st.get("events", ns, name).is_some() {
                        (
                            StatusCode::CONFLICT,
                            Some(status(409, "AlreadyExists", "the Event exists")),
                        )
                    } else {
                        let mut ev = body.clone();
                        ev["metadata"]["namespace"] = json!(ns);
                        let v = st.put("events", ev);
                        (StatusCode::CREATED, Some(v))
                    }
                }
                ["apis", "bgppeer.loxilb.io", "v1", "bgppeerservices", name, "status"] => {
                    assert_eq!(method, "PATCH");
                    assert_eq!(content_type, "application/apply-patch+yaml");
                    let (c, v) = st.apply_peer_status(name, &body);
                    (c, Some(v))
                }
                _ => (StatusCode::NOT_FOUND, Some(status_nf(&path))),
            }
        };
        st.log.push(Logged {
            agent: agent.into(),
            method,
            path,
            query,
            content_type,
            accept,
            body,
            status: code.as_u16(),
        });
        full(code, &resp.unwrap_or(Value::Null))
    }
}

/// The field manager the agent's writes must carry (`?fieldManager=`), so
/// `metadata.managedFields` names it rather than `unknown`.
pub const FIELD_MANAGER: &str = "loxilb-agent";

/// Every write (any method but GET) names its field manager: the
/// agent's ([`FIELD_MANAGER`]), or for a BGPPeerService's status the
/// node's own (`loxilb-agent@<node>`, one list entry per node). Returns
/// the write kinds seen, as `METHOD resource[/subresource]`.
pub fn check_field_managers(log: &[Logged]) -> BTreeSet<String> {
    let mut kinds = BTreeSet::new();
    for l in log.iter().filter(|l| l.method != "GET") {
        let (_, resource, ..) = l.rbac();
        let manager = l.query.get("fieldManager").map(String::as_str);
        let ok = if resource == "bgppeerservices/status" {
            // (The query is logged as sent: `@` is `%40`.)
            manager.is_some_and(|m| m.starts_with("loxilb-agent%40"))
        } else {
            manager == Some(FIELD_MANAGER)
        };
        assert!(
            ok,
            "{} {} {}: field manager {manager:?}, expected {FIELD_MANAGER:?}",
            l.agent, l.method, l.path
        );
        kinds.insert(format!("{} {resource}", l.method));
    }
    kinds
}

/// Every request must be allowed by the manifest's RBAC; every verb the
/// manifest grants on the API groups `all_used_in` must have been used
/// (each test names the groups its component is responsible for). Every
/// write must name its field manager ([`check_field_managers`]).
pub fn check_rbac(log: &[Logged], all_used_in: &[&str]) {
    check_rbac_except(log, all_used_in, &[]);
}

/// [`check_rbac`], except that the resources `not_used` (e.g. `pods`,
/// watched only while a Service has `loxilb.io/multus-nets`) need not have
/// been used.
pub fn check_rbac_except(log: &[Logged], all_used_in: &[&str], not_used: &[&str]) {
    check_field_managers(log);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifest/in-cluster/loxilb.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut cluster: Vec<PolicyRule> = Vec::new();
    let mut namespaced: Vec<(String, PolicyRule)> = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = serde_norway::Value::deserialize(doc).unwrap();
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("ClusterRole") => {
                let r: ClusterRole = serde_norway::from_value(v).unwrap();
                cluster.extend(r.rules.unwrap_or_default());
            }
            Some("Role") => {
                let r: Role = serde_norway::from_value(v).unwrap();
                let ns = r.metadata.namespace.clone().unwrap();
                namespaced.extend(
                    r.rules
                        .unwrap_or_default()
                        .into_iter()
                        .map(|x| (ns.clone(), x)),
                );
            }
            _ => {}
        }
    }
    let matches =
        |rule: &PolicyRule, group: &str, resource: &str, verb: &str, name: &Option<String>| {
            rule.api_groups.iter().flatten().any(|g| g == group)
                && rule.resources.iter().flatten().any(|r| r == resource)
                && rule.verbs.iter().any(|v| v == verb)
                && match &rule.resource_names {
                    None => true,
                    Some(names) => name.as_ref().is_some_and(|n| names.contains(n)),
                }
        };
    let mut used: BTreeSet<(String, String, String)> = BTreeSet::new();
    for l in log {
        let (group, resource, verb, ns, name) = l.rbac();
        let ok = cluster
            .iter()
            .any(|r| matches(r, &group, &resource, &verb, &name))
            || namespaced.iter().any(|(rns, r)| {
                ns.as_deref() == Some(rns.as_str()) && matches(r, &group, &resource, &verb, &name)
            });
        assert!(
            ok,
            "{} {} {}: {verb} on {group}/{resource} ({ns:?}/{name:?}) is not granted by the manifest",
            l.agent, l.method, l.path
        );
        used.insert((group, resource, verb));
    }
    {
        for r in cluster.iter().chain(namespaced.iter().map(|(_, r)| r)) {
            for g in r
                .api_groups
                .iter()
                .flatten()
                .filter(|g| all_used_in.contains(&g.as_str()))
            {
                for res in r
                    .resources
                    .iter()
                    .flatten()
                    .filter(|res| !not_used.contains(&res.as_str()))
                {
                    for v in &r.verbs {
                        assert!(
                            used.contains(&(g.clone(), res.clone(), v.clone())),
                            "the manifest grants {v} on {g}/{res}, which the component tested never used"
                        );
                    }
                }
            }
        }
    }
}

/// An agent task under test (the controller or a watcher), stopped by a
/// signal it was given when spawned.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Spawn `run(shutdown)`; `shutdown` completes when [`Running::stop`]
    /// is called.
    pub fn spawn<Fut>(
        run: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    ) -> Self
    where
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Running {
            stop: Some(stop),
            task,
        }
    }

    /// Signal the task and wait (at most 10 s) for it to end without error.
    pub async fn stop(mut self, what: &str) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .unwrap_or_else(|_| panic!("{what} does not stop"))
            .unwrap()
            .unwrap();
    }
}

/// Wait until `f` holds (checked every 20 ms, at most 15 s).
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

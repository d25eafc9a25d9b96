//! BGP neighbours from [`BGPPeerService`] objects: a watcher that keeps the
//! agent's speaker peered with exactly the valid ones ([`PeerSink`]),
//! reports every invalid one with a Warning Event naming the field and
//! skips it, and writes each object's `status` from what the speaker
//! reports.
//!
//! Every agent runs it (each has its own sessions). Status is written by
//! server-side apply of the status subresource, one field manager per
//! node: each agent owns its entry of `status.nodes` (a list-map keyed by
//! `node`) and shares `status.state`, the summary over the entries it
//! sees (the same function of the same data on every agent, so they
//! converge). Nothing is written while the computed status equals the
//! object's, so a stable session causes no writes. Events are named from
//! (object uid, generation, problem), so the agents raise one Event per
//! problem between them: the first create wins, the others get
//! `AlreadyExists`, which is success.
//!
//! The objects are read as dynamic objects and their spec parsed one by
//! one: a spec that does not even parse (an object stored under an older
//! CRD) is a Warning on that object, never a failed watch of all of them.
//!
//! Requests: list and watch of `bgppeerservices` (group
//! `bgppeer.loxilb.io`), patch of `bgppeerservices/status`, create of
//! `events.k8s.io` `events` in namespace `default` (where the Events of
//! cluster-scoped objects go).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    hash::Hasher,
    net::IpAddr,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::ObjectReference, jiff::Timestamp};
use kube::{
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{
    crds::{
        validate_peer_spec, BGPPeerNodeStatus, BGPPeerService, BGPPeerServiceSpec,
        BGPPeerServiceStatus, PeerSpecError, PeerSpecPlain, FIELD_IP,
    },
    events::{event_object, EventSpec},
};

/// Event reason of a BGPPeerService whose spec cannot be used.
pub const REASON_INVALID_PEER: &str = "InvalidBGPPeer";
/// Event action.
pub const ACTION_PEER: &str = "ConfigurePeer";
/// Namespace of the Events about cluster-scoped objects.
pub const EVENT_NAMESPACE: &str = "default";
/// `status.nodes[].state` of an object whose spec cannot be used.
pub const STATE_INVALID: &str = "Invalid";
/// `status.nodes[].state` of a valid peer the speaker does not report
/// (yet).
pub const STATE_PENDING: &str = "Pending";
/// `status.state` when the agents report different states.
pub const STATE_MIXED: &str = "Mixed";

/// Where the watcher hands the speaker its peers. The agent implements it
/// over its BGP speaker.
pub trait PeerSink: Send {
    /// The complete set of valid peers from the BGPPeerService objects,
    /// sorted by address, replacing the previous one (the agent adds its
    /// `--extBGPPeers`). Called when the set changes; an error is retried.
    fn set_peers(&mut self, peers: Vec<PeerSpecPlain>) -> anyhow::Result<()>;

    /// The speaker's sessions now, by neighbour address (peers from flags
    /// included; they are ignored). Called every status period.
    fn status(&mut self) -> Vec<(IpAddr, PeerStatusPlain)>;
}

/// One session as the speaker reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatusPlain {
    /// The BGP FSM state: `Idle`, `Connect`, `Active`, `OpenSent`,
    /// `OpenConfirm`, `Established`, ...
    pub state: String,
    /// Unix seconds of the last state change.
    pub since_unix: Option<u64>,
    /// Routes currently sent to the neighbour.
    pub prefixes_sent: Option<u32>,
    pub last_error: Option<String>,
}

/// Everything [`watch_bgp_peers`] needs besides the client and the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpPeerConfig {
    /// This agent's node: its entry in `status.nodes`.
    pub node: String,
    /// The Events' `reportingInstance` (the agent's identity).
    pub instance: String,
    /// How often the sessions' state is read and written to the objects.
    pub status_period: Duration,
    /// Delay before retrying a failed [`PeerSink::set_peers`].
    pub retry: Duration,
}

impl BgpPeerConfig {
    pub fn new(node: impl Into<String>, instance: impl Into<String>) -> Self {
        BgpPeerConfig {
            node: node.into(),
            instance: instance.into(),
            status_period: Duration::from_secs(10),
            retry: Duration::from_secs(5),
        }
    }

    /// The server-side apply field manager of this node's status entry.
    pub fn field_manager(&self) -> String {
        let m = format!("loxilb-agent@{}", self.node);
        m.chars().take(128).collect()
    }
}

/// What one object contributes: its name, uid, generation and either a
/// valid peer or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluated {
    /// The valid peers, sorted by address, one per address.
    pub peers: Vec<PeerSpecPlain>,
    /// Per object name: the peer it gives, or the problem.
    pub objects: BTreeMap<String, Result<PeerSpecPlain, PeerSpecError>>,
}

/// The spec of a dynamic object, strictly.
fn spec_of(obj: &DynamicObject) -> Result<BGPPeerServiceSpec, PeerSpecError> {
    let raw = obj
        .data
        .get("spec")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    serde_json::from_value(raw.clone()).map_err(|e| PeerSpecError {
        field: "spec",
        value: {
            let s = raw.to_string();
            if s.len() > 200 {
                format!("{}...", &s[..s.floor_char_boundary(200)])
            } else {
                s
            }
        },
        message: format!("not a BGPPeerService spec: {e}"),
    })
}

/// Evaluate every object (pure): validate each spec; of two objects with
/// the same address the first by name is used, the other is a problem.
pub fn evaluate<'a>(objects: impl IntoIterator<Item = &'a DynamicObject>) -> Evaluated {
    let mut sorted: Vec<&DynamicObject> = objects.into_iter().collect();
    sorted.sort_by_key(|o| o.name_any());
    let mut by_ip: BTreeMap<IpAddr, (String, PeerSpecPlain)> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for o in sorted {
        let name = o.name_any();
        let r = spec_of(o)
            .and_then(|s| validate_peer_spec(&s))
            .and_then(|p| match by_ip.get(&p.ip) {
                Some((first, _)) => Err(PeerSpecError {
                    field: FIELD_IP,
                    value: p.ip.to_string(),
                    message: format!(
                        "the same neighbour as BGPPeerService {first:?}, which is used; this one is skipped"
                    ),
                }),
                None => {
                    by_ip.insert(p.ip, (name.clone(), p));
                    Ok(p)
                }
            });
        out.insert(name, r);
    }
    Evaluated {
        peers: by_ip.into_values().map(|(_, p)| p).collect(),
        objects: out,
    }
}

fn rfc3339(unix: u64) -> Option<String> {
    Timestamp::from_second(i64::try_from(unix).ok()?)
        .ok()
        .map(|t| t.to_string())
}

/// This node's status entry for an object (pure).
pub fn node_entry(
    node: &str,
    result: &Result<PeerSpecPlain, PeerSpecError>,
    sessions: &BTreeMap<IpAddr, PeerStatusPlain>,
) -> BGPPeerNodeStatus {
    match result {
        Err(e) => BGPPeerNodeStatus {
            node: node.into(),
            state: STATE_INVALID.into(),
            last_error: Some(e.to_string()),
            ..Default::default()
        },
        Ok(p) => match sessions.get(&p.ip) {
            None => BGPPeerNodeStatus {
                node: node.into(),
                state: STATE_PENDING.into(),
                ..Default::default()
            },
            Some(s) => BGPPeerNodeStatus {
                node: node.into(),
                state: if s.state.is_empty() {
                    STATE_PENDING.into()
                } else {
                    s.state.clone()
                },
                since: s.since_unix.and_then(rfc3339),
                prefixes_sent: s.prefixes_sent.map(i64::from),
                last_error: s.last_error.clone().filter(|e| !e.is_empty()),
            },
        },
    }
}

/// The status with this node's entry replaced, and the summary state
/// recomputed (pure).
pub fn merged_status(
    current: &BGPPeerServiceStatus,
    own: &BGPPeerNodeStatus,
) -> BGPPeerServiceStatus {
    let mut nodes: Vec<BGPPeerNodeStatus> = current
        .nodes
        .iter()
        .filter(|n| n.node != own.node)
        .cloned()
        .collect();
    nodes.push(own.clone());
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    let states: BTreeSet<&str> = nodes.iter().map(|n| n.state.as_str()).collect();
    let state = match states.len() {
        1 => states.into_iter().next().map(String::from),
        _ => Some(STATE_MIXED.into()),
    };
    BGPPeerServiceStatus { state, nodes }
}

fn status_of(obj: &DynamicObject) -> BGPPeerServiceStatus {
    obj.data
        .get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default()
}

fn reference(obj: &DynamicObject) -> ObjectReference {
    ObjectReference {
        api_version: Some("bgppeer.loxilb.io/v1".into()),
        kind: Some("BGPPeerService".into()),
        name: obj.metadata.name.clone(),
        uid: obj.metadata.uid.clone(),
        resource_version: obj.metadata.resource_version.clone(),
        ..Default::default()
    }
}

/// The Event's name: the same on every agent for one problem of one
/// generation of one object.
pub fn event_name(obj_name: &str, uid: &str, generation: i64, problem: &str) -> String {
    // FNV-1a, 64 bits: stable across builds and processes.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x100000001b3);
            }
        }
    }
    let mut h = Fnv(0xcbf29ce484222325);
    for part in [uid, &generation.to_string(), problem] {
        h.write(part.as_bytes());
        h.write(&[0]);
    }
    let prefix: String = obj_name.chars().take(200).collect();
    format!("{prefix}.{:016x}", h.finish())
}

/// Run the watcher until `shutdown` completes.
pub async fn watch_bgp_peers<S: PeerSink>(
    client: Client,
    config: BgpPeerConfig,
    mut sink: S,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ar = ApiResource::erase::<BGPPeerService>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), EVENT_NAMESPACE);
    let stream = watcher(api.clone(), watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut status_tick = tokio::time::interval(config.status_period);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut objects: BTreeMap<String, DynamicObject> = BTreeMap::new();
    let mut init: Option<BTreeMap<String, DynamicObject>> = None;
    let mut ready = false;
    let mut sent: Option<Vec<PeerSpecPlain>> = None;
    let mut retry_at: Option<Instant> = None;
    // (event name) raised by this agent, to raise each once.
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let manager = config.field_manager();
    info!(node = %config.node, "watching BGPPeerService objects");

    loop {
        let mut status_due = false;
        let wake = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            Some(ev) = stream.next() => match ev {
                Ok(watcher::Event::Apply(o)) => { objects.insert(o.name_any(), o); }
                Ok(watcher::Event::Delete(o)) => { objects.remove(&o.name_any()); }
                Ok(watcher::Event::Init) => init = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    init.get_or_insert_with(BTreeMap::new).insert(o.name_any(), o);
                }
                Ok(watcher::Event::InitDone) => {
                    objects = init.take().unwrap_or_default();
                    ready = true;
                }
                Err(e) => {
                    warn!(error = %e, "BGPPeerService watch failed (is the CRD installed? manifest/crds/); retrying");
                    continue;
                }
            },
            _ = status_tick.tick() => status_due = true,
            _ = wake => {}
        }
        if !ready {
            continue;
        }
        let eval = evaluate(objects.values());

        // The speaker.
        let due = retry_at.is_some_and(|t| t <= Instant::now());
        if sent.as_ref() != Some(&eval.peers) && (retry_at.is_none() || due) {
            match sink.set_peers(eval.peers.clone()) {
                Ok(()) => {
                    info!(peers = ?eval.peers.iter().map(|p| p.ip).collect::<Vec<_>>(), "BGP peers from BGPPeerService objects");
                    sent = Some(eval.peers.clone());
                    retry_at = None;
                    status_due = true;
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), retry_in = ?config.retry, "BGP peers not updated");
                    retry_at = Some(Instant::now() + config.retry);
                }
            }
        }

        // Warnings: once per problem (per generation) of each object.
        let now = Timestamp::now();
        let mut current_problems = BTreeSet::new();
        for (name, r) in &eval.objects {
            let (Err(problem), Some(obj)) = (r, objects.get(name)) else {
                continue;
            };
            let note = format!("{problem}; this peer is skipped");
            let ev_name = event_name(
                name,
                obj.metadata.uid.as_deref().unwrap_or(""),
                obj.metadata.generation.unwrap_or(0),
                &note,
            );
            current_problems.insert(ev_name.clone());
            if warned.contains(&ev_name) {
                continue;
            }
            warn!(object = %name, "{note}");
            let spec = EventSpec::warning(REASON_INVALID_PEER, ACTION_PEER, note);
            let mut ev = event_object(&spec, &reference(obj), &config.instance, now, 0);
            ev.metadata.name = Some(ev_name.clone());
            ev.metadata.namespace = Some(EVENT_NAMESPACE.into());
            match events.create(&crate::reconcile::post_params(), &ev).await {
                Ok(_) => {
                    warned.insert(ev_name);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    debug!(object = %name, "Event already raised by another agent");
                    warned.insert(ev_name);
                }
                Err(e) => warn!(object = %name, error = %e, "could not create the Event"),
            }
            status_due = true;
        }
        warned.retain(|n| current_problems.contains(n));

        // Status: this node's entry of each object, when it changed.
        if !status_due {
            continue;
        }
        let sessions: BTreeMap<IpAddr, PeerStatusPlain> = sink.status().into_iter().collect();
        for (name, r) in &eval.objects {
            let Some(obj) = objects.get(name) else {
                continue;
            };
            let current = status_of(obj);
            let own = node_entry(&config.node, r, &sessions);
            let want = merged_status(&current, &own);
            if want.state == current.state && current.nodes.contains(&own) {
                continue;
            }
            let body = json!({
                "apiVersion": "bgppeer.loxilb.io/v1",
                "kind": "BGPPeerService",
                "metadata": {"name": name},
                "status": {"state": want.state, "nodes": [own]},
            });
            match api
                .patch_status(
                    name,
                    &PatchParams::apply(&manager).force(),
                    &Patch::Apply(body),
                )
                .await
            {
                Ok(updated) => {
                    // The watch brings it too; keep the cache current so
                    // the next round does not write it again.
                    objects.insert(name.clone(), updated);
                }
                Err(e) => {
                    warn!(object = %name, error = %e, "status not written; retrying at the next period")
                }
            }
        }
    }
    info!("BGPPeerService watcher stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "bgppeer.loxilb.io/v1", "kind": "BGPPeerService",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn evaluate_skips_invalid_and_duplicates() {
        let objs = [
            obj("b", json!({"ipAddress": "10.0.0.2", "remoteAs": 65002})),
            obj("a", json!({"ipAddress": "10.0.0.2", "remoteAs": 65003})),
            obj("c", json!({"ipAddress": "10.0.0.300", "remoteAs": 65002})),
            obj("d", json!({"ipAddress": "10.0.0.4", "remoteAs": "x"})),
            obj(
                "e",
                json!({"ipAddress": "2001:db8::1", "remoteAs": 65001, "remotePort": 1179}),
            ),
        ];
        let e = evaluate(objs.iter());
        let ips: Vec<String> = e.peers.iter().map(|p| p.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.2", "2001:db8::1"]);
        assert_eq!(e.peers[0].remote_as, 65003, "the first by name wins");
        assert_eq!(e.peers[1].port, 1179);
        let err = |n: &str| e.objects[n].clone().unwrap_err();
        assert_eq!(err("b").field, "spec.ipAddress");
        assert!(err("b").message.contains("\"a\""), "{}", err("b"));
        assert_eq!(
            (err("c").field, err("c").value.as_str()),
            ("spec.ipAddress", "10.0.0.300")
        );
        assert_eq!(err("d").field, "spec");
        assert!(err("d").message.contains("expected i64"), "{}", err("d"));
    }

    #[test]
    fn status_entries_and_summary() {
        let p = validate_peer_spec(&BGPPeerServiceSpec {
            ip_address: "10.0.0.2".into(),
            remote_as: 65002,
            remote_port: None,
            set_multi_hop: None,
        });
        let mut sessions = BTreeMap::new();
        assert_eq!(node_entry("n1", &p, &sessions).state, "Pending");
        sessions.insert(
            "10.0.0.2".parse().unwrap(),
            PeerStatusPlain {
                state: "Established".into(),
                since_unix: Some(1_777_629_600),
                prefixes_sent: Some(3),
                last_error: Some(String::new()),
            },
        );
        let own = node_entry("n1", &p, &sessions);
        assert_eq!(
            own,
            BGPPeerNodeStatus {
                node: "n1".into(),
                state: "Established".into(),
                since: Some("2026-05-01T10:00:00Z".into()),
                prefixes_sent: Some(3),
                last_error: None,
            }
        );
        let s = merged_status(&BGPPeerServiceStatus::default(), &own);
        assert_eq!(s.state.as_deref(), Some("Established"));
        let mut other = own.clone();
        other.node = "n0".into();
        other.state = "Active".into();
        let s2 = merged_status(
            &BGPPeerServiceStatus {
                state: None,
                nodes: vec![other, own.clone()],
            },
            &own,
        );
        assert_eq!(s2.state.as_deref(), Some("Mixed"));
        assert_eq!(
            s2.nodes.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(),
            ["n0", "n1"]
        );
    }

    #[test]
    fn event_names_are_shared_and_valid() {
        let a = event_name("peer1", "u1", 1, "spec.remoteAs: \"0\": x");
        assert_eq!(a, event_name("peer1", "u1", 1, "spec.remoteAs: \"0\": x"));
        assert_ne!(a, event_name("peer1", "u1", 2, "spec.remoteAs: \"0\": x"));
        assert!(a.starts_with("peer1.") && a.len() == "peer1.".len() + 16);
        assert!(event_name(&"x".repeat(253), "u", 1, "p").len() <= 253);
    }
}

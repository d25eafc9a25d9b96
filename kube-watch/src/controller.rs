//! The controller: watchers and reflectors (kube-runtime, no polling) on
//! Services, EndpointSlices and Nodes, leader election
//! ([`crate::leader`]), and the execution of [`crate::reconcile`]'s plans:
//! the API writes ([`ServiceWriter`]) and the datapath ([`RuleSink`]).
//!
//! The agent calls [`run`] with a [`kube::Client`], a [`RunConfig`] and its
//! [`RuleSink`]; it returns when the shutdown future completes (after
//! releasing the Lease if it held it).
//!
//! One task owns the state: watch events mark Services dirty (a Service
//! event marks that Service, an EndpointSlice event the Service it belongs
//! to; a Node change that matters to rules — readiness, addresses, labels,
//! not heartbeats — a re-list or a leadership change marks every Service);
//! nothing is planned until all three caches have their initial list.
//! While a Service of ours has `loxilb.io/multus-nets`, a metadata-only
//! Pod watch keeps each pod's `k8s.v1.cni.cncf.io/network-status`
//! ([`crate::multus`]); a pod whose annotation changed marks the multus
//! Services whose EndpointSlices refer to it (and no other); the multus
//! Services are planned once the Pod list is complete (the first plans at
//! start wait for it, at most [`RunConfig::pod_list_grace`]); the watch
//! stops when no Service has the annotation any more. The
//! dirty Services are planned and carried out as a batch whose rules reach
//! the datapath as one rule set ([`Executor::set_hold`]). A Service is
//! planned on the freshest version known ([`Freshest`]: the object the
//! agent's own last write returned, until the watch brings that version),
//! so the conditional metadata patch does not fail for the watch's lag. A
//! Service whose writes failed is planned again after a backoff (1 s
//! doubling to 60 s: [`retry_backoff`], kube-runtime's) or at its next watch event, whichever is first; a 409
//! (someone else changed the Service meanwhile: its watch event is on the
//! way) is logged at debug level only; a 404 (the Service is gone) is not
//! retried: the Service is planned as deleted at once (rules removed,
//! addresses released), logged at debug level. What the datapath did with
//! each Service's rules (installed, refused, the update failed) becomes a
//! `RuleProgrammed` or `RuleNotProgrammed` Event on the Service, from every
//! agent for its own node, once per change ([`RuleOutcomes`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use futures::{stream::BoxStream, Stream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        reflector::{self, ObjectRef, Store},
        utils::Backoff as _,
        watcher::{self, watcher, ExponentialBackoff},
        WatchStreamExt,
    },
    Api, Client, ResourceExt,
};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};
use tracing::{debug, info, info_span, warn, Instrument};

pub use crate::reconcile::RuleUpdate;

use crate::{
    annotations::keys::MULTUS_NETS,
    events::{actions, reasons, service_reference, EventPublisher, EventSpec, EventType},
    flags::{KubeConfig, StatusForm},
    leader::{LeaderElector, LeaseConfig},
    multus::{referenced_pods, NoPods, PodIndex, PodLookup, PodNetworks, NETWORK_STATUS},
    reconcile::{MetadataPatch, Plan, Reconciler, StatusUpdate, Step, FIELD_MANAGER},
    translate::{is_managed, ServiceRule, SERVICE_NAME_LABEL},
    ServiceKey,
};

/// A rule the datapath did not install, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub service: ServiceKey,
    /// The rule's name ([`loxilb_model::Rule::name`]).
    pub rule: String,
    pub reason: String,
}

/// What the datapath did with a rule set or update: the rules it refused
/// (the others of the update are installed). `Default`: all installed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub refused: Vec<Refused>,
}

impl Applied {
    /// Every rule installed.
    pub fn all() -> Self {
        Applied::default()
    }
}

/// Where the controller hands the datapath its work. The agent implements
/// it over its rule reconciler.
pub trait RuleSink: Send {
    /// The complete desired rule set of this node (every managed Service),
    /// replacing the previous one. Called (by the default
    /// [`RuleSink::update`]) only when it changed (or the last call
    /// failed). An error is retried. Returns the rules not installed: the
    /// controller raises a Warning Event on their Services (and a Normal
    /// one on the others), see [`RuleOutcomes`].
    fn apply(&mut self, rules: Vec<ServiceRule>) -> anyhow::Result<Applied>;

    /// The rule set changed: `update` says which Services' rules changed
    /// (each with its complete new list) and lends the whole set. Called
    /// only when something changed, or to retry a failed call: the changes
    /// accumulate until a call succeeds. The first call after start comes
    /// once the initial lists of Services, EndpointSlices and Nodes are
    /// complete and every Service is planned, and is
    /// [`RuleUpdate::is_full`] (even with no rules at all: the datapath may
    /// hold rules from before the start). A batch of Services (the start,
    /// a Node change) comes as one call.
    ///
    /// The default copies the whole set into [`RuleSink::apply`]. A sink
    /// that can update per Service overrides this and touches only the
    /// changed Services' rules (unless the update is full): with 10,000
    /// Services, copying and diffing them all dominates the cost of adding
    /// one.
    fn update(&mut self, update: &RuleUpdate<'_>) -> anyhow::Result<Applied> {
        self.apply(update.all().cloned().collect())
    }

    /// The addresses this node must own (answer ARP/ND for, advertise):
    /// every VIP while this agent leads, none otherwise. Called right after
    /// the first [`RuleSink::update`] (with no address on a follower: an
    /// agent restarted as follower drops the VIPs it held before), then
    /// when the set changes.
    fn own_vips(&mut self, vips: Vec<IpAddr>) -> anyhow::Result<()>;

    /// Every Node's `InternalIP` addresses (by Node name), at start and
    /// whenever they change: the agent's conntrack sync peers when they
    /// are discovered (`--ctsync-peers=nodes`). Ignored by default.
    fn node_addresses(&mut self, _nodes: Vec<(String, IpAddr)>) {}

    /// Whether this agent leads (holds the Lease), when that changes
    /// (first call: it leads; none while it never did). A sink that
    /// programs shared remote datapaths (`kube --loxiURL`) does so only
    /// while leading. Ignored by default.
    fn leading(&mut self, _leader: bool) {}
}

/// Everything [`run`] needs besides the client and the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    pub kube: KubeConfig,
    pub lease: LeaseConfig,
    /// First retry delay of a Service whose writes failed; doubles.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How the status names the VIPs ([`crate::flags::status_form`]).
    pub status_form: StatusForm,
    /// This node's name, in the notes of its `RuleProgrammed` /
    /// `RuleNotProgrammed` Events (every agent reports its own datapath).
    pub node_name: String,
    /// How long the first plans wait for the Pod list when Services with
    /// `loxilb.io/multus-nets` exist at start (so the first, whole rule
    /// set has their endpoints); after it the other Services are planned
    /// and the multus ones when the list comes.
    pub pod_list_grace: Duration,
}

impl RunConfig {
    pub fn new(kube: KubeConfig, lease: LeaseConfig) -> Self {
        RunConfig {
            node_name: lease.identity.clone(),
            kube,
            lease,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            status_form: StatusForm::Ip,
            pod_list_grace: Duration::from_secs(10),
        }
    }

    /// From the pod's environment, as `manifest/in-cluster/loxilb.yaml`
    /// sets it: identity `POD_NAME` (else `NODE_NAME`, else the host name),
    /// Lease namespace `POD_NAMESPACE` (else `kube-system`), node name
    /// `NODE_NAME` (else the identity).
    pub fn from_env(kube: KubeConfig) -> Result<Self, String> {
        Self::from_lookup(kube, |k| std::env::var(k).ok())
    }

    fn from_lookup(kube: KubeConfig, get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let identity = get("POD_NAME")
            .or_else(|| get("NODE_NAME"))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            })
            .ok_or("no identity for leader election: set POD_NAME (the manifest sets it from metadata.name)")?;
        let namespace = get("POD_NAMESPACE").unwrap_or_else(|| "kube-system".into());
        let mut config = RunConfig::new(kube, LeaseConfig::new(namespace, identity));
        if let Some(node) = get("NODE_NAME") {
            config.node_name = node;
        }
        Ok(config)
    }
}

/// A failed step of a plan. The cause is part of the message (no
/// `source()`), so a `{:#}` chain does not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("API write failed: {0}")]
    Api(kube::Error),
    #[error("datapath update failed: {0:#}")]
    Datapath(anyhow::Error),
}

impl StepError {
    /// A write refused with 409 Conflict: the Service changed since the
    /// version the patch was conditional on (its watch event is on the
    /// way, and plans it again).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StepError::Api(kube::Error::Api(s)) if s.is_conflict())
    }

    /// A write answered 404 Not Found: the Service is gone.
    pub fn is_gone(&self) -> bool {
        matches!(self, StepError::Api(kube::Error::Api(s)) if s.is_not_found())
    }
}

/// The freshest version of each Service the controller knows. The watch
/// cache lags behind the agent's own writes: a Service planned again
/// before the watch brought them (its EndpointSlice arrived, an address
/// was released) would be planned on a version older than the one the
/// writes returned, and its conditional metadata patch would fail with a
/// 409. So the object a write returned is used until the watch brings that
/// version (watch events come in `resourceVersion` order: every event
/// before it is older), and a Service a write found gone (404) is planned
/// as gone until the watch brings its deletion.
#[derive(Debug, Default)]
pub struct Freshest {
    written: HashMap<ServiceKey, Arc<Service>>,
    gone: BTreeSet<ServiceKey>,
}

fn resource_version_of(svc: &Service) -> Option<&str> {
    svc.metadata.resource_version.as_deref()
}

impl Freshest {
    /// A write to `key` returned `svc`; `known`: the version it was
    /// planned on. A write that changed nothing (same `resourceVersion`:
    /// no watch event follows) leaves things as they were.
    pub fn wrote(&mut self, key: &ServiceKey, mut svc: Service, known: Option<&Service>) {
        let known = self
            .written
            .get(key)
            .map(|s| s.as_ref())
            .or(known)
            .and_then(resource_version_of);
        if resource_version_of(&svc).is_none() || resource_version_of(&svc) == known {
            return;
        }
        slim(&mut svc);
        self.written.insert(key.clone(), Arc::new(svc));
    }

    /// A write found `key` gone (404).
    pub fn gone(&mut self, key: &ServiceKey) {
        self.written.remove(key);
        self.gone.insert(key.clone());
    }

    /// The watch brought `svc` (`deleted`: its deletion).
    pub fn observed(&mut self, svc: &Service, deleted: bool) {
        let Some(key) = key_of(svc) else {
            return;
        };
        if deleted {
            self.written.remove(&key);
            self.gone.remove(&key);
        } else if self
            .written
            .get(&key)
            .is_some_and(|w| resource_version_of(w) == resource_version_of(svc))
        {
            self.written.remove(&key);
        }
    }

    /// The watch listed the Services again: the cache is current.
    pub fn relisted(&mut self) {
        self.written.clear();
        self.gone.clear();
    }

    /// The version of `key` to plan on, given the cache's (`cached`).
    pub fn view(&self, key: &ServiceKey, cached: Option<Arc<Service>>) -> Option<Arc<Service>> {
        if self.gone.contains(key) {
            return None;
        }
        match (self.written.get(key), cached) {
            (Some(w), Some(_)) => Some(w.clone()),
            (_, cached) => cached,
        }
    }

    /// Services held here (written, not yet seen by the watch; or gone).
    pub fn len(&self) -> usize {
        self.written.len() + self.gone.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The writes to Services and their Events: a merge patch of metadata
/// (verb `patch` on `services`), a server-side apply of status (`patch` on
/// `services/status`), Event creation.
pub struct ServiceWriter {
    client: Client,
    events: EventPublisher,
}

impl ServiceWriter {
    /// `instance`: the Events' `reportingInstance`.
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        ServiceWriter {
            events: EventPublisher::new(client.clone(), instance),
            client,
        }
    }

    fn api(&self, key: &ServiceKey) -> Api<Service> {
        Api::namespaced(self.client.clone(), &key.namespace)
    }

    /// The merge patch of metadata (conditional on
    /// [`MetadataPatch::resource_version`]); returns the Service as
    /// written.
    pub async fn patch_metadata(
        &self,
        key: &ServiceKey,
        patch: &MetadataPatch,
    ) -> Result<Service, kube::Error> {
        self.api(key)
            .patch(
                &key.name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..PatchParams::default()
                },
                &Patch::Merge(patch.to_json()),
            )
            .await
    }

    /// The server-side apply of status; returns the Service as written.
    pub async fn patch_status(
        &self,
        key: &ServiceKey,
        update: &StatusUpdate,
    ) -> Result<Service, kube::Error> {
        self.api(key)
            .patch_status(
                &key.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(update.to_apply_body(key)),
            )
            .await
    }

    pub fn events(&self) -> &EventPublisher {
        &self.events
    }
}

/// What this node's datapath did with one Service's rules, as far as it
/// decides whether to tell again: the frontends installed and whether each
/// has endpoints (not how many: endpoints churn, but a frontend without
/// any drops every connection, and an Event saying `0 endpoints` must not
/// stand once they came), and the refusals.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Every rule installed: their [`outcome_of`].
    Programmed(Vec<String>),
    /// Some (or all) not installed: `rule: why` each, and the frontends
    /// that were installed.
    NotProgrammed {
        refused: Vec<String>,
        installed: Vec<String>,
    },
}

/// `vip:port/proto` of `r`.
fn frontend(r: &ServiceRule) -> String {
    format!(
        "{}/{}",
        std::net::SocketAddr::new(r.rule.vip, r.rule.port),
        r.rule.protocol.as_str()
    )
}

/// `vip:port/proto`, and ` without endpoints` when `r` has none: what of
/// an installed rule tells again when it changes.
fn outcome_of(r: &ServiceRule) -> String {
    if r.rule.endpoints.is_empty() {
        format!("{} without endpoints", frontend(r))
    } else {
        frontend(r)
    }
}

/// `vip:port/proto -> n endpoints` of `r`.
fn frontend_with_endpoints(r: &ServiceRule) -> String {
    let n = r.rule.endpoints.len();
    format!(
        "{} -> {n} endpoint{}",
        frontend(r),
        if n == 1 { "" } else { "s" }
    )
}

/// The per-Service outcome of this node's datapath updates, and the Events
/// that tell it: a Normal `RuleProgrammed` when a Service's rules are
/// installed, a Warning `RuleNotProgrammed` when the agent refused one of
/// them or the datapath update failed. An Event is queued only when a
/// Service's outcome changed since the last one: frontends installed or
/// refused, or a frontend's endpoints going from none to some or back (a
/// resync, a retry with the same result, or a change of how many
/// endpoints a frontend has says nothing). Its note starts with the node's
/// name: every agent reports its own datapath.
#[derive(Debug)]
pub struct RuleOutcomes {
    node: String,
    last: HashMap<ServiceKey, Outcome>,
    pending: BTreeMap<ServiceKey, EventSpec>,
}

impl RuleOutcomes {
    pub fn new(node: impl Into<String>) -> Self {
        RuleOutcomes {
            node: node.into(),
            last: HashMap::new(),
            pending: BTreeMap::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The sink was handed `update` and answered `result`: queue an Event
    /// for each Service of the update whose outcome changed. A Service
    /// without rules (any more) is forgotten, without an Event.
    pub fn record(&mut self, update: &RuleUpdate<'_>, result: Result<&Applied, &anyhow::Error>) {
        let mut refused: HashMap<&ServiceKey, Vec<&Refused>> = HashMap::new();
        if let Ok(applied) = result {
            for r in &applied.refused {
                refused.entry(&r.service).or_default().push(r);
            }
        }
        let failed = result
            .err()
            .map(|e| format!("datapath update failed: {e:#}"));
        let mut seen = BTreeSet::new();
        let one = |this: &mut Self, key: &ServiceKey, rules: &[ServiceRule]| {
            if rules.is_empty() {
                this.last.remove(key);
                this.pending.remove(key);
                return;
            }
            let (outcome, note) = match (&failed, refused.get(key)) {
                (Some(e), _) => (
                    Outcome::NotProgrammed {
                        refused: vec![e.clone()],
                        installed: vec![],
                    },
                    e.clone(),
                ),
                (None, Some(no)) => {
                    let out: BTreeSet<&str> = no.iter().map(|r| r.rule.as_str()).collect();
                    let refused: Vec<String> = no
                        .iter()
                        .map(|r| format!("{}: {}", r.rule, r.reason))
                        .collect();
                    let ok: Vec<&ServiceRule> = rules
                        .iter()
                        .filter(|r| !out.contains(r.rule.name.as_str()))
                        .collect();
                    let mut note = format!("not programmed: {}", refused.join("; "));
                    if !ok.is_empty() {
                        let list: Vec<String> =
                            ok.iter().map(|r| frontend_with_endpoints(r)).collect();
                        note.push_str(&format!("; programmed: {}", list.join(", ")));
                    }
                    let installed = ok.iter().map(|r| outcome_of(r)).collect();
                    (Outcome::NotProgrammed { refused, installed }, note)
                }
                (None, None) => {
                    let list: Vec<String> = rules.iter().map(frontend_with_endpoints).collect();
                    (
                        Outcome::Programmed(rules.iter().map(outcome_of).collect()),
                        format!("{} programmed", list.join(", ")),
                    )
                }
            };
            if this.last.get(key) == Some(&outcome) {
                return;
            }
            let note = format!("node {}: {note}", this.node);
            let spec = match outcome {
                Outcome::Programmed(_) => {
                    EventSpec::normal(reasons::RULE_PROGRAMMED, actions::PROGRAM, note)
                }
                Outcome::NotProgrammed { .. } => {
                    EventSpec::warning(reasons::RULE_NOT_PROGRAMMED, actions::PROGRAM, note)
                }
            };
            this.last.insert(key.clone(), outcome);
            this.pending.insert(key.clone(), spec);
        };
        if update.is_full() {
            for (key, rules) in update.services() {
                seen.insert(key);
                one(self, key, rules);
            }
            // Services without rules in a full update: forgotten.
            self.last.retain(|k, _| seen.contains(k));
            self.pending.retain(|k, _| seen.contains(k));
        } else {
            for (key, rules) in update.changed() {
                one(self, key, rules);
            }
        }
    }

    /// The Events queued since the last call, by Service.
    pub fn take(&mut self) -> Vec<(ServiceKey, EventSpec)> {
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// The Events for a change of the VIPs this node owns from `before` to
/// `after`: on each Service with a VIP taken (`VIPActive`) or given up
/// (`VIPBackup`), naming the node and the VIPs.
fn role_events(
    reconciler: &Reconciler,
    node: &str,
    before: &BTreeSet<IpAddr>,
    after: &BTreeSet<IpAddr>,
) -> Vec<(ServiceKey, EventSpec)> {
    let mut out = vec![];
    for key in reconciler.known_services() {
        let mut vips: BTreeSet<IpAddr> = BTreeSet::new();
        for r in reconciler.service_rules(&key) {
            vips.insert(r.rule.vip);
            vips.extend(r.rule.secondary_vips.iter().copied());
        }
        let list = |f: &dyn Fn(&IpAddr) -> bool| {
            vips.iter()
                .filter(|v| f(v))
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
        };
        let taken = list(&|v| after.contains(v) && !before.contains(v));
        let given = list(&|v| before.contains(v) && !after.contains(v));
        if !taken.is_empty() {
            out.push((
                key.clone(),
                EventSpec::normal(
                    reasons::VIP_ACTIVE,
                    actions::OWN,
                    format!(
                        "node {node} now answers for {} (active; announced by gratuitous ARP / unsolicited NA)",
                        taken.join(", ")
                    ),
                ),
            ));
        }
        if !given.is_empty() {
            out.push((
                key.clone(),
                EventSpec::normal(
                    reasons::VIP_BACKUP,
                    actions::OWN,
                    format!(
                        "node {node} gave up {} (backup: another node answers for it)",
                        given.join(", ")
                    ),
                ),
            ));
        }
    }
    out
}

/// Carries plans out: API writes, then the datapath.
pub struct Executor<S> {
    writer: ServiceWriter,
    sink: S,
    /// The rule set changed (or the last apply failed) and the sink has
    /// not taken it yet.
    sink_dirty: bool,
    /// The sink took a (full) rule update since start.
    sink_synced: bool,
    vips_sent: Option<Vec<IpAddr>>,
    /// Commit rules without handing them to the sink (a batch is being
    /// carried out; [`Executor::sync_sink`] at its end).
    hold: bool,
    /// What the datapath did with each Service's rules, and the Events
    /// not yet published ([`Executor::publish_rule_events`]).
    outcomes: RuleOutcomes,
    /// The Services as the writes returned them (or found them gone).
    freshest: Freshest,
    /// Events on the Services whose VIPs this node took or gave up, not
    /// yet published.
    role_events: Vec<(ServiceKey, EventSpec)>,
}

impl<S: RuleSink> Executor<S> {
    /// The Events on rules name the node as the writer's
    /// `reportingInstance` until [`Executor::set_node_name`].
    pub fn new(writer: ServiceWriter, sink: S) -> Self {
        Executor {
            outcomes: RuleOutcomes::new(writer.events().instance()),
            writer,
            sink,
            sink_dirty: false,
            sink_synced: false,
            vips_sent: None,
            hold: false,
            freshest: Freshest::default(),
            role_events: Vec::new(),
        }
    }

    /// The freshest version of each Service known from the writes.
    pub fn freshest(&self) -> &Freshest {
        &self.freshest
    }

    /// For the watch events: [`Freshest::observed`], [`Freshest::relisted`].
    pub fn freshest_mut(&mut self) -> &mut Freshest {
        &mut self.freshest
    }

    /// While held, [`Step::SetRules`] only commits the rules (the sink gets
    /// the whole set at the next [`Executor::sync_sink`]), except in a plan
    /// whose later steps wait for the datapath
    /// ([`Plan::waits_for_datapath`]). A batch of plans (a node change, the
    /// start) then reaches the datapath as one rule set, never as a partial
    /// one that would drop the rules (and sessions) of Services not yet
    /// planned.
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The node named in the `RuleProgrammed` / `RuleNotProgrammed` Events.
    pub fn set_node_name(&mut self, node: impl Into<String>) {
        self.outcomes.node = node.into();
    }

    /// Publish the Events on rules queued by the datapath updates since
    /// the last call (a change of a Service's outcome only, see
    /// [`RuleOutcomes`]). `regarding`: the Service's reference, `None`
    /// when it is gone (its Event is dropped). Failures are only logged.
    pub async fn publish_rule_events(
        &mut self,
        regarding: impl Fn(&ServiceKey) -> Option<ObjectReference>,
        now: Timestamp,
    ) {
        let mut events = self.outcomes.take();
        events.append(&mut self.role_events);
        for (key, ev) in events {
            match ev.type_ {
                EventType::Warning => warn!(service = %key, "{}: {}", ev.reason, ev.note),
                EventType::Normal => info!(service = %key, "{}: {}", ev.reason, ev.note),
            }
            let Some(r) = regarding(&key) else {
                continue;
            };
            if let Err(e) = self.writer.events().publish(&ev, &r, now).await {
                warn!(service = %key, error = %e, "could not create the Event");
            }
        }
    }

    /// Queue an Event on `key`, published with the Events on rules
    /// ([`Executor::publish_rule_events`]).
    pub fn queue_event(&mut self, key: ServiceKey, event: EventSpec) {
        self.role_events.push((key, event));
    }

    /// Whether Events on rules wait for [`Executor::publish_rule_events`].
    pub fn rule_events_pending(&self) -> bool {
        self.outcomes.has_pending() || !self.role_events.is_empty()
    }

    /// Hand the sink the rule set if it changed (the first time in any
    /// case, full, even when empty: the datapath may hold rules from before
    /// the start), and the owned VIPs if they changed (the first time in
    /// any case: a follower's are none, and it may own some from before).
    pub fn sync_sink(&mut self, reconciler: &mut Reconciler) -> Result<(), StepError> {
        let vips = reconciler.owned_vips();
        self.sync_sink_owning(reconciler, vips)
    }

    /// [`Executor::sync_sink`] with the owned VIPs computed already
    /// (`vips`: [`Reconciler::owned_vips`] of `reconciler` as it is; with
    /// owner groups that is a pass over every rule, which the controller
    /// loop makes once for [`Executor::sink_pending`] and this).
    pub fn sync_sink_owning(
        &mut self,
        reconciler: &mut Reconciler,
        vips: Vec<IpAddr>,
    ) -> Result<(), StepError> {
        debug_assert_eq!(vips, reconciler.owned_vips(), "stale owned VIPs");
        if !self.sink_synced || self.sink_dirty || reconciler.rules_changed() {
            let update = reconciler.rule_update(!self.sink_synced);
            let r = self.sink.update(&update);
            self.outcomes.record(&update, r.as_ref());
            r.map_err(StepError::Datapath)?;
            reconciler.rules_synced();
            self.sink_synced = true;
            self.sink_dirty = false;
        }
        if self.vips_sent.as_ref() != Some(&vips) {
            self.sink
                .own_vips(vips.clone())
                .map_err(StepError::Datapath)?;
            let before: BTreeSet<IpAddr> = self.vips_sent.iter().flatten().copied().collect();
            let after: BTreeSet<IpAddr> = vips.iter().copied().collect();
            self.role_events.extend(role_events(
                reconciler,
                &self.outcomes.node,
                &before,
                &after,
            ));
            self.vips_sent = Some(vips);
        }
        Ok(())
    }

    /// Tell the sink whether this agent leads ([`RuleSink::leading`]).
    pub fn sink_leading(&mut self, leader: bool) {
        self.sink.leading(leader);
    }

    /// Whether the sink still owes an update (a retry is due); `vips`:
    /// [`Reconciler::owned_vips`] of `reconciler` as it is.
    pub fn sink_pending(&self, reconciler: &Reconciler, vips: &[IpAddr]) -> bool {
        !self.sink_synced
            || self.sink_dirty
            || reconciler.rules_changed()
            || self.vips_sent.as_deref() != Some(vips)
    }

    /// Carry out `plan` for `key` (`svc`: the Service planned on, for the
    /// Events; the objects the writes return replace it in
    /// [`Executor::freshest`], a 404 marks it gone there): the steps in
    /// order, stopping at the first failure; then the
    /// Events: Warnings whatever happened, Normal ones (something was done)
    /// only when every step succeeded. Event failures are only logged.
    /// Returns the Services to plan again (`plan.requeue`, and the pending
    /// ones when an address was released).
    pub async fn execute(
        &mut self,
        reconciler: &mut Reconciler,
        key: &ServiceKey,
        svc: Option<&Service>,
        plan: &Plan,
        now: Timestamp,
    ) -> Result<Vec<ServiceKey>, StepError> {
        let mut requeue = plan.requeue.clone();
        let mut result = Ok(());
        for step in &plan.steps {
            let r = match step {
                Step::PatchMetadata(p) => match self.writer.patch_metadata(key, p).await {
                    Ok(written) => {
                        self.freshest.wrote(key, written, svc);
                        Ok(())
                    }
                    Err(e) => Err(StepError::Api(e)),
                },
                Step::SetRules(rules) => {
                    // Committed only once the datapath has it: a Service
                    // whose rules could not be removed is planned (and its
                    // finalizer held) until they are.
                    let previous = reconciler.service_rules(key).to_vec();
                    if reconciler.commit(key, rules.clone()) {
                        self.sink_dirty = true;
                    }
                    if self.hold && !plan.waits_for_datapath() {
                        continue;
                    }
                    let r = self.sync_sink(reconciler);
                    if r.is_err() && self.sink_dirty {
                        reconciler.commit(key, previous);
                    }
                    r
                }
                Step::PatchStatus(u) => match self.writer.patch_status(key, u).await {
                    Ok(written) => {
                        self.freshest.wrote(key, written, svc);
                        Ok(())
                    }
                    Err(e) => Err(StepError::Api(e)),
                },
                Step::Release => {
                    requeue.extend(reconciler.release(key));
                    Ok(())
                }
            };
            if let Err(e) = r {
                if e.is_gone() {
                    self.freshest.gone(key);
                }
                result = Err(e);
                break;
            }
        }
        if let Some(svc) = svc {
            let regarding = service_reference(svc);
            for ev in &plan.events {
                if ev.type_ == EventType::Normal && result.is_err() {
                    continue;
                }
                match ev.type_ {
                    EventType::Warning => warn!(service = %key, "{}: {}", ev.reason, ev.note),
                    EventType::Normal => info!(service = %key, "{}: {}", ev.reason, ev.note),
                }
                if let Err(e) = self.writer.events().publish(ev, &regarding, now).await {
                    warn!(service = %key, error = %e, "could not create the Event");
                }
            }
        }
        result.map(|()| requeue)
    }
}

/// The retry schedule of a failed Service (and of a failed datapath
/// update): kube-runtime's exponential backoff (the one its watchers use,
/// built on `backon`), `min` doubling to at most `max`, never giving up,
/// without jitter (the retries of a batch stay a batch).
pub fn retry_backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .into()
}

/// Services to plan, and the retries due.
///
/// The batching is why this is not kube-runtime's `Controller` (whose
/// scheduler and backoff would fit): the `Controller` calls `reconcile`
/// for one object at a time, concurrently, and the datapath takes the rule
/// set whole ([`Executor::set_hold`]: the dirty Services of a round, 500
/// at a start, are planned and reach the datapath as one rule set, so a
/// start or a re-list costs one map update, not one per Service, and no
/// Service's rules are dropped for a moment because another was planned
/// first). Its `reconcile` also sees one object kind; a plan here needs
/// the Service, its EndpointSlices, the Nodes and (Multus) the pods, and
/// a Node change marks every Service. What is kube-runtime's here: the
/// watchers and reflectors, and each key's backoff ([`retry_backoff`]).
pub struct WorkQueue {
    dirty: BTreeSet<ServiceKey>,
    retry: BTreeMap<ServiceKey, (Instant, ExponentialBackoff)>,
    min: Duration,
    max: Duration,
}

impl WorkQueue {
    /// Failed Services are retried after `min`, doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        WorkQueue {
            dirty: BTreeSet::new(),
            retry: BTreeMap::new(),
            min,
            max,
        }
    }

    pub fn mark(&mut self, key: ServiceKey) {
        self.dirty.insert(key);
    }

    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }

    /// The dirty Services, and those whose retry is due at `now`.
    pub fn take(&mut self, now: Instant) -> Vec<ServiceKey> {
        let due: Vec<ServiceKey> = self
            .retry
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        self.dirty.extend(due);
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// `key` failed: retry after `min * 2^(failures-1)`, at most `max`
    /// (the next step of its [`retry_backoff`]).
    pub fn failed(&mut self, key: &ServiceKey, now: Instant) -> Duration {
        let (min, max) = (self.min, self.max);
        let (at, backoff) = self
            .retry
            .entry(key.clone())
            .or_insert_with(|| (now, retry_backoff(min, max)));
        let delay = backoff.next().unwrap_or(max);
        *at = now + delay;
        delay
    }

    pub fn succeeded(&mut self, key: &ServiceKey) {
        self.retry.remove(key);
    }

    /// The earliest retry.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry.values().map(|(at, _)| *at).min()
    }
}

/// What of a Node the rules depend on: its labels, addresses and `Ready`
/// status (not heartbeats, images or other conditions' timestamps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFingerprint {
    labels: BTreeMap<String, String>,
    addresses: Vec<(String, String)>,
    ready: Option<String>,
}

impl NodeFingerprint {
    pub fn of(node: &Node) -> Self {
        let status = node.status.as_ref();
        NodeFingerprint {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            addresses: status
                .and_then(|s| s.addresses.as_ref())
                .map(|a| {
                    a.iter()
                        .map(|x| (x.type_.clone(), x.address.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .map(|c| c.status.clone()),
        }
    }
}

/// The fingerprints of the Nodes seen, to tell a change that matters.
#[derive(Debug, Default)]
pub struct NodeCache {
    seen: BTreeMap<String, NodeFingerprint>,
}

impl NodeCache {
    /// Record `node`; `true` when it is new or changed in what matters.
    pub fn update(&mut self, node: &Node) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        let fp = NodeFingerprint::of(node);
        self.seen.insert(name, fp.clone()) != Some(fp)
    }

    /// Forget `node`; `true` when it was known.
    pub fn remove(&mut self, node: &Node) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        self.seen.remove(&name).is_some()
    }

    pub fn clear(&mut self) {
        self.seen.clear();
    }

    /// Every known Node's `InternalIP` addresses, by Node name.
    pub fn internal_ips(&self) -> Vec<(String, IpAddr)> {
        self.seen
            .iter()
            .flat_map(|(name, fp)| {
                fp.addresses
                    .iter()
                    .filter(|(t, _)| t == "InternalIP")
                    .filter_map(|(_, a)| a.parse().ok())
                    .map(|a| (name.clone(), a))
            })
            .collect()
    }
}

fn key_of(svc: &Service) -> Option<ServiceKey> {
    Some(ServiceKey::new(
        svc.metadata.namespace.clone()?,
        svc.metadata.name.clone()?,
    ))
}

fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(slice.metadata.namespace.clone()?, name))
}

/// The EndpointSlices of the Services `keys`, copied out of the cache
/// (only theirs: with 10,000 Services, copying every slice for each event
/// cost more than the rest of the event's work). No allocation for the
/// slices of other Services.
fn slices_of(
    cached: &[std::sync::Arc<EndpointSlice>],
    keys: &[ServiceKey],
) -> BTreeMap<ServiceKey, Vec<EndpointSlice>> {
    let wanted: std::collections::HashMap<(&str, &str), &ServiceKey> = keys
        .iter()
        .map(|k| ((k.namespace.as_str(), k.name.as_str()), k))
        .collect();
    let mut out: BTreeMap<ServiceKey, Vec<EndpointSlice>> = BTreeMap::new();
    for s in cached {
        let (Some(ns), Some(name)) = (
            s.metadata.namespace.as_deref(),
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        if let Some(k) = wanted.get(&(ns, name.as_str())) {
            out.entry((*k).clone()).or_default().push((**s).clone());
        }
    }
    out
}

/// What a watch event means for the queue.
enum Touch {
    One(ServiceKey),
    All,
    Ready,
    Nothing,
}

fn touch<K>(
    ev: Result<watcher::Event<K>, watcher::Error>,
    what: &str,
    one: impl Fn(&K) -> Option<ServiceKey>,
) -> Touch {
    match ev {
        Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => match one(&o) {
            Some(k) => Touch::One(k),
            None => Touch::All,
        },
        Ok(watcher::Event::InitDone) => Touch::Ready,
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Touch::Nothing,
        Err(e) => {
            warn!(error = %e, "{what} watch failed; retrying");
            Touch::Nothing
        }
    }
}

fn watch_stream<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(api, config).modify(slim)).default_backoff();
    (store, stream)
}

/// The annotation `kubectl apply` stores a whole copy of the object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drop what the controller never reads before an object enters a cache:
/// `managedFields` (often larger than the rest of the object) and
/// `kubectl apply`'s copy of the object. With 10,000 Services and their
/// EndpointSlices this is most of the memory the caches would hold.
pub fn slim<K: kube::Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// Whether `svc` is a Service of ours (not being deleted) whose endpoints
/// are on Multus networks: its plans need the pods' network-status.
pub fn is_multus(svc: &Service, class: &str) -> bool {
    svc.metadata.deletion_timestamp.is_none()
        && svc.annotations().contains_key(MULTUS_NETS)
        && is_managed(svc, class)
}

type PodEvents = BoxStream<'static, Result<watcher::Event<PartialObjectMeta<Pod>>, watcher::Error>>;

/// The Pod watch, running while some Service has `loxilb.io/multus-nets`:
/// metadata only (`PartialObjectMeta`: no spec or status comes over the
/// wire), of which only each pod's [`NETWORK_STATUS`] is kept.
struct PodWatch {
    events: PodEvents,
    pods: PodNetworks,
}

impl PodWatch {
    fn start(client: &Client) -> Self {
        // `Api<PartialObjectMeta<_>>` asks for metadata only.
        let events = watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed();
        PodWatch {
            events,
            pods: PodNetworks::default(),
        }
    }
}

/// The next event of the Pod watch; never, when there is none.
async fn next_pod_event(
    w: &mut Option<PodWatch>,
) -> Option<Result<watcher::Event<PartialObjectMeta<Pod>>, watcher::Error>> {
    match w {
        Some(w) => w.events.next().await,
        None => std::future::pending().await,
    }
}

/// `(namespace, name, network-status)` of a pod's metadata.
fn pod_status_of(p: &PartialObjectMeta<Pod>) -> Option<(&str, &str, Option<&str>)> {
    Some((
        p.metadata.namespace.as_deref()?,
        p.metadata.name.as_deref()?,
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NETWORK_STATUS))
            .map(String::as_str),
    ))
}

/// The owner groups' next change (the pools this agent holds now);
/// never without owner groups.
async fn groups_changed(
    groups: &mut Option<crate::groups::OwnerGroups>,
) -> Option<BTreeSet<String>> {
    match groups {
        Some(g) => match g.held.changed().await {
            Ok(()) => Some(g.held.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Run the controller until `shutdown` completes.
pub async fn run<S: RuleSink>(
    client: Client,
    config: RunConfig,
    sink: S,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(client, config, sink, shutdown, None, |_| {}).await
}

/// [`run`], with takeover hints: identities of Lease holders found dead
/// (see [`LeaderElector::with_takeover_hints`]).
pub async fn run_with_hints<S: RuleSink>(
    client: Client,
    config: RunConfig,
    sink: S,
    shutdown: impl Future<Output = ()>,
    hints: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
) -> anyhow::Result<()> {
    run_with(client, config, sink, shutdown, hints, |_| {}).await
}

/// [`run`], handing `observe` the state (allocations, committed rules)
/// after every round of work: a read-only view for checks (the churn
/// test compares the allocation table with the Services in the API).
pub async fn run_observed<S: RuleSink>(
    client: Client,
    config: RunConfig,
    sink: S,
    shutdown: impl Future<Output = ()>,
    observe: impl FnMut(&Reconciler),
) -> anyhow::Result<()> {
    run_with(client, config, sink, shutdown, None, observe).await
}

/// [`run`] with both: takeover hints ([`run_with_hints`]) and an observer
/// of the state after each round ([`run_observed`]).
pub async fn run_with<S: RuleSink>(
    client: Client,
    config: RunConfig,
    sink: S,
    shutdown: impl Future<Output = ()>,
    hints: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
    mut observe: impl FnMut(&Reconciler),
) -> anyhow::Result<()> {
    let mut reconciler =
        Reconciler::new(config.kube.clone()).context("the configured pools cannot be used")?;
    reconciler.set_status_form(config.status_form.clone());
    let mut executor = Executor::new(
        ServiceWriter::new(client.clone(), config.lease.identity.clone()),
        sink,
    );
    executor.set_node_name(config.node_name.clone());

    let (services, svc_stream) = watch_stream(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let (slices, slice_stream) = watch_stream(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    );
    let (nodes, node_stream) =
        watch_stream(Api::<Node>::all(client.clone()), watcher::Config::default());
    let mut svc_stream = std::pin::pin!(svc_stream);
    let mut slice_stream = std::pin::pin!(slice_stream);
    let mut node_stream = std::pin::pin!(node_stream);

    let (leader_tx, mut leader_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut elector = LeaderElector::new(client.clone(), config.lease.clone());
    // --vipOwners=pool: one election per pool besides the leader's.
    let pools = reconciler.owner_groups();
    let mut groups = if pools.is_empty() {
        None
    } else {
        info!(?pools, "VIP owners: one Lease per pool");
        Some(
            crate::groups::OwnerGroups::start(client.clone(), &config.lease, &pools)
                .map_err(|e| anyhow::anyhow!("--vipOwners=pool: {e}"))?,
        )
    };
    let hints = match (hints, &groups) {
        // A dead agent's pools are taken over at once too.
        (Some(mut h), Some(g)) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let to_groups = g.hinter();
            tokio::spawn(async move {
                while let Some(dead) = h.recv().await {
                    to_groups(&dead);
                    if tx.send(dead).is_err() {
                        break;
                    }
                }
            });
            Some(rx)
        }
        (h, _) => h,
    };
    if let Some(h) = hints {
        elector = elector.with_takeover_hints(h);
    }
    let elector_task = tokio::spawn(elector.run(leader_tx, async move {
        let _ = stop_rx.await;
    }));

    let class = config.kube.load_balancer_class.clone();
    // Services with loxilb.io/multus-nets (ours, not being deleted): the
    // Pod watch runs while there is one.
    let mut multus_services: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut pod_watch: Option<PodWatch> = None;
    // Which pods each multus Service's EndpointSlices refer to: a pod's
    // change re-plans those Services only.
    let mut pod_index = PodIndex::default();
    // Multus Services to plan once the Pod list is complete.
    let mut waiting_for_pods: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut planned_once = false;
    let mut pods_deadline: Option<Instant> = None;
    // The Pod watch failed since its last complete list (the multus
    // Services were told).
    let mut pod_watch_failing = false;

    let mut queue = WorkQueue::new(config.retry_min, config.retry_max);
    let mut node_cache = NodeCache::default();
    let mut node_ips: Option<Vec<(String, IpAddr)>> = None;
    let mut ready = [false; 3];
    let mut all = false;
    let mut sink_retry: Option<Instant> = None;
    let mut sink_backoff = retry_backoff(config.retry_min, config.retry_max);
    let mut shutdown = std::pin::pin!(shutdown);
    info!(
        class = %config.kube.load_balancer_class,
        identity = %config.lease.identity,
        "watching Services, EndpointSlices and Nodes"
    );

    loop {
        // Services marked to plan again by the last round (pending ones
        // after a release, one found gone) are planned without waiting for
        // another event.
        // At start, the first plans wait (a while) for the Pod list.
        let holding_for_pods =
            !planned_once && pod_watch.as_ref().is_some_and(|w| !w.pods.synced());
        let next_retry = if ready == [true; 3] && holding_for_pods {
            pods_deadline
        } else if ready == [true; 3] && !queue.is_empty() {
            Some(Instant::now())
        } else {
            [queue.next_retry(), sink_retry].into_iter().flatten().min()
        };
        let wake = async {
            match next_retry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            Some(ev) = svc_stream.next() => {
                match &ev {
                    Ok(watcher::Event::Apply(s)) => {
                        executor.freshest_mut().observed(s, false);
                        if let Some(k) = key_of(s) {
                            if is_multus(s, &class) {
                                multus_services.insert(k);
                            } else {
                                multus_services.remove(&k);
                            }
                        }
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        executor.freshest_mut().observed(s, true);
                        if let Some(k) = key_of(s) {
                            multus_services.remove(&k);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        executor.freshest_mut().relisted();
                        multus_services = services
                            .state()
                            .iter()
                            .filter(|s| is_multus(s, &class))
                            .filter_map(|s| key_of(s))
                            .collect();
                    }
                    _ => {}
                }
                match touch(ev, "Service", key_of) {
                    Touch::One(k) => queue.mark(k),
                    Touch::All => all = true,
                    Touch::Ready => { ready[0] = true; all = true; }
                    Touch::Nothing => {}
                }
            },
            Some(ev) = slice_stream.next() => match touch(ev, "EndpointSlice", slice_service) {
                Touch::One(k) => queue.mark(k),
                Touch::All => {}
                Touch::Ready => { ready[1] = true; all = true; }
                Touch::Nothing => {}
            },
            Some(ev) = node_stream.next() => match ev {
                // Nodes are written every few seconds (heartbeats, images):
                // only a change of what the rules use replans.
                Ok(watcher::Event::Apply(n)) => all |= node_cache.update(&n),
                Ok(watcher::Event::Delete(n)) => all |= node_cache.remove(&n),
                Ok(watcher::Event::Init) => node_cache.clear(),
                Ok(watcher::Event::InitApply(n)) => { node_cache.update(&n); }
                Ok(watcher::Event::InitDone) => { ready[2] = true; all = true; }
                Err(e) => warn!(error = %e, "Node watch failed; retrying"),
            },
            Some(ev) = next_pod_event(&mut pod_watch) => {
                let w = pod_watch.as_mut().expect("an event comes from a running watch");
                let mut changed: Vec<(String, String)> = Vec::new();
                match ev {
                    Ok(watcher::Event::Init) => w.pods.relisting(),
                    Ok(watcher::Event::InitApply(p)) => {
                        if let Some((ns, name, st)) = pod_status_of(&p) {
                            w.pods.apply(ns, name, st);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        pod_watch_failing = false;
                        changed = w.pods.relisted();
                        debug!(pods = w.pods.len(), "Pod list complete");
                        for k in std::mem::take(&mut waiting_for_pods) {
                            queue.mark(k);
                        }
                    }
                    Ok(watcher::Event::Apply(p)) => {
                        if let Some((ns, name, st)) = pod_status_of(&p) {
                            if w.pods.apply(ns, name, st) {
                                changed.push((ns.to_string(), name.to_string()));
                            }
                        }
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some((ns, name, _)) = pod_status_of(&p) {
                            if w.pods.delete(ns, name) {
                                changed.push((ns.to_string(), name.to_string()));
                            }
                        }
                    }
                    Err(e) => {
                        warn!(
                            error = %e,
                            "Pod watch failed (the Services with {MULTUS_NETS} need the pods' {NETWORK_STATUS}); retrying. If the error says forbidden, grant list and watch on pods to the agent's ClusterRole (manifest/in-cluster/loxilb.yaml)"
                        );
                        // Told on each multus Service, once per failure
                        // streak, by the leader: their endpoints do not
                        // follow the pods until the watch works.
                        if !pod_watch_failing && reconciler.is_leader() {
                            pod_watch_failing = true;
                            let note = format!(
                                "the Pod watch failed ({e}): the endpoints on {} do not follow the pods' {NETWORK_STATUS} until it works (retrying); if it says forbidden, grant list and watch on pods to the agent's ClusterRole (manifest/in-cluster/loxilb.yaml)",
                                MULTUS_NETS
                            );
                            for k in &multus_services {
                                executor.queue_event(
                                    k.clone(),
                                    EventSpec::warning(
                                        reasons::POD_WATCH_FAILED,
                                        actions::CONFIGURE,
                                        note.clone(),
                                    ),
                                );
                            }
                        }
                    }
                }
                for (ns, name) in changed {
                    for k in pod_index.services_of(&ns, &name) {
                        queue.mark(k);
                    }
                }
            },
            Ok(()) = leader_rx.changed() => all = true,
            Some(held) = groups_changed(&mut groups) => reconciler.set_owner_groups(held),
            _ = wake => {}
        }
        // The Nodes' addresses go to the sink once the list is complete
        // and whenever they change (conntrack sync peers).
        if ready[2] {
            let ips = node_cache.internal_ips();
            if node_ips.as_ref() != Some(&ips) {
                executor.sink_mut().node_addresses(ips.clone());
                node_ips = Some(ips);
            }
        }
        // The Pod watch runs while a Service of ours has multus-nets.
        match (&pod_watch, multus_services.is_empty()) {
            (None, false) => {
                info!(
                    services = multus_services.len(),
                    "watching Pods (metadata only) for the Services with {MULTUS_NETS}"
                );
                pod_watch = Some(PodWatch::start(&client));
            }
            (Some(_), true) => {
                info!("no Service has {MULTUS_NETS} any more: Pod watch stopped");
                pod_watch = None;
                pod_index = PodIndex::default();
                waiting_for_pods.clear();
            }
            _ => {}
        }
        if ready != [true; 3] {
            continue;
        }
        if !planned_once {
            if pod_watch.as_ref().is_some_and(|w| !w.pods.synced()) {
                let deadline = *pods_deadline.get_or_insert(Instant::now() + config.pod_list_grace);
                if Instant::now() < deadline {
                    continue;
                }
                warn!(
                    "the Pod list is not complete after {:?}: the Services with {MULTUS_NETS} are planned once it is",
                    config.pod_list_grace
                );
            }
            planned_once = true;
        }

        let want_leader = *leader_rx.borrow();
        if want_leader != reconciler.is_leader() {
            if want_leader {
                let svcs: Vec<Arc<Service>> = services
                    .state()
                    .into_iter()
                    .filter_map(|s| match key_of(&s) {
                        Some(k) => executor.freshest().view(&k, Some(s)),
                        None => Some(s),
                    })
                    .collect();
                let t = reconciler.become_leader(svcs.iter().map(|s| s.as_ref()));
                info!(
                    adopted = t.adopted,
                    "leading: allocation table rebuilt from the Services' records"
                );
                for n in t.notes {
                    warn!("{n}");
                }
            } else {
                reconciler.step_down();
                info!("following: no more allocations, status or Events from this agent");
            }
            executor.sink_leading(want_leader);
            all = true;
        }
        if std::mem::take(&mut all) {
            for s in services.state() {
                if let Some(k) = key_of(&s) {
                    queue.mark(k);
                }
            }
            for k in reconciler.known_services() {
                queue.mark(k);
            }
        }

        let now = Instant::now();
        let keys = queue.take(now);
        if !keys.is_empty() {
            let started = Instant::now();
            let (mut done, mut conflicts, mut errors) = (0u64, 0u64, 0u64);
            let node_list: Vec<Node> = nodes.state().iter().map(|n| (**n).clone()).collect();
            let slices_of = slices_of(&slices.state(), &keys);
            let mut batch = Vec::with_capacity(keys.len());
            for key in keys {
                // One span per Service and round, over its planning here
                // and its plan's execution below: every line logged for it
                // (plan notes, Events, the datapath's) names the Service.
                let span = info_span!("reconcile", service = %key);
                let _entered = span.clone().entered();
                let svc = executor.freshest().view(
                    &key,
                    services.get(&ObjectRef::new(&key.name).within(&key.namespace)),
                );
                let slice_list = slices_of.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                let multus = svc.as_deref().is_some_and(|s| is_multus(s, &class));
                let pods: &dyn PodLookup = match &pod_watch {
                    Some(w) if w.pods.synced() => &w.pods,
                    _ if multus => {
                        // Planned when the Pod list is complete.
                        waiting_for_pods.insert(key);
                        continue;
                    }
                    _ => &NoPods,
                };
                let plan = reconciler.plan_with_pods(
                    &key,
                    svc.as_deref(),
                    slice_list,
                    &node_list,
                    pods,
                    Timestamp::now(),
                );
                pod_index.set(
                    &key,
                    if multus {
                        referenced_pods(&key, slice_list)
                    } else {
                        BTreeSet::new()
                    },
                );
                for n in &plan.notes {
                    warn!("{n}");
                }
                batch.push((key, svc, plan, span));
            }
            // The plans whose later writes wait for the datapath go last,
            // when every other rule of the batch is committed: the sink
            // then gets whole rule sets only.
            batch.sort_by_key(|(_, _, p, _)| p.waits_for_datapath());
            executor.set_hold(true);
            for (key, svc, plan, span) in batch {
                if !plan.steps.is_empty() {
                    span.in_scope(
                        || debug!(service = %key, steps = plan.steps.len(), "carrying out plan"),
                    );
                }
                let result = executor
                    .execute(
                        &mut reconciler,
                        &key,
                        svc.as_deref(),
                        &plan,
                        Timestamp::now(),
                    )
                    .instrument(span.clone())
                    .await;
                // No await below: the span is entered on this thread only
                // while the outcome is logged.
                let _entered = span.entered();
                match result {
                    Ok(requeue) => {
                        done += 1;
                        queue.succeeded(&key);
                        for k in requeue {
                            queue.mark(k);
                        }
                    }
                    Err(e) if e.is_gone() => {
                        done += 1;
                        // Nothing to retry: planned again as gone (its
                        // rules removed, its addresses released).
                        queue.succeeded(&key);
                        queue.mark(key.clone());
                        debug!(service = %key, error = %e, "the Service is gone; its pending writes are dropped");
                    }
                    Err(e) if e.is_conflict() => {
                        done += 1;
                        conflicts += 1;
                        // Changed by someone else since the version planned
                        // on: its watch event plans it again (the retry is
                        // only a safety net).
                        let d = queue.failed(&key, Instant::now());
                        debug!(service = %key, error = %e, retry_in = ?d, "the Service changed meanwhile; planned again on its new version");
                    }
                    Err(e) => {
                        done += 1;
                        errors += 1;
                        let d = queue.failed(&key, Instant::now());
                        warn!(service = %key, error = %e, retry_in = ?d, "plan not completed");
                    }
                }
            }
            executor.set_hold(false);
            let st = reconciler.stats_mut();
            st.reconciles += done;
            st.conflicts += conflicts;
            st.errors += errors;
            st.seconds += started.elapsed().as_secs_f64();
            sink_retry = None;
        }
        // The owned VIPs once per round (with owner groups a pass over
        // every rule), for the check and the update.
        let vips = reconciler.owned_vips();
        if executor.sink_pending(&reconciler, &vips)
            && sink_retry.is_none_or(|t| t <= Instant::now())
        {
            match executor.sync_sink_owning(&mut reconciler, vips) {
                Ok(()) => {
                    sink_retry = None;
                    sink_backoff.reset();
                }
                Err(e) => {
                    reconciler.stats_mut().sink_errors += 1;
                    let d = sink_backoff.next().unwrap_or(config.retry_max);
                    sink_retry = Some(Instant::now() + d);
                    warn!(error = %e, retry_in = ?d, "datapath not updated");
                }
            }
        }
        if executor.rule_events_pending() {
            executor
                .publish_rule_events(
                    |k| {
                        services
                            .get(&ObjectRef::new(&k.name).within(&k.namespace))
                            .map(|s| service_reference(&s))
                    },
                    Timestamp::now(),
                )
                .await;
        }
        observe(&reconciler);
    }

    // Stopping: give the VIPs up before the Leases go (so two nodes never
    // answer for them), and tell their Services.
    if !reconciler.owned_vips().is_empty() {
        reconciler.step_down();
        reconciler.set_owner_groups(BTreeSet::new());
        if let Err(e) = executor.sync_sink(&mut reconciler) {
            warn!(error = %e, "giving up the VIPs at exit");
        }
        executor
            .publish_rule_events(
                |k| {
                    services
                        .get(&ObjectRef::new(&k.name).within(&k.namespace))
                        .map(|s| service_reference(&s))
                },
                Timestamp::now(),
            )
            .await;
    }
    if let Some(g) = groups.take() {
        g.stop().await;
    }
    let _ = stop_tx.send(());
    elector_task.await.context("leader election task")?;
    info!("controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_config_from_env() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = RunConfig::from_lookup(
            KubeConfig::default(),
            env(&[
                ("POD_NAME", "loxilb-agent-x7"),
                ("NODE_NAME", "n1"),
                ("POD_NAMESPACE", "lb"),
            ]),
        )
        .unwrap();
        assert_eq!(c.lease.identity, "loxilb-agent-x7");
        assert_eq!(c.lease.namespace, "lb");
        assert_eq!(c.lease.name, "loxilb-agent");
        assert_eq!(c.node_name, "n1");
        let c = RunConfig::from_lookup(KubeConfig::default(), env(&[("NODE_NAME", "n1")])).unwrap();
        assert_eq!(
            (c.lease.identity.as_str(), c.lease.namespace.as_str()),
            ("n1", "kube-system")
        );
    }

    #[test]
    fn node_heartbeats_do_not_replan() {
        let node = |ready: &str, heartbeat: &str, addr: &str, label: Option<&str>| -> Node {
            let mut labels = serde_json::Map::new();
            if let Some(l) = label {
                labels.insert(l.into(), "".into());
            }
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n1", "labels": labels},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": addr}],
                    "conditions": [
                        {"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat},
                        {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat},
                    ],
                },
            }))
            .unwrap()
        };
        let mut c = NodeCache::default();
        assert!(c.update(&node("True", "2026-01-01T00:00:00Z", "10.0.0.1", None)));
        assert!(!c.update(&node("True", "2026-01-01T00:00:10Z", "10.0.0.1", None)));
        assert!(c.update(&node("False", "2026-01-01T00:00:20Z", "10.0.0.1", None)));
        assert!(c.update(&node("False", "2026-01-01T00:00:20Z", "10.0.0.9", None)));
        assert!(c.update(&node(
            "False",
            "2026-01-01T00:00:20Z",
            "10.0.0.9",
            Some(crate::translate::EXCLUDE_LABEL)
        )));
        let n = node("False", "2026-01-01T00:00:30Z", "10.0.0.9", None);
        assert!(c.remove(&n));
        assert!(!c.remove(&n));
    }

    fn rule(svc: &str, vip: &str, port: u16) -> ServiceRule {
        let mut rule =
            loxilb_model::Rule::new(vip.parse().unwrap(), port, loxilb_model::Protocol::Tcp);
        rule.name = format!("default/{svc}:{port}/tcp@{vip}");
        rule.timeout_s = 0;
        ServiceRule {
            service: ServiceKey::new("default", svc),
            rule,
        }
    }

    #[test]
    fn rule_outcomes_are_told_once_per_change() {
        let mut r = Reconciler::new(KubeConfig::default()).unwrap();
        let (a, b) = (
            ServiceKey::new("default", "a"),
            ServiceKey::new("default", "b"),
        );
        r.commit(
            &a,
            vec![rule("a", "20.0.0.1", 80), rule("a", "2001:db8::1", 80)],
        );
        r.commit(&b, vec![rule("b", "20.0.0.2", 53)]);
        let mut o = RuleOutcomes::new("n1");
        let refuse_b = Applied {
            refused: vec![Refused {
                service: b.clone(),
                rule: "default/b:53/tcp@20.0.0.2".into(),
                reason: "not served".into(),
            }],
        };
        o.record(&r.rule_update(true), Ok(&refuse_b));
        let evs = o.take();
        assert_eq!(evs.len(), 2);
        assert_eq!(
            (evs[0].1.type_, evs[0].1.reason, evs[0].1.note.as_str()),
            (
                EventType::Normal,
                reasons::RULE_PROGRAMMED,
                "node n1: 20.0.0.1:80/tcp -> 0 endpoints, [2001:db8::1]:80/tcp -> 0 endpoints programmed"
            )
        );
        assert_eq!(
            (evs[1].1.type_, evs[1].1.reason, evs[1].1.note.as_str()),
            (
                EventType::Warning,
                reasons::RULE_NOT_PROGRAMMED,
                "node n1: not programmed: default/b:53/tcp@20.0.0.2: not served"
            )
        );
        // The same whole set again (a resync): nothing.
        o.record(&r.rule_update(true), Ok(&refuse_b));
        assert!(!o.has_pending());
        // b accepted now: told; a unchanged: not.
        o.record(&r.rule_update(true), Ok(&Applied::all()));
        let evs = o.take();
        assert_eq!(evs.len(), 1);
        assert_eq!((&evs[0].0, evs[0].1.type_), (&b, EventType::Normal));
        // A whole set without b forgets it: its return is told again.
        r.commit(&b, vec![]);
        o.record(&r.rule_update(true), Ok(&Applied::all()));
        assert!(o.take().is_empty());
        r.commit(&b, vec![rule("b", "20.0.0.2", 53)]);
        o.record(&r.rule_update(true), Ok(&Applied::all()));
        assert_eq!(o.take().len(), 1);
    }

    /// The agent spawns the controller on its runtime: the future is Send.
    #[allow(dead_code)]
    fn run_is_send(client: Client, config: RunConfig, sink: impl RuleSink + 'static) {
        fn send<T: Send>(_: T) {}
        send(run(client, config, sink, async {}));
    }

    #[test]
    fn caches_hold_slim_objects() {
        let mut svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "default",
                "annotations": {LAST_APPLIED: "{\"huge\": true}", "loxilb.io/lbmode": "onearm"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
        }))
        .unwrap();
        slim(&mut svc);
        assert_eq!(svc.metadata.managed_fields, None);
        let a = svc.metadata.annotations.unwrap();
        assert_eq!(a.keys().collect::<Vec<_>>(), ["loxilb.io/lbmode"]);
    }

    fn svc_at(name: &str, rv: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "default", "name": name, "resourceVersion": rv},
        }))
        .unwrap()
    }

    #[test]
    fn freshest_prefers_own_writes_until_the_watch_brings_them() {
        let mut f = Freshest::default();
        let k = ServiceKey::new("default", "web");
        let cached = |rv: &str| Some(Arc::new(svc_at("web", rv)));
        let rv = |s: Option<Arc<Service>>| s.and_then(|s| s.metadata.resource_version.clone());
        // Planned on 5; the metadata write returned 6, the status write 7.
        f.wrote(&k, svc_at("web", "6"), Some(&svc_at("web", "5")));
        f.wrote(&k, svc_at("web", "7"), Some(&svc_at("web", "5")));
        assert_eq!(rv(f.view(&k, cached("5"))).as_deref(), Some("7"));
        // The watch brings 6 (older): still 7; then 7: the cache is current.
        f.observed(&svc_at("web", "6"), false);
        assert_eq!(rv(f.view(&k, cached("6"))).as_deref(), Some("7"));
        f.observed(&svc_at("web", "7"), false);
        assert!(f.is_empty());
        assert_eq!(rv(f.view(&k, cached("7"))).as_deref(), Some("7"));
        // A write that changed nothing (same version) is not held.
        f.wrote(&k, svc_at("web", "7"), Some(&svc_at("web", "7")));
        assert!(f.is_empty());
        // Not in the cache (never seen or deleted): nothing.
        f.wrote(&k, svc_at("web", "8"), Some(&svc_at("web", "7")));
        assert_eq!(f.view(&k, None), None);
        // A relist makes the cache current.
        f.relisted();
        assert!(f.is_empty());
        // Gone (404): planned as gone until the watch brings the deletion.
        f.wrote(&k, svc_at("web", "9"), Some(&svc_at("web", "8")));
        f.gone(&k);
        assert_eq!(f.view(&k, cached("8")), None);
        f.observed(&svc_at("web", "8"), false);
        assert_eq!(f.view(&k, cached("8")), None, "an older event");
        f.observed(&svc_at("web", "10"), true);
        assert!(f.is_empty());
        assert_eq!(rv(f.view(&k, cached("11"))).as_deref(), Some("11"));
    }

    #[test]
    fn step_errors_classified() {
        let api = |code: u16, reason: &str| {
            StepError::Api(kube::Error::Api(
                serde_json::from_value(serde_json::json!({
                    "status": "Failure", "message": "m", "reason": reason, "code": code,
                }))
                .unwrap(),
            ))
        };
        assert!(api(409, "Conflict").is_conflict() && !api(409, "Conflict").is_gone());
        assert!(api(404, "NotFound").is_gone() && !api(404, "NotFound").is_conflict());
        let other = api(403, "Forbidden");
        assert!(!other.is_gone() && !other.is_conflict());
        let dp = StepError::Datapath(anyhow::anyhow!("no"));
        assert!(!dp.is_gone() && !dp.is_conflict());
    }

    #[test]
    fn work_queue_backoff() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let mut q = WorkQueue::new(min, max);
        let k = ServiceKey::new("default", "web");
        let t = Instant::now();
        assert_eq!(q.failed(&k, t), Duration::from_secs(1));
        assert_eq!(q.failed(&k, t), Duration::from_secs(2));
        assert_eq!(q.failed(&k, t), Duration::from_secs(4));
        for _ in 0..10 {
            q.failed(&k, t);
        }
        assert_eq!(q.failed(&k, t), max);
        assert!(q.take(t).is_empty(), "not due yet");
        assert_eq!(q.take(t + max), vec![k.clone()]);
        q.succeeded(&k);
        assert_eq!(q.next_retry(), None);
        // Success starts the schedule over.
        assert_eq!(q.failed(&k, t), min);
        q.succeeded(&k);
        q.mark(k.clone());
        q.mark(k.clone());
        assert_eq!(q.take(t), vec![k]);
        assert!(q.is_empty());
    }
}

//! The controller's decisions, as plain functions over the core's types: no
//! I/O, no clock (the time is an argument). [`Reconciler::plan`] takes one
//! Service as the watchers see it (or its absence), its EndpointSlices and
//! the Nodes, and returns a [`Plan`]: the ordered writes ([`Step`]) and the
//! Events. [`crate::controller`] carries the plan out and calls
//! [`Reconciler::commit`] when a [`Step::SetRules`] is reached.
//!
//! # Who does what
//!
//! Every agent programs the rules of every managed Service into its own
//! datapath. The **leader** allocates addresses ([`crate::ipam::Ipam`]),
//! records them on the Service ([`RECORD_ANNOTATION`]) *before* any rule
//! uses them, adds the finalizer [`FINALIZER`], writes
//! `status.loadBalancer` and the conditions [`CONDITION_ALLOCATED`] and
//! [`CONDITION_CONFIGURED`], raises Events, and owns the VIPs
//! ([`Reconciler::owned_vips`]). A **follower** writes nothing: it takes the
//! addresses from the recorded allocation and computes the same rules. A new
//! leader rebuilds its table from the records ([`Reconciler::become_leader`]),
//! so nothing is handed out twice and nothing leaks.
//!
//! # Errors keep what works
//!
//! - Invalid `loxilb.io/*` annotation: a Warning Event per problem (naming
//!   the annotation, the value and the allowed values), condition
//!   `Configured=False`, and the Service keeps its last good annotation
//!   values (endpoints still follow the EndpointSlices); a Service that never
//!   had good values gets no rules.
//! - Allocation failure (pool exhausted, unknown pool, address in use):
//!   Warning Event, `Allocated=False` with the reason; the Service keeps the
//!   addresses it had, or stays pending and is retried when an address is
//!   released ([`Plan::requeue`], [`Reconciler::release`]).
//! - A Service field that cannot be used: Warning Event, `Configured=False`,
//!   last good rules kept.
//!
//! A Warning is raised once per problem: again only after the problem went
//! away and came back (or a new leader took over).
//!
//! # Deletion and hand-over
//!
//! A Service being deleted (our finalizer holds it) has its rules removed
//! from the datapath first, then its addresses released ([`Step::Release`]:
//! not before, so an address is never given to another Service while a rule
//! still uses it), then the finalizer removed. A Service that stops being ours (`type` no longer LoadBalancer)
//! loses its rules, its addresses, our status fields, the record and the
//! finalizer.
//!
//! # Why not kube-runtime's `finalizer()` helper
//!
//! `kube::runtime::finalizer` wraps a reconcile function: it adds the
//! finalizer with a JSON patch of its own and returns at once (the
//! object's next watch event runs `Apply`), and removes it after `Cleanup`
//! succeeds when the object is deleted. The flow here differs where it
//! matters:
//! - the finalizer and the allocation record go in **one** merged
//!   metadata patch ([`MetadataPatch`]), conditional on the
//!   `resourceVersion`, before any rule uses the address: with the
//!   helper, a new Service would cost two writes and a watch round trip
//!   more (one patch for the finalizer, another for the record), 1,000
//!   writes instead of 500 for 500 Services at a start;
//! - the finalizer also goes when a Service stops being ours (its `type`
//!   or `loadBalancerClass` changed), not only on deletion; the helper
//!   only removes it on deletion, so that case would stay hand-written
//!   anyway;
//! - the helper performs the writes itself, inside the reconcile; here
//!   the decision is a pure [`Plan`] of ordered [`Step`]s (release only
//!   after the rules are gone, finalizer removed last) that the unit tests
//!   check without an API server, and the controller carries it out;
//! - its patches carry no field manager (every write here names
//!   [`FIELD_MANAGER`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerStatus, Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use serde_json::{json, Value};

use crate::{
    annotations::ServiceAnnotations,
    events::{actions, reasons, EventSpec},
    flags::{KubeConfig, StatusForm},
    ipam::{Allocation, AllocationRecord, Ipam, IpamError, RECORD_ANNOTATION},
    multus::{NoPods, PodLookup},
    translate::{
        alloc_request, is_managed, load_balancer_status_as, parse_annotations, recorded_allocation,
        records_from_services, service_key, translate_with_pods, RecordSource, ServiceRule,
        TranslateError,
    },
    ServiceKey,
};

/// Held on every Service with an allocation, until its addresses are
/// released and its rules removed.
pub const FINALIZER: &str = "loxilb.io/loadbalancer";
/// The field manager of every write of the agent (the metadata merge
/// patch, the server-side apply of status, Events, the Lease): what
/// `metadata.managedFields` names as the owner of the fields it wrote.
/// (The status of BGPPeerService objects is applied per node,
/// [`crate::bgp_peers::BgpPeerConfig::field_manager`].)
pub const FIELD_MANAGER: &str = "loxilb-agent";

/// [`kube::api::PostParams`] of the agent's creates and updates
/// (field manager [`FIELD_MANAGER`]).
pub fn post_params() -> kube::api::PostParams {
    kube::api::PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}
/// Condition: the Service's addresses are allocated and recorded.
pub const CONDITION_ALLOCATED: &str = "loxilb.io/Allocated";
/// Condition: the annotations and spec are valid and rules were computed
/// from them.
pub const CONDITION_CONFIGURED: &str = "loxilb.io/Configured";
/// Our condition types.
pub const CONDITIONS: [&str; 2] = [CONDITION_ALLOCATED, CONDITION_CONFIGURED];

/// A conditional merge patch of a Service's metadata. The observed
/// `resourceVersion` is part of the patch, so the API server refuses it
/// (409 Conflict) when the Service changed since it was read; the watcher
/// then brings the new version and the Service is planned again.
///
/// The precondition stays: the finalizer list is replaced whole (a merge
/// patch replaces lists), so without it a finalizer another controller
/// added meanwhile would be lost; and the allocation record, from which a
/// new leader rebuilds its table, must not overwrite one written meanwhile
/// (by a leader that took over). The controller plans on the version its
/// own writes returned ([`crate::controller::Freshest`]), so the
/// precondition fails only when someone else wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataPatch {
    pub resource_version: String,
    /// The complete new finalizer list; `None`: unchanged.
    pub finalizers: Option<Vec<String>>,
    /// `Some(Some(v))`: set [`RECORD_ANNOTATION`] to `v`; `Some(None)`:
    /// remove it; `None`: unchanged.
    pub record: Option<Option<String>>,
}

impl MetadataPatch {
    /// The JSON merge patch (`application/merge-patch+json`).
    pub fn to_json(&self) -> Value {
        let mut meta = json!({ "resourceVersion": self.resource_version });
        if let Some(f) = &self.finalizers {
            meta["finalizers"] = json!(f);
        }
        if let Some(r) = &self.record {
            meta["annotations"] = json!({ RECORD_ANNOTATION: r });
        }
        json!({ "metadata": meta })
    }
}

/// A write of the Service's status, by server-side apply with
/// [`FIELD_MANAGER`]: the fields given are ours, fields we owned and no
/// longer give are removed, nobody else's fields are touched.
#[derive(Clone, Debug, PartialEq)]
pub enum StatusUpdate {
    Apply {
        /// `None`: no address (pending).
        load_balancer: Option<LoadBalancerStatus>,
        /// Our conditions ([`CONDITIONS`]).
        conditions: Vec<Condition>,
    },
    /// Own nothing in the status any more (the Service is no longer ours).
    Clear,
}

impl StatusUpdate {
    /// The apply configuration (`application/apply-patch+yaml`; JSON is
    /// YAML) for the `status` subresource of `key`.
    pub fn to_apply_body(&self, key: &ServiceKey) -> Value {
        let mut status = json!({});
        if let StatusUpdate::Apply {
            load_balancer,
            conditions,
        } = self
        {
            if let Some(lb) = load_balancer {
                status["loadBalancer"] = serde_json::to_value(lb).expect("serializable");
            }
            status["conditions"] = serde_json::to_value(conditions).expect("serializable");
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": key.name, "namespace": key.namespace },
            "status": status,
        })
    }
}

/// One write, in plan order.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Patch the Service's metadata (finalizer, allocation record).
    PatchMetadata(MetadataPatch),
    /// This Service's rules are now these (empty: it has none); hand the
    /// node's whole rule set to the datapath. Committed with
    /// [`Reconciler::commit`].
    SetRules(Vec<ServiceRule>),
    /// Write the status.
    PatchStatus(StatusUpdate),
    /// Release the Service's addresses (after its rules left the datapath):
    /// [`Reconciler::release`].
    Release,
}

/// What to do for one Service. The steps run in order and a failed one
/// stops the rest (the Service is then planned again); the Warning events
/// are published in any case, the Normal ones only when every step
/// succeeded. A plan has at most one [`Step::PatchMetadata`]
/// and it comes before any other write to the Service: it is conditional on
/// the `resourceVersion` read, which every write changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub events: Vec<EventSpec>,
    /// Services to plan again: pending ones, after an address was freed.
    pub requeue: Vec<ServiceKey>,
    /// For the log (followers log what a leader would raise as Events).
    pub notes: Vec<String>,
}

impl Plan {
    /// Whether a step after [`Step::SetRules`] must wait until the datapath
    /// has the new rules (an address released, a finalizer removed).
    pub fn waits_for_datapath(&self) -> bool {
        self.steps
            .iter()
            .skip_while(|s| !matches!(s, Step::SetRules(_)))
            .any(|s| matches!(s, Step::Release | Step::PatchMetadata(_)))
    }
}

#[derive(Clone, Debug, Default)]
struct Tracked {
    /// The last annotation values that parsed without error.
    last_good: Option<ServiceAnnotations>,
    /// Warnings raised last time (raised again only after they cleared).
    reported: BTreeSet<EventSpec>,
    /// Events to raise at the next plan (from a leader's rebuild).
    stashed: Vec<EventSpec>,
    /// The last allocation attempt failed.
    pending: bool,
}

/// What [`Reconciler::become_leader`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Takeover {
    /// Allocations adopted from the records.
    pub adopted: usize,
    /// For the log: records unreadable, taken from status, not adopted.
    pub notes: Vec<String>,
}

/// The controller's state: the allocation table, the committed rules per
/// Service, and what was reported.
#[derive(Clone, Debug)]
pub struct Reconciler {
    config: KubeConfig,
    ipam: Ipam,
    leader: bool,
    tracked: BTreeMap<ServiceKey, Tracked>,
    rules: BTreeMap<ServiceKey, Vec<ServiceRule>>,
    /// Services whose committed rules changed since the datapath last took
    /// them ([`Reconciler::rules_synced`]).
    changed: BTreeSet<ServiceKey>,
    /// Every VIP (and secondary address) of the committed rules, with how
    /// many rules use it: [`Reconciler::owned_vips`] without a pass over
    /// every rule.
    vip_refs: BTreeMap<IpAddr, u32>,
    /// `--vipOwners=pool`: the pools whose Lease this agent holds (it owns
    /// their VIPs); `None`: the leader owns every VIP.
    owner_groups: Option<BTreeSet<String>>,
    status_form: StatusForm,
    stats: ReconcileStats,
}

/// The controller's work since start, for the metrics: counts only grow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReconcileStats {
    /// Services planned and carried out (one reconcile each).
    pub reconciles: u64,
    /// Of those, ended by an API write refused because the Service changed
    /// meanwhile (planned again on its new version).
    pub conflicts: u64,
    /// Of those, ended by any other error (retried with back-off).
    pub errors: u64,
    /// Wall time spent planning and carrying them out, in seconds.
    pub seconds: f64,
    /// Datapath updates (rules handed to the node) that failed.
    pub sink_errors: u64,
}

/// What the datapath is handed when the committed rules change: which
/// Services' rules changed, and the whole rule set, both by reference (no
/// copy of the 10,000 other Services' rules).
#[derive(Clone, Copy, Debug)]
pub struct RuleUpdate<'a> {
    rules: &'a BTreeMap<ServiceKey, Vec<ServiceRule>>,
    changed: &'a BTreeSet<ServiceKey>,
    full: bool,
}

impl<'a> RuleUpdate<'a> {
    /// The receiver must make its rules exactly [`RuleUpdate::all`] (the
    /// first update after start: it may hold rules from before, e.g. maps
    /// adopted from a previous agent), not only apply
    /// [`RuleUpdate::changed`].
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Each Service whose rules changed, with its complete new rule list
    /// (empty: it has no rules any more), by Service.
    pub fn changed(&self) -> impl Iterator<Item = (&'a ServiceKey, &'a [ServiceRule])> + 'a {
        let rules = self.rules;
        self.changed
            .iter()
            .map(move |k| (k, rules.get(k).map(Vec::as_slice).unwrap_or(&[])))
    }

    /// Every Service with committed rules, with its rules.
    pub fn services(&self) -> impl Iterator<Item = (&'a ServiceKey, &'a [ServiceRule])> + 'a {
        self.rules.iter().map(|(k, v)| (k, v.as_slice()))
    }

    /// Every committed rule, by Service.
    pub fn all(&self) -> impl Iterator<Item = &'a ServiceRule> + 'a {
        self.rules.values().flatten()
    }

    /// The number of rules in [`RuleUpdate::all`].
    pub fn len(&self) -> usize {
        self.rules.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.values().all(Vec::is_empty)
    }
}

/// Count (or uncount) the addresses of `rules` in `refs`.
fn count_vips(refs: &mut BTreeMap<IpAddr, u32>, rules: &[ServiceRule], up: bool) {
    for r in rules {
        for a in std::iter::once(r.rule.vip).chain(r.rule.secondary_vips.iter().copied()) {
            if up {
                *refs.entry(a).or_insert(0) += 1;
            } else if let Some(c) = refs.get_mut(&a) {
                *c -= 1;
                if *c == 0 {
                    refs.remove(&a);
                }
            }
        }
    }
}

impl Reconciler {
    /// A follower with an empty table over the configured pools.
    pub fn new(config: KubeConfig) -> Result<Self, IpamError> {
        let ipam = config.ipam()?;
        let owner_groups = (config.vip_owners == crate::flags::VipOwners::Pool).then(BTreeSet::new);
        Ok(Reconciler {
            config,
            ipam,
            leader: false,
            tracked: BTreeMap::new(),
            rules: BTreeMap::new(),
            changed: BTreeSet::new(),
            vip_refs: BTreeMap::new(),
            owner_groups,
            status_form: StatusForm::Ip,
            stats: ReconcileStats::default(),
        })
    }

    pub fn config(&self) -> &KubeConfig {
        &self.config
    }

    /// How the status names the VIPs (default: plain IPs); the next plan
    /// of each Service rewrites a status in the other form.
    pub fn set_status_form(&mut self, form: StatusForm) {
        self.status_form = form;
    }

    pub fn status_form(&self) -> &StatusForm {
        &self.status_form
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// What the controller did since start ([`ReconcileStats`]).
    pub fn stats(&self) -> &ReconcileStats {
        &self.stats
    }

    pub fn stats_mut(&mut self) -> &mut ReconcileStats {
        &mut self.stats
    }

    /// The allocation table (meaningful while leader).
    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Leadership gained: rebuild the allocation table from the records on
    /// `services` (every Service the watcher has), oldest first. Every
    /// Service must be planned afterwards.
    pub fn become_leader<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
    ) -> Takeover {
        self.leader = true;
        let (records, mut notes) = records_from_services(services, &self.config);
        let adopted = records.len();
        let problems = self.ipam.rebuild(records);
        for p in &problems {
            notes.push(p.to_string());
            self.tracked
                .entry(p.service.clone())
                .or_default()
                .stashed
                .push(EventSpec::warning(
                    reasons::RECORD_NOT_ADOPTED,
                    actions::ALLOCATE,
                    p.to_string(),
                ));
        }
        for t in self.tracked.values_mut() {
            t.reported.clear();
        }
        Takeover {
            adopted: adopted - problems.len(),
            notes,
        }
    }

    /// Leadership lost: stop allocating; the table is rebuilt when it comes
    /// back.
    pub fn step_down(&mut self) {
        self.leader = false;
        self.ipam = self.config.ipam().expect("pools were valid at start");
        for t in self.tracked.values_mut() {
            t.stashed.clear();
            t.pending = false;
        }
    }

    /// Every committed rule, by Service (a copy; [`Reconciler::rule_update`]
    /// lends them).
    pub fn rules(&self) -> Vec<ServiceRule> {
        self.rules.values().flatten().cloned().collect()
    }

    /// The committed rules for the datapath: the Services changed since
    /// [`Reconciler::rules_synced`] and the whole set. `full`: see
    /// [`RuleUpdate::is_full`].
    pub fn rule_update(&self, full: bool) -> RuleUpdate<'_> {
        RuleUpdate {
            rules: &self.rules,
            changed: &self.changed,
            full,
        }
    }

    /// Whether rules changed since [`Reconciler::rules_synced`].
    pub fn rules_changed(&self) -> bool {
        !self.changed.is_empty()
    }

    /// The datapath took the last [`Reconciler::rule_update`].
    pub fn rules_synced(&mut self) {
        self.changed.clear();
    }

    /// The committed rules of one Service.
    pub fn service_rules(&self, key: &ServiceKey) -> &[ServiceRule] {
        self.rules.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The addresses this node must own: every VIP (and SCTP secondary
    /// address) of the committed rules while leader, none otherwise. With
    /// owner groups (`--vipOwners=pool`): the VIPs of the pools whose
    /// Lease this agent holds, with their rules' secondary addresses (a
    /// rule's addresses stay together), and while leader those outside
    /// every pool.
    pub fn owned_vips(&self) -> Vec<IpAddr> {
        let Some(held) = &self.owner_groups else {
            if !self.leader {
                return Vec::new();
            }
            return self.vip_refs.keys().copied().collect();
        };
        let mut out = BTreeSet::new();
        for r in self.rules.values().flatten() {
            // A rule's group: the (primary) pool of its VIP.
            let owned = match self.ipam.pool_of(r.rule.vip, false) {
                Some(g) => held.contains(g),
                None => self.leader,
            };
            if owned {
                out.insert(r.rule.vip);
                out.extend(r.rule.secondary_vips.iter().copied());
            }
        }
        out.into_iter().collect()
    }

    /// The owner groups (`--vipOwners=pool`): every pool's name, once;
    /// empty without owner groups.
    pub fn owner_groups(&self) -> Vec<String> {
        if self.owner_groups.is_none() {
            return Vec::new();
        }
        self.config.pool_names()
    }

    /// This agent now holds the Leases of these owner groups (ignored
    /// without owner groups).
    pub fn set_owner_groups(&mut self, held: BTreeSet<String>) {
        if let Some(g) = &mut self.owner_groups {
            *g = held;
        }
    }

    /// Every Service with state here (rules, last good values, pending).
    pub fn known_services(&self) -> Vec<ServiceKey> {
        let mut keys: BTreeSet<ServiceKey> = self.tracked.keys().cloned().collect();
        keys.extend(self.rules.keys().cloned());
        keys.extend(self.ipam.allocations().map(|a| a.service.clone()));
        keys.into_iter().collect()
    }

    /// Release `key`'s addresses; returns the pending Services to plan
    /// again (one of them may fit now).
    pub fn release(&mut self, key: &ServiceKey) -> Vec<ServiceKey> {
        match self.ipam.release(key) {
            Some(_) => self.pending_keys(key),
            None => Vec::new(),
        }
    }

    /// Make `rules` the committed rules of `key`; `true` when they changed.
    pub fn commit(&mut self, key: &ServiceKey, mut rules: Vec<ServiceRule>) -> bool {
        if self
            .rules
            .get(key)
            .map_or(rules.is_empty(), |r| *r == rules)
        {
            return false;
        }
        // Kept for as long as the Service lives: without the spare capacity
        // the translation left (10,000 Services hold these).
        rules.shrink_to_fit();
        for r in &mut rules {
            r.rule.endpoints.shrink_to_fit();
            r.rule.name.shrink_to_fit();
        }
        count_vips(&mut self.vip_refs, &rules, true);
        let old = if rules.is_empty() {
            self.rules.remove(key)
        } else {
            self.rules.insert(key.clone(), rules)
        };
        count_vips(&mut self.vip_refs, old.as_deref().unwrap_or(&[]), false);
        self.changed.insert(key.clone());
        true
    }

    /// Decide what to do for the Service `key`: `svc` as the watcher has it
    /// (`None`: gone), the cluster's EndpointSlices (or just this Service's)
    /// and Nodes.
    pub fn plan(
        &mut self,
        key: &ServiceKey,
        svc: Option<&Service>,
        slices: &[EndpointSlice],
        nodes: &[Node],
        now: Timestamp,
    ) -> Plan {
        self.plan_with_pods(key, svc, slices, nodes, &NoPods, now)
    }

    /// [`Reconciler::plan`], with the pods' network-status annotations
    /// (`pods`) for a Service with `loxilb.io/multus-nets`
    /// ([`crate::multus`]): its endpoints are the pods' addresses on those
    /// networks; a pod without them is a Warning Event
    /// ([`reasons::MULTUS_ENDPOINT_SKIPPED`]), once per problem.
    pub fn plan_with_pods(
        &mut self,
        key: &ServiceKey,
        svc: Option<&Service>,
        slices: &[EndpointSlice],
        nodes: &[Node],
        pods: &dyn PodLookup,
        now: Timestamp,
    ) -> Plan {
        let Some(svc) = svc else {
            return self.gone(key);
        };
        if service_key(svc).as_ref() != Ok(key) {
            return Plan {
                notes: vec![format!("{key}: the Service given is another one; ignored")],
                ..Plan::default()
            };
        }
        let deleting = svc.metadata.deletion_timestamp.is_some();
        if deleting || !is_managed(svc, &self.config.load_balancer_class) {
            return self.tear_down(key, svc, deleting);
        }
        if self.leader {
            self.plan_leader(key, svc, slices, nodes, pods, now)
        } else {
            self.plan_follower(key, svc, slices, nodes, pods)
        }
    }

    /// The Service is gone from the API (deleted without our finalizer, or
    /// after it was removed).
    fn gone(&mut self, key: &ServiceKey) -> Plan {
        let mut plan = Plan::default();
        if self.rules.contains_key(key) {
            plan.steps.push(Step::SetRules(Vec::new()));
        }
        if self.leader && self.ipam.allocation(key).is_some() {
            plan.steps.push(Step::Release);
        }
        self.tracked.remove(key);
        plan
    }

    fn tear_down(&mut self, key: &ServiceKey, svc: &Service, deleting: bool) -> Plan {
        let mut plan = Plan::default();
        if self.rules.contains_key(key) {
            plan.steps.push(Step::SetRules(Vec::new()));
        }
        self.tracked.remove(key);
        if !self.leader {
            return plan;
        }
        if self.ipam.allocation(key).is_some() {
            plan.steps.push(Step::Release);
        }
        let finalizers = finalizers(svc);
        let has_finalizer = finalizers.iter().any(|f| f == FINALIZER);
        let has_record = record_text(svc).is_some();
        // The conditional metadata patch goes before any other write to the
        // Service (which would change its resourceVersion).
        let patch = MetadataPatch {
            resource_version: resource_version(svc),
            finalizers: has_finalizer
                .then(|| finalizers.into_iter().filter(|f| f != FINALIZER).collect()),
            record: (has_record && !deleting).then_some(None),
        };
        if patch.finalizers.is_some() || patch.record.is_some() {
            plan.steps.push(Step::PatchMetadata(patch));
        }
        if !deleting && owns_status(svc) {
            plan.steps.push(Step::PatchStatus(StatusUpdate::Clear));
        }
        plan
    }

    fn pending_keys(&self, except: &ServiceKey) -> Vec<ServiceKey> {
        self.tracked
            .iter()
            .filter(|(k, t)| t.pending && *k != except)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The annotation values to use and the problems to report: the parsed
    /// values when they have no error, else the last good ones (if any).
    fn annotations(
        &mut self,
        key: &ServiceKey,
        svc: &Service,
        warnings: &mut Vec<EventSpec>,
    ) -> (Option<ServiceAnnotations>, bool) {
        let parsed = parse_annotations(svc);
        for w in &parsed.warnings {
            warnings.push(EventSpec::warning(
                reasons::ANNOTATION_WARNING,
                actions::CONFIGURE,
                w.to_string(),
            ));
        }
        let tracked = self.tracked.entry(key.clone()).or_default();
        if parsed.errors.is_empty() {
            tracked.last_good = Some(parsed.values.clone());
            return (Some(parsed.values), true);
        }
        let keeping = if tracked.last_good.is_some() {
            "the Service keeps its last good loxilb.io annotation values until this is fixed"
        } else {
            "the Service gets no rules until this is fixed"
        };
        for e in &parsed.errors {
            warnings.push(EventSpec::warning(
                reasons::INVALID_ANNOTATION,
                actions::CONFIGURE,
                format!("{e}; {keeping}"),
            ));
        }
        (tracked.last_good.clone(), false)
    }

    fn plan_follower(
        &mut self,
        key: &ServiceKey,
        svc: &Service,
        slices: &[EndpointSlice],
        nodes: &[Node],
        pods: &dyn PodLookup,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut problems = Vec::new();
        let (ann, _) = self.annotations(key, svc, &mut problems);
        // Logged once per problem, as a leader raises its Events.
        let tracked = self.tracked.entry(key.clone()).or_default();
        let now_set: BTreeSet<EventSpec> = problems.into_iter().collect();
        for p in now_set.difference(&tracked.reported) {
            plan.notes.push(format!("{key}: {p}"));
        }
        tracked.reported = now_set;
        let Some(ann) = ann else {
            return plan;
        };
        let rules = match recorded_allocation(svc) {
            Ok(Some((rec, RecordSource::Annotation))) => {
                let alloc = allocation_from_record(key, &rec);
                match translate_with_pods(svc, &ann, slices, nodes, pods, &alloc, &self.config) {
                    Ok(t) => t.rules,
                    Err(e) => {
                        plan.notes.push(format!("{key}: {e}; rules kept"));
                        return plan;
                    }
                }
            }
            // No allocation recorded yet (the leader has not got to it).
            Ok(_) => Vec::new(),
            Err(e) => {
                plan.notes.push(format!("{key}: {e}; rules kept"));
                return plan;
            }
        };
        if self.service_rules(key) != rules.as_slice() {
            plan.steps.push(Step::SetRules(rules));
        }
        plan
    }

    fn plan_leader(
        &mut self,
        key: &ServiceKey,
        svc: &Service,
        slices: &[EndpointSlice],
        nodes: &[Node],
        pods: &dyn PodLookup,
        now: Timestamp,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut warnings: Vec<EventSpec> = self
            .tracked
            .get_mut(key)
            .map(|t| std::mem::take(&mut t.stashed))
            .unwrap_or_default();
        let (ann, ann_ok) = self.annotations(key, svc, &mut warnings);
        let mut allocated = None::<(bool, &'static str, String)>;
        let mut configured = if ann_ok {
            None
        } else {
            Some((
                false,
                reasons::INVALID_ANNOTATION,
                warnings
                    .iter()
                    .filter(|w| w.reason == reasons::INVALID_ANNOTATION)
                    .map(|w| w.note.clone())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ))
        };
        let before = self.ipam.allocation(key).cloned();
        let mut rules = None;

        if let Some(ann) = ann {
            match alloc_request(svc, &ann, &self.config) {
                Err(e) => {
                    let note = invalid_note(&e, self.service_rules(key).is_empty());
                    warnings.push(EventSpec::warning(
                        reasons::INVALID_SERVICE,
                        actions::CONFIGURE,
                        note.clone(),
                    ));
                    configured = Some((false, reasons::INVALID_SERVICE, note));
                }
                Ok((req, req_warnings)) => {
                    for w in req_warnings {
                        warnings.push(EventSpec::warning(
                            reasons::CONFIGURATION_WARNING,
                            actions::CONFIGURE,
                            w,
                        ));
                    }
                    match self.ipam.ensure(&req) {
                        Err(e) => {
                            let reason = ipam_reason(&e);
                            let note = match &before {
                                Some(a) => {
                                    format!("{e}; the Service keeps {}", record_ips(&a.record()))
                                }
                                None => format!("{e}; the Service stays pending"),
                            };
                            warnings.push(EventSpec::warning(reason, actions::ALLOCATE, &note));
                            allocated = Some((false, reason, note));
                            self.tracked.entry(key.clone()).or_default().pending = true;
                        }
                        Ok(alloc) => {
                            self.tracked.entry(key.clone()).or_default().pending = false;
                            match translate_with_pods(
                                svc,
                                &ann,
                                slices,
                                nodes,
                                pods,
                                &alloc,
                                &self.config,
                            ) {
                                Ok(t) => {
                                    for w in t.warnings {
                                        warnings.push(EventSpec::warning(
                                            reasons::CONFIGURATION_WARNING,
                                            actions::CONFIGURE,
                                            w,
                                        ));
                                    }
                                    for w in t.endpoint_warnings {
                                        warnings.push(EventSpec::warning(
                                            reasons::MULTUS_ENDPOINT_SKIPPED,
                                            actions::CONFIGURE,
                                            w,
                                        ));
                                    }
                                    if configured.is_none() {
                                        configured = Some((
                                            true,
                                            "RulesComputed",
                                            format!("{} rule(s)", t.rules.len()),
                                        ));
                                    }
                                    rules = Some(t.rules);
                                }
                                Err(e) => {
                                    let note = invalid_note(&e, self.service_rules(key).is_empty());
                                    warnings.push(EventSpec::warning(
                                        reasons::INVALID_SERVICE,
                                        actions::CONFIGURE,
                                        note.clone(),
                                    ));
                                    configured = Some((false, reasons::INVALID_SERVICE, note));
                                }
                            }
                        }
                    }
                }
            }
        }

        let current = self.ipam.allocation(key).cloned();
        if current != before {
            plan.requeue = self.pending_keys(key);
        }

        // 1. Record the allocation (and hold the finalizer) before any rule
        //    or status uses it.
        let observed_finalizers = finalizers(svc);
        let has_finalizer = observed_finalizers.iter().any(|f| f == FINALIZER);
        let want_record = current.as_ref().map(|a| a.record().to_string());
        let observed_record = record_text(svc);
        let mut patch = MetadataPatch {
            resource_version: resource_version(svc),
            finalizers: None,
            record: None,
        };
        // A record without an allocation (left by a tear-down whose patch
        // lost a race, or not adopted at a takeover) is removed: followers
        // program it and the next leader would adopt it.
        if want_record.as_deref() != observed_record {
            patch.record = Some(want_record.clone());
        }
        if current.is_some() && !has_finalizer {
            let mut f = observed_finalizers;
            f.push(FINALIZER.to_string());
            patch.finalizers = Some(f);
        }
        if patch.record.is_some() || patch.finalizers.is_some() {
            plan.steps.push(Step::PatchMetadata(patch));
        }
        if let (Some(a), Some(_)) = (&current, want_record.as_deref()) {
            if want_record.as_deref() != observed_record {
                let pools: BTreeSet<&str> = a
                    .vips
                    .iter()
                    .chain(&a.secondary)
                    .map(|x| x.pool.as_deref().unwrap_or("static"))
                    .collect();
                let ports: Vec<String> = a.ports.iter().map(|p| p.to_string()).collect();
                plan.events.push(EventSpec::normal(
                    reasons::ALLOCATED,
                    actions::ALLOCATE,
                    format!(
                        "{} (pool {}) for {}",
                        record_ips(&a.record()),
                        pools.into_iter().collect::<Vec<_>>().join(", "),
                        if ports.is_empty() {
                            "no port".to_string()
                        } else {
                            ports.join(", ")
                        }
                    ),
                ));
            }
        }

        // 2. The rules. Without new ones the committed ones stay, but only
        //    for what the allocation holds: an allocation changed by an
        //    earlier plan whose writes failed, then kept by a failed
        //    `ensure`, no longer holds the ports of the rules committed
        //    before it (and another Service may be given them).
        let rules = rules.or_else(|| {
            let committed = self.service_rules(key);
            let held: Vec<ServiceRule> = committed
                .iter()
                .filter(|r| current.as_ref().is_some_and(|a| holds(a, r)))
                .cloned()
                .collect();
            (held.len() != committed.len()).then_some(held)
        });
        if let Some(rules) = rules {
            if self.service_rules(key) != rules.as_slice() {
                plan.steps.push(Step::SetRules(rules));
            }
        }

        // 3. The status.
        let allocated = allocated.unwrap_or_else(|| match &current {
            Some(a) => (true, reasons::ALLOCATED, record_ips(&a.record())),
            None => (
                false,
                "Pending",
                "no address allocated yet (see the Service's Events)".to_string(),
            ),
        });
        let configured = configured.unwrap_or((
            false,
            "Pending",
            "rules are computed once an address is allocated".to_string(),
        ));
        let generation = svc.metadata.generation;
        let conditions = vec![
            condition(svc, CONDITION_ALLOCATED, allocated, generation, now),
            condition(svc, CONDITION_CONFIGURED, configured, generation, now),
        ];
        let load_balancer = current
            .as_ref()
            .map(|a| load_balancer_status_as(a, &self.status_form));
        if !status_matches(svc, load_balancer.as_ref(), &conditions) {
            plan.steps.push(Step::PatchStatus(StatusUpdate::Apply {
                load_balancer,
                conditions,
            }));
        }

        // 4. Warnings: once per problem.
        let tracked = self.tracked.entry(key.clone()).or_default();
        let now_set: BTreeSet<EventSpec> = warnings.into_iter().collect();
        for w in &now_set {
            if !tracked.reported.contains(w) {
                plan.events.push(w.clone());
            }
        }
        tracked.reported = now_set;
        plan
    }
}

/// Whether `a` holds the address and the (port, protocol) of rule `r`.
fn holds(a: &Allocation, r: &ServiceRule) -> bool {
    a.vips.iter().any(|v| v.ip == r.rule.vip)
        && a.ports
            .contains(&crate::ipam::PortKey::new(r.rule.port, r.rule.protocol))
}

/// Addresses of a record, for messages: `192.0.2.1` or `192.0.2.1, 2001:db8::1
/// (secondary 198.51.100.1)`.
fn record_ips(rec: &AllocationRecord) -> String {
    let join = |v: &[IpAddr]| {
        v.iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if rec.secondary.is_empty() {
        join(&rec.vips)
    } else {
        format!("{} (secondary {})", join(&rec.vips), join(&rec.secondary))
    }
}

fn invalid_note(e: &TranslateError, no_rules: bool) -> String {
    if no_rules {
        format!("{e}; the Service gets no rules until this is fixed")
    } else {
        format!("{e}; the Service keeps its last good rules until this is fixed")
    }
}

/// The Event reason of an allocation failure.
pub fn ipam_reason(e: &IpamError) -> &'static str {
    match e {
        IpamError::Exhausted { .. } => reasons::POOL_EXHAUSTED,
        IpamError::UnknownPool { .. } => reasons::UNKNOWN_POOL,
        IpamError::InUse { .. } => reasons::ADDRESS_IN_USE,
        _ => reasons::ALLOCATION_FAILED,
    }
}

/// An allocation as a record describes it (what a follower uses: only the
/// addresses matter for the rules).
pub fn allocation_from_record(key: &ServiceKey, rec: &AllocationRecord) -> Allocation {
    use crate::ipam::AllocatedIp;
    let ip = |ip: &IpAddr| AllocatedIp {
        ip: *ip,
        pool: None,
    };
    Allocation {
        service: key.clone(),
        vips: rec.vips.iter().map(ip).collect(),
        secondary: rec.secondary.iter().map(ip).collect(),
        ports: rec.ports.clone(),
    }
}

fn finalizers(svc: &Service) -> Vec<String> {
    svc.metadata.finalizers.clone().unwrap_or_default()
}

fn resource_version(svc: &Service) -> String {
    svc.metadata.resource_version.clone().unwrap_or_default()
}

fn record_text(svc: &Service) -> Option<&str> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(RECORD_ANNOTATION)
        .map(String::as_str)
}

fn observed_conditions(svc: &Service) -> &[Condition] {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or(&[])
}

/// Whether the status has something we would have written.
fn owns_status(svc: &Service) -> bool {
    observed_conditions(svc)
        .iter()
        .any(|c| CONDITIONS.contains(&c.type_.as_str()))
}

/// A condition; its `lastTransitionTime` is kept when its status did not
/// change.
fn condition(
    svc: &Service,
    type_: &str,
    (ok, reason, message): (bool, &'static str, String),
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = observed_conditions(svc)
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: truncate(&message, 32 * 1024),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The addresses of a `status.loadBalancer`, as (ip, hostname) pairs.
fn ingress_addresses(lb: Option<&LoadBalancerStatus>) -> Vec<(Option<String>, Option<String>)> {
    lb.and_then(|l| l.ingress.as_ref())
        .map(|i| {
            i.iter()
                .map(|e| (e.ip.clone(), e.hostname.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn status_matches(
    svc: &Service,
    load_balancer: Option<&LoadBalancerStatus>,
    conditions: &[Condition],
) -> bool {
    let observed_lb = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
    if ingress_addresses(observed_lb) != ingress_addresses(load_balancer) {
        return false;
    }
    let observed = observed_conditions(svc);
    conditions.iter().all(|want| {
        observed.iter().any(|c| {
            c.type_ == want.type_
                && c.status == want.status
                && c.reason == want.reason
                && c.message == want.message
                && c.observed_generation == want.observed_generation
        })
    })
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests;

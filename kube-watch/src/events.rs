//! Kubernetes Events on Services: what to say ([`EventSpec`], decided by
//! [`crate::reconcile`]), the `events.k8s.io/v1` object that says it
//! ([`event_object`], pure), and [`EventPublisher`], which creates it.
//!
//! Only the leader publishes the Events of planning, and
//! [`crate::reconcile::Reconciler`] emits a Warning once per problem (again
//! only after the problem went away and came back), so a Service whose
//! EndpointSlices churn does not flood its Events. Every agent publishes
//! whether its own datapath took a Service's rules ([`reasons::RULE_PROGRAMMED`],
//! [`reasons::RULE_NOT_PROGRAMMED`], note prefixed with the node's name), once
//! per change of that outcome ([`crate::controller::RuleOutcomes`]).
//!
//! # Why not kube-runtime's `Recorder`
//!
//! `kube::runtime::events::Recorder` (kube 5.0) creates the same
//! `events.k8s.io/v1` objects, and aggregates repeats into a series (a
//! merge patch of the first Event's `series`). Its key for "a repeat" is
//! type, reason, action, reporter and object, **not the note**, and the
//! patch sends the first Event again with a new count. Here one reason
//! carries different notes: two bad annotations are two
//! `InvalidAnnotation` Events, and `RuleProgrammed` is told again when a
//! Service's endpoints go from none to some. Through the `Recorder` the
//! second would show as "x2" of the first note, hiding which annotation
//! is wrong and bringing back the `0 endpoints` Event found on a real API
//! server (issue 18). Its writes also name no field manager (every write
//! here names [`crate::reconcile::FIELD_MANAGER`], which the in-memory
//! API server of the tests checks). The deduplication it would bring is
//! done earlier and by content: [`crate::reconcile::Reconciler`] raises a
//! Warning once per problem and [`crate::controller::RuleOutcomes`] an
//! outcome once per change, so repeats are not sent at all.

use std::{
    fmt,
    sync::atomic::{AtomicU32, Ordering},
};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client};

/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "loxilb.io/loxilb-agent";
/// Longest `note` the API accepts (bytes).
pub const MAX_NOTE: usize = 1024;

/// Reasons (the `reason` field, UpperCamelCase as the API asks).
pub mod reasons {
    /// A `loxilb.io/*` annotation has a value that cannot be used.
    pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";
    /// An unknown `loxilb.io/*` annotation, or one without effect.
    pub const ANNOTATION_WARNING: &str = "AnnotationWarning";
    /// A Service field cannot be used (or contradicts an annotation).
    pub const INVALID_SERVICE: &str = "InvalidService";
    /// The rules are right but the user should know (a node without an
    /// address of the family, probe settings without effect, ...).
    pub const CONFIGURATION_WARNING: &str = "ConfigurationWarning";
    /// A pod of a Service with `loxilb.io/multus-nets` is not an
    /// endpoint: its `k8s.v1.cni.cncf.io/network-status` is missing,
    /// malformed, or has no address on the networks named.
    pub const MULTUS_ENDPOINT_SKIPPED: &str = "MultusEndpointSkipped";
    /// The agent cannot watch the pods a Service with
    /// `loxilb.io/multus-nets` needs (RBAC, API errors).
    pub const POD_WATCH_FAILED: &str = "PodWatchFailed";
    /// The pool has no address left for the Service's ports.
    pub const POOL_EXHAUSTED: &str = "PoolExhausted";
    /// The Service names a pool that is not configured.
    pub const UNKNOWN_POOL: &str = "UnknownPool";
    /// The requested address is used by another Service.
    pub const ADDRESS_IN_USE: &str = "AddressInUse";
    /// Any other allocation failure.
    pub const ALLOCATION_FAILED: &str = "AllocationFailed";
    /// A recorded allocation a new leader could not take over.
    pub const RECORD_NOT_ADOPTED: &str = "RecordNotAdopted";
    /// An address was allocated (Normal).
    pub const ALLOCATED: &str = "Allocated";
    /// This node's datapath installed the Service's rules (Normal).
    pub const RULE_PROGRAMMED: &str = "RuleProgrammed";
    /// This node's datapath could not install (some of) the Service's
    /// rules: refused by the agent, or the map write failed.
    pub const RULE_NOT_PROGRAMMED: &str = "RuleNotProgrammed";
    /// This node now answers for the Service's VIPs (holds them, announced
    /// them): it became their active node (Normal).
    pub const VIP_ACTIVE: &str = "VIPActive";
    /// This node gave the Service's VIPs up (another node answers for
    /// them now; this one is a backup) (Normal).
    pub const VIP_BACKUP: &str = "VIPBackup";
}

/// Actions (the `action` field).
pub mod actions {
    /// Reading the Service's configuration.
    pub const CONFIGURE: &str = "Configure";
    /// Allocating its addresses.
    pub const ALLOCATE: &str = "Allocate";
    /// Installing its rules into a node's datapath.
    pub const PROGRAM: &str = "Program";
    /// Taking or giving up its VIPs on a node.
    pub const OWN: &str = "Own";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One Event to raise on a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventSpec {
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

impl EventSpec {
    pub fn warning(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        EventSpec {
            type_: EventType::Warning,
            reason,
            action,
            note: note.into(),
        }
    }

    pub fn normal(reason: &'static str, action: &'static str, note: impl Into<String>) -> Self {
        EventSpec {
            type_: EventType::Normal,
            reason,
            action,
            note: note.into(),
        }
    }
}

impl fmt::Display for EventSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({}): {}",
            self.type_.as_str(),
            self.reason,
            self.action,
            self.note
        )
    }
}

/// The reference to a Service that Events point at.
pub fn service_reference(svc: &Service) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        name: svc.metadata.name.clone(),
        namespace: svc.metadata.namespace.clone(),
        uid: svc.metadata.uid.clone(),
        resource_version: svc.metadata.resource_version.clone(),
        field_path: None,
    }
}

/// `note` cut to [`MAX_NOTE`] bytes on a character boundary.
pub fn bounded_note(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_string();
    }
    let mut end = MAX_NOTE - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

/// The `events.k8s.io/v1` Event for `spec` about `regarding`, named
/// `<object>.<time in ns, hex><seq>` (unique per publisher, as the API
/// requires).
pub fn event_object(
    spec: &EventSpec,
    regarding: &ObjectReference,
    instance: &str,
    now: Timestamp,
    seq: u32,
) -> Event {
    let object = regarding.name.as_deref().unwrap_or("loxilb");
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{object}.{:x}{:04x}",
                now.as_nanosecond(),
                seq & 0xffff
            )),
            namespace: regarding.namespace.clone(),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(spec.type_.as_str().into()),
        reason: Some(spec.reason.into()),
        action: Some(spec.action.into()),
        note: Some(bounded_note(&spec.note)),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Default::default()
    }
}

/// Creates Events (verb `create` on `events.k8s.io` `events`, nothing else).
pub struct EventPublisher {
    client: Client,
    instance: String,
    seq: AtomicU32,
}

impl EventPublisher {
    /// `instance` is the `reportingInstance` (this agent's identity).
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        EventPublisher {
            client,
            instance: instance.into(),
            seq: AtomicU32::new(0),
        }
    }

    /// The `reportingInstance` of the Events.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub async fn publish(
        &self,
        spec: &EventSpec,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let ev = event_object(spec, regarding, &self.instance, now, seq);
        api.create(&crate::reconcile::post_params(), &ev)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc() -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "web", "uid": "u-1", "resourceVersion": "7"},
        }))
        .unwrap()
    }

    #[test]
    fn event_object_fields() {
        let now: Timestamp = "2026-05-01T10:00:00.123456Z".parse().unwrap();
        let spec = EventSpec::warning(
            reasons::INVALID_ANNOTATION,
            actions::CONFIGURE,
            "loxilb.io/lbmode: \"nat\": allowed values: default, onearm, fullnat, dsr",
        );
        let ev = event_object(&spec, &service_reference(&svc()), "agent-1", now, 3);
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["metadata"]["namespace"], "shop");
        assert_eq!(
            v["metadata"]["name"],
            format!("web.{:x}0003", now.as_nanosecond())
        );
        assert_eq!(v["type"], "Warning");
        assert_eq!(v["reason"], "InvalidAnnotation");
        assert_eq!(v["action"], "Configure");
        assert_eq!(v["reportingController"], "loxilb.io/loxilb-agent");
        assert_eq!(v["reportingInstance"], "agent-1");
        assert_eq!(v["eventTime"], "2026-05-01T10:00:00.123456Z");
        assert_eq!(
            v["regarding"],
            json!({"apiVersion": "v1", "kind": "Service", "name": "web",
                   "namespace": "shop", "uid": "u-1", "resourceVersion": "7"})
        );
        assert_eq!(v["note"], spec.note);
    }

    #[test]
    fn notes_are_bounded() {
        let long = "é".repeat(1000);
        let n = bounded_note(&long);
        assert!(n.len() <= MAX_NOTE && n.ends_with("..."), "{}", n.len());
        assert_eq!(bounded_note("short"), "short");
    }
}

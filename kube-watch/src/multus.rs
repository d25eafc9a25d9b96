//! Endpoints on Multus secondary networks (`loxilb.io/multus-nets`), as
//! kube-loxilb serves them.
//!
//! For a Service annotated with `loxilb.io/multus-nets: net1[,ns/net2...]`
//! the endpoints are not the pods' primary addresses (nor node:nodePort)
//! but the addresses the pods have on those NetworkAttachmentDefinitions,
//! as Multus reports them in each pod's [`NETWORK_STATUS`] annotation (a
//! JSON array of `{name, interface, ips, default, ...}`, `name` being
//! `namespace/nad-name`). A name without a namespace in the Service's
//! annotation means the Service's namespace.
//!
//! **Which pods.** The pods of the Service's EndpointSlices: every ready
//! endpoint (`conditions.ready` true or unset) whose `targetRef` is a Pod.
//! Kubernetes' EndpointSlice controller has already applied the Service's
//! selector, the pods' readiness and termination, and resolved a named
//! `targetPort` per pod: the port of each endpoint is the slice's port of
//! the Service port (the Service's targetPort), its addresses are replaced
//! by the pod's addresses on the named networks. (kube-loxilb lists the
//! pods by the Service's selector instead, which also takes pods that are
//! not ready.) An endpoint without a Pod `targetRef` (a hand-written
//! EndpointSlice) is no endpoint, with a warning.
//!
//! **Every address.** A pod contributes each address of the rule's family
//! it has on each of the named networks (several IPs on one network, or
//! several networks: all of them).
//!
//! **Problems are told, never papered over.** A pod whose annotation is
//! missing or malformed, or that has no address of the family on the named
//! networks, contributes no endpoint, and a [`PodProblem`] says which pod
//! and what is wrong (the controller makes it a Warning Event on the
//! Service, once per change). A pod the agent has not seen yet (its watch
//! event is behind the EndpointSlice's) is skipped without a warning: its
//! event re-plans the Service.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::{IpFamily, ServiceKey};

/// The pod annotation Multus writes the attached networks' addresses into.
pub const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";

/// One entry of [`NETWORK_STATUS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkStatus {
    /// `namespace/nad-name` for a NetworkAttachmentDefinition (the
    /// cluster network's entry often has no namespace).
    pub name: String,
    pub interface: Option<String>,
    pub ips: Vec<IpAddr>,
    pub default: bool,
}

/// The most characters of a malformed value quoted in a message.
const MAX_QUOTED: usize = 48;

fn quote(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > MAX_QUOTED {
        format!("{}...", s.chars().take(MAX_QUOTED).collect::<String>())
    } else {
        s
    }
}

/// Parse a [`NETWORK_STATUS`] value strictly: a JSON array of objects, each
/// with a string `name`; `ips`, when present, an array of IP address
/// strings; `interface` a string and `default` a boolean when present.
/// Other fields (`mac`, `dns`, `device-info`, ...) are not looked at.
pub fn parse_network_status(raw: &str) -> Result<Vec<NetworkStatus>, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Array(items) = v else {
        return Err(format!("not a JSON array (it is {})", quote(&v)));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(o) = item else {
            return Err(format!("entry {i} is not an object ({})", quote(item)));
        };
        let name = match o.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => {
                return Err(format!(
                    "entry {i}: `name` is not a network name ({})",
                    quote(other)
                ))
            }
            None => return Err(format!("entry {i} has no `name`")),
        };
        let interface = match o.get("interface") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(format!(
                    "entry {i} ({name}): `interface` is not a string ({})",
                    quote(other)
                ))
            }
        };
        let default = match o.get("default") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "entry {i} ({name}): `default` is not a boolean ({})",
                    quote(other)
                ))
            }
        };
        let ips = match o.get("ips") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|x| {
                    x.as_str()
                        .and_then(|s| s.parse::<IpAddr>().ok())
                        .ok_or_else(|| {
                            format!(
                                "entry {i} ({name}): {} in `ips` is not an IP address",
                                quote(x)
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(format!(
                    "entry {i} ({name}): `ips` is not a list of addresses ({})",
                    quote(other)
                ))
            }
        };
        out.push(NetworkStatus {
            name,
            interface,
            ips,
            default,
        });
    }
    Ok(out)
}

/// A network name as the Service gives it, qualified: `name` alone means
/// `namespace/name`.
pub fn qualify(net: &str, namespace: &str) -> String {
    if net.contains('/') {
        net.to_string()
    } else {
        format!("{namespace}/{net}")
    }
}

/// Why a pod contributes no endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodProblem {
    /// The pod has no [`NETWORK_STATUS`] annotation.
    Missing,
    /// The annotation cannot be read: why.
    Malformed(String),
    /// No address of `family` on the networks asked for; `attached`: the
    /// networks the annotation lists (with the families of their
    /// addresses).
    NoAddress {
        family: IpFamily,
        attached: Vec<String>,
    },
}

/// The addresses of family `family` a pod (in `pod_namespace`) has on the
/// networks `nets` (qualified, see [`qualify`]), from its
/// [`NETWORK_STATUS`] annotation (`None`: absent). In the order of `nets`,
/// then of the annotation; no duplicates.
pub fn pod_addresses(
    status: Option<&str>,
    pod_namespace: &str,
    nets: &[String],
    family: IpFamily,
) -> Result<Vec<IpAddr>, PodProblem> {
    let raw = status.ok_or(PodProblem::Missing)?;
    let entries = parse_network_status(raw).map_err(PodProblem::Malformed)?;
    let mut out = Vec::new();
    for net in nets {
        for e in entries
            .iter()
            .filter(|e| qualify(&e.name, pod_namespace) == *net)
        {
            for ip in e.ips.iter().filter(|ip| IpFamily::of(ip) == family) {
                if !out.contains(ip) {
                    out.push(*ip);
                }
            }
        }
    }
    if out.is_empty() {
        let attached = entries
            .iter()
            .map(|e| {
                let fams: BTreeSet<String> = e
                    .ips
                    .iter()
                    .map(|ip| IpFamily::of(ip).to_string())
                    .collect();
                if fams.is_empty() {
                    format!("{} (no address)", e.name)
                } else {
                    format!(
                        "{} ({})",
                        e.name,
                        fams.into_iter().collect::<Vec<_>>().join(", ")
                    )
                }
            })
            .collect();
        return Err(PodProblem::NoAddress { family, attached });
    }
    Ok(out)
}

impl PodProblem {
    /// The text of the Warning Event on `service` about `pod`, naming what
    /// is wrong and what to do. `nets`: the networks asked for.
    pub fn describe(&self, service: &ServiceKey, pod: &str, nets: &[String]) -> String {
        let head = format!(
            "pod {}/{pod} is not an endpoint of {service}",
            service.namespace
        );
        match self {
            PodProblem::Missing => format!(
                "{head}: it has no {NETWORK_STATUS} annotation (is Multus installed, and does the pod request {} in k8s.v1.cni.cncf.io/networks?)",
                nets.join(", ")
            ),
            PodProblem::Malformed(why) => format!(
                "{head}: its {NETWORK_STATUS} annotation is malformed: {why}; Multus writes it: check the pod's network attachments"
            ),
            PodProblem::NoAddress { family, attached } => format!(
                "{head}: no {family} address on {} in its {NETWORK_STATUS} (networks there: {}); attach the pod to the network (k8s.v1.cni.cncf.io/networks) or fix loxilb.io/multus-nets",
                nets.join(", "),
                if attached.is_empty() {
                    "none".to_string()
                } else {
                    attached.join(", ")
                }
            ),
        }
    }
}

/// Where [`crate::translate`] looks the pods' [`NETWORK_STATUS`] up.
pub trait PodLookup {
    /// `None`: the pod is not known (yet); `Some(None)`: it is, without
    /// the annotation; `Some(Some(v))`: the annotation's value.
    fn network_status(&self, namespace: &str, name: &str) -> Option<Option<&str>>;
}

/// No pod is known (a caller without a pod watch).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPods;

impl PodLookup for NoPods {
    fn network_status(&self, _: &str, _: &str) -> Option<Option<&str>> {
        None
    }
}

impl PodLookup for BTreeMap<(String, String), Option<String>> {
    fn network_status(&self, namespace: &str, name: &str) -> Option<Option<&str>> {
        self.get(&(namespace.to_string(), name.to_string()))
            .map(|v| v.as_deref())
    }
}

/// The pods the EndpointSlices of `service` refer to (`targetRef` of kind
/// Pod, ready or not): the pods whose changes matter to its rules.
pub fn referenced_pods(service: &ServiceKey, slices: &[EndpointSlice]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in slices {
        if !crate::translate::slice_of(s, service) {
            continue;
        }
        for ep in s.endpoints.iter().flatten() {
            if let Some(name) = pod_ref(ep) {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// The pod an EndpointSlice endpoint refers to.
pub(crate) fn pod_ref(ep: &k8s_openapi::api::discovery::v1::Endpoint) -> Option<&str> {
    let r = ep.target_ref.as_ref()?;
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    r.name.as_deref().filter(|n| !n.is_empty())
}

/// The pods' network-status annotations, as the agent's Pod watch saw
/// them: a [`PodLookup`]. Holds only each pod's name and annotation.
#[derive(Clone, Debug, Default)]
pub struct PodNetworks {
    pods: std::collections::HashMap<(String, String), Option<String>>,
    /// Being relisted: the new list so far.
    relist: Option<std::collections::HashMap<(String, String), Option<String>>>,
    synced: bool,
}

impl PodNetworks {
    /// Whether a complete list has been received.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// A pod was added or changed; `true` when its annotation is new or
    /// different (other changes of a pod do not matter).
    pub fn apply(&mut self, namespace: &str, name: &str, status: Option<&str>) -> bool {
        let key = (namespace.to_string(), name.to_string());
        let new = status.map(str::to_string);
        if let Some(r) = self.relist.as_mut() {
            r.insert(key, new);
            return false;
        }
        self.pods.insert(key, new.clone()) != Some(new)
    }

    /// A pod was deleted; `true` when it was known.
    pub fn delete(&mut self, namespace: &str, name: &str) -> bool {
        self.pods
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
    }

    /// A (re)list starts: [`PodNetworks::apply`] fills the new list until
    /// [`PodNetworks::relisted`].
    pub fn relisting(&mut self) {
        self.relist = Some(Default::default());
    }

    /// The (re)list is complete: it replaces what was known. Returns the
    /// pods that changed (added, removed, annotation changed).
    pub fn relisted(&mut self) -> Vec<(String, String)> {
        let new = self.relist.take().unwrap_or_default();
        let mut changed: Vec<(String, String)> = new
            .iter()
            .filter(|(k, v)| self.pods.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        changed.extend(self.pods.keys().filter(|k| !new.contains_key(*k)).cloned());
        self.pods = new;
        self.synced = true;
        changed
    }
}

impl PodLookup for PodNetworks {
    fn network_status(&self, namespace: &str, name: &str) -> Option<Option<&str>> {
        self.pods
            .get(&(namespace.to_string(), name.to_string()))
            .map(|v| v.as_deref())
    }
}

/// Which multus Services refer to which pods (from their EndpointSlices
/// when last planned): a pod's change re-plans only those.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    by_service: std::collections::HashMap<ServiceKey, BTreeSet<String>>,
    by_pod: std::collections::HashMap<(String, String), BTreeSet<ServiceKey>>,
}

impl PodIndex {
    /// `service` refers to `pods` (in its namespace) now (empty: none, or
    /// it is no multus Service any more).
    pub fn set(&mut self, service: &ServiceKey, pods: BTreeSet<String>) {
        let old = if pods.is_empty() {
            self.by_service.remove(service).unwrap_or_default()
        } else {
            self.by_service
                .insert(service.clone(), pods.clone())
                .unwrap_or_default()
        };
        for p in old.difference(&pods) {
            let k = (service.namespace.clone(), p.clone());
            if let Some(s) = self.by_pod.get_mut(&k) {
                s.remove(service);
                if s.is_empty() {
                    self.by_pod.remove(&k);
                }
            }
        }
        for p in pods.difference(&old) {
            self.by_pod
                .entry((service.namespace.clone(), p.clone()))
                .or_default()
                .insert(service.clone());
        }
    }

    /// The Services that refer to the pod.
    pub fn services_of(&self, namespace: &str, name: &str) -> Vec<ServiceKey> {
        self.by_pod
            .get(&(namespace.to_string(), name.to_string()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many pods are referred to.
    pub fn pods(&self) -> usize {
        self.by_pod.len()
    }
}

impl fmt::Display for NetworkStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ips: Vec<String> = self.ips.iter().map(IpAddr::to_string).collect();
        write!(f, "{} [{}]", self.name, ips.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// What Multus writes for a pod on the cluster network and macvlan1.
    const GOOD: &str = r#"[
        {"name": "cbr0", "interface": "eth0", "ips": ["10.244.1.5"], "mac": "aa:bb:cc:dd:ee:ff", "default": true, "dns": {}},
        {"name": "default/macvlan1", "interface": "net1", "ips": ["192.168.50.5", "fd00:50::5"], "mac": "aa:bb:cc:dd:ee:01", "dns": {}}
    ]"#;

    fn nets(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| qualify(n, "default")).collect()
    }

    #[test]
    fn parses_what_multus_writes() {
        let s = parse_network_status(GOOD).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "cbr0");
        assert!(s[0].default);
        assert_eq!(s[1].interface.as_deref(), Some("net1"));
        assert_eq!(s[1].ips, vec![ip("192.168.50.5"), ip("fd00:50::5")]);
        assert!(!s[1].default);
        assert_eq!(
            s[1].to_string(),
            "default/macvlan1 [192.168.50.5, fd00:50::5]"
        );
        // An entry without ips (a network without IPAM) is fine.
        let s = parse_network_status(r#"[{"name": "default/l2"}]"#).unwrap();
        assert!(s[0].ips.is_empty());
        assert_eq!(parse_network_status("[]").unwrap(), vec![]);
    }

    #[test]
    fn malformed_is_told_precisely() {
        let e = |raw: &str| parse_network_status(raw).unwrap_err();
        assert!(
            e("{not json").starts_with("not JSON ("),
            "{}",
            e("{not json")
        );
        assert_eq!(
            e(r#"{"name": "x"}"#),
            r#"not a JSON array (it is {"name":"x"})"#
        );
        assert_eq!(e(r#"["x"]"#), r#"entry 0 is not an object ("x")"#);
        assert_eq!(e(r#"[{"ips": []}]"#), "entry 0 has no `name`");
        assert_eq!(
            e(r#"[{"name": 5}]"#),
            "entry 0: `name` is not a network name (5)"
        );
        assert_eq!(
            e(r#"[{"name": "default/m", "ips": ["192.168.50.300"]}]"#),
            r#"entry 0 (default/m): "192.168.50.300" in `ips` is not an IP address"#
        );
        assert_eq!(
            e(r#"[{"name": "default/m", "ips": "192.168.50.3"}]"#),
            r#"entry 0 (default/m): `ips` is not a list of addresses ("192.168.50.3")"#
        );
        assert!(e(r#"[{"name": "a", "default": "yes"}]"#).contains("`default` is not a boolean"));
        assert!(e(r#"[{"name": "a", "interface": 1}]"#).contains("`interface` is not a string"));
        let long = format!(r#""{}""#, "x".repeat(200));
        assert!(e(&long).ends_with("...)"), "{}", e(&long));
    }

    #[test]
    fn qualified_names() {
        assert_eq!(qualify("macvlan1", "web"), "web/macvlan1");
        assert_eq!(
            qualify("kube-system/macvlan1", "web"),
            "kube-system/macvlan1"
        );
    }

    #[test]
    fn addresses_on_the_named_networks() {
        let v4 = pod_addresses(Some(GOOD), "default", &nets(&["macvlan1"]), IpFamily::V4);
        assert_eq!(v4, Ok(vec![ip("192.168.50.5")]));
        let v6 = pod_addresses(Some(GOOD), "default", &nets(&["macvlan1"]), IpFamily::V6);
        assert_eq!(v6, Ok(vec![ip("fd00:50::5")]));
        // The namespace given explicitly.
        let q = pod_addresses(
            Some(GOOD),
            "default",
            &nets(&["default/macvlan1"]),
            IpFamily::V4,
        );
        assert_eq!(q, Ok(vec![ip("192.168.50.5")]));
        // Several IPs on one network, and several networks: all, in order.
        let many = json!([
            {"name": "default/a", "ips": ["192.168.1.1", "192.168.1.2", "fd00::1"]},
            {"name": "default/b", "ips": ["192.168.2.1", "192.168.1.1"]},
            {"name": "default/c", "ips": ["192.168.3.1"]},
        ])
        .to_string();
        assert_eq!(
            pod_addresses(Some(&many), "default", &nets(&["b", "a"]), IpFamily::V4),
            Ok(vec![
                ip("192.168.2.1"),
                ip("192.168.1.1"),
                ip("192.168.1.2")
            ])
        );
        // A status name without namespace is the pod's namespace.
        let bare = r#"[{"name": "macvlan1", "ips": ["192.168.50.7"]}]"#;
        assert_eq!(
            pod_addresses(Some(bare), "default", &nets(&["macvlan1"]), IpFamily::V4),
            Ok(vec![ip("192.168.50.7")])
        );
        // Another namespace's network of the same name is another network.
        assert!(pod_addresses(
            Some(GOOD),
            "default",
            &nets(&["other/macvlan1"]),
            IpFamily::V4
        )
        .is_err());
    }

    #[test]
    fn problems_name_the_pod_and_what_to_do() {
        let svc = ServiceKey::new("default", "web");
        let n = nets(&["macvlan1"]);
        let missing = pod_addresses(None, "default", &n, IpFamily::V4).unwrap_err();
        assert_eq!(missing, PodProblem::Missing);
        assert_eq!(
            missing.describe(&svc, "web-1", &n),
            "pod default/web-1 is not an endpoint of default/web: it has no k8s.v1.cni.cncf.io/network-status annotation (is Multus installed, and does the pod request default/macvlan1 in k8s.v1.cni.cncf.io/networks?)"
        );
        let bad = pod_addresses(Some("[{"), "default", &n, IpFamily::V4).unwrap_err();
        let text = bad.describe(&svc, "web-2", &n);
        assert!(
            text.starts_with("pod default/web-2 is not an endpoint of default/web: its k8s.v1.cni.cncf.io/network-status annotation is malformed: not JSON ("),
            "{text}"
        );
        // Attached elsewhere only.
        let other = r#"[{"name": "cbr0", "ips": ["10.244.1.5"], "default": true}, {"name": "default/other", "ips": ["192.168.60.5"]}, {"name": "default/l2"}]"#;
        let p = pod_addresses(Some(other), "default", &n, IpFamily::V4).unwrap_err();
        assert_eq!(
            p.describe(&svc, "web-3", &n),
            "pod default/web-3 is not an endpoint of default/web: no IPv4 address on default/macvlan1 in its k8s.v1.cni.cncf.io/network-status (networks there: cbr0 (IPv4), default/other (IPv4), default/l2 (no address)); attach the pod to the network (k8s.v1.cni.cncf.io/networks) or fix loxilb.io/multus-nets"
        );
        // On the network, but not with the family asked for.
        let v6only = r#"[{"name": "default/macvlan1", "ips": ["fd00:50::9"]}]"#;
        let p = pod_addresses(Some(v6only), "default", &n, IpFamily::V4).unwrap_err();
        assert_eq!(
            p,
            PodProblem::NoAddress {
                family: IpFamily::V4,
                attached: vec!["default/macvlan1 (IPv6)".into()]
            }
        );
        let p = pod_addresses(Some("[]"), "default", &n, IpFamily::V4).unwrap_err();
        assert!(p.describe(&svc, "x", &n).contains("(networks there: none)"));
    }

    #[test]
    fn pod_cache_tells_annotation_changes_only() {
        let mut c = PodNetworks::default();
        assert!(!c.synced());
        c.relisting();
        assert!(!c.apply("default", "a", Some("[]")));
        c.apply("default", "b", None);
        let mut changed = c.relisted();
        changed.sort();
        assert_eq!(changed.len(), 2);
        assert!(c.synced());
        assert_eq!(c.network_status("default", "a"), Some(Some("[]")));
        assert_eq!(c.network_status("default", "b"), Some(None));
        assert_eq!(c.network_status("default", "c"), None);
        assert!(!c.apply("default", "a", Some("[]")), "same annotation");
        assert!(c.apply("default", "a", Some(GOOD)));
        assert!(c.delete("default", "a"));
        assert!(!c.delete("default", "a"));
        // A relist tells what changed meanwhile.
        c.relisting();
        c.apply("default", "b", None);
        c.apply("default", "d", Some("[]"));
        assert_eq!(c.relisted(), vec![("default".to_string(), "d".to_string())]);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn pod_index_maps_pods_to_services() {
        let mut i = PodIndex::default();
        let (a, b) = (ServiceKey::new("ns", "a"), ServiceKey::new("ns", "b"));
        i.set(&a, ["p1".to_string(), "p2".to_string()].into());
        i.set(&b, ["p2".to_string()].into());
        assert_eq!(i.services_of("ns", "p2"), vec![a.clone(), b.clone()]);
        assert_eq!(i.services_of("other", "p2"), vec![]);
        i.set(&a, ["p1".to_string()].into());
        assert_eq!(i.services_of("ns", "p2"), vec![b.clone()]);
        i.set(&b, BTreeSet::new());
        assert_eq!(i.services_of("ns", "p2"), vec![]);
        assert_eq!(i.pods(), 1);
    }
}

//! From a Service, its EndpointSlices, the Nodes and its allocation to the
//! desired load-balancer rules; plus the allocation request for a Service,
//! the status to write and the allocation recorded on a Service.
//!
//! The caller's sequence for one Service (the next step wires it to
//! watchers):
//!
//! 1. [`is_managed`]: `type: LoadBalancer` and our `loadBalancerClass`;
//!    anything else is not ours (release its allocation if it had one).
//! 2. [`crate::annotations::parse`] (or [`parse_annotations`]); on errors
//!    keep the Service's last good rules and raise Warning Events.
//! 3. [`alloc_request`] then [`crate::ipam::Ipam::ensure`]; on an error the
//!    Service keeps what it had (or stays pending) and gets a Warning Event.
//! 4. Write [`crate::ipam::Allocation::record`] into
//!    [`crate::ipam::RECORD_ANNOTATION`], then [`translate`] and program the
//!    rules, then write [`load_balancer_status`].
//!
//! Endpoints: by default each eligible node's InternalIP with the Service
//! port's nodePort; with `usepodnetwork` (annotation, else `--usePodNetwork`)
//! each ready pod's address with its target port (from the EndpointSlice).
//! A node is eligible when its `Ready` condition is `True` and it does not
//! carry the label `node.kubernetes.io/exclude-from-external-load-balancers`;
//! with `externalTrafficPolicy: Local` it also needs a ready endpoint of the
//! port on it. In pod-network mode the node filters and the traffic policy do
//! not apply: traffic goes straight to the pods and only their readiness
//! counts. An EndpointSlice endpoint is ready when `conditions.ready` is true
//! or unset (the API's rule); only its first address is used (the API says
//! the addresses are fungible).
//!
//! With `loxilb.io/multus-nets` the endpoints are the addresses the
//! EndpointSlices' ready pods have on those Multus networks (from each
//! pod's `k8s.v1.cni.cncf.io/network-status`), with the target port; node
//! filters and the traffic policy do not apply ([`crate::multus`],
//! [`translate_with_pods`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};

use loxilb_model::{
    Endpoint, Limit, Mode, ProbeKind, ProbeSpec, Protocol, Rule, Selection, Unsupported,
    DEFAULT_PERSIST_TIMEOUT_S,
};

use crate::{
    annotations::{
        keys, parse as parse_annotation_map, IpamFamily, ParsedAnnotations, ServiceAnnotations,
    },
    flags::{KubeConfig, StatusForm},
    ipam::{
        AllocRequest, Allocation, AllocationRecord, PortKey, SecondaryRequest, DEFAULT_POOL,
        RECORD_ANNOTATION,
    },
    multus::{self, NoPods, PodLookup},
    IpFamily, ServiceKey,
};

/// Nodes with this label (any value) never receive load-balancer traffic.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Idle timeout without `loxilb.io/timeout` (the rule model's).
pub const DEFAULT_TIMEOUT_S: u32 = loxilb_model::DEFAULT_TIMEOUT_S;
/// Probe timeout without `loxilb.io/probetimeout` (the rule model's).
pub const DEFAULT_PROBE_TIMEOUT_S: u32 = loxilb_model::probe::DEFAULT_TIMEOUT.as_secs() as u32;
/// Probe retries without `loxilb.io/proberetries` (the rule model's).
pub const DEFAULT_PROBE_RETRIES: u32 = loxilb_model::probe::DEFAULT_RETRIES;

/// One desired load-balancer rule of a Service: one (VIP, port, protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRule {
    pub service: ServiceKey,
    /// Named `namespace/name:port/protocol@vip`, unique per rule. Its
    /// endpoints are sorted, without duplicates, and may be none (the
    /// rule then drops). `source_ranges` are those of
    /// `spec.loadBalancerSourceRanges` of the VIP's family; when the
    /// Service lists prefixes of the other family only, the unspecified
    /// address (nobody). `announce_local_only`: `externalTrafficPolicy:
    /// Local` with node endpoints (only nodes that are endpoints, with a
    /// ready local pod, should attract the traffic, so only they announce
    /// the VIP over BGP).
    pub rule: Rule,
}

impl ServiceRule {
    /// Whether this load balancer can serve the rule
    /// ([`loxilb_model::supported`]); a refusal says why, with what to do
    /// in a Service's terms ([`refusal`]).
    pub fn supported(&self) -> Result<(), String> {
        loxilb_model::supported(&self.rule).map_err(|e| refusal(&e))
    }
}

/// A refusal of the rule model, its remedy worded for a Service's owner
/// (annotations and Service fields, not rule-file fields).
pub fn refusal(e: &Unsupported) -> String {
    const SECONDARY: &str = "loxilb.io/secondaryIPs / poolSelectSecondary";
    let remedy = match e.limit {
        Limit::SecondaryVipsProtocol => {
            format!("remove {SECONDARY} (secondary VIPs are for SCTP ports)")
        }
        Limit::SecondaryVipsMode => format!(
            "set {}: default or fullnat, or remove {SECONDARY} to serve the primary VIP alone",
            keys::LB_MODE
        ),
        Limit::SecondaryVipsCount | Limit::SecondaryVipFamily | Limit::SecondaryVipRepeated => {
            format!("list each address once, of the VIP's family, in {SECONDARY}")
        }
        Limit::SourceRangeFamily | Limit::SourceRangeHostBits => {
            "fix spec.loadBalancerSourceRanges".into()
        }
        Limit::Nat46 => format!("use an IPv6 VIP: ipFamilies or {}", keys::IPAM),
        Limit::EndpointFamilies => format!(
            "a rule balances one family: choose it with ipFamilies or {}",
            keys::IPAM
        ),
        Limit::Nat64Dsr => format!(
            "use another {} (default, onearm or fullnat), or an IPv4 VIP",
            keys::LB_MODE
        ),
        Limit::Nat64Sctp => format!("serve SCTP without NAT64 ({}: ipv4 or ipv6)", keys::IPAM),
        Limit::DsrPort => format!(
            "use the pod network ({}: \"yes\"), or another {}",
            keys::USE_POD_NETWORK,
            keys::LB_MODE
        ),
        Limit::Timeout => format!("fix {}", keys::TIMEOUT),
        Limit::Probe => "fix the loxilb.io/probe* annotations".into(),
        Limit::Address
        | Limit::EndpointCount
        | Limit::EndpointRepeated
        | Limit::EndpointWeight
        | Limit::DsrIpipIpv6 => e.remedy.clone(),
    };
    e.message_with(&remedy)
}

/// The rules of one Service and what the user should be told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// Ordered by VIP (family order), then Service port order.
    pub rules: Vec<ServiceRule>,
    /// Not errors: the rules are right, but the user should know (Events).
    pub warnings: Vec<String>,
    /// Pods (or EndpointSlice endpoints) that are not endpoints of a
    /// Service with `loxilb.io/multus-nets`, and why ([`crate::multus`]).
    pub endpoint_warnings: Vec<String>,
}

/// Why no rules (or no allocation request) can be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// Not a Service this load balancer handles; not an error to report.
    #[error("not handled by this load balancer: {0}")]
    NotManaged(String),
    /// A field of the Service (or the allocation given) cannot be used.
    #[error("{field}: {value:?}: {message}")]
    Invalid {
        field: String,
        value: String,
        message: String,
    },
}

fn invalid(
    field: impl Into<String>,
    value: impl Into<String>,
    message: impl Into<String>,
) -> TranslateError {
    TranslateError::Invalid {
        field: field.into(),
        value: value.into(),
        message: message.into(),
    }
}

/// `namespace/name` of a Service (both must be set).
pub fn service_key(svc: &Service) -> Result<ServiceKey, TranslateError> {
    match (&svc.metadata.namespace, &svc.metadata.name) {
        (Some(ns), Some(n)) if !ns.is_empty() && !n.is_empty() => Ok(ServiceKey::new(ns, n)),
        _ => Err(invalid(
            "metadata",
            "",
            "a Service needs metadata.namespace and metadata.name",
        )),
    }
}

/// Why a Service is not ours, or `Ok` when it is: `type: LoadBalancer` with
/// `spec.loadBalancerClass` equal to `class`.
pub fn managed(svc: &Service, class: &str) -> Result<(), String> {
    let spec = svc.spec.as_ref().ok_or("no spec")?;
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return Err(format!(
            "type is {}, not LoadBalancer",
            spec.type_.as_deref().unwrap_or("ClusterIP")
        ));
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) if c == class => Ok(()),
        Some(c) => Err(format!("loadBalancerClass is {c}, not {class}")),
        None => Err(format!(
            "no loadBalancerClass (this load balancer handles {class})"
        )),
    }
}

/// [`managed`] as a boolean.
pub fn is_managed(svc: &Service, class: &str) -> bool {
    managed(svc, class).is_ok()
}

/// [`crate::annotations::parse`] on a Service's annotations.
pub fn parse_annotations(svc: &Service) -> ParsedAnnotations {
    match &svc.metadata.annotations {
        Some(a) => parse_annotation_map(a),
        None => parse_annotation_map(&BTreeMap::new()),
    }
}

/// The VIP families, in order: `loxilb.io/ipam` when given, else
/// `spec.ipFamilies` (two entries: dual stack), else IPv4.
pub fn vip_families(
    svc: &Service,
    ann: &ServiceAnnotations,
) -> Result<Vec<IpFamily>, TranslateError> {
    match ann.ipam {
        Some(IpamFamily::Ipv4) => return Ok(vec![IpFamily::V4]),
        Some(IpamFamily::Ipv6 | IpamFamily::Ipv6To4) => return Ok(vec![IpFamily::V6]),
        None => {}
    }
    let fams = svc.spec.as_ref().and_then(|s| s.ip_families.as_ref());
    let Some(fams) = fams.filter(|f| !f.is_empty()) else {
        return Ok(vec![IpFamily::V4]);
    };
    let mut out = Vec::new();
    for (i, f) in fams.iter().enumerate() {
        let fam = match f.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            _ => {
                return Err(invalid(
                    format!("spec.ipFamilies[{i}]"),
                    f,
                    "allowed values: IPv4, IPv6",
                ))
            }
        };
        if !out.contains(&fam) {
            out.push(fam);
        }
    }
    Ok(out)
}

/// One Service port, checked.
struct Port<'a> {
    index: usize,
    spec: &'a ServicePort,
    port: u16,
    protocol: Protocol,
}

fn ports(svc: &Service) -> Result<Vec<Port<'_>>, TranslateError> {
    let list = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| {
                    invalid(
                        format!("spec.ports[{i}].port"),
                        p.port.to_string(),
                        "not a port (1..=65535)",
                    )
                })?;
            let protocol = protocol_from_kubernetes(p.protocol.as_deref()).map_err(|m| {
                invalid(
                    format!("spec.ports[{i}].protocol"),
                    p.protocol.clone().unwrap_or_default(),
                    m,
                )
            })?;
            Ok(Port {
                index: i,
                spec: p,
                port,
                protocol,
            })
        })
        .collect()
}

/// What to ask [`crate::ipam::Ipam::ensure`] for, and warnings.
///
/// The static IP is `loxilb.io/staticIP` or `spec.loadBalancerIP` (both
/// given and different is an error). Secondary addresses are requested only
/// when the Service has an SCTP port (they serve SCTP multi-homing);
/// otherwise the annotation is reported as having no effect.
pub fn alloc_request(
    svc: &Service,
    ann: &ServiceAnnotations,
    config: &KubeConfig,
) -> Result<(AllocRequest, Vec<String>), TranslateError> {
    let key = service_key(svc)?;
    managed(svc, &config.load_balancer_class).map_err(TranslateError::NotManaged)?;
    let families = vip_families(svc, ann)?;
    let spec_ip = match svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .filter(|s| !s.is_empty())
    {
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| invalid("spec.loadBalancerIP", s, "not an IP address"))?,
        ),
        None => None,
    };
    let static_ip = match (ann.static_ip, spec_ip) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(
                keys::STATIC_IP,
                a.to_string(),
                format!(
                    "differs from spec.loadBalancerIP ({b}); give the VIP in one place, or the same address in both"
                ),
            ))
        }
        (a, b) => a.or(b),
    };
    let ports = ports(svc)?;
    let port_set: BTreeSet<PortKey> = ports
        .iter()
        .map(|p| PortKey::new(p.port, p.protocol))
        .collect();
    let mut warnings = Vec::new();
    let mut secondary = if !ann.secondary_ips.is_empty() {
        SecondaryRequest::Ips(ann.secondary_ips.clone())
    } else if !ann.pool_select_secondary.is_empty() {
        SecondaryRequest::Pools(ann.pool_select_secondary.clone())
    } else {
        SecondaryRequest::None
    };
    if secondary != SecondaryRequest::None && !port_set.iter().any(|p| p.protocol == Protocol::Sctp)
    {
        let which = match secondary {
            SecondaryRequest::Ips(_) => keys::SECONDARY_IPS,
            _ => keys::POOL_SELECT_SECONDARY,
        };
        warnings.push(format!(
            "{which}: has no effect: secondary addresses serve SCTP multi-homing and the Service has no SCTP port"
        ));
        secondary = SecondaryRequest::None;
    }
    Ok((
        AllocRequest {
            service: key,
            families,
            pool: ann
                .pool_select
                .clone()
                .unwrap_or_else(|| DEFAULT_POOL.to_string()),
            static_ip,
            ports: port_set,
            secondary,
        },
        warnings,
    ))
}

/// A ready endpoint from the EndpointSlices.
struct ReadyEndpoint<'a> {
    ip: IpAddr,
    port: u16,
    node: Option<&'a str>,
}

/// Whether `slice` belongs to Service `key` (its namespace and the
/// `kubernetes.io/service-name` label).
pub(crate) fn slice_of(slice: &EndpointSlice, key: &ServiceKey) -> bool {
    slice.metadata.namespace.as_deref() == Some(key.namespace.as_str())
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(String::as_str)
            == Some(key.name.as_str())
}

/// Ready endpoints of one Service port, of one address family.
fn ready_endpoints<'a>(
    key: &ServiceKey,
    slices: &'a [EndpointSlice],
    family: IpFamily,
    port: &Port<'_>,
) -> Vec<ReadyEndpoint<'a>> {
    let want_type = match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    };
    let mut out = Vec::new();
    for slice in slices {
        if !slice_of(slice, key) || slice.address_type != want_type {
            continue;
        }
        let Some(target) = slice_target_port(slice, port) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let ip = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok());
            if let (true, Some(ip)) = (ready, ip) {
                if IpFamily::of(&ip) == family {
                    out.push(ReadyEndpoint {
                        ip,
                        port: target,
                        node: ep.node_name.as_deref(),
                    });
                }
            }
        }
    }
    out
}

fn node_name(n: &Node) -> &str {
    n.metadata.name.as_deref().unwrap_or("")
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_excluded(n: &Node) -> bool {
    n.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(EXCLUDE_LABEL))
}

fn node_internal_ip(n: &Node, family: IpFamily) -> Option<IpAddr> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find(|ip| IpFamily::of(ip) == family)
}

/// The desired rules of a managed Service.
///
/// `ann` must come from a parse without errors (see the module doc);
/// `allocation` from [`crate::ipam::Ipam::ensure`] with this Service's
/// current [`alloc_request`]. Mode: `loxilb.io/lbmode`, else `--setLBMode`.
/// Probing: `loxilb.io/liveness`, else `--monitor`; the probe type is
/// `loxilb.io/probetype`, else the port's protocol for fullnat and onearm
/// and ping for default and dsr; timeout 60 s and 2 retries unless
/// annotated.
///
/// A Service with `loxilb.io/multus-nets` gets the pods' addresses on those
/// networks ([`crate::multus`]); without a pod watch (this function) every
/// pod is unknown and it has no endpoints: see [`translate_with_pods`].
pub fn translate(
    svc: &Service,
    ann: &ServiceAnnotations,
    slices: &[EndpointSlice],
    nodes: &[Node],
    allocation: &Allocation,
    config: &KubeConfig,
) -> Result<Translation, TranslateError> {
    translate_with_pods(svc, ann, slices, nodes, &NoPods, allocation, config)
}

/// [`translate`], the pods' network-status annotations from `pods` (used
/// by Services with `loxilb.io/multus-nets` only).
pub fn translate_with_pods(
    svc: &Service,
    ann: &ServiceAnnotations,
    slices: &[EndpointSlice],
    nodes: &[Node],
    pods: &dyn PodLookup,
    allocation: &Allocation,
    config: &KubeConfig,
) -> Result<Translation, TranslateError> {
    let key = service_key(svc)?;
    managed(svc, &config.load_balancer_class).map_err(TranslateError::NotManaged)?;
    if allocation.service != key {
        return Err(invalid(
            "allocation",
            allocation.service.to_string(),
            format!("is another Service's; pass the allocation of {key}"),
        ));
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Err(TranslateError::NotManaged("no spec".into()));
    };
    let families = vip_families(svc, ann)?;
    let ports = ports(svc)?;
    let mode = ann.lb_mode.unwrap_or(config.lb_mode);
    let selection = ann.ep_select.unwrap_or(Selection::RoundRobin);
    let timeout_s = ann.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    let pod_network = ann.use_pod_network.unwrap_or(config.use_pod_network);
    let local = spec.external_traffic_policy.as_deref() == Some("Local");

    let sources: Option<Vec<IpNet>> = match spec.load_balancer_source_ranges.as_deref() {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    s.trim().parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
                        invalid(
                            format!("spec.loadBalancerSourceRanges[{i}]"),
                            s,
                            "not a CIDR (e.g. 192.0.2.0/24)",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };

    let multus_nets: Vec<String> = ann
        .multus_nets
        .iter()
        .map(|n| multus::qualify(n, &key.namespace))
        .collect();
    let multus = !multus_nets.is_empty();
    if multus && ann.use_pod_network == Some(false) {
        return Err(invalid(
            keys::USE_POD_NETWORK,
            "no",
            format!(
                "contradicts {}: endpoints on Multus networks are pod addresses; remove one of the two annotations",
                keys::MULTUS_NETS
            ),
        ));
    }
    let mut endpoint_warnings = BTreeSet::new();

    if !pod_network && !multus {
        if let Some((i, p)) = ports
            .iter()
            .enumerate()
            .find(|(_, p)| p.spec.node_port.is_none())
        {
            return Err(invalid(
                format!("spec.ports[{i}].nodePort"),
                "",
                format!(
                    "port {}/{} has no nodePort (spec.allocateLoadBalancerNodePorts is false?); endpoints are node:nodePort unless {} is \"yes\" (or --usePodNetwork)",
                    p.port,
                    p.protocol,
                    keys::USE_POD_NETWORK
                ),
            ));
        }
    }

    let monitor = ann.liveness.unwrap_or(config.monitor);
    let mut warnings = BTreeSet::new();
    let probe_params_set =
        ann.probe_port.is_some() || ann.probe_req.is_some() || ann.probe_resp.is_some();
    let any_probe_annotation = probe_params_set
        || ann.probe_type.is_some()
        || ann.probe_timeout_s.is_some()
        || ann.probe_retries.is_some();
    if !monitor && ann.liveness.is_none() && any_probe_annotation {
        warnings.insert(format!(
            "probe annotations are set but endpoints are not probed: set {}: \"yes\" (or start the agent with --monitor)",
            keys::LIVENESS
        ));
    }

    let mut rules = Vec::new();
    for family in families {
        let vip = allocation.vip(family).ok_or_else(|| {
            invalid(
                "allocation",
                allocation.record().to_string(),
                format!("has no {family} VIP; run Ipam::ensure with the Service's current request first"),
            )
        })?;
        let ep_family = if ann.ipam == Some(IpamFamily::Ipv6To4) {
            IpFamily::V4
        } else {
            family
        };
        let secondary: Vec<IpAddr> = allocation
            .secondary
            .iter()
            .map(|a| a.ip)
            .filter(|ip| IpFamily::of(ip) == family)
            .collect();
        let source_ranges = source_ranges(sources.as_deref(), family);

        for port in &ports {
            let mut endpoints: Vec<Endpoint> = if multus {
                multus_endpoints(
                    &key,
                    slices,
                    pods,
                    &multus_nets,
                    ep_family,
                    port,
                    &mut endpoint_warnings,
                )
            } else if pod_network {
                let ready = ready_endpoints(&key, slices, ep_family, port);
                ready
                    .iter()
                    .map(|e| Endpoint {
                        ip: e.ip,
                        port: e.port,
                        weight: 1,
                    })
                    .collect()
            } else {
                let ready = ready_endpoints(&key, slices, ep_family, port);
                let node_port = port
                    .spec
                    .node_port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0)
                    .ok_or_else(|| {
                        invalid(
                            format!("spec.ports[{}].nodePort", port.index),
                            port.spec.node_port.unwrap_or_default().to_string(),
                            "not a port (1..=65535)",
                        )
                    })?;
                let local_nodes: BTreeSet<&str> = ready.iter().filter_map(|e| e.node).collect();
                let mut eps = Vec::new();
                for n in nodes {
                    if !node_ready(n) || node_excluded(n) {
                        continue;
                    }
                    if local && !local_nodes.contains(node_name(n)) {
                        continue;
                    }
                    match node_internal_ip(n, ep_family) {
                        Some(ip) => eps.push(Endpoint {
                            ip,
                            port: node_port,
                            weight: 1,
                        }),
                        None => {
                            warnings.insert(format!(
                                "node {} has no {ep_family} InternalIP; it is not an endpoint of {key}",
                                node_name(n)
                            ));
                        }
                    }
                }
                eps
            };
            endpoints.sort();
            endpoints.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);

            let probe = probe_for(ann, mode, port.protocol, monitor, &mut warnings);
            rules.push(ServiceRule {
                service: key.clone(),
                rule: Rule {
                    name: format!("{key}:{}/{}@{vip}", port.port, port.protocol),
                    vip,
                    secondary_vips: if port.protocol == Protocol::Sctp {
                        secondary.clone()
                    } else {
                        Vec::new()
                    },
                    port: port.port,
                    protocol: port.protocol,
                    mode,
                    selection,
                    timeout_s,
                    persist_timeout_s: DEFAULT_PERSIST_TIMEOUT_S,
                    source_ranges: source_ranges.clone(),
                    endpoints,
                    probe,
                    announce_local_only: local && !pod_network && !multus,
                },
            });
        }
    }
    Ok(Translation {
        rules,
        warnings: warnings.into_iter().collect(),
        endpoint_warnings: endpoint_warnings.into_iter().collect(),
    })
}

/// The rule's source ranges of `family` from the Service's
/// `loadBalancerSourceRanges` (`None`: not given, every client): sorted,
/// without duplicates. Prefixes of the other family only: the
/// unspecified address, a source no packet carries (nobody, not
/// everybody).
fn source_ranges(sources: Option<&[IpNet]>, family: IpFamily) -> Vec<IpNet> {
    let Some(list) = sources else {
        return vec![];
    };
    let mut v: Vec<IpNet> = list
        .iter()
        .copied()
        .filter(|n| IpFamily::of(&n.addr()) == family)
        .collect();
    if v.is_empty() {
        v.push(
            match family {
                IpFamily::V4 => "0.0.0.0/32",
                IpFamily::V6 => "::/128",
            }
            .parse()
            .expect("valid"),
        );
    }
    v.sort();
    v.dedup();
    v
}

/// A Service port's protocol, in its Kubernetes spelling (`TCP`, `UDP`,
/// `SCTP`); `None` (field unset) is TCP, as the API defaults it.
pub fn protocol_from_kubernetes(value: Option<&str>) -> Result<Protocol, String> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!(
            "protocol `{other}` is not supported (allowed: TCP, UDP, SCTP)"
        )),
    }
}

/// The target port of Service port `port` in `slice` (same name and
/// protocol), when it has one.
fn slice_target_port(slice: &EndpointSlice, port: &Port<'_>) -> Option<u16> {
    let port_name = port.spec.name.as_deref().unwrap_or("");
    slice.ports.iter().flatten().find_map(|p| {
        let same_name = p.name.as_deref().unwrap_or("") == port_name;
        let same_proto = protocol_from_kubernetes(p.protocol.as_deref()) == Ok(port.protocol);
        (same_name && same_proto)
            .then_some(p.port)
            .flatten()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
    })
}

/// Endpoints of one Service port on the Multus networks `nets`
/// (qualified): for each ready endpoint of the Service's EndpointSlices
/// (of either address type: the slices only say which pods) that refers to
/// a Pod, the pod's addresses of `family` on those networks, with the
/// slice's target port. A pod without them is skipped with a warning; a
/// pod not known (yet) silently: its arrival re-plans the Service.
fn multus_endpoints(
    key: &ServiceKey,
    slices: &[EndpointSlice],
    pods: &dyn PodLookup,
    nets: &[String],
    family: IpFamily,
    port: &Port<'_>,
    warnings: &mut BTreeSet<String>,
) -> Vec<Endpoint> {
    let mut seen: BTreeSet<(&str, u16)> = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices {
        if !slice_of(slice, key) {
            continue;
        }
        let Some(target) = slice_target_port(slice, port) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let Some(pod) = multus::pod_ref(ep) else {
                warnings.insert(format!(
                    "endpoint {} of EndpointSlice {}/{} is not an endpoint of {key}: it has no targetRef to a Pod, and with {} the endpoints are the pods' addresses on those networks",
                    ep.addresses.first().map(String::as_str).unwrap_or("(no address)"),
                    key.namespace,
                    slice.metadata.name.as_deref().unwrap_or(""),
                    keys::MULTUS_NETS,
                ));
                continue;
            };
            // A dual-stack pod is in the IPv4 and the IPv6 slice.
            if !seen.insert((pod, target)) {
                continue;
            }
            let Some(status) = pods.network_status(&key.namespace, pod) else {
                continue;
            };
            match multus::pod_addresses(status, &key.namespace, nets, family) {
                Ok(ips) => out.extend(ips.into_iter().map(|ip| Endpoint {
                    ip,
                    port: target,
                    weight: 1,
                })),
                Err(p) => {
                    warnings.insert(p.describe(key, pod, nets));
                }
            }
        }
    }
    out
}

fn probe_for(
    ann: &ServiceAnnotations,
    mode: Mode,
    protocol: Protocol,
    monitor: bool,
    warnings: &mut BTreeSet<String>,
) -> Option<ProbeSpec> {
    if !monitor {
        return None;
    }
    let kind = ann.probe_type.unwrap_or(match mode {
        Mode::FullNat | Mode::OneArm => match protocol {
            Protocol::Tcp => ProbeKind::Tcp,
            Protocol::Udp => ProbeKind::Udp,
            Protocol::Sctp => ProbeKind::Sctp,
        },
        Mode::Default | Mode::Dsr | Mode::DsrIpip => ProbeKind::Ping,
    });
    if kind == ProbeKind::None {
        return None;
    }
    let params = ann.probe_port.is_some() || ann.probe_req.is_some() || ann.probe_resp.is_some();
    if ann.probe_type.is_none() && !kind.uses_port() && params {
        warnings.insert(format!(
            "{}, {} and {} have no effect: the probe is {kind} (the default for lbmode {mode}); set {}",
            keys::PROBE_PORT,
            keys::PROBE_REQ,
            keys::PROBE_RESP,
            keys::PROBE_TYPE
        ));
    }
    let uses = kind.uses_port();
    let timeout_s = ann
        .probe_timeout_s
        .unwrap_or(DEFAULT_PROBE_TIMEOUT_S)
        .max(1);
    Some(ProbeSpec {
        port: ann.probe_port.filter(|_| uses),
        request: ann.probe_req.clone().filter(|_| uses),
        response: ann.probe_resp.clone().filter(|_| uses),
        timeout: std::time::Duration::from_secs(timeout_s.into()),
        retries: ann.probe_retries.unwrap_or(DEFAULT_PROBE_RETRIES),
        ..ProbeSpec::new(kind)
    })
}

/// The `status.loadBalancer` to write: one ingress entry per VIP, in the
/// Service's family order, each with `ip` set.
///
/// Unlike kube-loxilb, which writes each address as a *hostname*
/// `<zone>-<ip>` (`llb-192.168.80.20`, the "EXTERNAL-IP" users see), the
/// entries are plain IPs: `kubectl get svc` shows the address, and tools
/// that read `ingress[].ip` (ExternalDNS, kube-proxy, Ingress controllers)
/// work. Secondary (SCTP multi-homing) addresses are not listed: clients
/// learn them from the SCTP association, and listing them would advertise
/// them for the TCP/UDP ports too. `ipMode` is left unset (the Kubernetes
/// default, `VIP`).
pub fn load_balancer_status(allocation: &Allocation) -> LoadBalancerStatus {
    load_balancer_status_as(allocation, &StatusForm::Ip)
}

/// kube-loxilb's status hostname of a VIP ([`StatusForm::Hostname`]): `<zone>-<ip>`
/// (`llb-192.168.80.20`); an IPv6 address has its colons written as dashes
/// (`llb-2001-db8--5`), in full when the short form would end with a dash
/// (`2001:db8::` is `llb-2001-db8-0-0-0-0-0-0`: a hostname cannot end with
/// `-`).
pub fn status_hostname(zone: &str, ip: IpAddr) -> String {
    let text = match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => {
            let short = a.to_string();
            if short.ends_with(':') {
                a.segments()
                    .iter()
                    .map(|s| format!("{s:x}"))
                    .collect::<Vec<_>>()
                    .join("-")
            } else {
                short.replace(':', "-")
            }
        }
    };
    format!("{zone}-{text}")
}

/// [`load_balancer_status`] in the given form.
pub fn load_balancer_status_as(allocation: &Allocation, form: &StatusForm) -> LoadBalancerStatus {
    // `ipMode: VIP`: traffic to the address may be short-cut to the
    // endpoints inside the cluster (kube-proxy's default); the ports are
    // those the address was allocated for.
    let ports: Vec<k8s_openapi::api::core::v1::PortStatus> = allocation
        .ports
        .iter()
        .map(|p| k8s_openapi::api::core::v1::PortStatus {
            port: p.port as i32,
            protocol: p.protocol.as_str().to_ascii_uppercase(),
            error: None,
        })
        .collect();
    LoadBalancerStatus {
        ingress: Some(
            allocation
                .vips
                .iter()
                .map(|a| {
                    let ports = if ports.is_empty() {
                        None
                    } else {
                        Some(ports.clone())
                    };
                    match form {
                        StatusForm::Ip => LoadBalancerIngress {
                            ip: Some(a.ip.to_string()),
                            ip_mode: Some("VIP".to_string()),
                            ports,
                            ..Default::default()
                        },
                        StatusForm::Hostname { zone } => LoadBalancerIngress {
                            hostname: Some(status_hostname(zone, a.ip)),
                            ports,
                            ..Default::default()
                        },
                    }
                })
                .collect(),
        ),
    }
}

/// Where a recorded allocation was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordSource {
    /// [`RECORD_ANNOTATION`]: the normal case.
    Annotation,
    /// No annotation; `status.loadBalancer.ingress` (plain IPs, or
    /// kube-loxilb's `llb-<ip>` hostnames when migrating from it), with the
    /// current spec's ports and no secondary addresses.
    Status,
}

/// The allocation recorded on a Service, if any.
pub fn recorded_allocation(
    svc: &Service,
) -> Result<Option<(AllocationRecord, RecordSource)>, TranslateError> {
    if let Some(text) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RECORD_ANNOTATION))
    {
        let rec = text.parse::<AllocationRecord>().map_err(|m| {
            invalid(
                format!("metadata.annotations[{RECORD_ANNOTATION}]"),
                text,
                m,
            )
        })?;
        return Ok(Some((rec, RecordSource::Annotation)));
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    let Some(ingress) = ingress.filter(|i| !i.is_empty()) else {
        return Ok(None);
    };
    let mut vips = Vec::new();
    for (i, entry) in ingress.iter().enumerate() {
        let field = format!("status.loadBalancer.ingress[{i}]");
        let ip = match (&entry.ip, &entry.hostname) {
            (Some(ip), _) => ip
                .parse::<IpAddr>()
                .map_err(|_| invalid(format!("{field}.ip"), ip, "not an IP address"))?,
            (None, Some(h)) => legacy_hostname(h).ok_or_else(|| {
                invalid(
                    format!("{field}.hostname"),
                    h,
                    "not an address this load balancer (or kube-loxilb's llb-<ip>) wrote",
                )
            })?,
            (None, None) => return Err(invalid(field, "", "neither ip nor hostname")),
        };
        vips.push(ip);
    }
    let rec = AllocationRecord {
        vips,
        secondary: Vec::new(),
        ports: ports(svc)?
            .iter()
            .map(|p| PortKey::new(p.port, p.protocol))
            .collect(),
    };
    rec.validate()
        .map_err(|m| invalid("status.loadBalancer.ingress", rec.to_string(), m))?;
    Ok(Some((rec, RecordSource::Status)))
}

/// kube-loxilb's status hostname in its default zone: `llb-<ip>`, IPv6
/// colons written as dashes.
fn legacy_hostname(h: &str) -> Option<IpAddr> {
    let rest = h.strip_prefix("llb-")?;
    rest.parse::<IpAddr>().ok().or_else(|| {
        rest.replace('-', ":")
            .parse::<IpAddr>()
            .ok()
            .filter(IpAddr::is_ipv6)
    })
}

/// The records to pass to [`crate::ipam::Ipam::rebuild`], from every
/// Service a new leader sees: only managed Services, oldest first
/// (`creationTimestamp`, a missing one counting as oldest, then
/// namespace/name), so on a conflict the older Service keeps its address. Also returns what the user should be told
/// (records not readable, records taken from the status).
pub fn records_from_services<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    config: &KubeConfig,
) -> (Vec<(ServiceKey, AllocationRecord)>, Vec<String>) {
    let mut managed: Vec<(&Service, ServiceKey)> = services
        .into_iter()
        .filter(|s| is_managed(s, &config.load_balancer_class))
        .filter_map(|s| service_key(s).ok().map(|k| (s, k)))
        .collect();
    managed.sort_by(|(a, ka), (b, kb)| {
        (&a.metadata.creation_timestamp, ka).cmp(&(&b.metadata.creation_timestamp, kb))
    });
    let mut records = Vec::new();
    let mut notes = Vec::new();
    for (svc, key) in managed {
        match recorded_allocation(svc) {
            Ok(Some((rec, RecordSource::Annotation))) => records.push((key, rec)),
            Ok(Some((rec, RecordSource::Status))) => {
                notes.push(format!(
                    "{key}: no {RECORD_ANNOTATION} annotation; adopted the addresses in status.loadBalancer.ingress ({})",
                    rec
                ));
                records.push((key, rec));
            }
            Ok(None) => {}
            Err(e) => notes.push(format!(
                "{key}: recorded allocation unreadable ({e}); the Service will be allocated again"
            )),
        }
    }
    (records, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{PoolRange, PoolSpec};
    use serde_json::{json, Value};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc_json(extra_spec: Value, annotations: Value) -> Service {
        let mut spec = json!({
            "type": "LoadBalancer",
            "loadBalancerClass": "loxilb.io/loxilb",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
        });
        for (k, v) in extra_spec.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "web", "annotations": annotations,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn svc(extra_spec: Value) -> Service {
        svc_json(extra_spec, json!({}))
    }

    fn node(name: &str, ips: &[&str], ready: bool, labels: Value) -> Node {
        let addrs: Vec<Value> = ips
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {
                "addresses": addrs,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        }))
        .unwrap()
    }

    /// A slice of `default/web`: (address, node, ready).
    fn slice(addr_type: &str, port: i32, eps: &[(&str, &str, Option<bool>)]) -> EndpointSlice {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(a, n, r)| {
                let mut e = json!({"addresses": [a], "nodeName": n});
                if let Some(r) = r {
                    e["conditions"] = json!({"ready": r});
                }
                e
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "web-abc",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": addr_type,
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn cfg() -> KubeConfig {
        KubeConfig {
            cidr_pools: vec![PoolSpec {
                name: DEFAULT_POOL.into(),
                range: PoolRange::Cidr("20.0.0.0/24".parse().unwrap()),
            }],
            cidr6_pools: vec![PoolSpec {
                name: DEFAULT_POOL.into(),
                range: PoolRange::Cidr("3ffe::/96".parse().unwrap()),
            }],
            ..KubeConfig::default()
        }
    }

    fn nodes() -> Vec<Node> {
        vec![
            node("n1", &["10.0.0.1", "fd00::1"], true, json!({})),
            node("n2", &["10.0.0.2", "fd00::2"], true, json!({})),
            node("n3", &["10.0.0.3"], false, json!({})),
            node("n4", &["10.0.0.4"], true, json!({EXCLUDE_LABEL: ""})),
        ]
    }

    fn slices() -> Vec<EndpointSlice> {
        vec![slice(
            "IPv4",
            8080,
            &[
                ("10.244.1.5", "n1", Some(true)),
                ("10.244.1.6", "n1", None),
                ("10.244.3.9", "n3", Some(false)),
                ("10.244.2.7", "n2", Some(false)),
            ],
        )]
    }

    /// Parse, request, allocate, translate: what the controller will do.
    fn run(
        s: &Service,
        sl: &[EndpointSlice],
        ns: &[Node],
        c: &KubeConfig,
    ) -> Result<Translation, String> {
        let ann = parse_annotations(s)
            .into_result()
            .map_err(|e| format!("{e:?}"))?
            .0;
        let (req, _) = alloc_request(s, &ann, c).map_err(|e| e.to_string())?;
        let mut ipam = c.ipam().unwrap();
        let alloc = ipam.ensure(&req).map_err(|e| e.to_string())?;
        translate(s, &ann, sl, ns, &alloc, c).map_err(|e| e.to_string())
    }

    fn eps(rule: &ServiceRule) -> Vec<String> {
        rule.rule
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.ip, e.port))
            .collect()
    }

    #[test]
    fn managed_services() {
        let c = cfg();
        assert!(is_managed(&svc(json!({})), &c.load_balancer_class));
        let e = managed(&svc(json!({"type": "NodePort"})), "loxilb.io/loxilb").unwrap_err();
        assert_eq!(e, "type is NodePort, not LoadBalancer");
        let e = managed(
            &svc(json!({"loadBalancerClass": "other.io/lb"})),
            "loxilb.io/loxilb",
        )
        .unwrap_err();
        assert!(e.contains("other.io/lb"));
        let e = managed(&svc(json!({"loadBalancerClass": null})), "loxilb.io/loxilb").unwrap_err();
        assert!(e.contains("no loadBalancerClass"));
        assert!(managed(&Service::default(), "x").is_err());
        let t = translate(
            &svc(json!({"type": "ClusterIP"})),
            &ServiceAnnotations::default(),
            &[],
            &[],
            &Allocation {
                service: ServiceKey::new("default", "web"),
                vips: vec![],
                secondary: vec![],
                ports: BTreeSet::new(),
            },
            &c,
        );
        assert!(matches!(t, Err(TranslateError::NotManaged(_))));
    }

    #[test]
    fn default_rule_uses_ready_non_excluded_nodes() {
        let t = run(&svc(json!({})), &slices(), &nodes(), &cfg()).unwrap();
        assert_eq!(t.rules.len(), 1);
        let r = &t.rules[0];
        assert_eq!(r.rule.name, "default/web:80/tcp@20.0.0.1");
        assert_eq!(r.service, ServiceKey::new("default", "web"));
        assert_eq!(r.rule.vip, ip("20.0.0.1"));
        assert_eq!((r.rule.port, r.rule.protocol), (80, Protocol::Tcp));
        assert_eq!(r.rule.mode, Mode::Default);
        assert_eq!(r.rule.selection, Selection::RoundRobin);
        assert_eq!(r.rule.timeout_s, 1800);
        // n3 NotReady, n4 excluded by label; Cluster policy: n2 stays.
        assert_eq!(eps(r), vec!["10.0.0.1:30080", "10.0.0.2:30080"]);
        assert!(r.rule.endpoints.iter().all(|e| e.weight == 1));
        assert!(r.rule.source_ranges.is_empty());
        assert_eq!(r.rule.probe, None);
        assert!(r.rule.secondary_vips.is_empty());
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn external_traffic_policy_local_keeps_nodes_with_ready_local_endpoints() {
        let s = svc(json!({"externalTrafficPolicy": "Local"}));
        let t = run(&s, &slices(), &nodes(), &cfg()).unwrap();
        assert!(
            t.rules.iter().all(|r| r.rule.announce_local_only),
            "ETP Local marks the rules local-traffic"
        );
        let cluster = run(&svc(json!({})), &slices(), &nodes(), &cfg()).unwrap();
        assert!(cluster.rules.iter().all(|r| !r.rule.announce_local_only));
        // n1 has ready pods; n2's pod is not ready; n3's node is NotReady.
        assert_eq!(eps(&t.rules[0]), vec!["10.0.0.1:30080"]);
        // No ready endpoint anywhere: a rule without endpoints.
        let t = run(&s, &[], &nodes(), &cfg()).unwrap();
        assert!(t.rules[0].rule.endpoints.is_empty());
        // A local ready pod on an excluded node does not bring it back.
        let sl = vec![slice("IPv4", 8080, &[("10.244.4.1", "n4", Some(true))])];
        assert!(run(&s, &sl, &nodes(), &cfg()).unwrap().rules[0]
            .rule
            .endpoints
            .is_empty());
    }

    #[test]
    fn nodes_without_a_true_ready_condition_are_skipped() {
        let unknown: Node = serde_json::from_value(json!({
            "metadata": {"name": "u"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.8"}],
                       "conditions": [{"type": "Ready", "status": "Unknown"}]},
        }))
        .unwrap();
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "b"}})).unwrap();
        let external_only: Node = serde_json::from_value(json!({
            "metadata": {"name": "e"},
            "status": {"addresses": [{"type": "ExternalIP", "address": "198.51.100.9"}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        let t = run(
            &svc(json!({})),
            &slices(),
            &[unknown, bare, external_only],
            &cfg(),
        )
        .unwrap();
        assert!(t.rules[0].rule.endpoints.is_empty());
        assert_eq!(
            t.warnings,
            vec!["node e has no IPv4 InternalIP; it is not an endpoint of default/web"]
        );
    }

    #[test]
    fn pod_network_ignores_node_filters_and_traffic_policy() {
        let s = svc_json(
            json!({"externalTrafficPolicy": "Local"}),
            json!({"loxilb.io/usepodnetwork": "yes"}),
        );
        let sl = vec![slice(
            "IPv4",
            8080,
            &[("10.244.4.1", "n4", None), ("10.244.9.9", "gone", None)],
        )];
        let t = run(&s, &sl, &nodes(), &cfg()).unwrap();
        assert_eq!(eps(&t.rules[0]), vec!["10.244.4.1:8080", "10.244.9.9:8080"]);
    }

    #[test]
    fn service_without_annotations() {
        let mut s = svc(json!({}));
        s.metadata.annotations = None;
        assert_eq!(parse_annotations(&s), ParsedAnnotations::default());
        assert_eq!(run(&s, &slices(), &nodes(), &cfg()).unwrap().rules.len(), 1);
    }

    #[test]
    fn pod_network_endpoints() {
        let s = svc_json(json!({}), json!({"loxilb.io/usepodnetwork": "yes"}));
        let t = run(&s, &slices(), &nodes(), &cfg()).unwrap();
        assert_eq!(eps(&t.rules[0]), vec!["10.244.1.5:8080", "10.244.1.6:8080"]);
        // The flag does the same, and the annotation overrides it.
        let c = KubeConfig {
            use_pod_network: true,
            ..cfg()
        };
        assert_eq!(
            run(&svc(json!({})), &slices(), &nodes(), &c).unwrap().rules[0]
                .rule
                .endpoints
                .len(),
            2
        );
        let s = svc_json(json!({}), json!({"loxilb.io/usepodnetwork": "no"}));
        assert_eq!(
            eps(&run(&s, &slices(), &nodes(), &c).unwrap().rules[0])[0],
            "10.0.0.1:30080"
        );
        // Without nodePorts only the pod network works.
        let s = svc(json!({"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}));
        let e = run(&s, &slices(), &nodes(), &cfg()).unwrap_err();
        assert!(
            e.contains("spec.ports[0].nodePort") && e.contains("usepodnetwork"),
            "{e}"
        );
        assert_eq!(
            run(&s, &slices(), &nodes(), &c).unwrap().rules[0]
                .rule
                .endpoints
                .len(),
            2
        );
    }

    #[test]
    fn endpoint_slices_are_matched_by_service_port_and_family() {
        let c = KubeConfig {
            use_pod_network: true,
            ..cfg()
        };
        let mut other_svc = slice("IPv4", 8080, &[("10.9.9.9", "n1", None)]);
        other_svc
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(SERVICE_NAME_LABEL.into(), "other".into());
        let mut other_ns = slice("IPv4", 8080, &[("10.9.9.8", "n1", None)]);
        other_ns.metadata.namespace = Some("kube-system".into());
        let mut other_port: EndpointSlice = slice("IPv4", 9090, &[("10.9.9.7", "n1", None)]);
        other_port.ports.as_mut().unwrap()[0].name = Some("metrics".into());
        let v6 = slice("IPv6", 8080, &[("fd00:244::1", "n1", None)]);
        let dup = slice("IPv4", 8080, &[("10.244.1.5", "n1", Some(true))]);
        let mut sl = slices();
        sl.extend([other_svc, other_ns, other_port, v6, dup]);
        let t = run(&svc(json!({})), &sl, &nodes(), &c).unwrap();
        assert_eq!(eps(&t.rules[0]), vec!["10.244.1.5:8080", "10.244.1.6:8080"]);
    }

    #[test]
    fn one_rule_per_port_and_protocol() {
        let s = svc(json!({"ports": [
            {"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"},
            {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"},
            {"name": "ngap", "port": 38412, "nodePort": 30412, "protocol": "SCTP"},
        ]}));
        let t = run(&s, &slices(), &nodes(), &cfg()).unwrap();
        let keys: Vec<(u16, Protocol, u16)> = t
            .rules
            .iter()
            .map(|r| (r.rule.port, r.rule.protocol, r.rule.endpoints[0].port))
            .collect();
        assert_eq!(
            keys,
            vec![
                (80, Protocol::Tcp, 30080),
                (53, Protocol::Udp, 30053),
                (38412, Protocol::Sctp, 30412)
            ]
        );
        let e = run(
            &svc(json!({"ports": [{"port": 80, "nodePort": 1, "protocol": "ICMP"}]})),
            &[],
            &[],
            &cfg(),
        )
        .unwrap_err();
        assert!(
            e.contains("spec.ports[0].protocol") && e.contains("TCP, UDP, SCTP"),
            "{e}"
        );
        let e = run(
            &svc(json!({"ports": [{"port": 70000, "nodePort": 1}]})),
            &[],
            &[],
            &cfg(),
        )
        .unwrap_err();
        assert!(e.contains("spec.ports[0].port"), "{e}");
    }

    #[test]
    fn annotations_and_flags_set_mode_selection_timeout() {
        let s = svc_json(
            json!({}),
            json!({"loxilb.io/lbmode": "dsr", "loxilb.io/epselect": "persist", "loxilb.io/timeout": "60"}),
        );
        let r = &run(&s, &slices(), &nodes(), &cfg()).unwrap().rules[0];
        assert_eq!(
            (r.rule.mode, r.rule.selection, r.rule.timeout_s),
            (Mode::Dsr, Selection::Persist, 60)
        );
        let c = KubeConfig {
            lb_mode: Mode::FullNat,
            ..cfg()
        };
        assert_eq!(
            run(&svc(json!({})), &slices(), &nodes(), &c).unwrap().rules[0]
                .rule
                .mode,
            Mode::FullNat
        );
        let s = svc_json(json!({}), json!({"loxilb.io/lbmode": "onearm"}));
        assert_eq!(
            run(&s, &slices(), &nodes(), &c).unwrap().rules[0].rule.mode,
            Mode::OneArm
        );
    }

    #[test]
    fn probe_defaults() {
        // Not monitored: no probe.
        assert_eq!(
            run(&svc(json!({})), &slices(), &nodes(), &cfg())
                .unwrap()
                .rules[0]
                .rule
                .probe,
            None
        );
        // liveness on, default mode: ping, 60 s, 2 retries.
        let s = svc_json(json!({}), json!({"loxilb.io/liveness": "yes"}));
        let p = run(&s, &slices(), &nodes(), &cfg()).unwrap().rules[0]
            .rule
            .probe
            .clone()
            .unwrap();
        assert_eq!(
            p,
            ProbeSpec {
                timeout: std::time::Duration::from_secs(60),
                retries: 2,
                ..ProbeSpec::new(ProbeKind::Ping)
            }
        );
        // fullnat via --monitor: the port's protocol, per rule.
        let c = KubeConfig {
            monitor: true,
            ..cfg()
        };
        let s = svc_json(
            json!({"ports": [
                {"name": "http", "port": 80, "nodePort": 30080},
                {"name": "sig", "port": 38412, "nodePort": 30412, "protocol": "SCTP"},
            ]}),
            json!({"loxilb.io/lbmode": "fullnat"}),
        );
        let t = run(&s, &slices(), &nodes(), &c).unwrap();
        assert_eq!(t.rules[0].rule.probe.as_ref().unwrap().kind, ProbeKind::Tcp);
        assert_eq!(
            t.rules[1].rule.probe.as_ref().unwrap().kind,
            ProbeKind::Sctp
        );
        // liveness: no overrides --monitor; probetype none turns it off.
        let s = svc_json(json!({}), json!({"loxilb.io/liveness": "no"}));
        assert_eq!(
            run(&s, &slices(), &nodes(), &c).unwrap().rules[0]
                .rule
                .probe,
            None
        );
        let s = svc_json(json!({}), json!({"loxilb.io/probetype": "none"}));
        let t = run(&s, &slices(), &nodes(), &c).unwrap();
        assert_eq!(t.rules[0].rule.probe, None);
        assert!(t.warnings.is_empty());
    }

    #[test]
    fn probe_annotations() {
        let s = svc_json(
            json!({}),
            json!({"loxilb.io/liveness": "yes", "loxilb.io/probetype": "http", "loxilb.io/probeport": "3000",
                   "loxilb.io/probereq": "/health", "loxilb.io/proberesp": "ok",
                   "loxilb.io/probetimeout": "10", "loxilb.io/proberetries": "3"}),
        );
        let p = run(&s, &slices(), &nodes(), &cfg()).unwrap().rules[0]
            .rule
            .probe
            .clone()
            .unwrap();
        assert_eq!(
            p,
            ProbeSpec {
                port: Some(3000),
                request: Some("/health".into()),
                response: Some("ok".into()),
                timeout: std::time::Duration::from_secs(10),
                retries: 3,
                ..ProbeSpec::new(ProbeKind::Http)
            }
        );
        // Probe annotations without liveness or --monitor: warned.
        let s = svc_json(json!({}), json!({"loxilb.io/probetype": "tcp"}));
        let t = run(&s, &slices(), &nodes(), &cfg()).unwrap();
        assert_eq!(t.rules[0].rule.probe, None);
        assert!(
            t.warnings[0].contains("not probed") && t.warnings[0].contains("--monitor"),
            "{:?}",
            t.warnings
        );
        // A probe port with the default ping probe: warned, not used.
        let s = svc_json(
            json!({}),
            json!({"loxilb.io/liveness": "yes", "loxilb.io/probeport": "81"}),
        );
        let t = run(&s, &slices(), &nodes(), &cfg()).unwrap();
        let p = t.rules[0].rule.probe.as_ref().unwrap();
        assert_eq!((p.kind, p.port), (ProbeKind::Ping, None));
        assert_eq!(t.warnings.len(), 1);
        assert!(t.warnings[0].contains("the probe is ping (the default for lbmode default)"));
    }

    #[test]
    fn source_ranges_of_the_vips_family_or_nobody() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(source_ranges(None, IpFamily::V6).is_empty(), "every client");
        let given = [
            net("10.0.0.0/8"),
            net("2001:db8:77::/48"),
            net("10.0.0.0/8"),
        ];
        assert_eq!(
            source_ranges(Some(&given), IpFamily::V4),
            vec![net("10.0.0.0/8")]
        );
        assert_eq!(
            source_ranges(Some(&given), IpFamily::V6),
            vec![net("2001:db8:77::/48")]
        );
        assert_eq!(
            source_ranges(Some(&given[..1]), IpFamily::V6),
            vec![net("::/128")],
            "only the other family's: nobody"
        );
    }

    /// A rule as translate makes them: fullnat, lc, one node endpoint.
    fn service_rule() -> ServiceRule {
        let mut rule = Rule::new(ip("20.0.0.1"), 80, Protocol::Tcp);
        rule.name = "default/web:80/tcp@20.0.0.1".into();
        rule.mode = Mode::FullNat;
        rule.selection = Selection::LeastConn;
        rule.endpoints = vec![Endpoint {
            ip: ip("10.0.0.5"),
            port: 30080,
            weight: 2,
        }];
        ServiceRule {
            service: ServiceKey::new("default", "web"),
            rule,
        }
    }

    /// What the datapath cannot do is refused, saying why and what to
    /// change on the Service.
    #[test]
    fn refuses_what_the_datapath_cannot_do_and_says_why() {
        service_rule().supported().unwrap();
        let mut r = service_rule();
        r.rule.endpoints[0].ip = ip("2001:db8::5");
        let e = r.supported().unwrap_err();
        assert!(
            e.contains("NAT46") && e.contains("2001:db8::5") && e.contains("loxilb.io/ipam"),
            "{e}"
        );
        let mut r = service_rule();
        r.rule.vip = ip("2001:db8::1");
        r.rule.endpoints = vec![
            Endpoint {
                ip: ip("2001:db8::5"),
                port: 1,
                weight: 1,
            },
            Endpoint {
                ip: ip("10.0.0.6"),
                port: 1,
                weight: 1,
            },
        ];
        let e = r.supported().unwrap_err();
        assert!(
            e.contains("different families") && e.contains("ipFamilies"),
            "{e}"
        );
        let mut r = service_rule();
        r.rule.vip = ip("2001:db8::1");
        r.rule.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
        r.rule.endpoints.clear();
        let e = r.supported().unwrap_err();
        assert!(e.contains("IPv4 on an IPv6 rule"), "{e}");
        let mut r = service_rule();
        r.rule.mode = Mode::Dsr;
        let e = r.supported().unwrap_err();
        assert!(
            e.contains("service port 80") && e.contains("loxilb.io/usepodnetwork"),
            "{e}"
        );
        // NAT64: not in DSR, not for SCTP.
        let mut r = service_rule();
        r.rule.vip = ip("2001:db8::1");
        r.supported().unwrap();
        r.rule.mode = Mode::Dsr;
        r.rule.endpoints[0].port = 80;
        let e = r.supported().unwrap_err();
        assert!(
            e.contains("NAT64") && e.contains("another loxilb.io/lbmode"),
            "{e}"
        );
        r.rule.mode = Mode::Default;
        r.rule.protocol = Protocol::Sctp;
        let e = r.supported().unwrap_err();
        assert!(e.contains("SCTP is not translated"), "{e}");
        // A bad probe setting (tcp sends no request).
        let mut r = service_rule();
        let mut p = ProbeSpec::new(ProbeKind::Tcp);
        p.request = Some("/health".into());
        r.rule.probe = Some(p);
        let e = r.supported().unwrap_err();
        assert!(
            e.contains("probe request") && e.contains("loxilb.io/probe"),
            "{e}"
        );
    }

    #[test]
    fn sctp_secondary_vips_in_default_and_fullnat_mode_only() {
        let mut r = service_rule();
        r.rule.protocol = Protocol::Sctp;
        r.rule.mode = Mode::Default;
        r.rule.secondary_vips = vec![ip("30.0.0.2"), ip("31.0.0.2")];
        r.supported().unwrap();
        r.rule.mode = Mode::FullNat;
        r.supported().unwrap();
        for mode in [Mode::OneArm, Mode::Dsr] {
            let mut r = r.clone();
            r.rule.mode = mode;
            r.rule.endpoints[0].port = 80;
            let e = r.supported().unwrap_err();
            assert!(
                e.contains("multihoming")
                    && e.contains("mode default (DNAT) and fullnat")
                    && e.contains("set loxilb.io/lbmode: default or fullnat"),
                "{mode:?}: {e}"
            );
        }
        // More than the datapath holds; another family; a repeat.
        r.rule.secondary_vips = (1..=4).map(|i| ip(&format!("30.0.0.{i}"))).collect();
        assert!(r.supported().unwrap_err().contains("at most 3"));
        r.rule.secondary_vips = vec![ip("2001:db8::2")];
        assert!(r.supported().unwrap_err().contains("one family"));
        r.rule.secondary_vips = vec![ip("30.0.0.2"), ip("30.0.0.2")];
        assert!(r.supported().unwrap_err().contains("listed twice"));
        r.rule.secondary_vips = vec![r.rule.vip];
        assert!(r.supported().unwrap_err().contains("listed twice"));
        // Not SCTP (translate gives secondaries to SCTP rules only, but
        // one is never installed silently without them).
        r.rule.protocol = Protocol::Tcp;
        r.rule.secondary_vips = vec![ip("30.0.0.2")];
        let e = r.supported().unwrap_err();
        assert!(
            e.contains("only SCTP") && e.contains("remove loxilb.io/secondaryIPs"),
            "{e}"
        );
    }

    #[test]
    fn load_balancer_source_ranges() {
        let s = svc(
            json!({"loadBalancerSourceRanges": ["192.0.2.1/24", " 198.51.100.0/25", "2001:db8::/32"]}),
        );
        let r = &run(&s, &slices(), &nodes(), &cfg()).unwrap().rules[0];
        assert_eq!(
            r.rule.source_ranges,
            vec![
                "192.0.2.0/24".parse::<IpNet>().unwrap(),
                "198.51.100.0/25".parse().unwrap()
            ]
        );
        // Only IPv6 prefixes for an IPv4 VIP: nobody, not everybody.
        let s = svc(json!({"loadBalancerSourceRanges": ["2001:db8::/32"]}));
        assert_eq!(
            run(&s, &slices(), &nodes(), &cfg()).unwrap().rules[0]
                .rule
                .source_ranges,
            vec!["0.0.0.0/32".parse::<IpNet>().unwrap()]
        );
        let s = svc(json!({"loadBalancerSourceRanges": []}));
        assert!(run(&s, &slices(), &nodes(), &cfg()).unwrap().rules[0]
            .rule
            .source_ranges
            .is_empty());
        let s = svc(json!({"loadBalancerSourceRanges": ["10.0.0.0/8", "everyone"]}));
        let e = run(&s, &slices(), &nodes(), &cfg()).unwrap_err();
        assert!(
            e.contains("spec.loadBalancerSourceRanges[1]") && e.contains("\"everyone\""),
            "{e}"
        );
    }

    #[test]
    fn dual_stack_and_families() {
        let sl = vec![
            slice("IPv4", 8080, &[("10.244.1.5", "n1", None)]),
            slice("IPv6", 8080, &[("fd00:244::5", "n2", None)]),
        ];
        let s = svc(json!({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "PreferDualStack"}));
        let t = run(&s, &sl, &nodes(), &cfg()).unwrap();
        assert_eq!(t.rules.len(), 2);
        assert_eq!(t.rules[0].rule.vip, ip("3ffe::1"));
        assert_eq!(eps(&t.rules[0]), vec!["fd00::1:30080", "fd00::2:30080"]);
        assert_eq!(t.rules[1].rule.vip, ip("20.0.0.1"));
        assert_eq!(eps(&t.rules[1]), vec!["10.0.0.1:30080", "10.0.0.2:30080"]);
        // Pod network, IPv6 only.
        let s = svc_json(
            json!({"ipFamilies": ["IPv6"]}),
            json!({"loxilb.io/usepodnetwork": "yes"}),
        );
        let t = run(&s, &sl, &nodes(), &cfg()).unwrap();
        assert_eq!(
            eps(&t.rules[0]),
            vec!["[fd00:244::5]:8080".replace(['[', ']'], "")]
        );
        // The annotation wins over ipFamilies.
        let s = svc_json(
            json!({"ipFamilies": ["IPv6", "IPv4"]}),
            json!({"loxilb.io/ipam": "ipv4"}),
        );
        assert_eq!(run(&s, &sl, &nodes(), &cfg()).unwrap().rules.len(), 1);
        let e = run(&svc(json!({"ipFamilies": ["IPv5"]})), &sl, &nodes(), &cfg()).unwrap_err();
        assert!(e.contains("spec.ipFamilies[0]"));
    }

    #[test]
    fn nat64_uses_ipv4_endpoints_behind_an_ipv6_vip() {
        let s = svc_json(json!({}), json!({"loxilb.io/ipam": "nat64"}));
        let t = run(&s, &slices(), &nodes(), &cfg()).unwrap();
        assert_eq!(t.rules[0].rule.vip, ip("3ffe::1"));
        assert_eq!(eps(&t.rules[0]), vec!["10.0.0.1:30080", "10.0.0.2:30080"]);
        // ipv6 (nat66): IPv6 node addresses; n4 (excluded) and n3 (not
        // ready) are skipped before their missing IPv6 address matters.
        let s = svc_json(json!({}), json!({"loxilb.io/ipam": "ipv6"}));
        let mut ns = nodes();
        ns.push(node("n5", &["10.0.0.5"], true, json!({})));
        let t = run(&s, &slices(), &ns, &cfg()).unwrap();
        assert_eq!(eps(&t.rules[0]), vec!["fd00::1:30080", "fd00::2:30080"]);
        assert_eq!(
            t.warnings,
            vec!["node n5 has no IPv6 InternalIP; it is not an endpoint of default/web"]
        );
    }

    #[test]
    fn secondary_vips_on_sctp_rules() {
        let c = KubeConfig {
            secondary_pools: vec![PoolSpec {
                name: "sec".into(),
                range: PoolRange::Cidr("30.0.0.0/24".parse().unwrap()),
            }],
            ..cfg()
        };
        let s = svc_json(
            json!({"ports": [
                {"name": "http", "port": 80, "nodePort": 30080},
                {"name": "sig", "port": 38412, "nodePort": 30412, "protocol": "SCTP"},
            ]}),
            json!({"loxilb.io/poolSelectSecondary": "sec"}),
        );
        let t = run(&s, &slices(), &nodes(), &c).unwrap();
        assert!(t.rules[0].rule.secondary_vips.is_empty(), "TCP rule");
        assert_eq!(t.rules[1].rule.secondary_vips, vec![ip("30.0.0.1")]);

        let s = svc_json(
            json!({}),
            json!({"loxilb.io/secondaryIPs": "1.1.1.1,2.2.2.2"}),
        );
        let ann = parse_annotations(&s).values;
        let (req, warnings) = alloc_request(&s, &ann, &c).unwrap();
        assert_eq!(req.secondary, SecondaryRequest::None);
        assert!(
            warnings[0].contains("loxilb.io/secondaryIPs: has no effect")
                && warnings[0].contains("no SCTP port")
        );
    }

    #[test]
    fn alloc_request_fields() {
        let c = cfg();
        let s = svc_json(
            json!({"ports": [
                {"port": 80, "nodePort": 30080},
                {"port": 80, "nodePort": 30081, "protocol": "UDP"},
                {"port": 38412, "nodePort": 30412, "protocol": "SCTP"},
            ]}),
            json!({"loxilb.io/poolSelect": "pool1", "loxilb.io/secondaryIPs": "1.1.1.1"}),
        );
        let ann = parse_annotations(&s).values;
        let (req, warnings) = alloc_request(&s, &ann, &c).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(req.service, ServiceKey::new("default", "web"));
        assert_eq!(req.pool, "pool1");
        assert_eq!(req.families, vec![IpFamily::V4]);
        assert_eq!(req.static_ip, None);
        assert_eq!(
            req.ports,
            [
                PortKey::new(80, Protocol::Tcp),
                PortKey::new(80, Protocol::Udp),
                PortKey::new(38412, Protocol::Sctp)
            ]
            .into()
        );
        assert_eq!(req.secondary, SecondaryRequest::Ips(vec![ip("1.1.1.1")]));
        let (req, _) = alloc_request(&svc(json!({})), &ServiceAnnotations::default(), &c).unwrap();
        assert_eq!(req.pool, DEFAULT_POOL);
        let e = alloc_request(
            &svc(json!({"type": "NodePort"})),
            &ServiceAnnotations::default(),
            &c,
        )
        .unwrap_err();
        assert!(matches!(e, TranslateError::NotManaged(_)));
        let mut nameless = svc(json!({}));
        nameless.metadata.namespace = None;
        assert!(alloc_request(&nameless, &ServiceAnnotations::default(), &c)
            .unwrap_err()
            .to_string()
            .contains("metadata.namespace"));
    }

    #[test]
    fn static_ip_from_annotation_or_load_balancer_ip() {
        let c = cfg();
        let req = |s: &Service| alloc_request(s, &parse_annotations(s).values, &c);
        let s = svc(json!({"loadBalancerIP": "192.0.2.10"}));
        assert_eq!(req(&s).unwrap().0.static_ip, Some(ip("192.0.2.10")));
        let s = svc_json(json!({}), json!({"loxilb.io/staticIP": "192.0.2.11"}));
        assert_eq!(req(&s).unwrap().0.static_ip, Some(ip("192.0.2.11")));
        let s = svc_json(
            json!({"loadBalancerIP": "192.0.2.11"}),
            json!({"loxilb.io/staticIP": "192.0.2.11"}),
        );
        assert_eq!(req(&s).unwrap().0.static_ip, Some(ip("192.0.2.11")));
        let s = svc_json(
            json!({"loadBalancerIP": "192.0.2.10"}),
            json!({"loxilb.io/staticIP": "192.0.2.11"}),
        );
        let e = req(&s).unwrap_err().to_string();
        assert_eq!(
            e,
            "loxilb.io/staticIP: \"192.0.2.11\": differs from spec.loadBalancerIP (192.0.2.10); \
             give the VIP in one place, or the same address in both"
        );
        let s = svc(json!({"loadBalancerIP": "nope"}));
        assert!(req(&s)
            .unwrap_err()
            .to_string()
            .starts_with("spec.loadBalancerIP: \"nope\""));
        // Outside every pool: allocated and recorded as such.
        let s = svc_json(json!({}), json!({"loxilb.io/staticIP": "192.168.255.254"}));
        let t = run(&s, &slices(), &nodes(), &c).unwrap();
        assert_eq!(t.rules[0].rule.vip, ip("192.168.255.254"));
    }

    /// A slice of `default/web` whose endpoints refer to pods: (pod IP,
    /// pod name or none, ready).
    fn pod_slice(
        addr_type: &str,
        port: i32,
        eps: &[(&str, Option<&str>, Option<bool>)],
    ) -> EndpointSlice {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(a, pod, r)| {
                let mut e = json!({"addresses": [a], "nodeName": "n1"});
                if let Some(p) = pod {
                    e["targetRef"] = json!({"kind": "Pod", "namespace": "default", "name": p});
                }
                if let Some(r) = r {
                    e["conditions"] = json!({"ready": r});
                }
                e
            })
            .collect();
        let mut sl = slice(addr_type, port, &[]);
        sl.endpoints = serde_json::from_value(json!(endpoints)).unwrap();
        sl.metadata.name = Some(format!("web-{}", addr_type.to_lowercase()));
        sl
    }

    fn pods(list: &[(&str, Option<Value>)]) -> BTreeMap<(String, String), Option<String>> {
        list.iter()
            .map(|(n, v)| {
                (
                    ("default".to_string(), n.to_string()),
                    v.as_ref().map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }),
                )
            })
            .collect()
    }

    fn run_pods(
        s: &Service,
        sl: &[EndpointSlice],
        p: &dyn PodLookup,
    ) -> Result<Translation, String> {
        let c = cfg();
        let ann = parse_annotations(s)
            .into_result()
            .map_err(|e| format!("{e:?}"))?
            .0;
        let (req, _) = alloc_request(s, &ann, &c).map_err(|e| e.to_string())?;
        let alloc = c.ipam().unwrap().ensure(&req).map_err(|e| e.to_string())?;
        translate_with_pods(s, &ann, sl, &nodes(), p, &alloc, &c).map_err(|e| e.to_string())
    }

    fn status(nets: &[(&str, &[&str])]) -> Option<Value> {
        let mut v = vec![
            json!({"name": "cbr0", "interface": "eth0", "ips": ["10.244.1.99"], "default": true}),
        ];
        for (i, (n, ips)) in nets.iter().enumerate() {
            v.push(json!({"name": n, "interface": format!("net{}", i + 1), "ips": ips}));
        }
        Some(json!(v))
    }

    #[test]
    fn multus_endpoints_are_the_pods_secondary_addresses() {
        // No nodePort needed: the endpoints are pod addresses.
        let s = svc_json(
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
            json!({"loxilb.io/multus-nets": "macvlan1"}),
        );
        let sl = vec![pod_slice(
            "IPv4",
            8080,
            &[
                ("10.244.1.5", Some("web-1"), Some(true)),
                ("10.244.1.6", Some("web-2"), None),
                ("10.244.1.7", Some("web-3"), Some(false)),
                ("10.244.1.8", Some("web-4"), Some(true)),
            ],
        )];
        let p = pods(&[
            ("web-1", status(&[("default/macvlan1", &["192.168.50.5"])])),
            // Several IPs on the network, and an IPv6 one (not this rule's).
            (
                "web-2",
                status(&[(
                    "default/macvlan1",
                    &["192.168.50.6", "192.168.50.16", "fd00:50::6"],
                )]),
            ),
            // Not ready: not an endpoint, whatever its networks.
            ("web-3", status(&[("default/macvlan1", &["192.168.50.7"])])),
            // web-4: not known yet (no warning; its event re-plans).
        ]);
        let t = run_pods(&s, &sl, &p).unwrap();
        assert_eq!(
            eps(&t.rules[0]),
            vec![
                "192.168.50.5:8080",
                "192.168.50.6:8080",
                "192.168.50.16:8080"
            ]
        );
        assert!(!t.rules[0].rule.announce_local_only);
        assert!(t.endpoint_warnings.is_empty(), "{:?}", t.endpoint_warnings);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        // Without a pod lookup nobody is known: no endpoints, no warnings.
        let t = run_pods(&s, &sl, &NoPods).unwrap();
        assert!(t.rules[0].rule.endpoints.is_empty());
        assert!(t.endpoint_warnings.is_empty());
    }

    #[test]
    fn multus_pods_without_an_address_are_told() {
        let s = svc_json(
            json!({}),
            json!({"loxilb.io/multus-nets": "macvlan1, other/net2"}),
        );
        let sl = vec![pod_slice(
            "IPv4",
            8080,
            &[
                ("10.244.1.1", Some("good"), None),
                ("10.244.1.2", Some("missing"), None),
                ("10.244.1.3", Some("malformed"), None),
                ("10.244.1.4", Some("elsewhere"), None),
                ("10.244.1.5", Some("in-other-ns"), None),
                ("10.244.1.6", None, None),
            ],
        )];
        let p = pods(&[
            ("good", status(&[("default/macvlan1", &["192.168.50.1"])])),
            ("missing", None),
            (
                "malformed",
                Some(json!(
                    "[{\"name\": \"default/macvlan1\", \"ips\": [\"300.1.1.1\"]}]"
                )),
            ),
            (
                "elsewhere",
                status(&[("default/macvlan2", &["192.168.51.4"])]),
            ),
            // other/net2: named with its namespace in the Service.
            ("in-other-ns", status(&[("other/net2", &["192.168.52.5"])])),
        ]);
        let t = run_pods(&s, &sl, &p).unwrap();
        assert_eq!(
            eps(&t.rules[0]),
            vec!["192.168.50.1:8080", "192.168.52.5:8080"]
        );
        let w = &t.endpoint_warnings;
        assert_eq!(w.len(), 4, "{w:#?}");
        let has = |pod: &str, part: &str| {
            w.iter().any(|x| {
                x.starts_with(&format!(
                    "pod default/{pod} is not an endpoint of default/web: "
                )) && x.contains(part)
            })
        };
        assert!(
            has(
                "missing",
                "has no k8s.v1.cni.cncf.io/network-status annotation"
            ),
            "{w:#?}"
        );
        assert!(
            has("malformed", "annotation is malformed: entry 0 (default/macvlan1): \"300.1.1.1\" in `ips` is not an IP address"),
            "{w:#?}"
        );
        assert!(
            has("elsewhere", "no IPv4 address on default/macvlan1, other/net2 in its k8s.v1.cni.cncf.io/network-status (networks there: cbr0 (IPv4), default/macvlan2 (IPv4))"),
            "{w:#?}"
        );
        assert!(
            w.iter().any(|x| x.starts_with("endpoint 10.244.1.6 of EndpointSlice default/web-ipv4 is not an endpoint of default/web: it has no targetRef to a Pod")),
            "{w:#?}"
        );
    }

    #[test]
    fn multus_ipv6_and_dual_stack() {
        // A dual-stack pod is in both slices: one endpoint per address.
        let sl = vec![
            pod_slice("IPv4", 8080, &[("10.244.1.5", Some("web-1"), None)]),
            pod_slice("IPv6", 8080, &[("fd00:244::5", Some("web-1"), None)]),
        ];
        let p = pods(&[(
            "web-1",
            status(&[(
                "default/macvlan1",
                &["192.168.50.5", "fd00:50::5", "fd00:50::55"],
            )]),
        )]);
        let s = svc_json(
            json!({"ipFamilies": ["IPv6", "IPv4"]}),
            json!({"loxilb.io/multus-nets": "default/macvlan1"}),
        );
        let t = run_pods(&s, &sl, &p).unwrap();
        assert_eq!(t.rules[0].rule.vip, ip("3ffe::1"));
        assert_eq!(
            eps(&t.rules[0]),
            vec!["fd00:50::5:8080", "fd00:50::55:8080"]
        );
        assert_eq!(eps(&t.rules[1]), vec!["192.168.50.5:8080"]);
        // IPv6 only, the pod without an IPv6 address on the network: told.
        let p4 = pods(&[("web-1", status(&[("default/macvlan1", &["192.168.50.5"])]))]);
        let s = svc_json(
            json!({"ipFamilies": ["IPv6"]}),
            json!({"loxilb.io/multus-nets": "macvlan1"}),
        );
        let t = run_pods(&s, &sl, &p4).unwrap();
        assert!(t.rules[0].rule.endpoints.is_empty());
        assert!(
            t.endpoint_warnings[0].contains("no IPv6 address on default/macvlan1"),
            "{:?}",
            t.endpoint_warnings
        );
        // NAT64: IPv6 VIP, the pods' IPv4 secondary addresses.
        let s = svc_json(
            json!({}),
            json!({"loxilb.io/multus-nets": "macvlan1", "loxilb.io/ipam": "nat64"}),
        );
        let t = run_pods(&s, &sl, &p4).unwrap();
        assert_eq!(t.rules[0].rule.vip, ip("3ffe::1"));
        assert_eq!(eps(&t.rules[0]), vec!["192.168.50.5:8080"]);
    }

    #[test]
    fn multus_named_target_ports_and_contradictions() {
        // Two Service ports; the slice resolved each (named targetPort).
        let s = svc_json(
            json!({"ports": [
                {"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
            ]}),
            json!({"loxilb.io/multus-nets": "macvlan1"}),
        );
        let mut sl = pod_slice("IPv4", 8081, &[("10.244.1.5", Some("web-1"), None)]);
        sl.ports = serde_json::from_value(json!([
            {"name": "http", "port": 8081, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
        ]))
        .unwrap();
        let p = pods(&[("web-1", status(&[("default/macvlan1", &["192.168.50.5"])]))]);
        let t = run_pods(&s, &[sl.clone()], &p).unwrap();
        assert_eq!(eps(&t.rules[0]), vec!["192.168.50.5:8081"]);
        assert_eq!(eps(&t.rules[1]), vec!["192.168.50.5:5353"]);
        assert_eq!(referenced_pods_of(&s, &[sl]), vec!["web-1".to_string()]);
        let s = svc_json(
            json!({}),
            json!({"loxilb.io/multus-nets": "macvlan1", "loxilb.io/usepodnetwork": "no"}),
        );
        let e = run_pods(&s, &[], &p).unwrap_err();
        assert!(
            e.starts_with("loxilb.io/usepodnetwork: \"no\": contradicts loxilb.io/multus-nets"),
            "{e}"
        );
    }

    fn referenced_pods_of(s: &Service, sl: &[EndpointSlice]) -> Vec<String> {
        multus::referenced_pods(&service_key(s).unwrap(), sl)
            .into_iter()
            .collect()
    }

    #[test]
    fn translate_checks_the_allocation() {
        let s = svc(json!({"ipFamilies": ["IPv4", "IPv6"]}));
        let c = cfg();
        let mut ipam = c.ipam().unwrap();
        let mut r = alloc_request(&s, &ServiceAnnotations::default(), &c)
            .unwrap()
            .0;
        r.families = vec![IpFamily::V4];
        let alloc = ipam.ensure(&r).unwrap();
        let e = translate(
            &s,
            &ServiceAnnotations::default(),
            &[],
            &nodes(),
            &alloc,
            &c,
        )
        .unwrap_err();
        assert!(e.to_string().contains("has no IPv6 VIP"), "{e}");
        let mut other = alloc.clone();
        other.service = ServiceKey::new("default", "other");
        let e = translate(
            &s,
            &ServiceAnnotations::default(),
            &[],
            &nodes(),
            &other,
            &c,
        )
        .unwrap_err();
        assert!(e.to_string().contains("another Service's"), "{e}");
    }

    #[test]
    fn status_lists_plain_ips() {
        let c = cfg();
        let s = svc(json!({"ipFamilies": ["IPv4", "IPv6"]}));
        let mut ipam = c.ipam().unwrap();
        let alloc = ipam
            .ensure(
                &alloc_request(&s, &ServiceAnnotations::default(), &c)
                    .unwrap()
                    .0,
            )
            .unwrap();
        let st = load_balancer_status(&alloc);
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(
            v,
            json!({"ingress": [
                {"ip": "20.0.0.1", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
                {"ip": "3ffe::1", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]}
            ]})
        );
    }

    #[test]
    fn recorded_allocation_from_annotation_or_status() {
        let s = svc_json(
            json!({}),
            json!({RECORD_ANNOTATION: "ips=20.0.0.9;ports=80/tcp"}),
        );
        let (rec, src) = recorded_allocation(&s).unwrap().unwrap();
        assert_eq!(src, RecordSource::Annotation);
        assert_eq!(rec.vips, vec![ip("20.0.0.9")]);
        let s = svc_json(json!({}), json!({RECORD_ANNOTATION: "ips=20.0.0.9"}));
        let e = recorded_allocation(&s).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "metadata.annotations[loxilb.io/allocated]: \"ips=20.0.0.9\": no `ports` section"
            ),
            "{e}"
        );

        assert_eq!(recorded_allocation(&svc(json!({}))).unwrap(), None);

        let mut s = svc(json!({}));
        s.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
            {"ip": "20.0.0.4"}, {"hostname": "llb-3ffe--4"}]}}))
            .unwrap(),
        );
        let (rec, src) = recorded_allocation(&s).unwrap().unwrap();
        assert_eq!(src, RecordSource::Status);
        assert_eq!(rec.to_string(), "ips=20.0.0.4,3ffe::4;ports=80/tcp");
        s.status = Some(
            serde_json::from_value(
                json!({"loadBalancer": {"ingress": [{"hostname": "lb.example.com"}]}}),
            )
            .unwrap(),
        );
        assert!(recorded_allocation(&s)
            .unwrap_err()
            .to_string()
            .contains("hostname"));
        s.status = Some(
            serde_json::from_value(
                json!({"loadBalancer": {"ingress": [{"ip": "20.0.0.4"}, {"ip": "20.0.0.5"}]}}),
            )
            .unwrap(),
        );
        assert!(recorded_allocation(&s)
            .unwrap_err()
            .to_string()
            .contains("same family"));
        assert_eq!(
            legacy_hostname("llb-192.168.80.20"),
            Some(ip("192.168.80.20"))
        );
        assert_eq!(legacy_hostname("llbanyextip"), None);
        assert_eq!(legacy_hostname("llb-1-2-3-4"), None);
    }

    #[test]
    fn leader_change_rebuilds_from_services() {
        let c = KubeConfig {
            unique_ip: true,
            ..cfg()
        };
        let make = |name: &str, created: &str, ann: Value| -> Service {
            let mut s = svc_json(json!({}), ann);
            s.metadata.name = Some(name.into());
            s.metadata.creation_timestamp = Some(serde_json::from_value(json!(created)).unwrap());
            s
        };
        let services = vec![
            make(
                "young",
                "2026-03-01T00:00:00Z",
                json!({RECORD_ANNOTATION: "ips=20.0.0.1;ports=80/tcp"}),
            ),
            make(
                "old",
                "2026-01-01T00:00:00Z",
                json!({RECORD_ANNOTATION: "ips=20.0.0.1;ports=80/tcp"}),
            ),
            make(
                "broken",
                "2026-01-02T00:00:00Z",
                json!({RECORD_ANNOTATION: "garbage"}),
            ),
            make("fresh", "2026-01-03T00:00:00Z", json!({})),
            {
                let mut s = make(
                    "foreign",
                    "2026-01-01T00:00:00Z",
                    json!({RECORD_ANNOTATION: "ips=20.0.0.2;ports=80/tcp"}),
                );
                s.spec.as_mut().unwrap().load_balancer_class = Some("other.io/lb".into());
                s
            },
        ];
        let (records, notes) = records_from_services(&services, &c);
        let names: Vec<&str> = records.iter().map(|(k, _)| k.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["old", "young"],
            "oldest first; foreign and unreadable skipped"
        );
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].starts_with("default/broken: recorded allocation unreadable"),
            "{}",
            notes[0]
        );

        let mut ipam = c.ipam().unwrap();
        let problems = ipam.rebuild(records);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].service.name, "young");
        // Every managed Service then goes through ensure: no double allocation.
        let mut seen = BTreeSet::new();
        for s in services
            .iter()
            .filter(|s| is_managed(s, &c.load_balancer_class))
        {
            let (req, _) = alloc_request(s, &parse_annotations(s).values, &c).unwrap();
            let a = ipam.ensure(&req).unwrap();
            assert!(seen.insert(a.vips[0].ip), "{} given twice", a.vips[0].ip);
        }
        assert_eq!(
            ipam.allocation(&ServiceKey::new("default", "old"))
                .unwrap()
                .vips[0]
                .ip,
            ip("20.0.0.1")
        );

        // Status-only Services are adopted with a note.
        let mut s = make("legacy", "2026-01-01T00:00:00Z", json!({}));
        s.status = Some(
            serde_json::from_value(
                json!({"loadBalancer": {"ingress": [{"hostname": "llb-20.0.0.7"}]}}),
            )
            .unwrap(),
        );
        let (records, notes) = records_from_services([&s], &c);
        assert_eq!(records[0].1.vips, vec![ip("20.0.0.7")]);
        assert!(notes[0].contains("adopted the addresses in status.loadBalancer.ingress"));
    }
}

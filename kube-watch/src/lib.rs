//! The Kubernetes side of the agent: LoadBalancer Services (plus their
//! EndpointSlices and the Nodes) become load-balancer rules for the
//! datapath, VIPs are allocated from pools, and the results are written back
//! to the Services.
//!
//! # Status (what is done, what is not)
//!
//! Done, each piece exercised by tests that fail when it breaks:
//! - the pure core ([`annotations`], [`flags`], [`ipam`], [`translate`]) and
//!   the controller's decisions ([`reconcile`]: what to allocate, which
//!   finalizer/record/status/Events to write and in which order, which rules
//!   to hand to the datapath), unit-tested over plain values;
//! - the I/O: kube-runtime watchers and reflectors on Services,
//!   EndpointSlices and Nodes (and a metadata-only Pod watch while a
//!   Service has `loxilb.io/multus-nets`), Lease leader election
//!   ([`leader`]), merge
//!   patch of metadata, server-side apply of status, Event creation
//!   ([`events`]), the run loop ([`controller::run`]) with kube-runtime's
//!   exponential backoff for retries; tested against a
//!   mocked API server (exact requests, `tests/api_writes.rs`) and an
//!   in-memory API server driving the whole loop (`tests/controller_loop.rs`,
//!   which also checks every request against the manifest's RBAC);
//! - `manifest/in-cluster/loxilb.yaml` (DaemonSet, RBAC, ServiceAccount),
//!   validated against the Kubernetes 1.37 schemas (`tests/manifests.rs`,
//!   `kubernetes-validate` from `scripts/setup.sh`; `LOXILB_REQUIRE_TOOLS=1`
//!   makes a missing validator a failure);
//! - the agent's side lives in `loxilb-agent` (`loxilb-agent kube`): it
//!   implements [`controller::RuleSink`] over its rule reconciler (and VIP
//!   ownership), runs the health probes the rules carry, peers BGP from
//!   [`bgp_peers`], and serves `/healthz` and `/readyz` for the DaemonSet;
//! - run against a real kube-apiserver (two agents as two nodes, issue 18):
//!   what it found (409s on the metadata patch while the watch lagged
//!   behind the agent's own writes, 404s retried, writes without a field
//!   manager, an Event left saying `0 endpoints`) is fixed, and the
//!   in-memory API server now reproduces those conditions (a lagging watch,
//!   no-op writes not stored, a slow initial list, field managers checked).
//!
//! Not done:
//! - The last good annotation values are kept in memory: after an agent
//!   restart a Service whose annotations are invalid gets no rules until
//!   they are fixed.
//! - The BGP policy CRDs (defined, read, not applied; see [`crds`]).
//! - If the agents are uninstalled while Services still carry the
//!   `loxilb.io/loadbalancer` finalizer, deleting those Services waits for
//!   it to be removed by hand.
//!
//! # The pieces
//!
//! - [`annotations`]: every `loxilb.io/*` Service annotation parsed strictly
//!   into one typed struct; invalid values come back as problems (annotation,
//!   value, allowed values) separately from the fields that parsed, so the
//!   caller can keep the Service's last good rules and raise a Warning Event.
//! - [`flags`]: the Kubernetes-related agent flags (`--cidrPools`,
//!   `--cidr6Pools`, `--externalSecondaryCIDRs`, `--setLBMode`,
//!   `--setUniqueIP`, `--loadBalancerClass`, `--usePodNetwork`, `--monitor`,
//!   the Lease timings, the status form and `--zone`): strict parsers that
//!   the agent's CLI uses as clap `value_parser`s ([`flags::for_clap`]),
//!   so a bad value is refused at startup, and a typed
//!   [`flags::KubeConfig`].
//! - [`config_file`]: `loxilb-agent kube --config <file>`: the flags'
//!   settings in YAML, checked strictly, turned into flags that the command
//!   line overrides.
//! - [`ipam`]: IPv4/IPv6 pools (CIDRs or ranges), shared and exclusive
//!   allocation keyed by Service, static IPs, dual stack, SCTP secondary IPs,
//!   release and reuse, and the allocation record written on each Service
//!   (`loxilb.io/allocated`) from which a new leader rebuilds the table.
//! - [`translate`]: Service + EndpointSlices + Nodes + allocation -> the
//!   desired [`translate::ServiceRule`]s (model rules, one per VIP, port
//!   and protocol, checked by [`translate::ServiceRule::supported`]), the
//!   allocation request for a Service, and the `status.loadBalancer` to write.
//! - [`multus`]: endpoints on Multus secondary networks
//!   (`loxilb.io/multus-nets`): the EndpointSlices' ready pods, their
//!   addresses on those networks from `k8s.v1.cni.cncf.io/network-status`.
//! - [`reconcile`]: the controller's state and decisions: one Service in, a
//!   [`reconcile::Plan`] (ordered writes, rules, Events) out. Pure.
//! - [`events`]: what an Event says and the `events.k8s.io/v1` object.
//! - [`leader`]: Lease-based leader election (decision pure, I/O apart).
//! - [`controller`]: watchers, the run loop, the API writes, and the
//!   [`controller::RuleSink`] seam to the datapath.
//! - [`crds`]: the custom resources (BGPPeerService and the BGP policy
//!   kinds) and their CRDs; [`bgp_peers`]: BGP neighbours from
//!   BGPPeerService objects, with their status and Events.

pub mod annotations;
pub mod bgp_peers;
pub mod config_file;
pub mod controller;
pub mod crds;
pub mod events;
pub mod flags;
pub mod groups;
pub mod ipam;
pub mod leader;
pub mod multus;
pub mod reconcile;
pub mod translate;

use std::{fmt, net::IpAddr};

/// A Service's identity: the key of its allocation and of its rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_forms() {
        assert_eq!(ServiceKey::new("ns", "web").to_string(), "ns/web");
        assert_eq!(IpFamily::of(&"::1".parse().unwrap()), IpFamily::V6);
        assert_eq!(IpFamily::V4.to_string(), "IPv4");
    }
}

//! The Kubernetes side of the agent, as a pure and testable core: it turns
//! LoadBalancer Services (plus their EndpointSlices and the Nodes) into
//! load-balancer rules, and owns the VIP address management. Nothing here
//! talks to an API server; every input is a plain value (strings,
//! `k8s-openapi` objects) and every output is a plain value.
//!
//! The pieces:
//!
//! - [`annotations`]: every `loxilb.io/*` Service annotation parsed strictly
//!   into one typed struct; invalid values come back as problems (annotation,
//!   value, allowed values) separately from the fields that parsed, so the
//!   caller can keep the Service's last good rules and raise a Warning Event.
//! - [`flags`]: the Kubernetes-related agent flags (`--cidrPools`,
//!   `--cidr6Pools`, `--externalSecondaryCIDRs`, `--setLBMode`,
//!   `--setUniqueIP`, `--loadBalancerClass`, `--usePodNetwork`, `--monitor`)
//!   as string parsers and a typed [`flags::KubeConfig`].
//! - [`ipam`]: IPv4/IPv6 pools (CIDRs or ranges), shared and exclusive
//!   allocation keyed by Service, static IPs, dual stack, SCTP secondary IPs,
//!   release and reuse, and the allocation record written on each Service
//!   (`loxilb.io/allocated`) from which a new leader rebuilds the table.
//! - [`translate`]: Service + EndpointSlices + Nodes + allocation -> the
//!   desired [`translate::LbRule`]s (one per VIP, port and protocol), the
//!   allocation request for a Service, and the `status.loadBalancer` to write.
//!
//! Not done yet (the next step): the watchers on Services, EndpointSlices and
//! Nodes, leader election (a Lease), writing status and the allocation
//! annotation back, Kubernetes Events for the problems these modules return,
//! finalizers so a deleted Service's rules and IPs are released even when the
//! agent was down, and the wiring of [`flags`] into the agent's command line.

pub mod annotations;
pub mod flags;
pub mod ipam;
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

/// The L4 protocols a Service port can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower-case name, as in rule files and allocation records.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`); `None` (field
    /// unset) is TCP, as the API defaults it.
    pub fn from_kubernetes(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(format!(
                "protocol `{other}` is not supported (allowed: TCP, UDP, SCTP)"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    fn protocol_from_kubernetes() {
        assert_eq!(Protocol::from_kubernetes(None), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_kubernetes(Some("TCP")), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_kubernetes(Some("UDP")), Ok(Protocol::Udp));
        assert_eq!(Protocol::from_kubernetes(Some("SCTP")), Ok(Protocol::Sctp));
        let e = Protocol::from_kubernetes(Some("tcp")).unwrap_err();
        assert!(e.contains("`tcp`") && e.contains("TCP, UDP, SCTP"), "{e}");
    }

    #[test]
    fn display_forms() {
        assert_eq!(ServiceKey::new("ns", "web").to_string(), "ns/web");
        assert_eq!(Protocol::Sctp.to_string(), "sctp");
        assert_eq!(IpFamily::of(&"::1".parse().unwrap()), IpFamily::V6);
        assert_eq!(IpFamily::V4.to_string(), "IPv4");
    }
}

//! The one load-balancer rule model: what a rule is ([`Rule`]: a VIP, port
//! and [`Protocol`], its [`Mode`] and endpoint [`Selection`], endpoints,
//! secondary VIPs, source ranges, timeouts, health probe) and what this
//! load balancer can serve ([`supported`]).
//!
//! Every front end builds these rules and checks them with [`supported`]:
//! the rule file (`loxilb-agent`'s `config`), the REST API (`api`, through
//! the rule file's checks) and the Kubernetes translation (`kube-watch`'s
//! `translate`). The agent installs them (`rules`, `node`). Each front end
//! parses its own spellings (a rule file's `mode: fullnat`, a Service's
//! `loxilb.io/lbmode: fullnat`, the API's `mode: 2`) and words the remedy
//! of a refusal in its own terms ([`Unsupported::limit`] says which limit
//! was hit).
//!
//! Plain data: no Kubernetes, no datapath. The datapath's sizes the model
//! needs ([`MAX_RULE_VIPS`], [`MAX_ENDPOINTS`]) are asserted equal to the
//! datapath's own by the agent.

pub mod probe;
mod supported;

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

pub use probe::{ProbeError, ProbeKind, ProbeSpec};
pub use supported::{supported, Limit, Unsupported};

/// Idle timeout of a rule's sessions without one given, seconds.
pub const DEFAULT_TIMEOUT_S: u32 = 1800;
/// Longest idle timeout (and persist timeout), seconds: a week.
pub const MAX_TIMEOUT_S: u32 = 7 * 24 * 3600;
/// Client affinity lifetime of a `persist` rule without one given, seconds.
pub const DEFAULT_PERSIST_TIMEOUT_S: u32 = 10800;
/// VIPs a rule may have, the primary included (the datapath's
/// `loxilb_common::MAX_RULE_VIPS`).
pub const MAX_RULE_VIPS: usize = 4;
/// Secondary VIPs a rule may have.
pub const MAX_SECONDARY_VIPS: usize = MAX_RULE_VIPS - 1;
/// Endpoints a rule may have (the datapath's
/// `loxilb_common::MAX_EPS_PER_RULE`).
pub const MAX_ENDPOINTS: usize = 1 << 16;

/// The L4 protocol of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Lower-case name, as in rule files and allocation records.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The IP protocol number (IANA).
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// `tcp`, `udp`, `sctp` (any case, surrounding blanks ignored).
    pub fn from_name(s: &str) -> Option<Self> {
        let s = s.trim();
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How packets to the VIP are rewritten on their way to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// DNAT: destination rewritten to the endpoint, client source IP kept.
    Default,
    /// Source rewritten to the node's own address toward the endpoint.
    #[serde(rename = "onearm")]
    OneArm,
    /// Source rewritten to the full-NAT source (`--fullnat-source`, else
    /// the VIP).
    #[serde(rename = "fullnat")]
    FullNat,
    /// Direct server return on L2 (endpoint holds the VIP, replies directly).
    Dsr,
    /// Direct server return over IPIP.
    DsrIpip,
}

impl Mode {
    /// As written in a rule file (and in `loxilb.io/lbmode`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::OneArm => "onearm",
            Mode::FullNat => "fullnat",
            Mode::Dsr => "dsr",
            Mode::DsrIpip => "dsr-ipip",
        }
    }

    /// Either direct-server-return mode: the packet reaches the endpoint
    /// untranslated.
    pub fn is_dsr(self) -> bool {
        matches!(self, Mode::Dsr | Mode::DsrIpip)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a new flow's endpoint is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Selection {
    /// Weighted round-robin.
    #[serde(rename = "rr")]
    RoundRobin,
    /// Consistent hashing of the 5-tuple (Maglev).
    #[serde(rename = "hash")]
    Hash,
    /// Source-IP affinity, new clients round-robin.
    #[serde(rename = "persist")]
    Persist,
    /// Least active sessions (power of two choices).
    #[serde(rename = "lc")]
    LeastConn,
}

impl Selection {
    /// As written in a rule file (and in `loxilb.io/epselect`).
    pub fn as_str(self) -> &'static str {
        match self {
            Selection::RoundRobin => "rr",
            Selection::Hash => "hash",
            Selection::Persist => "persist",
            Selection::LeastConn => "lc",
        }
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One backend of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// Share of new flows (weighted selections), at least 1.
    pub weight: u16,
}

/// One load-balancer rule: one (VIP, port, protocol) and how it is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Unique among the rules of a node.
    pub name: String,
    /// IPv4 or IPv6. An IPv6 VIP with IPv4 endpoints is a NAT64 rule.
    pub vip: IpAddr,
    /// SCTP multihoming: the rule's other VIPs (at most
    /// [`MAX_SECONDARY_VIPS`], the family of `vip`, distinct), in the order
    /// given. Each is served like `vip` (same port, endpoints and rule).
    pub secondary_vips: Vec<IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    pub selection: Selection,
    /// Idle timeout of a session, seconds (1..=[`MAX_TIMEOUT_S`]).
    pub timeout_s: u32,
    /// Client affinity lifetime of `persist`, seconds.
    pub persist_timeout_s: u32,
    /// Allowed client prefixes, of the VIP's family, without host bits;
    /// empty = every client. (A front end that must admit nobody lists
    /// the unspecified address, `0.0.0.0/32` or `::/128`, a source no
    /// packet carries.)
    pub source_ranges: Vec<ipnet::IpNet>,
    pub endpoints: Vec<Endpoint>,
    /// Endpoint health probing; None: endpoints are not probed.
    pub probe: Option<ProbeSpec>,
    /// Announce the VIP over BGP only from nodes that are endpoints of the
    /// rule (Kubernetes `externalTrafficPolicy: Local`); false: every node
    /// serving the rule announces it.
    pub announce_local_only: bool,
}

impl Rule {
    /// A rule of `vip`, `port` and `protocol` with every default: mode
    /// `default`, round-robin, the default timeouts, no secondary VIPs,
    /// source ranges, endpoints or probe; named `vip:port/protocol`.
    pub fn new(vip: IpAddr, port: u16, protocol: Protocol) -> Self {
        Rule {
            name: default_name(vip, port, protocol),
            vip,
            secondary_vips: vec![],
            port,
            protocol,
            mode: Mode::Default,
            selection: Selection::RoundRobin,
            timeout_s: DEFAULT_TIMEOUT_S,
            persist_timeout_s: DEFAULT_PERSIST_TIMEOUT_S,
            source_ranges: vec![],
            endpoints: vec![],
            probe: None,
            announce_local_only: false,
        }
    }
}

/// `vip:port/protocol` (`[v6]:port/protocol`): the name of a rule not
/// given one.
pub fn default_name(vip: IpAddr, port: u16, protocol: Protocol) -> String {
    format!("{}/{protocol}", std::net::SocketAddr::new(vip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_name(p.as_str()), Some(p));
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        assert_eq!(Protocol::from_name(" SCTP "), Some(Protocol::Sctp));
        assert_eq!(Protocol::from_name("icmp"), None);
        assert_eq!(Protocol::from_number(1), None);
        assert_eq!(Mode::DsrIpip.to_string(), "dsr-ipip");
        assert_eq!(Selection::LeastConn.to_string(), "lc");
        let r = Rule::new("2001:db8::1".parse().unwrap(), 80, Protocol::Tcp);
        assert_eq!(r.name, "[2001:db8::1]:80/tcp");
        assert_eq!(r.timeout_s, DEFAULT_TIMEOUT_S);
    }
}

//! What this load balancer can serve: the one capability check of a
//! [`Rule`], whichever front end built it.

use std::{collections::HashSet, fmt, net::IpAddr};

use crate::{
    Mode, Protocol, Rule, MAX_ENDPOINTS, MAX_RULE_VIPS, MAX_SECONDARY_VIPS, MAX_TIMEOUT_S,
};

/// Which limit a rule hit: lets a front end word the remedy in its own
/// terms (a Service's annotations rather than a rule file's fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// A VIP or endpoint that is unspecified, multicast, broadcast or an
    /// IPv4-mapped IPv6 address.
    Address,
    /// An idle or persist timeout out of range.
    Timeout,
    /// Secondary VIPs on a rule that is not SCTP.
    SecondaryVipsProtocol,
    /// Secondary VIPs in a mode other than default and fullnat.
    SecondaryVipsMode,
    /// More secondary VIPs than a rule holds.
    SecondaryVipsCount,
    /// A secondary VIP of the other family than the VIP's.
    SecondaryVipFamily,
    /// A secondary VIP listed twice, or the VIP itself.
    SecondaryVipRepeated,
    /// A source range of the other family than the VIP's.
    SourceRangeFamily,
    /// A source range with host bits set.
    SourceRangeHostBits,
    /// More endpoints than a rule holds.
    EndpointCount,
    /// An endpoint listed twice.
    EndpointRepeated,
    /// An endpoint weight of 0.
    EndpointWeight,
    /// IPv6 endpoints of an IPv4 VIP (NAT46).
    Nat46,
    /// Endpoints of both families.
    EndpointFamilies,
    /// IPv4 endpoints of an IPv6 VIP (NAT64) in a DSR mode.
    Nat64Dsr,
    /// IPv4 endpoints of an IPv6 VIP (NAT64) for SCTP.
    Nat64Sctp,
    /// `dsr-ipip` for an IPv6 VIP.
    DsrIpipIpv6,
    /// A DSR endpoint on another port than the service's.
    DsrPort,
    /// A probe setting ([`crate::ProbeSpec::validate`]).
    Probe,
}

/// Why a rule cannot be served: the field of the rule, named as the rule
/// file names it (`vip`, `secondary_vips[1]`, `endpoints[0].ip`, `probe`),
/// what is wrong with its value, and what to do in the rule model's (the
/// rule file's) terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub field: String,
    pub limit: Limit,
    /// What is wrong, naming the value.
    pub problem: String,
    /// What to do, in the rule model's words (empty: nothing to add).
    pub remedy: String,
}

impl Unsupported {
    fn new(field: impl Into<String>, limit: Limit, problem: String, remedy: &str) -> Self {
        Unsupported {
            field: field.into(),
            limit,
            problem,
            remedy: remedy.to_string(),
        }
    }

    /// The problem and the model's remedy, without the field.
    pub fn message(&self) -> String {
        self.message_with(&self.remedy)
    }

    /// The problem and another remedy (a front end's own words).
    pub fn message_with(&self, remedy: &str) -> String {
        if remedy.is_empty() {
            self.problem.clone()
        } else {
            format!("{}; {remedy}", self.problem)
        }
    }
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message())
    }
}

impl std::error::Error for Unsupported {}

/// Whether `ip` can be a VIP or an endpoint.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast() || a.to_ipv4_mapped().is_some()),
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn list(a: &[IpAddr]) -> String {
    a.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether this load balancer can serve `r` as it is. The first problem
/// found is returned, checked in the order of the rule's fields (VIP,
/// timeouts, secondary VIPs, source ranges, endpoints, probe).
pub fn supported(r: &Rule) -> Result<(), Unsupported> {
    use Limit::*;
    let vip = r.vip;
    if !usable(vip) {
        return Err(Unsupported::new(
            "vip",
            Address,
            format!("{vip} cannot be a service address"),
            "",
        ));
    }
    for (field, t, what) in [
        ("timeout", r.timeout_s, "an idle timeout"),
        (
            "persist_timeout",
            r.persist_timeout_s,
            "an affinity timeout",
        ),
    ] {
        if !(1..=MAX_TIMEOUT_S).contains(&t) {
            return Err(Unsupported::new(
                field,
                Timeout,
                format!("{t} is not {what} in seconds (an integer 1..={MAX_TIMEOUT_S})"),
                "",
            ));
        }
    }
    secondary_vips(r)?;
    for (j, net) in r.source_ranges.iter().enumerate() {
        let field = format!("source_ranges[{j}]");
        if net.addr().is_ipv4() != vip.is_ipv4() {
            return Err(Unsupported::new(
                field,
                SourceRangeFamily,
                format!(
                    "{net} is {} on an {} rule: it can never match a client of {vip} (clients \
                     of an {} service are {} addresses)",
                    family(net.addr()),
                    family(vip),
                    family(vip),
                    family(vip)
                ),
                "list prefixes of the VIP's family",
            ));
        }
        if net.trunc() != *net {
            return Err(Unsupported::new(
                field,
                SourceRangeHostBits,
                format!("{net} has host bits set"),
                &format!("did you mean {}?", net.trunc()),
            ));
        }
    }
    endpoints(r)?;
    if let Some(p) = &r.probe {
        p.validate()
            .map_err(|e| Unsupported::new("probe", Probe, e.to_string(), ""))?;
    }
    Ok(())
}

/// The secondary VIPs (SCTP multihoming).
fn secondary_vips(r: &Rule) -> Result<(), Unsupported> {
    use Limit::*;
    let all = &r.secondary_vips;
    if all.is_empty() {
        return Ok(());
    }
    let shown = list(all);
    let (protocol, mode, vip) = (r.protocol, r.mode, r.vip);
    if protocol != Protocol::Sctp {
        return Err(Unsupported::new(
            "secondary_vips",
            SecondaryVipsProtocol,
            format!(
                "only SCTP rules can have secondary VIPs ({shown}): an SCTP association is \
                 multihomed; a {protocol} connection has one address per side"
            ),
            "use protocol: sctp, or remove secondary_vips and give the other addresses rules \
             of their own",
        ));
    }
    if mode != Mode::Default && mode != Mode::FullNat {
        return Err(Unsupported::new(
            "secondary_vips",
            SecondaryVipsMode,
            format!(
                "SCTP multihoming (secondary VIPs {shown}) is served in mode default (DNAT) and \
                 fullnat, not {mode}: the datapath rewrites the SCTP address parameters for \
                 those two"
            ),
            "use mode: default or fullnat, or remove secondary_vips",
        ));
    }
    if all.len() > MAX_SECONDARY_VIPS {
        return Err(Unsupported::new(
            "secondary_vips",
            SecondaryVipsCount,
            format!(
                "{} secondary VIPs ({shown}); a rule has at most {MAX_SECONDARY_VIPS} (the \
                 datapath holds {MAX_RULE_VIPS} addresses per association path set)",
                all.len()
            ),
            "remove some",
        ));
    }
    for (j, &a) in all.iter().enumerate() {
        let field = format!("secondary_vips[{j}]");
        if !usable(a) {
            return Err(Unsupported::new(
                field,
                Address,
                format!("{a} cannot be a service address"),
                "",
            ));
        }
        if a.is_ipv4() != vip.is_ipv4() {
            return Err(Unsupported::new(
                field,
                SecondaryVipFamily,
                format!(
                    "{a} is {} but the VIP {vip} is {}: every VIP of a rule has the VIP's \
                     family (an association's addresses are of one family)",
                    family(a),
                    family(vip)
                ),
                "",
            ));
        }
        if a == vip {
            return Err(Unsupported::new(
                field,
                SecondaryVipRepeated,
                format!("{a} is the rule's VIP itself, listed twice"),
                "list only the other addresses",
            ));
        }
        if all[..j].contains(&a) {
            return Err(Unsupported::new(
                field,
                SecondaryVipRepeated,
                format!("{a} is listed twice"),
                "list each address once",
            ));
        }
    }
    Ok(())
}

fn endpoints(r: &Rule) -> Result<(), Unsupported> {
    use Limit::*;
    let (vip, mode, protocol) = (r.vip, r.mode, r.protocol);
    if r.endpoints.len() > MAX_ENDPOINTS {
        return Err(Unsupported::new(
            "endpoints",
            EndpointCount,
            format!(
                "{} endpoints; at most {MAX_ENDPOINTS} per rule",
                r.endpoints.len()
            ),
            "",
        ));
    }
    let mut seen = HashSet::with_capacity(r.endpoints.len());
    for (j, e) in r.endpoints.iter().enumerate() {
        let ip = e.ip;
        let field = |name: &str| format!("endpoints[{j}].{name}");
        if !usable(ip) {
            return Err(Unsupported::new(
                field("ip"),
                Address,
                format!("{ip} cannot be an endpoint"),
                "",
            ));
        }
        if vip.is_ipv4() && ip.is_ipv6() {
            return Err(Unsupported::new(
                field("ip"),
                Nat46,
                format!(
                    "{ip}: an IPv4 service ({vip}) cannot have IPv6 endpoints (NAT46 is not \
                     supported)"
                ),
                "give the service an IPv6 VIP",
            ));
        }
        let first = r.endpoints[0].ip;
        if first.is_ipv4() != ip.is_ipv4() {
            return Err(Unsupported::new(
                field("ip"),
                EndpointFamilies,
                format!(
                    "{ip}: endpoints {first} and {ip} are of different families; every endpoint \
                     of a rule has one family"
                ),
                "split the rule",
            ));
        }
        if vip.is_ipv6() && ip.is_ipv4() && mode.is_dsr() {
            return Err(Unsupported::new(
                field("ip"),
                Nat64Dsr,
                format!(
                    "{ip}: an IPv6 service ({vip}) with IPv4 endpoints is translated (NAT64), \
                     which dsr modes never do"
                ),
                "use mode default, onearm or fullnat",
            ));
        }
        if vip.is_ipv6() && ip.is_ipv4() && protocol == Protocol::Sctp {
            return Err(Unsupported::new(
                field("ip"),
                Nat64Sctp,
                format!(
                    "{ip}: SCTP is not translated between IPv6 and IPv4 (its INIT carries \
                     addresses)"
                ),
                "give the service an IPv4 VIP or the endpoint an IPv6 address",
            ));
        }
        // (Checked with the endpoints, as the rule file always has: a
        // dsr-ipip rule without endpoints sends nothing anywhere.)
        if vip.is_ipv6() && mode == Mode::DsrIpip {
            return Err(Unsupported::new(
                "mode",
                DsrIpipIpv6,
                "dsr-ipip carries IPv4 only".into(),
                "use dsr (L2) for an IPv6 service",
            ));
        }
        if e.weight == 0 {
            return Err(Unsupported::new(
                field("weight"),
                EndpointWeight,
                "0 is not a weight (an integer 1..=65535)".into(),
                "",
            ));
        }
        if !seen.insert((ip, e.port)) {
            return Err(Unsupported::new(
                field("ip"),
                EndpointRepeated,
                format!(
                    "{} is listed twice in this rule",
                    std::net::SocketAddr::new(ip, e.port)
                ),
                "list each endpoint once",
            ));
        }
        if mode.is_dsr() && e.port != r.port {
            return Err(Unsupported::new(
                field("port"),
                DsrPort,
                format!(
                    "{}: in {mode} mode the packet reaches the endpoint untranslated, so the \
                     endpoint must listen on the service port {}",
                    std::net::SocketAddr::new(ip, e.port),
                    r.port
                ),
                &format!("give it port {}, or use another mode", r.port),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

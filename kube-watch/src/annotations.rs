//! The `loxilb.io/*` Service annotations, parsed strictly.
//!
//! [`parse`] returns the fields that parsed ([`ServiceAnnotations`]) and,
//! separately, the [`Problem`]s: `errors` (a value that cannot be used; the
//! caller keeps the Service's last good rules and raises a Warning Event
//! with the problem's text) and `warnings` (nothing is wrong with the rules,
//! but the user should know: an unknown annotation, a value with no effect).
//! A field whose value is invalid is left unset in the result; it is never
//! replaced by a default. A caller that sees `errors` must not program the
//! result as if the annotation were absent.
//!
//! Keyword values (`yes`, `fullnat`, `hash`, ...) are matched ignoring ASCII
//! case and surrounding spaces; everything else is exact. Where kube-loxilb
//! silently falls back (an unknown `lbmode` becomes the flag's mode) this
//! module reports an error instead.
//!
//! kube-loxilb annotations this load balancer does not implement (`egress`,
//! `prefLocalPod`, `nodelabel`, `zoneselect`, `mtls-*`, ...) are a warning
//! when their value asks for nothing (`no`, `false`, `disabled`, empty) and
//! an error otherwise: ignoring a requested behaviour would be a silent
//! fallback. `loxilb.io/allocated` is written by the agent itself (see
//! [`crate::ipam::RECORD_ANNOTATION`]) and is not parsed here.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use loxilb_model::{Mode, ProbeKind, Selection};

use crate::ipam::{MAX_SECONDARY_IPS, RECORD_ANNOTATION};

/// The prefix of every annotation handled here.
pub const PREFIX: &str = "loxilb.io/";

/// The full annotation keys.
pub mod keys {
    pub const MULTUS_NETS: &str = "loxilb.io/multus-nets";
    pub const POOL_SELECT: &str = "loxilb.io/poolSelect";
    pub const POOL_SELECT_SECONDARY: &str = "loxilb.io/poolSelectSecondary";
    pub const SECONDARY_IPS: &str = "loxilb.io/secondaryIPs";
    pub const STATIC_IP: &str = "loxilb.io/staticIP";
    pub const LIVENESS: &str = "loxilb.io/liveness";
    pub const LB_MODE: &str = "loxilb.io/lbmode";
    pub const IPAM: &str = "loxilb.io/ipam";
    pub const TIMEOUT: &str = "loxilb.io/timeout";
    pub const PROBE_TYPE: &str = "loxilb.io/probetype";
    pub const PROBE_PORT: &str = "loxilb.io/probeport";
    pub const PROBE_REQ: &str = "loxilb.io/probereq";
    pub const PROBE_RESP: &str = "loxilb.io/proberesp";
    pub const PROBE_TIMEOUT: &str = "loxilb.io/probetimeout";
    pub const PROBE_RETRIES: &str = "loxilb.io/proberetries";
    pub const EP_SELECT: &str = "loxilb.io/epselect";
    pub const USE_POD_NETWORK: &str = "loxilb.io/usepodnetwork";

    /// Every annotation [`super::parse`] understands.
    pub const ALL: [&str; 17] = [
        MULTUS_NETS,
        POOL_SELECT,
        POOL_SELECT_SECONDARY,
        SECONDARY_IPS,
        STATIC_IP,
        LIVENESS,
        LB_MODE,
        IPAM,
        TIMEOUT,
        PROBE_TYPE,
        PROBE_PORT,
        PROBE_REQ,
        PROBE_RESP,
        PROBE_TIMEOUT,
        PROBE_RETRIES,
        EP_SELECT,
        USE_POD_NETWORK,
    ];
}

/// kube-loxilb annotations that this load balancer does not implement.
const KUBE_LOXILB_ONLY: [&str; 15] = [
    "loxilb.io/prefLocalPod",
    "loxilb.io/nodelabel",
    "loxilb.io/zoneselect",
    "loxilb.io/zoneinstance",
    "loxilb.io/useproxyprotov2",
    "loxilb.io/egress",
    "loxilb.io/useExternalEndpoint",
    "loxilb.io/mtls-frontend-mode",
    "loxilb.io/mtls-frontend-secret",
    "loxilb.io/mtls-frontend-require-cn",
    "loxilb.io/mtls-frontend-cn-pattern",
    "loxilb.io/mtls-backend-verify",
    "loxilb.io/mtls-backend-ca-secret",
    "loxilb.io/mtls-backend-client-secret",
    "loxilb.io/num-secondary-networks",
];

/// Idle timeout bounds (seconds): the rule model's.
pub use loxilb_model::MAX_TIMEOUT_S;
/// Probe timeout bounds (seconds): the rule model's.
pub const MAX_PROBE_TIMEOUT_S: u32 = loxilb_model::probe::MAX_TIMEOUT.as_secs() as u32;
/// Probe retries bound: the rule model's.
pub const MAX_PROBE_RETRIES: u32 = loxilb_model::probe::MAX_RETRIES;
/// Longest `probereq` / `proberesp` accepted (bytes): the rule model's.
pub const MAX_PROBE_TEXT: usize = loxilb_model::probe::MAX_TEXT;

/// Which VIP family a Service gets and how it reaches its endpoints
/// (`loxilb.io/ipam`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpamFamily {
    /// IPv4 VIP, IPv4 endpoints (`ipv4`, `ip`, `ip4`).
    Ipv4,
    /// IPv6 VIP, IPv6 endpoints (`ipv6`, `ip6`, `nat66`).
    Ipv6,
    /// IPv6 VIP, IPv4 endpoints: NAT64 (`ipv6to4`, `nat64`).
    Ipv6To4,
}

/// Every `loxilb.io/*` annotation that parsed. `None` / empty means "not
/// given, or given with an invalid value" — [`ParsedAnnotations::errors`]
/// tells which.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceAnnotations {
    /// `multus-nets`: NetworkAttachmentDefinition names (`[namespace/]name`,
    /// no namespace: the Service's): the endpoints are the pods' addresses
    /// on them ([`crate::multus`]).
    pub multus_nets: Vec<String>,
    /// `poolSelect`: the pool the VIP comes from.
    pub pool_select: Option<String>,
    /// `poolSelectSecondary`: secondary pools (SCTP multi-homing), ≤ 3.
    pub pool_select_secondary: Vec<String>,
    /// `secondaryIPs`: explicit secondary IPs (SCTP multi-homing), ≤ 3.
    pub secondary_ips: Vec<IpAddr>,
    /// `staticIP`: an explicit VIP, possibly outside every pool.
    pub static_ip: Option<IpAddr>,
    /// `liveness`: probe the endpoints (overrides `--monitor`).
    pub liveness: Option<bool>,
    /// `lbmode` (overrides `--setLBMode`).
    pub lb_mode: Option<Mode>,
    /// `ipam`.
    pub ipam: Option<IpamFamily>,
    /// `timeout`: session idle timeout, seconds.
    pub timeout_s: Option<u32>,
    pub probe_type: Option<ProbeKind>,
    pub probe_port: Option<u16>,
    pub probe_req: Option<String>,
    pub probe_resp: Option<String>,
    pub probe_timeout_s: Option<u32>,
    pub probe_retries: Option<u32>,
    pub ep_select: Option<Selection>,
    /// `usepodnetwork` (overrides `--usePodNetwork`).
    pub use_pod_network: Option<bool>,
}

/// One problem with one annotation; its `Display` is the text of the
/// Kubernetes Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The full annotation key.
    pub annotation: String,
    /// The value as given.
    pub value: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// Longest value quoted in a problem's text (Event messages are bounded).
const MAX_QUOTED: usize = 64;

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut value: String = self.value.chars().take(MAX_QUOTED).collect();
        if self.value.chars().count() > MAX_QUOTED {
            value.push_str("...");
        }
        write!(f, "{}: {:?}: {}", self.annotation, value, self.message)
    }
}

/// The result of [`parse`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedAnnotations {
    /// The fields that parsed.
    pub values: ServiceAnnotations,
    /// Values that cannot be used: keep the last good rules, raise a Warning.
    pub errors: Vec<Problem>,
    /// Worth telling the user; the values are usable.
    pub warnings: Vec<Problem>,
}

impl ParsedAnnotations {
    /// The values when there is no error, else the errors.
    pub fn into_result(self) -> Result<(ServiceAnnotations, Vec<Problem>), Vec<Problem>> {
        if self.errors.is_empty() {
            Ok((self.values, self.warnings))
        } else {
            Err(self.errors)
        }
    }
}

/// Parse every `loxilb.io/*` annotation of a Service (other keys are not
/// looked at).
pub fn parse(annotations: &BTreeMap<String, String>) -> ParsedAnnotations {
    let mut out = ParsedAnnotations::default();
    for (key, raw) in annotations {
        if !key.starts_with(PREFIX) || key == RECORD_ANNOTATION {
            continue;
        }
        if let Some(m) = typographic_quote(raw) {
            out.errors.push(problem(key, raw, m));
            continue;
        }
        let v = &mut out.values;
        let r: Result<(), String> = match key.as_str() {
            keys::MULTUS_NETS => parse_multus(raw).map(|x| v.multus_nets = x),
            keys::POOL_SELECT => parse_pool_name(raw.trim()).map(|x| v.pool_select = Some(x)),
            keys::POOL_SELECT_SECONDARY => {
                parse_pool_list(raw).map(|x| v.pool_select_secondary = x)
            }
            keys::SECONDARY_IPS => parse_ip_list(raw).map(|x| v.secondary_ips = x),
            keys::STATIC_IP => parse_ip(raw.trim()).map(|x| v.static_ip = Some(x)),
            keys::LIVENESS => parse_yes_no(raw).map(|x| v.liveness = Some(x)),
            keys::LB_MODE => parse_lb_mode(raw).map(|x| v.lb_mode = Some(x)),
            keys::IPAM => parse_ipam(raw).map(|x| v.ipam = Some(x)),
            keys::TIMEOUT => {
                parse_number(raw, 1, MAX_TIMEOUT_S, "seconds").map(|x| v.timeout_s = Some(x))
            }
            keys::PROBE_TYPE => parse_probe_type(raw).map(|x| v.probe_type = Some(x)),
            keys::PROBE_PORT => {
                parse_number(raw, 1, 65535, "port").map(|x| v.probe_port = Some(x as u16))
            }
            keys::PROBE_REQ => parse_probe_text(raw).map(|x| v.probe_req = Some(x)),
            keys::PROBE_RESP => parse_probe_text(raw).map(|x| v.probe_resp = Some(x)),
            keys::PROBE_TIMEOUT => parse_number(raw, 1, MAX_PROBE_TIMEOUT_S, "seconds")
                .map(|x| v.probe_timeout_s = Some(x)),
            keys::PROBE_RETRIES => parse_number(raw, 0, MAX_PROBE_RETRIES, "retries")
                .map(|x| v.probe_retries = Some(x)),
            keys::EP_SELECT => parse_ep_select(raw).map(|x| v.ep_select = Some(x)),
            keys::USE_POD_NETWORK => parse_yes_no(raw).map(|x| v.use_pod_network = Some(x)),
            _ => {
                unknown(key, raw, &mut out);
                Ok(())
            }
        };
        if let Err(m) = r {
            out.errors.push(problem(key, raw, m));
        }
    }
    cross_checks(annotations, &mut out);
    out
}

fn problem(key: &str, value: &str, message: impl Into<String>) -> Problem {
    Problem {
        annotation: key.to_string(),
        value: value.to_string(),
        message: message.into(),
    }
}

fn unknown(key: &str, raw: &str, out: &mut ParsedAnnotations) {
    if key == "loxilb.io/num-secondary-networks" {
        out.warnings.push(problem(
            key,
            raw,
            "documented by kube-loxilb but never implemented there or here; it has no effect, remove it",
        ));
        return;
    }
    if KUBE_LOXILB_ONLY.contains(&key) {
        let inert = matches!(
            raw.trim().to_ascii_lowercase().as_str(),
            "" | "no" | "false" | "disabled"
        );
        if inert {
            out.warnings.push(problem(
                key,
                raw,
                "a kube-loxilb annotation this load balancer does not implement; this value asks for nothing, so it has no effect",
            ));
        } else {
            out.errors.push(problem(
                key,
                raw,
                "a kube-loxilb annotation that is not supported by this load balancer; remove it (or set it to \"no\"/\"disabled\")",
            ));
        }
        return;
    }
    let lower = key.to_ascii_lowercase();
    let hint = keys::ALL
        .iter()
        .find(|k| k.to_ascii_lowercase() == lower)
        .map(|k| format!("; did you mean {k}? (annotation names are case-sensitive)"))
        .unwrap_or_default();
    out.warnings.push(problem(
        key,
        raw,
        format!(
            "unknown loxilb.io annotation, ignored{hint}; known: {}",
            keys::ALL
                .iter()
                .map(|k| &k[PREFIX.len()..])
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
}

fn cross_checks(annotations: &BTreeMap<String, String>, out: &mut ParsedAnnotations) {
    let has = |k: &str| annotations.contains_key(k);
    let raw = |k: &str| annotations.get(k).map(String::as_str).unwrap_or("");

    if has(keys::POOL_SELECT_SECONDARY) && has(keys::SECONDARY_IPS) {
        for (k, other) in [
            (keys::POOL_SELECT_SECONDARY, keys::SECONDARY_IPS),
            (keys::SECONDARY_IPS, keys::POOL_SELECT_SECONDARY),
        ] {
            out.errors.push(problem(
                k,
                raw(k),
                format!(
                    "cannot be combined with {other}: give either secondary pools or explicit secondary IPs, not both"
                ),
            ));
        }
        out.values.pool_select_secondary.clear();
        out.values.secondary_ips.clear();
    }

    let v = &out.values;
    let probe_params = [keys::PROBE_PORT, keys::PROBE_REQ, keys::PROBE_RESP];
    if let Some(t) = v.probe_type.filter(|t| !t.uses_port()) {
        for k in probe_params.iter().filter(|k| has(k)) {
            out.warnings.push(problem(
                k,
                raw(k),
                format!(
                    "has no effect with {}={t}; it applies to probetype udp, tcp, http, https or sctp",
                    keys::PROBE_TYPE
                ),
            ));
        }
    }
    if v.liveness == Some(false) {
        let all = [
            keys::PROBE_TYPE,
            keys::PROBE_PORT,
            keys::PROBE_REQ,
            keys::PROBE_RESP,
            keys::PROBE_TIMEOUT,
            keys::PROBE_RETRIES,
        ];
        for k in all.iter().filter(|k| has(k)) {
            out.warnings.push(problem(
                k,
                raw(k),
                format!(
                    "has no effect: {} is \"no\", so endpoints are not probed",
                    keys::LIVENESS
                ),
            ));
        }
    }
}

fn typographic_quote(raw: &str) -> Option<String> {
    raw.contains(['\u{201c}', '\u{201d}', '\u{2018}', '\u{2019}'])
        .then(|| {
            "contains typographic quotes (\u{201c} \u{201d} \u{2018} \u{2019}), probably copied from a document; write the value with plain ASCII quotes in YAML".to_string()
        })
}

fn keyword(raw: &str) -> String {
    raw.trim().to_ascii_lowercase()
}

/// `yes` / `no`.
pub fn parse_yes_no(raw: &str) -> Result<bool, String> {
    match keyword(raw).as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err("allowed values: yes, no".into()),
    }
}

pub fn parse_lb_mode(raw: &str) -> Result<Mode, String> {
    const ALLOWED: &str = "allowed values: default, onearm, fullnat, dsr";
    match keyword(raw).as_str() {
        "default" => Ok(Mode::Default),
        "onearm" => Ok(Mode::OneArm),
        "fullnat" => Ok(Mode::FullNat),
        "dsr" => Ok(Mode::Dsr),
        m @ ("fullproxy" | "hostonearm") => Err(format!(
            "mode {m} is not supported by this load balancer; {ALLOWED}"
        )),
        _ => Err(ALLOWED.into()),
    }
}

pub fn parse_ipam(raw: &str) -> Result<IpamFamily, String> {
    match keyword(raw).as_str() {
        "ipv4" | "ip" | "ip4" => Ok(IpamFamily::Ipv4),
        "ipv6" | "ip6" | "nat66" => Ok(IpamFamily::Ipv6),
        "ipv6to4" | "nat64" => Ok(IpamFamily::Ipv6To4),
        _ => Err(
            "allowed values: ipv4 (or ip, ip4), ipv6 (or ip6, nat66), ipv6to4 (or nat64)".into(),
        ),
    }
}

pub fn parse_probe_type(raw: &str) -> Result<ProbeKind, String> {
    const ALLOWED: &str = "allowed values: none, ping, udp, tcp, http, https, sctp";
    match keyword(raw).as_str() {
        "none" => Ok(ProbeKind::None),
        "ping" => Ok(ProbeKind::Ping),
        "udp" => Ok(ProbeKind::Udp),
        "tcp" => Ok(ProbeKind::Tcp),
        "http" => Ok(ProbeKind::Http),
        "https" => Ok(ProbeKind::Https),
        "sctp" => Ok(ProbeKind::Sctp),
        "icmp" => Err(format!("use ping for ICMP echo probes; {ALLOWED}")),
        _ => Err(ALLOWED.into()),
    }
}

pub fn parse_ep_select(raw: &str) -> Result<Selection, String> {
    const ALLOWED: &str = "allowed values: rr (or roundrobin), hash, persist, lc";
    match keyword(raw).as_str() {
        "rr" | "roundrobin" => Ok(Selection::RoundRobin),
        "hash" => Ok(Selection::Hash),
        "persist" => Ok(Selection::Persist),
        "lc" => Ok(Selection::LeastConn),
        s @ ("n2" | "n2det" | "n3") => Err(format!(
            "{s} (GTP-specific selection) is not supported by this load balancer; {ALLOWED}"
        )),
        _ => Err(ALLOWED.into()),
    }
}

fn parse_number(raw: &str, min: u32, max: u32, what: &str) -> Result<u32, String> {
    let allowed = format!("allowed values: an integer {min}..={max} ({what})");
    let t = raw.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("not an integer; {allowed}"));
    }
    match t.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("out of range; {allowed}")),
    }
}

fn parse_ip(raw: &str) -> Result<IpAddr, String> {
    raw.parse::<IpAddr>().map_err(|_| {
        format!("`{raw}` is not an IP address; allowed values: one IPv4 or IPv6 address")
    })
}

/// Comma-separated, trimmed items; empty items are an error.
fn list(raw: &str) -> Result<Vec<&str>, String> {
    let items: Vec<&str> = raw.split(',').map(str::trim).collect();
    if items.iter().any(|s| s.is_empty()) {
        return Err("empty item in a comma-separated list".into());
    }
    Ok(items)
}

fn no_duplicates<T: PartialEq + fmt::Display>(items: &[T]) -> Result<(), String> {
    for (i, a) in items.iter().enumerate() {
        if items[..i].contains(a) {
            return Err(format!("`{a}` is given twice"));
        }
    }
    Ok(())
}

fn parse_ip_list(raw: &str) -> Result<Vec<IpAddr>, String> {
    let items = list(raw).map_err(|e| {
        format!("{e}; allowed values: up to {MAX_SECONDARY_IPS} comma-separated IP addresses")
    })?;
    if items.len() > MAX_SECONDARY_IPS {
        return Err(format!(
            "{} addresses given; allowed values: up to {MAX_SECONDARY_IPS} comma-separated IP addresses",
            items.len()
        ));
    }
    let allowed =
        format!("allowed values: up to {MAX_SECONDARY_IPS} distinct comma-separated IP addresses");
    let ips = items
        .iter()
        .map(|s| {
            s.parse::<IpAddr>().map_err(|_| {
                format!("`{s}` is not an IP address; allowed values: up to {MAX_SECONDARY_IPS} comma-separated IP addresses")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    no_duplicates(&ips).map_err(|e| format!("{e}; {allowed}"))?;
    Ok(ips)
}

/// A pool name: `[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?`, at most 63
/// characters (the same rule the pool flags use).
pub fn parse_pool_name(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 63
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && raw.as_bytes()[0].is_ascii_alphanumeric()
        && raw.as_bytes()[raw.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(raw.to_string())
    } else {
        Err(format!(
            "`{raw}` is not a pool name; allowed values: the name of a pool from --cidrPools/--cidr6Pools/--externalSecondaryCIDRs (letters, digits, `.`, `_`, `-`; at most 63)"
        ))
    }
}

fn parse_pool_list(raw: &str) -> Result<Vec<String>, String> {
    let items = list(raw).map_err(|e| {
        format!("{e}; allowed values: up to {MAX_SECONDARY_IPS} comma-separated pool names")
    })?;
    if items.len() > MAX_SECONDARY_IPS {
        return Err(format!(
            "{} pools given; allowed values: up to {MAX_SECONDARY_IPS} comma-separated pool names",
            items.len()
        ));
    }
    let names = items
        .iter()
        .map(|s| parse_pool_name(s))
        .collect::<Result<Vec<_>, _>>()?;
    no_duplicates(&names).map_err(|e| {
        format!(
            "{e}; allowed values: up to {MAX_SECONDARY_IPS} distinct comma-separated pool names"
        )
    })?;
    Ok(names)
}

/// NetworkAttachmentDefinition references: `name` or `namespace/name`, each
/// part a DNS-1123 label.
fn parse_multus(raw: &str) -> Result<Vec<String>, String> {
    const ALLOWED: &str = "allowed values: comma-separated NetworkAttachmentDefinition names ([namespace/]name, lower-case DNS labels)";
    let items = list(raw).map_err(|e| format!("{e}; {ALLOWED}"))?;
    for item in &items {
        let parts: Vec<&str> = item.split('/').collect();
        if parts.len() > 2 || !parts.iter().all(|p| dns_label(p)) {
            return Err(format!("`{item}` is not a network name; {ALLOWED}"));
        }
    }
    let names: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    no_duplicates(&names).map_err(|e| format!("{e}; {ALLOWED}"))?;
    Ok(names)
}

/// RFC 1123 label: lower-case alphanumerics and `-`, alphanumeric at both
/// ends, at most 63 characters.
pub(crate) fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn parse_probe_text(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err(format!(
            "empty; allowed values: a non-empty text of at most {MAX_PROBE_TEXT} bytes (omit the annotation for none)"
        ));
    }
    if raw.len() > MAX_PROBE_TEXT {
        return Err(format!(
            "{} bytes; allowed values: a non-empty text of at most {MAX_PROBE_TEXT} bytes",
            raw.len()
        ));
    }
    Ok(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> ParsedAnnotations {
        parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn one_error(pairs: &[(&str, &str)]) -> Problem {
        let r = p(pairs);
        assert_eq!(r.errors.len(), 1, "errors: {:?}", r.errors);
        r.errors[0].clone()
    }

    #[test]
    fn empty_and_foreign_annotations() {
        let r = p(&[
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
            ("example.com/loxilb.io/lbmode", "nonsense"),
        ]);
        assert_eq!(r, ParsedAnnotations::default());
    }

    #[test]
    fn every_annotation_parses() {
        let r = p(&[
            ("loxilb.io/multus-nets", "macvlan1, kube-system/macvlan2"),
            ("loxilb.io/poolSelect", "pool1"),
            ("loxilb.io/poolSelectSecondary", "pool2,pool3"),
            ("loxilb.io/staticIP", "192.168.255.254"),
            ("loxilb.io/liveness", "yes"),
            ("loxilb.io/lbmode", "fullnat"),
            ("loxilb.io/ipam", "ipv6to4"),
            ("loxilb.io/timeout", "60"),
            ("loxilb.io/probetype", "tcp"),
            ("loxilb.io/probeport", "3000"),
            ("loxilb.io/probereq", "health"),
            ("loxilb.io/proberesp", "ok"),
            ("loxilb.io/probetimeout", "10"),
            ("loxilb.io/proberetries", "3"),
            ("loxilb.io/epselect", "hash"),
            ("loxilb.io/usepodnetwork", "no"),
        ]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let v = r.values;
        assert_eq!(v.multus_nets, vec!["macvlan1", "kube-system/macvlan2"]);
        assert_eq!(v.pool_select.as_deref(), Some("pool1"));
        assert_eq!(v.pool_select_secondary, vec!["pool2", "pool3"]);
        assert!(v.secondary_ips.is_empty());
        assert_eq!(v.static_ip, Some("192.168.255.254".parse().unwrap()));
        assert_eq!(v.liveness, Some(true));
        assert_eq!(v.lb_mode, Some(Mode::FullNat));
        assert_eq!(v.ipam, Some(IpamFamily::Ipv6To4));
        assert_eq!(v.timeout_s, Some(60));
        assert_eq!(v.probe_type, Some(ProbeKind::Tcp));
        assert_eq!(v.probe_port, Some(3000));
        assert_eq!(v.probe_req.as_deref(), Some("health"));
        assert_eq!(v.probe_resp.as_deref(), Some("ok"));
        assert_eq!(v.probe_timeout_s, Some(10));
        assert_eq!(v.probe_retries, Some(3));
        assert_eq!(v.ep_select, Some(Selection::Hash));
        assert_eq!(v.use_pod_network, Some(false));
    }

    #[test]
    fn keywords_ignore_case_and_spaces() {
        let r = p(&[
            ("loxilb.io/liveness", " YES "),
            ("loxilb.io/lbmode", "FullNAT"),
            ("loxilb.io/epselect", "RoundRobin"),
        ]);
        assert!(r.errors.is_empty());
        assert_eq!(r.values.liveness, Some(true));
        assert_eq!(r.values.lb_mode, Some(Mode::FullNat));
        assert_eq!(r.values.ep_select, Some(Selection::RoundRobin));
    }

    #[test]
    fn lbmode_values() {
        for (s, m) in [
            ("default", Mode::Default),
            ("onearm", Mode::OneArm),
            ("fullnat", Mode::FullNat),
            ("dsr", Mode::Dsr),
        ] {
            assert_eq!(parse_lb_mode(s), Ok(m));
            assert_eq!(m.to_string(), s);
        }
        for m in ["fullproxy", "hostonearm"] {
            let e = one_error(&[("loxilb.io/lbmode", m)]);
            assert_eq!(e.annotation, "loxilb.io/lbmode");
            assert_eq!(e.value, m);
            assert!(
                e.message.contains("not supported by this load balancer"),
                "{e}"
            );
            assert!(e.message.contains("default, onearm, fullnat, dsr"), "{e}");
        }
        let e = one_error(&[("loxilb.io/lbmode", "nat")]);
        assert_eq!(
            e.to_string(),
            "loxilb.io/lbmode: \"nat\": allowed values: default, onearm, fullnat, dsr"
        );
    }

    #[test]
    fn invalid_value_is_not_replaced() {
        let r = p(&[("loxilb.io/lbmode", "bogus"), ("loxilb.io/timeout", "30")]);
        assert_eq!(r.values.lb_mode, None, "no fallback to a default");
        assert_eq!(r.values.timeout_s, Some(30), "the valid field is kept");
        assert_eq!(r.errors.len(), 1);
        let errs = r.clone().into_result().unwrap_err();
        assert_eq!(errs[0].annotation, "loxilb.io/lbmode");
        let ok = p(&[("loxilb.io/timeout", "30")]).into_result().unwrap();
        assert_eq!(ok.0.timeout_s, Some(30));
        assert!(ok.1.is_empty());
    }

    #[test]
    fn ipam_aliases() {
        for (s, f) in [
            ("ipv4", IpamFamily::Ipv4),
            ("ip", IpamFamily::Ipv4),
            ("ip4", IpamFamily::Ipv4),
            ("ipv6", IpamFamily::Ipv6),
            ("ip6", IpamFamily::Ipv6),
            ("nat66", IpamFamily::Ipv6),
            ("ipv6to4", IpamFamily::Ipv6To4),
            ("nat64", IpamFamily::Ipv6To4),
        ] {
            assert_eq!(parse_ipam(s), Ok(f), "{s}");
        }
        let e = one_error(&[("loxilb.io/ipam", "dual")]);
        assert!(e.message.contains("ipv6to4 (or nat64)"), "{e}");
    }

    #[test]
    fn probetype_values() {
        for s in ["none", "ping", "udp", "tcp", "http", "https", "sctp"] {
            assert_eq!(parse_probe_type(s).unwrap().as_str(), s);
        }
        let e = one_error(&[("loxilb.io/probetype", "icmp")]);
        assert!(e.message.contains("use ping"), "{e}");
        let e = one_error(&[("loxilb.io/probetype", "grpc")]);
        assert!(e
            .message
            .contains("none, ping, udp, tcp, http, https, sctp"));
    }

    #[test]
    fn epselect_values() {
        for (s, m) in [
            ("rr", Selection::RoundRobin),
            ("roundrobin", Selection::RoundRobin),
            ("hash", Selection::Hash),
            ("persist", Selection::Persist),
            ("lc", Selection::LeastConn),
        ] {
            assert_eq!(parse_ep_select(s), Ok(m));
        }
        for s in ["n2", "n3", "n2det"] {
            let e = one_error(&[("loxilb.io/epselect", s)]);
            assert!(
                e.message.contains("not supported by this load balancer"),
                "{e}"
            );
            assert!(e.message.contains("rr (or roundrobin), hash, persist, lc"));
        }
        assert!(one_error(&[("loxilb.io/epselect", "random")])
            .message
            .starts_with("allowed values"));
    }

    #[test]
    fn yes_no() {
        assert_eq!(parse_yes_no("no"), Ok(false));
        let e = one_error(&[("loxilb.io/usepodnetwork", "true")]);
        assert_eq!(e.message, "allowed values: yes, no");
        let e = one_error(&[("loxilb.io/liveness", "")]);
        assert_eq!(e.annotation, "loxilb.io/liveness");
    }

    #[test]
    fn numbers() {
        assert_eq!(
            p(&[("loxilb.io/timeout", "604800")]).values.timeout_s,
            Some(604800)
        );
        for bad in ["0", "604801", "-1", "1.5", "60s", "", "+5", "99999999999"] {
            let e = one_error(&[("loxilb.io/timeout", bad)]);
            assert!(e.message.contains("1..=604800 (seconds)"), "{bad}: {e}");
        }
        assert_eq!(
            p(&[("loxilb.io/proberetries", "0")]).values.probe_retries,
            Some(0)
        );
        assert!(one_error(&[("loxilb.io/proberetries", "101")])
            .message
            .contains("0..=100"));
        assert!(one_error(&[("loxilb.io/probeport", "0")])
            .message
            .contains("1..=65535"));
        assert!(one_error(&[("loxilb.io/probeport", "65536")])
            .message
            .contains("out of range"));
        assert!(one_error(&[("loxilb.io/probetimeout", "0")])
            .message
            .contains("1..=3600"));
        assert_eq!(
            p(&[("loxilb.io/probeport", " 8080 ")]).values.probe_port,
            Some(8080)
        );
    }

    #[test]
    fn static_ip() {
        assert_eq!(
            p(&[("loxilb.io/staticIP", "3ffe::5")]).values.static_ip,
            Some("3ffe::5".parse().unwrap())
        );
        let e = one_error(&[("loxilb.io/staticIP", "123.123.123.0/24")]);
        assert!(e.message.contains("not an IP address"), "{e}");
        one_error(&[("loxilb.io/staticIP", "1.1.1.1,2.2.2.2")]);
    }

    #[test]
    fn secondary_ips() {
        let r = p(&[("loxilb.io/secondaryIPs", "1.1.1.1, 2.2.2.2,3ffe::1")]);
        assert!(r.errors.is_empty());
        assert_eq!(r.values.secondary_ips.len(), 3);
        let e = one_error(&[("loxilb.io/secondaryIPs", "1.1.1.1,2.2.2.2,3.3.3.3,4.4.4.4")]);
        assert!(
            e.message.contains("4 addresses given") && e.message.contains("up to 3"),
            "{e}"
        );
        assert!(one_error(&[("loxilb.io/secondaryIPs", "1.1.1.1,,2.2.2.2")])
            .message
            .contains("empty item"));
        assert!(one_error(&[("loxilb.io/secondaryIPs", "1.1.1.1,foo")])
            .message
            .contains("`foo`"));
        assert!(one_error(&[("loxilb.io/secondaryIPs", "1.1.1.1,1.1.1.1")])
            .message
            .contains("given twice"));
    }

    #[test]
    fn pools() {
        let e = one_error(&[("loxilb.io/poolSelect", "pool 1")]);
        assert!(e.message.contains("not a pool name"), "{e}");
        one_error(&[("loxilb.io/poolSelect", "")]);
        one_error(&[("loxilb.io/poolSelect", "-pool")]);
        assert!(one_error(&[("loxilb.io/poolSelectSecondary", "a,b,c,d")])
            .message
            .contains("up to 3"));
        assert!(one_error(&[("loxilb.io/poolSelectSecondary", "a,a")])
            .message
            .contains("given twice"));
        assert_eq!(
            p(&[("loxilb.io/poolSelect", " pool_2.x ")])
                .values
                .pool_select
                .as_deref(),
            Some("pool_2.x")
        );
    }

    #[test]
    fn secondary_pools_and_ips_together_is_an_error() {
        let r = p(&[
            ("loxilb.io/poolSelectSecondary", "pool2"),
            ("loxilb.io/secondaryIPs", "1.1.1.1"),
        ]);
        assert_eq!(r.errors.len(), 2);
        assert!(r.errors.iter().all(|e| e.message.contains("not both")));
        assert!(r.values.pool_select_secondary.is_empty());
        assert!(r.values.secondary_ips.is_empty());
    }

    #[test]
    fn multus_nets() {
        let e = one_error(&[("loxilb.io/multus-nets", "MacVlan")]);
        assert!(e.message.contains("NetworkAttachmentDefinition"), "{e}");
        one_error(&[("loxilb.io/multus-nets", "a/b/c")]);
        one_error(&[("loxilb.io/multus-nets", "a,")]);
        assert!(!dns_label("-a") && !dns_label("a-") && dns_label("a-1"));
    }

    #[test]
    fn probe_text() {
        let e = one_error(&[("loxilb.io/probereq", "")]);
        assert!(e.message.contains("empty"));
        let long = "x".repeat(MAX_PROBE_TEXT + 1);
        let e = one_error(&[("loxilb.io/proberesp", &long)]);
        assert!(e.to_string().contains("...\""), "long value shortened: {e}");
        assert!(e.to_string().len() < 300);
        assert_eq!(
            p(&[("loxilb.io/probereq", " GET /health ")])
                .values
                .probe_req
                .as_deref(),
            Some(" GET /health "),
            "probe payloads are kept exactly"
        );
    }

    #[test]
    fn typographic_quotes() {
        let e = one_error(&[("loxilb.io/poolSelect", "\u{201c}pool1\u{201d}")]);
        assert!(e.message.contains("typographic quotes"), "{e}");
    }

    #[test]
    fn unknown_annotation_is_a_warning() {
        let r = p(&[("loxilb.io/frobnicate", "yes")]);
        assert!(r.errors.is_empty());
        assert_eq!(r.warnings.len(), 1);
        let w = r.warnings[0].to_string();
        assert!(
            w.starts_with("loxilb.io/frobnicate: \"yes\": unknown loxilb.io annotation"),
            "{w}"
        );
        assert!(w.contains("poolSelect"));

        let r = p(&[("loxilb.io/poolselect", "pool1")]);
        assert!(r.warnings[0]
            .message
            .contains("did you mean loxilb.io/poolSelect?"));
        assert_eq!(r.values.pool_select, None);
    }

    #[test]
    fn kube_loxilb_only_annotations() {
        let r = p(&[
            ("loxilb.io/egress", "no"),
            ("loxilb.io/mtls-frontend-mode", "disabled"),
        ]);
        assert!(r.errors.is_empty());
        assert_eq!(r.warnings.len(), 2);
        let e = one_error(&[("loxilb.io/useproxyprotov2", "yes")]);
        assert!(e.message.contains("not supported by this load balancer"));
        one_error(&[("loxilb.io/nodelabel", "edge")]);
        let r = p(&[("loxilb.io/num-secondary-networks", "2")]);
        assert!(r.errors.is_empty());
        assert!(r.warnings[0].message.contains("no effect"));
    }

    #[test]
    fn own_record_annotation_is_skipped() {
        let r = p(&[(RECORD_ANNOTATION, "ips=1.2.3.4;ports=80/tcp")]);
        assert_eq!(r, ParsedAnnotations::default());
    }

    #[test]
    fn probe_parameters_without_effect_warn() {
        let r = p(&[
            ("loxilb.io/probetype", "ping"),
            ("loxilb.io/probeport", "80"),
            ("loxilb.io/probereq", "x"),
        ]);
        assert!(r.errors.is_empty());
        assert_eq!(r.warnings.len(), 2);
        assert!(r
            .warnings
            .iter()
            .all(|w| w.message.contains("probetype=ping")));
        assert_eq!(r.values.probe_port, Some(80), "kept; it is just unused");

        let r = p(&[
            ("loxilb.io/liveness", "no"),
            ("loxilb.io/probetimeout", "5"),
        ]);
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].message.contains("not probed"));
    }
}

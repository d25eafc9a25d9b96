//! The standalone rule file: parsed strictly, validated completely, and
//! every error names the file, the field and the value. Each rule is read
//! into the rule model ([`loxilb_model::Rule`]) and checked by its one
//! capability check ([`loxilb_model::supported`], the check Kubernetes
//! rules and REST API rules pass too), then against the rules before it
//! (a VIP, port and protocol, and a name, serve one rule).
//!
//! ```yaml
//! rules:
//!   - name: web              # optional; unique
//!     vip: 20.0.0.100
//!     secondary_vips: []     # SCTP multihoming: up to 3 more VIPs (sctp; mode default or fullnat)
//!     port: 80
//!     protocol: tcp          # tcp | udp | sctp
//!     mode: default          # default (DNAT) | onearm | fullnat | dsr | dsr-ipip
//!     selection: rr          # rr | hash (Maglev) | persist (source-IP affinity) | lc
//!     persist_timeout: 10800 # affinity lifetime, seconds (persist only)
//!     timeout: 1800          # idle seconds, 1..=604800 (default 1800)
//!     source_ranges: [192.168.0.0/16]   # allowed clients (default: all)
//!     endpoints:
//!       - { ip: 10.0.1.10, port: 8080, weight: 1 }
//!     probe:                 # optional endpoint health probing
//!       type: http           # none | ping | tcp | udp | http | https | sctp
//!       port: 8080           # default: each endpoint's port
//!       request: healthz     # udp payload / http path
//!       response: ok         # expected in the reply / body
//!       timeout: 5           # seconds (default 60)
//!       retries: 2           # consecutive failures to go down (default 2)
//!       interval: 10         # seconds between probes (default 10)
//! ```

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
};

use loxilb_model::{
    Endpoint, Mode, ProbeKind, ProbeSpec, Protocol, Rule, Selection, DEFAULT_PERSIST_TIMEOUT_S,
    DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S,
};
use serde::Deserialize;

/// A config error: which file, which field, what was wrong, what to do.
///
/// The message depends on whether there is a field, which thiserror's
/// `#[error(...)]` cannot say for a struct (its `fmt = ...` form is for
/// enums only), so `Display` is written out below; `Error` is derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.field, self.message)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rules: Vec<RawRule>,
}

/// An optional key: `None` when absent, `Some(None)` when given without
/// a value (`mode:` or `mode: ~`), which [`given`] refuses rather than
/// read as absent (a default the user did not ask for).
type Opt<T> = Option<Option<T>>;

fn present<'de, D, T>(d: D) -> Result<Opt<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The value of an optional key; a key without a value is an error.
fn given<T>(
    err: &dyn Fn(String, String) -> ConfigError,
    field: String,
    v: Opt<T>,
) -> Result<Option<T>, ConfigError> {
    match v {
        None => Ok(None),
        Some(None) => Err(err(
            field,
            "has no value; give one or remove the key (for its default)".into(),
        )),
        Some(Some(x)) => Ok(Some(x)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default, deserialize_with = "present")]
    name: Opt<String>,
    vip: String,
    #[serde(default)]
    secondary_vips: Vec<String>,
    port: serde_norway::Value,
    protocol: String,
    #[serde(default, deserialize_with = "present")]
    mode: Opt<String>,
    #[serde(default, deserialize_with = "present")]
    selection: Opt<String>,
    #[serde(default, deserialize_with = "present")]
    timeout: Opt<serde_norway::Value>,
    #[serde(default, deserialize_with = "present")]
    persist_timeout: Opt<serde_norway::Value>,
    #[serde(default)]
    source_ranges: Vec<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default, deserialize_with = "present")]
    probe: Opt<RawProbe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, deserialize_with = "present")]
    port: Opt<serde_norway::Value>,
    #[serde(default, deserialize_with = "present")]
    request: Opt<String>,
    #[serde(default, deserialize_with = "present")]
    response: Opt<String>,
    /// seconds
    #[serde(default, deserialize_with = "present")]
    timeout: Opt<serde_norway::Value>,
    #[serde(default, deserialize_with = "present")]
    retries: Opt<serde_norway::Value>,
    /// seconds
    #[serde(default, deserialize_with = "present")]
    interval: Opt<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    ip: String,
    port: serde_norway::Value,
    #[serde(default, deserialize_with = "present")]
    weight: Opt<serde_norway::Value>,
}

/// Read and validate a rule file.
pub fn load(path: &Path) -> Result<Vec<Rule>, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        field: String::new(),
        message: format!("cannot read the rule file: {e}"),
    })?;
    parse(&file, &text)
}

fn show(v: &serde_norway::Value) -> String {
    match v {
        serde_norway::Value::String(s) => format!("{s:?}"),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn int_in(
    err: &dyn Fn(String, String) -> ConfigError,
    field: String,
    v: &serde_norway::Value,
    min: u64,
    max: u64,
    what: &str,
) -> Result<u64, ConfigError> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(err(
            field,
            format!("{} is not {what} (an integer {min}..={max})", show(v)),
        )),
    }
}

/// Parse and validate rule-file text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Vec<Rule>, ConfigError> {
    let err = |field: String, message: String| ConfigError {
        file: file.to_string(),
        field,
        message,
    };
    // An empty file is far more often an editor or a copy caught halfway
    // than a wish to delete every rule: refuse it (`rules: []` says so).
    let raw: RawFile = if text.trim().is_empty() {
        return Err(err(
            String::new(),
            "the file is empty; to remove every rule, write `rules: []`".to_string(),
        ));
    } else {
        serde_norway::from_str(text).map_err(|e| {
            let loc = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            err(String::new(), format!("{e}{loc}"))
        })?
    };
    check_raw(file, raw)
}

/// Rules given as a YAML value of the rule file's shape (`{rules: [...]}`,
/// built by another front end, the REST API): every check of [`parse`],
/// errors naming `file` and the rule file's field paths.
pub fn parse_value(file: &str, v: serde_norway::Value) -> Result<Vec<Rule>, ConfigError> {
    let raw: RawFile = serde_norway::from_value(v).map_err(|e| ConfigError {
        file: file.to_string(),
        field: String::new(),
        message: e.to_string(),
    })?;
    check_raw(file, raw)
}

/// Every check of the rule file, on its parsed form: each rule read into
/// the rule model, checked by [`loxilb_model::supported`], then against
/// the rules before it.
fn check_raw(file: &str, raw: RawFile) -> Result<Vec<Rule>, ConfigError> {
    let err = |field: String, message: String| ConfigError {
        file: file.to_string(),
        field,
        message,
    };
    let mut rules = Vec::with_capacity(raw.rules.len());
    // (VIP, port, protocol) -> which rule defines it, and how.
    let mut seen_keys: HashMap<(IpAddr, u16, Protocol), String> = HashMap::new();
    let mut seen_names = HashSet::new();
    for (i, r) in raw.rules.into_iter().enumerate() {
        let mut rule = read_rule(&err, i, r)?;
        loxilb_model::supported(&rule)
            .map_err(|e| err(format!("rules[{i}].{}", e.field), e.message()))?;
        rule.source_ranges.sort();
        rule.source_ranges.dedup();
        if rule
            .probe
            .as_ref()
            .is_some_and(|p| p.kind == ProbeKind::None)
        {
            rule.probe = None;
        }
        let (name, port, protocol) = (&rule.name, rule.port, rule.protocol);
        let keys = std::iter::once((format!("rules[{i}].vip"), rule.vip, "VIP")).chain(
            rule.secondary_vips.iter().enumerate().map(|(j, a)| {
                (
                    format!("rules[{i}].secondary_vips[{j}]"),
                    *a,
                    "secondary VIP",
                )
            }),
        );
        for (field, a, what) in keys {
            let this = format!("rules[{i}] ({name:?}) as its {what}");
            if let Some(other) = seen_keys.insert((a, port, protocol), this) {
                return Err(err(
                    field,
                    format!(
                        "{}/{protocol} is already defined by {other}; a VIP, port and protocol \
                         serve one rule: change the address or the port of one of them",
                        std::net::SocketAddr::new(a, port)
                    ),
                ));
            }
        }
        if !seen_names.insert(name.clone()) {
            return Err(err(
                format!("rules[{i}].name"),
                format!("{name:?} is used by another rule"),
            ));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Rule `i` of the file (`r`) read into the rule model: every value
/// parsed, nothing yet checked against what the load balancer can do.
fn read_rule(
    err: &dyn Fn(String, String) -> ConfigError,
    i: usize,
    r: RawRule,
) -> Result<Rule, ConfigError> {
    let f = |name: &str| format!("rules[{i}].{name}");
    let ip = |field: String, text: &str, like: &str| {
        text.trim()
            .parse::<IpAddr>()
            .map_err(|_| err(field, format!("{text:?} is not an IP address{like}")))
    };
    let vip = ip(f("vip"), &r.vip, " (like 20.0.0.1 or 2001:db8::1)")?;
    let port = int_in(err, f("port"), &r.port, 1, 65535, "a port")? as u16;
    let Some(protocol) = Protocol::from_name(&r.protocol) else {
        return Err(err(
            f("protocol"),
            format!("{:?} is not supported; use tcp, udp or sctp", r.protocol),
        ));
    };
    let mut rule = Rule::new(vip, port, protocol);
    let raw_mode = given(err, f("mode"), r.mode)?;
    rule.mode = match raw_mode.as_deref().map(str::trim) {
        None | Some("default") => Mode::Default,
        Some("onearm") => Mode::OneArm,
        Some("fullnat") => Mode::FullNat,
        Some("dsr") => Mode::Dsr,
        Some("dsr-ipip") => Mode::DsrIpip,
        Some(m @ ("fullproxy" | "hostonearm")) => {
            return Err(err(
                f("mode"),
                format!("{m:?} is not supported by this load balancer; use default, onearm, fullnat, dsr or dsr-ipip"),
            ))
        }
        Some(_) => {
            return Err(err(
                f("mode"),
                format!(
                    "{:?} is not a mode; use default, onearm, fullnat, dsr or dsr-ipip",
                    raw_mode.unwrap_or_default()
                ),
            ))
        }
    };
    let raw_selection = given(err, f("selection"), r.selection)?;
    rule.selection = match raw_selection.as_deref().map(str::trim) {
        None | Some("rr") | Some("roundrobin") => Selection::RoundRobin,
        Some("hash") => Selection::Hash,
        Some("persist") => Selection::Persist,
        Some("lc") => Selection::LeastConn,
        Some(_) => {
            return Err(err(
                f("selection"),
                format!(
                    "{:?} is not a selection; use rr, hash, persist or lc",
                    raw_selection.unwrap_or_default()
                ),
            ))
        }
    };
    rule.timeout_s = match &given(err, f("timeout"), r.timeout)? {
        None => DEFAULT_TIMEOUT_S,
        Some(v) => int_in(
            err,
            f("timeout"),
            v,
            1,
            MAX_TIMEOUT_S as u64,
            "an idle timeout in seconds",
        )? as u32,
    };
    rule.persist_timeout_s = match (
        &given(err, f("persist_timeout"), r.persist_timeout)?,
        rule.selection,
    ) {
        (None, _) => DEFAULT_PERSIST_TIMEOUT_S,
        (Some(v), Selection::Persist) => int_in(
            err,
            f("persist_timeout"),
            v,
            1,
            MAX_TIMEOUT_S as u64,
            "an affinity timeout in seconds",
        )? as u32,
        (Some(_), _) => {
            return Err(err(
                f("persist_timeout"),
                "only applies to selection: persist".into(),
            ))
        }
    };
    for (j, cidr) in r.source_ranges.iter().enumerate() {
        let net: ipnet::IpNet = cidr.trim().parse().map_err(|_| {
            err(
                format!("rules[{i}].source_ranges[{j}]"),
                format!("{cidr:?} is not an IP prefix (like 192.168.0.0/16 or 2001:db8::/32)"),
            )
        })?;
        rule.source_ranges.push(net);
    }
    match given(err, f("name"), r.name)? {
        Some(n) if n.trim().is_empty() => return Err(err(f("name"), "must not be empty".into())),
        Some(n) => rule.name = n,
        None => {}
    }
    for (j, text) in r.secondary_vips.iter().enumerate() {
        rule.secondary_vips.push(ip(
            format!("rules[{i}].secondary_vips[{j}]"),
            text,
            " (like 30.0.0.1 or 2001:db8:1::1)",
        )?);
    }
    for (j, e) in r.endpoints.into_iter().enumerate() {
        let g = |name: &str| format!("rules[{i}].endpoints[{j}].{name}");
        let ip = ip(g("ip"), &e.ip, "")?;
        let port = int_in(err, g("port"), &e.port, 1, 65535, "a port")? as u16;
        let weight = match &given(err, g("weight"), e.weight)? {
            None => 1,
            Some(v) => int_in(err, g("weight"), v, 1, 65535, "a weight")? as u16,
        };
        rule.endpoints.push(Endpoint { ip, port, weight });
    }
    if let Some(p) = given(err, f("probe"), r.probe)? {
        let pf = |n: &str| format!("rules[{i}].probe.{n}");
        let kind: ProbeKind = p.kind.trim().parse().map_err(|_| {
            err(
                pf("type"),
                format!(
                    "{:?} is not a probe type; use none, ping, tcp, udp, http, https or sctp",
                    p.kind
                ),
            )
        })?;
        let mut spec = ProbeSpec::new(kind);
        if let Some(v) = &given(err, pf("port"), p.port)? {
            spec.port = Some(int_in(err, pf("port"), v, 1, 65535, "a port")? as u16);
        }
        spec.request = given(err, pf("request"), p.request)?;
        spec.response = given(err, pf("response"), p.response)?;
        let secs = |v: &serde_norway::Value, n: &str| -> Result<std::time::Duration, ConfigError> {
            match v.as_f64() {
                Some(x) if x > 0.0 && x <= 86400.0 => Ok(std::time::Duration::from_secs_f64(x)),
                _ => Err(err(
                    pf(n),
                    format!("{} is not a duration in seconds (like 5 or 0.5)", show(v)),
                )),
            }
        };
        if let Some(v) = &given(err, pf("timeout"), p.timeout)? {
            spec.timeout = secs(v, "timeout")?;
        }
        if let Some(v) = &given(err, pf("interval"), p.interval)? {
            spec.interval = secs(v, "interval")?;
        }
        if let Some(v) = &given(err, pf("retries"), p.retries)? {
            spec.retries = int_in(err, pf("retries"), v, 0, 100, "a retry count")? as u32;
        }
        rule.probe = Some(spec);
    }
    Ok(rule)
}

/// One reload of the rule file (`loxilb-agent run`: SIGHUP, or the file
/// changed): `load` reads and checks the whole file; only rules that pass
/// every check reach `apply`. A bad file is refused as a whole, with its
/// error, and nothing is applied: the rules already running stay as they
/// are. `Ok` holds what `apply` returned (a failed map write is not a
/// problem of the file).
pub fn reload<T>(
    load: impl FnOnce() -> Result<Vec<Rule>, ConfigError>,
    apply: impl FnOnce(&[Rule]) -> T,
) -> Result<T, ConfigError> {
    let rules = load()?;
    Ok(apply(&rules))
}

/// Check what the rule file cannot know by itself: every endpoint of an L2
/// DSR rule (IPv4 or IPv6) must be on a segment this node is directly
/// attached to, by the node's routing table (read over rtnetlink; should
/// the route change later, the datapath drops and counts
/// `drop_dsr_no_l2`).
pub fn check_reachability(
    file: &str,
    rules: &[Rule],
    routes: &[crate::routes::Route],
) -> Result<(), ConfigError> {
    check_dsr_endpoints(file, rules, |ip| crate::routes::l2_problem(routes, ip))
}

/// The first endpoint of a `dsr` rule for which `problem` says what is
/// wrong, as an error naming it.
fn check_dsr_endpoints(
    file: &str,
    rules: &[Rule],
    problem: impl Fn(IpAddr) -> Option<String>,
) -> Result<(), ConfigError> {
    for (i, r) in rules.iter().enumerate() {
        if r.mode != Mode::Dsr {
            continue;
        }
        for (j, e) in r.endpoints.iter().enumerate() {
            if let Some(why) = problem(e.ip) {
                return Err(ConfigError {
                    file: file.to_string(),
                    field: format!("rules[{i}].endpoints[{j}].ip"),
                    message: why,
                });
            }
        }
    }
    Ok(())
}

/// L2 DSR hands the client's frame, still addressed to the VIP, to the
/// endpoint's MAC by XDP redirect: the stack cannot send such a frame. So
/// a `dsr` endpoint must be reached through a device XDP can transmit
/// through (`devs`: every device and its forwarding, see
/// [`crate::devices::classify`]).
pub fn check_dsr_forwarding(
    file: &str,
    rules: &[Rule],
    routes: &[crate::routes::Route],
    devs: &[(crate::netlink::Link, loxilb_common::DevFwd)],
) -> Result<(), ConfigError> {
    check_dsr_endpoints(file, rules, |ip| {
        // No route: check_reachability says so.
        let route = crate::routes::lookup(routes, ip)?;
        let (_, d) = devs.iter().find(|(l, _)| l.name == route.iface)?;
        (d.mode != loxilb_common::dev_fwd::REDIRECT).then(|| {
            format!(
                "{ip} is reached through {} ({}); L2 DSR sends the client's frame to the \
                 endpoint by XDP redirect, which cannot deliver there: use mode dsr-ipip \
                 or fullnat, or reach the endpoint through a device that takes XDP frames",
                route.iface,
                crate::devices::describe(d)
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsr_endpoints_need_a_device_xdp_can_send_through() {
        let text =
            "rules:\n  - vip: 20.0.0.1\n    port: 80\n    protocol: tcp\n    mode: dsr\n    \
                    endpoints: [{ ip: 10.0.1.10, port: 80 }]\n";
        let rules = parse("r.yaml", text).unwrap();
        let routes = vec![crate::routes::Route {
            iface: "br1".into(),
            dest: "10.0.1.0".parse().unwrap(),
            prefix_len: 24,
            gateway: None,
        }];
        let link = crate::netlink::Link {
            index: 3,
            name: "br1".into(),
            kind: Some("bridge".into()),
            up: true,
            loopback: false,
            mac: None,
        };
        let bridge = crate::devices::classify(&link, Some(crate::netlink::XDP_ACT_NDO_XMIT));
        let e = check_dsr_forwarding("r.yaml", &rules, &routes, &[(link.clone(), bridge)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rules[0].endpoints[0].ip"), "{e}");
        assert!(e.contains("reached through br1 (stack (bridge"), "{e}");
        let mut veth = link;
        veth.kind = Some("veth".into());
        let ok = crate::devices::classify(&veth, Some(crate::netlink::XDP_ACT_NDO_XMIT));
        assert!(check_dsr_forwarding("r.yaml", &rules, &routes, &[(veth, ok)]).is_ok());
    }

    const GOOD: &str = r#"
rules:
  - name: web
    vip: 20.0.0.100
    port: 80
    protocol: tcp
    timeout: 60
    endpoints:
      - { ip: 10.0.1.10, port: 8080 }
      - { ip: 10.0.2.10, port: 8080, weight: 3 }
  - vip: 20.0.0.100
    port: 53
    protocol: UDP
    endpoints: []
"#;

    #[test]
    fn parses_a_good_file() {
        let r = parse("r.yaml", GOOD).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "web");
        assert_eq!(r[0].timeout_s, 60);
        assert_eq!(r[0].endpoints[1].weight, 3);
        assert_eq!(r[1].name, "20.0.0.100:53/udp");
        assert_eq!(r[1].protocol, Protocol::Udp);
        assert_eq!(r[1].timeout_s, DEFAULT_TIMEOUT_S);
        assert!(r[0].source_ranges.is_empty());
    }

    #[test]
    fn probes_parse_and_bad_settings_name_the_field() {
        let r = parse(
            "r.yaml",
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, probe: {type: http, request: healthz, response: ok, timeout: 0.5, retries: 3, interval: 2}}\n  - {vip: 20.0.0.1, port: 81, protocol: tcp, probe: {type: none}}\n",
        )
        .unwrap();
        let p = r[0].probe.as_ref().unwrap();
        assert_eq!(p.kind, crate::probe::ProbeKind::Http);
        assert_eq!(p.timeout, std::time::Duration::from_millis(500));
        assert_eq!(p.retries, 3);
        assert!(r[1].probe.is_none(), "type none means no probing");
        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, probe: {type: icmp}}\n");
        assert_eq!(e.field, "rules[0].probe.type");
        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, probe: {type: tcp, timeout: abc}}\n");
        assert_eq!(e.field, "rules[0].probe.timeout");
        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, probe: {type: ping, port: 80}}\n",
        );
        assert_eq!(e.field, "rules[0].probe");
        assert!(e.message.contains("port"), "{e}");
    }

    #[test]
    fn ipv6_rules_and_family_mistakes() {
        let r = parse(
            "r.yaml",
            "rules:\n  - {vip: \"fd00::1\", port: 80, protocol: tcp, source_ranges: [\"fd00:c::/64\"], endpoints: [{ip: \"fd00:1::10\", port: 8080}]}\n",
        )
        .unwrap();
        assert!(r[0].vip.is_ipv6() && r[0].endpoints[0].ip.is_ipv6());
        assert_eq!(r[0].name, "[fd00::1]:80/tcp");
        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: \"fd00:1::10\", port: 1}]}\n");
        assert!(e.message.contains("NAT46"), "{e}");
        let e = bad("rules:\n  - {vip: \"fd00::1\", port: 80, protocol: tcp, endpoints: [{ip: \"fd00:1::10\", port: 1}, {ip: 10.0.0.1, port: 1}]}\n");
        assert!(e.message.contains("one family"), "{e}");
        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, source_ranges: [\"fd00::/8\"]}\n",
        );
        assert!(
            e.message.contains("can never match") && e.field.contains("source_ranges[0]"),
            "{e}"
        );
        let e = bad("rules:\n  - {vip: \"fd00::1\", port: 80, protocol: tcp, mode: dsr-ipip, endpoints: [{ip: \"fd00:1::10\", port: 80}]}\n");
        assert!(e.message.contains("IPv4 only"), "{e}");
        let e = bad("rules:\n  - {vip: \"::ffff:10.0.0.1\", port: 80, protocol: tcp}\n");
        assert!(e.message.contains("cannot be a service address"), "{e}");
    }

    #[test]
    fn selections_and_ranges() {
        let r = parse(
            "r.yaml",
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, selection: persist, persist_timeout: 60, source_ranges: [192.168.0.0/16, 10.0.0.0/8, 10.0.0.0/8]}\n  - {vip: 20.0.0.1, port: 81, protocol: tcp, selection: hash}\n",
        )
        .unwrap();
        assert_eq!(r[0].selection, Selection::Persist);
        assert_eq!(r[0].persist_timeout_s, 60);
        assert_eq!(r[0].source_ranges.len(), 2, "sorted and deduplicated");
        assert_eq!(r[1].selection, Selection::Hash);
        assert_eq!(r[1].persist_timeout_s, DEFAULT_PERSIST_TIMEOUT_S);
    }

    #[test]
    fn empty_file_is_refused_and_an_empty_list_means_no_rules() {
        let e = parse("r.yaml", "").unwrap_err();
        assert!(e.to_string().contains("rules: []"), "{e}");
        assert!(parse("r.yaml", " \n").is_err());
        assert!(parse("r.yaml", "rules: []").unwrap().is_empty());
    }

    fn bad(text: &str) -> ConfigError {
        parse("r.yaml", text).unwrap_err()
    }

    #[test]
    fn errors_name_file_field_and_value() {
        let e = bad("rules:\n  - {vip: 20.0.0.300, port: 80, protocol: tcp}\n");
        assert_eq!(e.field, "rules[0].vip");
        assert!(
            e.to_string()
                .starts_with("r.yaml: rules[0].vip: \"20.0.0.300\""),
            "{e}"
        );

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 70000, protocol: tcp}\n");
        assert_eq!(e.field, "rules[0].port");
        assert!(e.message.contains("70000"), "{e}");

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: icmp}\n");
        assert_eq!(e.field, "rules[0].protocol");
        assert!(e.message.contains("icmp") && e.message.contains("tcp, udp or sctp"));

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, timeout: abc}\n");
        assert_eq!(e.field, "rules[0].timeout");
        assert!(e.message.contains("abc"));

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, mode: fullproxy}\n");
        assert_eq!(e.field, "rules[0].mode");
        assert!(e.message.contains("not supported"));

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, mode: dsr, endpoints: [{ip: 10.0.0.1, port: 8080}]}\n");
        assert_eq!(e.field, "rules[0].endpoints[0].port");
        assert!(e.message.contains("service port 80"), "{e}");

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, selection: n3}\n");
        assert_eq!(e.field, "rules[0].selection");

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, persist_timeout: 5}\n");
        assert_eq!(e.field, "rules[0].persist_timeout");
        assert!(e.message.contains("selection: persist"));

        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, source_ranges: [10.0.0.1/8]}\n",
        );
        assert_eq!(e.field, "rules[0].source_ranges[0]");
        assert!(e.message.contains("10.0.0.0/8"), "{e}");

        let e =
            bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, source_ranges: [nope]}\n");
        assert_eq!(e.field, "rules[0].source_ranges[0]");

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, mode: bogus}\n");
        assert!(e.message.contains("not a mode"));

        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: 1.2.3.4, port: 0}]}\n",
        );
        assert_eq!(e.field, "rules[0].endpoints[0].port");

        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: x, port: 1}]}\n",
        );
        assert_eq!(e.field, "rules[0].endpoints[0].ip");

        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: 1.1.1.1, port: 1, weight: 0}]}\n",
        );
        assert_eq!(e.field, "rules[0].endpoints[0].weight");
    }

    /// Found by the rule-file property test: `mode:` with no value (or
    /// `~`) was read as absent, the default silently taking its place.
    #[test]
    fn a_key_without_a_value_is_refused_not_defaulted() {
        for (extra, field) in [
            ("mode: ~", "rules[0].mode"),
            ("mode: null", "rules[0].mode"),
            ("selection: null", "rules[0].selection"),
            ("timeout: ~", "rules[0].timeout"),
            ("name: ~", "rules[0].name"),
            ("probe: ~", "rules[0].probe"),
            ("probe: {type: http, timeout: ~}", "rules[0].probe.timeout"),
            (
                "endpoints: [{ip: 10.0.0.1, port: 1, weight: ~}]",
                "rules[0].endpoints[0].weight",
            ),
        ] {
            let e = bad(&format!(
                "rules:\n  - {{vip: 20.0.0.1, port: 80, protocol: tcp, {extra}}}\n"
            ));
            assert_eq!(e.field, field, "{extra}: {e}");
            assert!(e.message.contains("has no value"), "{e}");
        }
        // A key left empty in block style.
        let e = bad("rules:\n  - vip: 20.0.0.1\n    port: 80\n    protocol: tcp\n    mode:\n");
        assert_eq!(e.field, "rules[0].mode", "{e}");
    }

    #[test]
    fn unknown_fields_and_duplicates_are_errors() {
        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, vipp: 1}\n");
        assert!(e.message.contains("vipp"), "{e}");
        assert!(e.message.contains("line"), "{e}");

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp}\n  - {vip: 20.0.0.1, port: 80, protocol: tcp}\n");
        assert_eq!(e.field, "rules[1].vip");
        assert!(e.message.contains("already defined"));

        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: 1.1.1.1, port: 1}, {ip: 1.1.1.1, port: 1}]}\n");
        assert_eq!(e.field, "rules[0].endpoints[1].ip");
    }

    #[test]
    fn secondary_vips_parse_for_sctp_default_rules() {
        let r = parse(
            "r.yaml",
            "rules:\n  - {name: s, vip: 20.0.0.7, secondary_vips: [30.0.0.2, \" 31.0.0.2 \"], port: 38412, protocol: sctp}\n  - {vip: \"fd00::7\", secondary_vips: [\"fd00:1::7\"], port: 38412, protocol: sctp}\n  - {vip: 20.0.0.8, port: 38412, protocol: sctp}\n  - {vip: 20.0.0.9, secondary_vips: [30.0.0.9], port: 38412, protocol: sctp, mode: fullnat}\n",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(r[0].secondary_vips, vec![ip("30.0.0.2"), ip("31.0.0.2")]);
        assert_eq!(r[1].secondary_vips, vec![ip("fd00:1::7")]);
        assert!(r[2].secondary_vips.is_empty());
        assert_eq!(r[3].secondary_vips, vec![ip("30.0.0.9")]);
        assert_eq!(r[3].mode, Mode::FullNat);
        // An empty list is no list, whatever the protocol.
        let r = parse(
            "r.yaml",
            "rules:\n  - {vip: 20.0.0.1, secondary_vips: [], port: 80, protocol: tcp}\n",
        )
        .unwrap();
        assert!(r[0].secondary_vips.is_empty());
    }

    #[test]
    fn secondary_vip_errors_name_the_field_and_say_why() {
        let sctp = |extra: &str| {
            bad(&format!(
                "rules:\n  - {{vip: 20.0.0.7, port: 38412, protocol: sctp, {extra}}}\n"
            ))
        };
        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, secondary_vips: [30.0.0.1]}\n",
        );
        assert_eq!(e.field, "rules[0].secondary_vips");
        assert!(
            e.message.contains("only SCTP") && e.message.contains("protocol: sctp"),
            "{e}"
        );
        let e = bad(
            "rules:\n  - {vip: 20.0.0.1, port: 53, protocol: udp, secondary_vips: [30.0.0.1]}\n",
        );
        assert_eq!(e.field, "rules[0].secondary_vips");
        let e = sctp("mode: onearm, secondary_vips: [30.0.0.1]");
        assert_eq!(e.field, "rules[0].secondary_vips");
        assert!(
            e.message.contains("not onearm") && e.message.contains("use mode: default or fullnat"),
            "{e}"
        );
        let e = sctp("secondary_vips: [30.0.0.1, 30.0.0.2, 30.0.0.3, 30.0.0.4]");
        assert_eq!(e.field, "rules[0].secondary_vips");
        assert!(e.message.contains("at most 3"), "{e}");
        let e = sctp("secondary_vips: [30.0.0.1, nope]");
        assert_eq!(e.field, "rules[0].secondary_vips[1]");
        assert!(e.message.contains("\"nope\" is not an IP address"), "{e}");
        let e = sctp("secondary_vips: [\"fd00::1\"]");
        assert_eq!(e.field, "rules[0].secondary_vips[0]");
        assert!(e.message.contains("the VIP's family"), "{e}");
        let e = sctp("secondary_vips: [20.0.0.7]");
        assert_eq!(e.field, "rules[0].secondary_vips[0]");
        assert!(e.message.contains("the rule's VIP itself"), "{e}");
        let e = sctp("secondary_vips: [30.0.0.1, 30.0.0.1]");
        assert_eq!(e.field, "rules[0].secondary_vips[1]");
        assert!(e.message.contains("listed twice"), "{e}");
        let e = sctp("secondary_vips: [255.255.255.255]");
        assert_eq!(e.field, "rules[0].secondary_vips[0]");
        assert!(e.message.contains("cannot be a service address"), "{e}");
    }

    #[test]
    fn secondary_vips_collide_with_other_rules_vips() {
        // A secondary VIP that is another rule's VIP (same port, protocol).
        let e = bad("rules:\n  - {name: a, vip: 30.0.0.1, port: 9, protocol: sctp}\n  - {name: b, vip: 20.0.0.1, port: 9, protocol: sctp, secondary_vips: [30.0.0.1]}\n");
        assert_eq!(e.field, "rules[1].secondary_vips[0]");
        assert!(
            e.message
                .contains("30.0.0.1:9/sctp is already defined by rules[0] (\"a\") as its VIP"),
            "{e}"
        );
        // A VIP that is another rule's secondary VIP.
        let e = bad("rules:\n  - {name: a, vip: 20.0.0.1, port: 9, protocol: sctp, secondary_vips: [30.0.0.1]}\n  - {name: b, vip: 30.0.0.1, port: 9, protocol: sctp}\n");
        assert_eq!(e.field, "rules[1].vip");
        assert!(
            e.message.contains("rules[0] (\"a\") as its secondary VIP"),
            "{e}"
        );
        // Two rules sharing a secondary VIP.
        let e = bad("rules:\n  - {name: a, vip: 20.0.0.1, port: 9, protocol: sctp, secondary_vips: [30.0.0.1]}\n  - {name: b, vip: 20.0.0.2, port: 9, protocol: sctp, secondary_vips: [30.0.0.1]}\n");
        assert_eq!(e.field, "rules[1].secondary_vips[0]");
        assert!(e.message.contains("as its secondary VIP"), "{e}");
        // Another port or protocol is another service.
        parse("r.yaml", "rules:\n  - {name: a, vip: 20.0.0.1, port: 9, protocol: sctp, secondary_vips: [30.0.0.1]}\n  - {name: b, vip: 30.0.0.1, port: 10, protocol: sctp}\n  - {name: c, vip: 30.0.0.1, port: 9, protocol: tcp}\n").unwrap();
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = load(Path::new("/nonexistent/rules.yaml")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("/nonexistent/rules.yaml: cannot read"));
    }
}

//! The standalone rule file: parsed strictly, validated completely, and
//! every error names the file, the field and the value. The file is read
//! by typed serde (each field a type of its own that reads its value or
//! refuses it, saying what is allowed; unknown keys refused), through
//! [`serde_path_to_error`] for the field's path (`rules[2].endpoints[0].port`)
//! and serde_norway for the line. Each rule is read
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
    marker::PhantomData,
    net::IpAddr,
    path::Path,
    time::Duration,
};

use loxilb_model::{
    Endpoint, Mode, ProbeKind, ProbeSpec, Protocol, Rule, Selection, DEFAULT_PERSIST_TIMEOUT_S,
    DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S,
};
use serde::{de, Deserialize, Deserializer};

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

/// The file: a list of rules, nothing else.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rule file: a mapping with a `rules` list (`rules: []` for none)"
)]
struct RawFile {
    #[serde(default)]
    rules: Vec<RawRule>,
}

/// One rule as written: each field of its own type, which reads the value
/// into the rule model's or refuses it with the value as given and what
/// is allowed (the field's path is added by [`serde_path_to_error`]).
/// Optional keys are read with [`not_null`]: a key given without a value
/// is an error, not its default.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rule: a mapping with vip, port, protocol and optional settings"
)]
struct RawRule {
    #[serde(default, deserialize_with = "not_null")]
    name: Option<Name>,
    vip: Ip,
    #[serde(default)]
    secondary_vips: Vec<Ip>,
    port: Port,
    protocol: ProtocolName,
    #[serde(default, deserialize_with = "not_null")]
    mode: Option<ModeName>,
    #[serde(default, deserialize_with = "not_null")]
    selection: Option<SelectionName>,
    #[serde(default, deserialize_with = "not_null")]
    timeout: Option<IdleTimeout>,
    #[serde(default, deserialize_with = "not_null")]
    persist_timeout: Option<AffinityTimeout>,
    #[serde(default)]
    source_ranges: Vec<Prefix>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default, deserialize_with = "not_null")]
    probe: Option<RawProbe>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a probe: a mapping with type and optional settings"
)]
struct RawProbe {
    #[serde(rename = "type")]
    kind: ProbeType,
    #[serde(default, deserialize_with = "not_null")]
    port: Option<Port>,
    #[serde(default, deserialize_with = "not_null")]
    request: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    response: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    timeout: Option<ProbeSeconds>,
    #[serde(default, deserialize_with = "not_null")]
    retries: Option<Retries>,
    #[serde(default, deserialize_with = "not_null")]
    interval: Option<ProbeSeconds>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an endpoint: a mapping with ip, port and optional weight"
)]
struct RawEndpoint {
    ip: Ip,
    port: Port,
    #[serde(default, deserialize_with = "not_null")]
    weight: Option<Weight>,
}

/// An optional key's value; a key without one (`mode:`, `mode: ~`) is
/// refused rather than read as absent (a default the user did not ask
/// for). The error comes from inside the deserializer's call, so it names
/// this key's path and line.
fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Given<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Given<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a value")
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
            Err(E::custom(
                "has no value; give one or remove the key (for its default)",
            ))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
            self.visit_none()
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            T::deserialize(d).map(Some)
        }
    }
    d.deserialize_option(Given(PhantomData))
}

/// A field written as text (any YAML scalar, as written: `name: 007` is
/// "007", `name: no` is "no"), read by `read`, which says what is wrong
/// with a value it refuses.
fn text<'de, D, T>(d: D, read: fn(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Text<T>(fn(&str) -> Result<T, String>);
    impl<'de, T> de::Visitor<'de> for Text<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            (self.0)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(Text(read))
}

/// Text fields: each reads its text into the rule model's value.
macro_rules! text_field {
    ($(#[$m:meta])* $name:ident($t:ty), |$s:ident| $read:expr) => {
        $(#[$m])*
        struct $name($t);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                text(d, |$s: &str| -> Result<$name, String> { $read.map($name) })
            }
        }
    };
}

text_field!(
    /// An address: a VIP, a secondary VIP, an endpoint's.
    Ip(IpAddr),
    |s| s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address (like 20.0.0.1 or 2001:db8::1)"))
);
text_field!(
    /// A rule's name: any text but blank.
    Name(String),
    |s| if s.trim().is_empty() {
        Err("must not be empty".to_string())
    } else {
        Ok(s.to_string())
    }
);
text_field!(ProtocolName(Protocol), |s| Protocol::from_name(s)
    .ok_or_else(|| format!(
        "{s:?} is not supported; use tcp, udp or sctp"
    )));
text_field!(ModeName(Mode), |s| match s.trim() {
    "default" => Ok(Mode::Default),
    "onearm" => Ok(Mode::OneArm),
    "fullnat" => Ok(Mode::FullNat),
    "dsr" => Ok(Mode::Dsr),
    "dsr-ipip" => Ok(Mode::DsrIpip),
    m @ ("fullproxy" | "hostonearm") => Err(format!(
        "{m:?} is not supported by this load balancer; use default, onearm, fullnat, dsr \
             or dsr-ipip"
    )),
    _ => Err(format!(
        "{s:?} is not a mode; use default, onearm, fullnat, dsr or dsr-ipip"
    )),
});
text_field!(SelectionName(Selection), |s| match s.trim() {
    "rr" | "roundrobin" => Ok(Selection::RoundRobin),
    "hash" => Ok(Selection::Hash),
    "persist" => Ok(Selection::Persist),
    "lc" => Ok(Selection::LeastConn),
    _ => Err(format!(
        "{s:?} is not a selection; use rr, hash, persist or lc"
    )),
});
text_field!(
    /// An allowed client prefix (host bits are refused later, by
    /// [`loxilb_model::supported`], which names the network meant).
    Prefix(ipnet::IpNet),
    |s| s.trim().parse().map_err(|_| {
        format!("{s:?} is not an IP prefix (like 192.168.0.0/16 or 2001:db8::/32)")
    })
);
text_field!(ProbeType(ProbeKind), |s| s.trim().parse().map_err(|_| {
    format!("{s:?} is not a probe type; use none, ping, tcp, udp, http, https or sctp")
}));

/// A number as YAML gave it, for the number fields to check.
enum Num {
    Int(i128),
    Float(f64),
    /// Not a number: how to show it (text quoted).
    Other(String),
}

impl Num {
    /// The value as given, for an error.
    fn shown(&self) -> String {
        match self {
            Num::Int(n) => n.to_string(),
            // As YAML writes it (`1000.0`, `.inf`), not as Rust does.
            Num::Float(x) if x.is_nan() => ".nan".into(),
            Num::Float(x) if x.is_infinite() => if *x > 0.0 { ".inf" } else { "-.inf" }.into(),
            Num::Float(x) => format!("{x:?}"),
            Num::Other(s) => s.clone(),
        }
    }
}

/// A number field: any scalar is handed to `read` (which refuses what is
/// not its kind of number, saying so); lists and mappings are refused as
/// not `expecting`.
fn number<'de, D, T>(
    d: D,
    expecting: &str,
    read: impl FnOnce(Num) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Number<'a, F> {
        expecting: &'a str,
        read: F,
    }
    impl<F> Number<'_, F> {
        fn read<T, E: de::Error>(self, n: Num) -> Result<T, E>
        where
            F: FnOnce(Num) -> Result<T, String>,
        {
            (self.read)(n).map_err(E::custom)
        }
    }
    impl<'de, T, F: FnOnce(Num) -> Result<T, String>> de::Visitor<'de> for Number<'_, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
            self.read(Num::Int(n.into()))
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
            self.read(Num::Int(n.into()))
        }
        fn visit_u128<E: de::Error>(self, n: u128) -> Result<T, E> {
            self.read(i128::try_from(n).map_or_else(|_| Num::Other(n.to_string()), Num::Int))
        }
        fn visit_i128<E: de::Error>(self, n: i128) -> Result<T, E> {
            self.read(Num::Int(n))
        }
        fn visit_f64<E: de::Error>(self, x: f64) -> Result<T, E> {
            self.read(Num::Float(x))
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<T, E> {
            self.read(Num::Other(b.to_string()))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            self.read(Num::Other(format!("{s:?}")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<T, E> {
            self.read(Num::Other("null".into()))
        }
        fn visit_none<E: de::Error>(self) -> Result<T, E> {
            self.visit_unit()
        }
    }
    d.deserialize_any(Number { expecting, read })
}

/// An integer field: `what`, from `min` to `max`. YAML 1.2's integers
/// (`80`, `+80`, `0x50`, `0o120`), as the YAML parser reads them; not
/// `80.0`, `1e3`, `"80"`, or `080` (a string in YAML 1.2, an octal number
/// in 1.1: refused as neither).
fn int_in<'de, D: Deserializer<'de>>(
    d: D,
    min: u64,
    max: u64,
    what: &str,
) -> Result<u64, D::Error> {
    let expecting = format!("{what} (an integer {min}..={max})");
    number(d, &expecting, |n| match n {
        Num::Int(i) if (i128::from(min)..=i128::from(max)).contains(&i) => Ok(i as u64),
        other => Err(format!("{} is not {expecting}", other.shown())),
    })
}

/// Integer fields: each a number of the rule model's, in its range.
macro_rules! int_field {
    ($(#[$m:meta])* $name:ident($t:ty): $min:expr, $max:expr, $what:literal) => {
        $(#[$m])*
        struct $name($t);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // `$max` fits `$t`.
                int_in(d, $min, $max, $what).map(|n| $name(n as $t))
            }
        }
    };
}

int_field!(Port(u16): 1, 65535, "a port");
int_field!(
    /// seconds
    IdleTimeout(u32): 1, MAX_TIMEOUT_S as u64, "an idle timeout in seconds"
);
int_field!(
    /// seconds
    AffinityTimeout(u32): 1, MAX_TIMEOUT_S as u64, "an affinity timeout in seconds"
);
int_field!(Weight(u16): 1, 65535, "a weight");
int_field!(Retries(u32): 0, 100, "a retry count");

/// A probe's timeout or interval: seconds, fractions allowed, up to a day.
struct ProbeSeconds(Duration);

impl<'de> Deserialize<'de> for ProbeSeconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const EXPECTING: &str =
            "a duration in seconds, more than 0 and at most 86400 (like 5 or 0.5)";
        number(d, EXPECTING, |n| {
            let x = match n {
                Num::Int(i) => i as f64,
                Num::Float(x) => x,
                Num::Other(_) => f64::NAN,
            };
            if x > 0.0 && x <= 86400.0 {
                Ok(ProbeSeconds(Duration::from_secs_f64(x)))
            } else {
                Err(format!("{} is not {EXPECTING}", n.shown()))
            }
        })
    }
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

/// The path of the value a typed read refused, as the rule file's fields
/// and the REST API's are named (`rules[2].endpoints[0].port`,
/// `endpoints[1].targetPort`); empty for the document as a whole.
pub fn field_path(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." {
        String::new()
    } else {
        p
    }
}

/// A refusal of the YAML parser or of a field's type as a [`ConfigError`]:
/// the field's path, the message (the value as given and what is
/// allowed) and where in the file. serde_norway puts its own path (that
/// of the value, or of the mapping around it for a missing, unknown or
/// empty key) before the message and the place after it: they are taken
/// off, the path [`serde_path_to_error`] found going in `field`, the
/// place put after the message.
fn yaml_error(file: &str, e: serde_path_to_error::Error<serde_norway::Error>) -> ConfigError {
    let path = field_path(e.path());
    let e = e.into_inner();
    let mut message = e.to_string();
    if let Some(l) = e.location() {
        let (line, column) = (l.line(), l.column());
        match message.strip_suffix(&format!(" at line {line} column {column}")) {
            Some(m) => message = format!("{m} (line {line}, column {column})"),
            // The parser's own errors say where, in their words.
            None if message.contains(" at line ") => {}
            None => message = format!("{message} (line {line}, column {column})"),
        }
    }
    // `path` or a mapping around it (`rules[0]` of `rules[0].mode`); a
    // key that is not text (`?`) or a broken document has no field to
    // blame, and its message says where.
    let around = |p: &str| {
        path == p
            || path
                .strip_prefix(p)
                .is_some_and(|r| r.starts_with(['.', '[']))
    };
    let named = message
        .split_once(": ")
        .filter(|(p, _)| !path.is_empty() && !path.contains('?') && around(p))
        .map(|(_, m)| m.to_string());
    let field = match named {
        Some(m) => {
            message = m;
            path
        }
        None => String::new(),
    };
    ConfigError {
        file: file.to_string(),
        field,
        message,
    }
}

/// Parse and validate rule-file text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Vec<Rule>, ConfigError> {
    // An empty file is far more often an editor or a copy caught halfway
    // than a wish to delete every rule: refuse it (`rules: []` says so).
    if text.trim().is_empty() {
        return Err(ConfigError {
            file: file.to_string(),
            field: String::new(),
            message: "the file is empty; to remove every rule, write `rules: []`".to_string(),
        });
    }
    let raw: RawFile = serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text))
        .map_err(|e| yaml_error(file, e))?;
    check_raw(file, raw)
}

/// Rules given as a JSON value of the rule file's shape (`{"rules":
/// [...]}`, built by another front end, the REST API): every check of
/// [`parse`], errors naming `file` and the rule file's field paths.
pub fn parse_value(file: &str, v: serde_json::Value) -> Result<Vec<Rule>, ConfigError> {
    let raw: RawFile = serde_path_to_error::deserialize(v).map_err(|e| ConfigError {
        file: file.to_string(),
        field: field_path(e.path()),
        message: e.into_inner().to_string(),
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

/// Rule `i` of the file (`r`, every value already read by its type) as
/// the rule model's rule: defaults filled in, nothing yet checked against
/// what the load balancer can do.
fn read_rule(
    err: &dyn Fn(String, String) -> ConfigError,
    i: usize,
    r: RawRule,
) -> Result<Rule, ConfigError> {
    let mut rule = Rule::new(r.vip.0, r.port.0, r.protocol.0);
    rule.mode = r.mode.map_or(Mode::Default, |m| m.0);
    rule.selection = r.selection.map_or(Selection::RoundRobin, |s| s.0);
    rule.timeout_s = r.timeout.map_or(DEFAULT_TIMEOUT_S, |t| t.0);
    rule.persist_timeout_s = match (r.persist_timeout, rule.selection) {
        (None, _) => DEFAULT_PERSIST_TIMEOUT_S,
        (Some(t), Selection::Persist) => t.0,
        (Some(_), _) => {
            return Err(err(
                format!("rules[{i}].persist_timeout"),
                "only applies to selection: persist".into(),
            ))
        }
    };
    rule.source_ranges = r.source_ranges.into_iter().map(|p| p.0).collect();
    if let Some(n) = r.name {
        rule.name = n.0;
    }
    rule.secondary_vips = r.secondary_vips.into_iter().map(|a| a.0).collect();
    rule.endpoints = r
        .endpoints
        .into_iter()
        .map(|e| Endpoint {
            ip: e.ip.0,
            port: e.port.0,
            weight: e.weight.map_or(1, |w| w.0),
        })
        .collect();
    if let Some(p) = r.probe {
        let mut spec = ProbeSpec::new(p.kind.0);
        if let Some(port) = p.port {
            spec.port = Some(port.0);
        }
        spec.request = p.request;
        spec.response = p.response;
        if let Some(t) = p.timeout {
            spec.timeout = t.0;
        }
        if let Some(t) = p.interval {
            spec.interval = t.0;
        }
        if let Some(n) = p.retries {
            spec.retries = n.0;
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

    /// YAML 1.1 and 1.2 read some scalars differently; the rule file
    /// reads them as serde_yaml 0.9 did (YAML 1.2's core schema): `yes`,
    /// `no`, `on` are text, `0x10` and `0o10` integers, `010` text (an
    /// octal number in 1.1: refused rather than guessed), `1e3` a float,
    /// `~` no value.
    #[test]
    fn yaml_1_1_and_1_2_scalars_read_as_yaml_1_2() {
        let rule = |extra: &str| {
            parse(
                "r.yaml",
                &format!("rules:\n  - {{vip: 20.0.0.1, port: 80, protocol: tcp, {extra}}}\n"),
            )
        };
        for (word, name) in [
            ("yes", "yes"),
            ("no", "no"),
            ("on", "on"),
            ("007", "007"),
            ("0x10", "0x10"),
            ("true", "true"),
        ] {
            assert_eq!(rule(&format!("name: {word}")).unwrap()[0].name, name);
        }
        let port = |v: &str| {
            parse(
                "r.yaml",
                &format!("rules:\n  - {{vip: 20.0.0.1, port: {v}, protocol: tcp}}\n"),
            )
        };
        for (v, want) in [("0x10", 16), ("0o10", 8), ("+80", 80), ("!!int '80'", 80)] {
            assert_eq!(port(v).unwrap()[0].port, want, "{v}");
        }
        for (v, shown) in [
            ("010", "\"010\""),
            ("1e3", "1000.0"),
            ("80.0", "80.0"),
            ("'80'", "\"80\""),
            ("yes", "\"yes\""),
            ("true", "true"),
            ("~", "null"),
            (".inf", ".inf"),
            ("8_0", "\"8_0\""),
        ] {
            let e = port(v).unwrap_err();
            assert_eq!(e.field, "rules[0].port", "{v}: {e}");
            assert!(
                e.message
                    .starts_with(&format!("{shown} is not a port (an integer 1..=65535)")),
                "{v}: {e}"
            );
        }
        // Seconds of a probe: integers and fractions, `1e3` among them.
        let r = rule("probe: {type: tcp, timeout: 1e3, interval: 0x10}").unwrap();
        let p = r[0].probe.as_ref().unwrap();
        assert_eq!(p.timeout, std::time::Duration::from_secs(1000));
        assert_eq!(p.interval, std::time::Duration::from_secs(16));
        // Words are not switches: `mode: on` is no mode.
        let e = rule("mode: on").unwrap_err();
        assert_eq!(e.field, "rules[0].mode");
        assert!(e.message.starts_with("\"on\" is not a mode"), "{e}");
        let e = rule("mode: ~").unwrap_err();
        assert!(e.message.contains("has no value"), "{e}");
    }

    /// Every field's bad value: the error names the field's path, the
    /// value as given, what is allowed, and the line.
    #[test]
    fn each_field_refuses_a_bad_value_naming_path_value_and_what_is_allowed() {
        for (extra, field, says) in [
            (
                "vip: 20.0.0.256",
                "rules[0].vip",
                "\"20.0.0.256\" is not an IP address (like",
            ),
            (
                "secondary_vips: [30.0.0.1, x]",
                "rules[0].secondary_vips[1]",
                "\"x\" is not an IP address",
            ),
            (
                "port: 0",
                "rules[0].port",
                "0 is not a port (an integer 1..=65535)",
            ),
            (
                "protocol: icmp",
                "rules[0].protocol",
                "\"icmp\" is not supported; use tcp, udp or sctp",
            ),
            ("name: ' '", "rules[0].name", "must not be empty"),
            (
                "mode: nat",
                "rules[0].mode",
                "\"nat\" is not a mode; use default, onearm",
            ),
            (
                "selection: wrr",
                "rules[0].selection",
                "\"wrr\" is not a selection; use rr, hash",
            ),
            (
                "timeout: 604801",
                "rules[0].timeout",
                "604801 is not an idle timeout in seconds (an integer 1..=604800)",
            ),
            (
                "selection: persist, persist_timeout: -1",
                "rules[0].persist_timeout",
                "-1 is not an affinity timeout in seconds (an integer 1..=604800)",
            ),
            (
                "source_ranges: [10.0.0.0/8, 10.0.0.0/33]",
                "rules[0].source_ranges[1]",
                "\"10.0.0.0/33\" is not an IP prefix (like",
            ),
            (
                "endpoints: [{ip: 10.0.0.1, port: 1}, {ip: 10.0.0.2, port: 1.5}]",
                "rules[0].endpoints[1].port",
                "1.5 is not a port (an integer 1..=65535)",
            ),
            (
                "endpoints: [{ip: '10.0.0.x', port: 1}]",
                "rules[0].endpoints[0].ip",
                "\"10.0.0.x\" is not an IP address",
            ),
            (
                "endpoints: [{ip: 10.0.0.1, port: 1, weight: 65536}]",
                "rules[0].endpoints[0].weight",
                "65536 is not a weight (an integer 1..=65535)",
            ),
            (
                "probe: {type: grpc}",
                "rules[0].probe.type",
                "\"grpc\" is not a probe type; use none, ping",
            ),
            (
                "probe: {type: tcp, port: '80'}",
                "rules[0].probe.port",
                "\"80\" is not a port (an integer 1..=65535)",
            ),
            (
                "probe: {type: tcp, timeout: 0}",
                "rules[0].probe.timeout",
                "0 is not a duration in seconds, more than 0 and at most 86400",
            ),
            (
                "probe: {type: tcp, interval: 86401}",
                "rules[0].probe.interval",
                "86401 is not a duration in seconds",
            ),
            (
                "probe: {type: tcp, retries: 101}",
                "rules[0].probe.retries",
                "101 is not a retry count (an integer 0..=100)",
            ),
            (
                "probe: {type: http, request: [a]}",
                "rules[0].probe.request",
                "invalid type: sequence, expected a string",
            ),
            (
                "endpoints: [{ip: 10.0.0.1}]",
                "rules[0].endpoints[0]",
                "missing field `port`",
            ),
            (
                "endpoints: {ip: 10.0.0.1}",
                "rules[0].endpoints",
                "invalid type: map, expected a sequence",
            ),
            (
                "probe: tcp",
                "rules[0].probe",
                "invalid type: string \"tcp\", expected a probe: a mapping with type",
            ),
            (
                "probe: {type: tcp, every: 5}",
                "rules[0].probe.every",
                "unknown field `every`, expected one of",
            ),
        ] {
            // The base rule less the key the case sets.
            let base: Vec<&str> = ["vip: 20.0.0.1", "port: 80", "protocol: tcp"]
                .into_iter()
                .filter(|kv| !extra.starts_with(&kv[..kv.find(':').unwrap() + 1]))
                .collect();
            let e = bad(&format!("rules:\n  - {{{}, {extra}}}\n", base.join(", ")));
            assert_eq!(e.field, field, "{extra}: {e}");
            assert!(e.message.starts_with(says), "{extra}: {e}");
            assert!(e.message.contains("(line 2, column "), "{extra}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("r.yaml: {field}: {says}")),
                "{e}"
            );
        }
        // Deeper in the file: the right rule, the right line.
        let e = bad("rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp}\n  - vip: 20.0.0.2\n    port: 80\n    protocol: tcp\n    endpoints:\n      - ip: 10.0.0.1\n        port: 99999\n");
        assert_eq!(e.field, "rules[1].endpoints[0].port");
        assert_eq!(
            e.message,
            "99999 is not a port (an integer 1..=65535) (line 8, column 15)"
        );
        // A broken document has no field: the parser says where.
        let e = bad("rules: [{vip: 20.0.0.1, port: 80\n");
        assert_eq!(e.field, "");
        assert!(e.message.contains("line"), "{e}");
    }

    /// The REST API's rules (a JSON value of the file's shape) pass the
    /// same typed reading: its errors name the same paths, without lines.
    #[test]
    fn parse_value_reads_as_the_file_does() {
        let v = serde_json::json!({"rules": [{"vip": "20.0.0.1", "port": 80, "protocol": "tcp",
            "endpoints": [{"ip": "10.0.0.1", "port": 8080, "weight": 2}],
            "probe": {"type": "tcp", "timeout": 3}}]});
        let r = parse_value("request", v).unwrap();
        assert_eq!(r[0].endpoints[0].weight, 2);
        let v = serde_json::json!({"rules": [{"vip": "20.0.0.1", "port": 80, "protocol": "tcp",
            "endpoints": [{"ip": "10.0.0.1", "port": 0}]}]});
        let e = parse_value("request", v).unwrap_err();
        assert_eq!(e.field, "rules[0].endpoints[0].port");
        assert_eq!(e.message, "0 is not a port (an integer 1..=65535)");
        let v = serde_json::json!({"rules": [{"vip": "20.0.0.1", "port": 80, "protocol": "tcp", "mode": "nat"}]});
        let e = parse_value("request", v).unwrap_err();
        assert_eq!(e.to_string(), "request: rules[0].mode: \"nat\" is not a mode; use default, onearm, fullnat, dsr or dsr-ipip");
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = load(Path::new("/nonexistent/rules.yaml")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("/nonexistent/rules.yaml: cannot read"));
    }
}

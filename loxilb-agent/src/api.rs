//! The REST API kube-loxilb and loxicmd speak to loxilb (`/netlox/v1`),
//! served by the agent itself (`loxilb-agent run --api-listen ADDR:PORT`).
//!
//! Endpoints (base path [`BASE`]):
//!
//! | method | path | what |
//! |---|---|---|
//! | `POST` | `/config/loadbalancer` | create or update a rule ([`LbRule`]) |
//! | `GET` | `/config/loadbalancer/all` | every rule: `{"lbAttr": [LbRule...]}` |
//! | `DELETE` | `/config/loadbalancer/externalipaddress/{ip}/port/{port}/protocol/{proto}` | one rule |
//! | `DELETE` | `/config/loadbalancer/name/{name}` | every rule of that name (a Service's ports) |
//! | `GET` | `/config/conntrack/all` | sessions: `{"ctAttr": [...]}` |
//! | `GET` | `/` and `/netlox/v1/status` | health: `{"status": "ok", ...}` |
//!
//! A rule is keyed, as in loxilb, by external IP, port and protocol; its
//! `name` (kube-loxilb: `ns_svc:llb-inst0`, shared by a Service's ports)
//! is the service's name. Inside the agent each API rule is named
//! `{name}@{ip}:{port}/{proto}` (or `{ip}:{port}/{proto}` without a name),
//! unique, as `loxilb-agent rules` shows it.
//!
//! Values map onto the rule model (`loxilb_model::Rule`) and go through
//! the very checks of the rule file ([`config::parse_value`], which ends
//! with the rule model's [`loxilb_model::supported`]): loxilb's
//! `sel` 0 rr, 1 hash, 3 persist, 4 lc (2 priority, 5 n2, 6 n3 are
//! refused); `mode` 0 default (DNAT), 1 onearm, 2 fullnat, 3 dsr (4
//! fullproxy, 5 hostonearm refused); `Monitor: true` probes the endpoints
//! with `probetype` (none, ping, tcp, udp, http, https, sctp; empty: tcp
//! for TCP rules, sctp for SCTP, ping for UDP), `probeport`, `probereq`,
//! `proberesp`, `probeTimeout` (s), `probeRetries`; `inactiveTimeOut` 0 is
//! the default idle timeout. `privateIP`, `proxyprotocolv2`, `egress` and
//! a non-zero `block` are refused (not supported by this datapath); `BGP`
//! must agree with the agent (`--setBGP` announces every VIP; a rule
//! cannot opt in or out). `oper` is kube-loxilb's: 0 create or replace, 1
//! attach the listed endpoints to the rule, 2 detach them. `managed` is
//! stored and shown. Endpoint `state` and `counter` are output only
//! (ignored on input); a list shows `state`: `active`, or `inactive`
//! while the endpoint's health probe finds it down. Field names are those of kube-loxilb's client
//! (`BGP`, `Monitor`; loxilb's `bgp`, `monitor` are accepted too); an
//! unknown field is refused.
//!
//! Responses (loxilb's shapes where they are known; choices otherwise):
//!
//! - success of a write: `200 {"result": "Success"}` (kube-loxilb checks
//!   for 200 and that `result`; an update and a create answer alike);
//! - errors: `{"code": <status>, "message": "<field>: <what is wrong and
//!   what to do>", "fields": ["<JSON path>"]}` (loxilb's `Error` model's
//!   `code`, `message`, `fields`); `fields` is empty when no field is to
//!   blame. 400: bad JSON, an unknown field, a wrong type, a value this
//!   datapath does not support (`fields` names the JSON path, like
//!   `serviceArguments.mode` or `endpoints[1].targetPort`); 401: a write
//!   without credentials; 403: a write with a wrong token; 404: delete of
//!   a missing rule, unknown path; 405: a method the path does not take;
//!   409: a conflict (the VIP, port and protocol are another rule's: one
//!   of another name, or one of the rule file, `run -c`, which the API
//!   never changes); 413: a body over 1 MiB; 500: the datapath or the
//!   state file could not be written (the change is undone).
//!
//! Authentication (see [`server`]): reads (`GET`) are open; writes need a
//! client certificate of `--api-tls DIR/ca.crt`, or the token of
//! `--api-token-file` (`Authorization: Bearer <token>`, or the bare token
//! as kube-loxilb sends it), unless `--insecure-api`.
//!
//! API rules persist (see [`store`]): in the agent's state directory,
//! re-applied at start; with the rule file's rules they make the one set
//! the node installs, through the same reconciler (rule ids, endpoints,
//! probes and counters behave as for file rules).

pub mod server;
pub mod store;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use loxilb_model::{Mode, Protocol, Rule, Selection};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::config::{self, ConfigError};

pub const BASE: &str = "/netlox/v1";
/// Request bodies above this are refused (413).
pub const MAX_BODY: usize = 1 << 20;

/// loxilb's `mode` numbers, by value.
const MODES: [&str; 6] = [
    "default",
    "onearm",
    "fullnat",
    "dsr",
    "fullproxy",
    "hostonearm",
];
/// loxilb's `sel` numbers, by value.
const SELS: [&str; 7] = ["rr", "hash", "priority", "persist", "lc", "n2", "n3"];

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn one() -> u16 {
    1
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A load-balancer rule as loxilb's API carries it (kube-loxilb's
/// `LoadBalancerModel`). Go clients send `null` for empty lists: read as
/// empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbRule {
    #[serde(rename = "serviceArguments")]
    pub service: ServiceArgs,
    #[serde(
        rename = "secondaryIPs",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub secondary_ips: Vec<SecondaryIp>,
    #[serde(
        rename = "allowedSources",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub allowed_sources: Vec<AllowedSource>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<LbEndpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceArgs {
    #[serde(rename = "externalIP")]
    pub external_ip: String,
    #[serde(
        rename = "privateIP",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub private_ip: String,
    pub port: u16,
    pub protocol: String,
    #[serde(default)]
    pub sel: u32,
    #[serde(default)]
    pub mode: i32,
    #[serde(rename = "BGP", alias = "bgp", default)]
    pub bgp: bool,
    #[serde(rename = "Monitor", alias = "monitor", default)]
    pub monitor: bool,
    #[serde(rename = "inactiveTimeOut", default)]
    pub inactive_timeout: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub block: u16,
    #[serde(default)]
    pub managed: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub probetype: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub probeport: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub probereq: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proberesp: String,
    #[serde(rename = "probeRetries", default, skip_serializing_if = "is_zero")]
    pub probe_retries: u32,
    #[serde(rename = "probeTimeout", default, skip_serializing_if = "is_zero")]
    pub probe_timeout: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub oper: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub proxyprotocolv2: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub egress: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondaryIp {
    #[serde(rename = "secondaryIP")]
    pub secondary_ip: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedSource {
    pub prefix: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbEndpoint {
    #[serde(rename = "endpointIP")]
    pub endpoint_ip: String,
    #[serde(rename = "targetPort")]
    pub target_port: u16,
    #[serde(default = "one")]
    pub weight: u16,
    /// Output only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// Output only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub counter: String,
}

/// A refused request: HTTP status, the JSON path to blame (may be empty)
/// and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub field: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            field: field.into(),
            message: message.into(),
        }
    }

    fn bad(field: &str, message: String) -> Self {
        Self::new(400, field, message)
    }

    /// The body: `{"code", "message", "fields"}`.
    pub fn body(&self) -> Value {
        let message = if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        };
        let fields: Vec<&str> = if self.field.is_empty() {
            vec![]
        } else {
            vec![self.field.as_str()]
        };
        json!({ "code": self.status, "message": message, "fields": fields })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body()["message"])
    }
}

/// A rule's identity: VIP, port, protocol.
pub type Key = (IpAddr, u16, Protocol);

fn show_key((ip, port, proto): Key) -> String {
    format!("{}/{proto}", SocketAddr::new(ip, port))
}

/// Every key a rule serves: its VIP's, then its secondary VIPs'.
pub fn rule_keys(r: &Rule) -> impl Iterator<Item = Key> + '_ {
    std::iter::once(r.vip)
        .chain(r.secondary_vips.iter().copied())
        .map(move |v| (v, r.port, r.protocol))
}

fn key_of(r: &Rule) -> Key {
    (r.vip, r.port, r.protocol)
}

/// The JSON path of a rule-file field (`rules[0].endpoints[1].port`).
fn api_field(f: &str) -> String {
    let rest = f.strip_prefix("rules[0]").unwrap_or(f);
    let rest = rest.strip_prefix('.').unwrap_or(rest);
    // `name[j].sub` / `name[j]`
    let (head, index, sub) = match rest.find('[') {
        Some(i) => {
            let close = rest[i..].find(']').map(|c| i + c).unwrap_or(rest.len());
            let sub = rest.get(close + 1..).unwrap_or("");
            (
                &rest[..i],
                Some(&rest[i..=close.min(rest.len() - 1)]),
                sub.strip_prefix('.').unwrap_or(sub),
            )
        }
        None => (rest, None, ""),
    };
    let s = |n: &str| format!("serviceArguments.{n}");
    match (head, index) {
        ("endpoints", Some(i)) => format!(
            "endpoints{i}.{}",
            match sub {
                "ip" => "endpointIP",
                "port" => "targetPort",
                other => other,
            }
        ),
        ("endpoints", None) => "endpoints".into(),
        ("secondary_vips", Some(i)) => format!("secondaryIPs{i}.secondaryIP"),
        ("secondary_vips", None) => "secondaryIPs".into(),
        ("source_ranges", Some(i)) => format!("allowedSources{i}.prefix"),
        ("vip", _) => s("externalIP"),
        ("port", _) => s("port"),
        ("protocol", _) => s("protocol"),
        ("mode", _) => s("mode"),
        ("selection", _) => s("sel"),
        ("timeout", _) => s("inactiveTimeOut"),
        ("name", _) => s("name"),
        ("probe.type", _) | ("probe", _) => s("probetype"),
        ("probe.port", _) => s("probeport"),
        ("probe.request", _) => s("probereq"),
        ("probe.response", _) => s("proberesp"),
        ("probe.timeout", _) => s("probeTimeout"),
        ("probe.retries", _) => s("probeRetries"),
        ("", _) => String::new(),
        (other, _) => other.to_string(),
    }
}

/// What the node needs of the host beyond the rule itself (L2 DSR
/// endpoints reachable through a device XDP can send through): the
/// agent's checks of a rule file, given the rules to check.
pub type NodeCheck = Box<dyn Fn(&[Rule]) -> Result<(), ConfigError> + Send>;

/// Where API rules go: the node's reconciler (see `main.rs`), or a
/// recording double in tests.
pub trait Sink: Send {
    /// Install (add or update) `upserts`, remove `removed`.
    fn apply(&mut self, upserts: &[Rule], removed: &[Rule]) -> anyhow::Result<()>;
    /// The live sessions (`loxilb-agent sessions`).
    fn sessions(&mut self) -> anyhow::Result<Vec<crate::show::SessionRow>>;
    /// The endpoints health probes found down: (rule name, IP, port).
    fn endpoints_down(&mut self) -> HashSet<(String, IpAddr, u16)>;
    /// Every health-probe target and its state (`GET /config/endpoint/all`).
    fn probes(&mut self) -> Vec<crate::probe::TargetStatus>;
    /// The BGP sessions (`GET /config/bgp/neigh/all`; asked only with BGP
    /// on).
    fn bgp_neighbors(&mut self) -> anyhow::Result<Vec<crate::bgp::Neighbor>>;
    /// The cluster role kube-loxilb gave this agent (`POST
    /// /config/cistate`): `true` MASTER (every VIP announced as active),
    /// `false` BACKUP (announced as a backup: `--bgp-backup-path`).
    fn set_master(&mut self, master: bool) -> anyhow::Result<()>;
}

/// kube-loxilb's `POST /config/cistate` body (loxilb's `CIStatusMod`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiState {
    pub instance: String,
    /// `MASTER` or `BACKUP`.
    pub state: String,
    /// The instance's VIP (kube-loxilb's `--setRoles` value); kept and
    /// reported, `0.0.0.0` when none.
    #[serde(default)]
    pub vip: String,
}

/// The API's view of the agent's rules: those created through it (by key,
/// with the request as stored) and those of the rule file (read only).
pub struct Api {
    rules: BTreeMap<Key, (LbRule, Rule)>,
    /// Every key (secondary VIPs included) of an API rule -> its primary key.
    api_keys: HashMap<Key, Key>,
    file: Vec<Rule>,
    file_keys: HashMap<Key, String>,
    file_label: String,
    sink: Box<dyn Sink>,
    node_check: NodeCheck,
    store: store::Store,
    /// Whether the agent announces VIPs over BGP (`--setBGP`).
    bgp: bool,
    /// The cluster instances' states kube-loxilb posted, by instance.
    cistate: BTreeMap<String, CiState>,
}

/// The agent's own name of an API rule.
pub fn internal_name(service: &str, key: Key) -> String {
    if service.is_empty() {
        show_key(key)
    } else {
        format!("{service}@{}", show_key(key))
    }
}

impl Api {
    /// The API over `sink`, with the rules `store` holds (checked like
    /// new requests; refused as a whole, naming the stored rule, if one no
    /// longer passes). `file`: the rule file's rules (`file_label` names
    /// it in conflicts), which must not conflict with the stored rules.
    /// Nothing is applied to `sink`: the caller installs [`Api::union`].
    pub fn new(
        sink: Box<dyn Sink>,
        node_check: NodeCheck,
        store: store::Store,
        stored: Vec<LbRule>,
        bgp: bool,
        file_label: &str,
        file: Vec<Rule>,
    ) -> anyhow::Result<Self> {
        let mut api = Api {
            rules: BTreeMap::new(),
            api_keys: HashMap::new(),
            file: vec![],
            file_keys: HashMap::new(),
            file_label: file_label.to_string(),
            sink,
            node_check,
            store,
            bgp,
            cistate: BTreeMap::new(),
        };
        for (i, req) in stored.into_iter().enumerate() {
            let rule = api.check(&req).map_err(|e| {
                anyhow::anyhow!(
                    "{}: stored rule {i} ({}) is refused now: {e}; remove it from the file (or \
                     fix what changed) and restart",
                    api.store.describe(),
                    req.service.name
                )
            })?;
            api.conflicts(&rule, &req.service.name).map_err(|e| {
                anyhow::anyhow!("{}: stored rule {i}: {}", api.store.describe(), e.message)
            })?;
            api.insert(req, rule);
        }
        api.set_file(file)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        for c in api.store.roles()? {
            let c = checked_role(c).map_err(|e| {
                anyhow::anyhow!(
                    "{}: a stored cluster role is refused: {}; remove the file (kube-loxilb \
                     sets the role again)",
                    api.store.describe_roles(),
                    e.message
                )
            })?;
            api.cistate.insert(c.instance.clone(), c);
        }
        Ok(api)
    }

    /// The rules the node must hold: the rule file's, then the API's.
    pub fn union(&self) -> Vec<Rule> {
        self.file
            .iter()
            .cloned()
            .chain(self.rules.values().map(|(_, r)| r.clone()))
            .collect()
    }

    /// How many rules come from the API.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// A new rule file: refused (409-style message naming both rules) if
    /// one of its rules has a key or name of an API rule; else taken, and
    /// [`Api::union`] is what to install.
    pub fn set_file(&mut self, file: Vec<Rule>) -> Result<(), ApiError> {
        let names: HashMap<&str, Key> = self
            .rules
            .iter()
            .map(|(k, (_, r))| (r.name.as_str(), *k))
            .collect();
        let mut keys = HashMap::new();
        for r in &file {
            if let Some(k) = names.get(r.name.as_str()) {
                return Err(ApiError::new(
                    409,
                    "",
                    format!(
                        "rule {:?} of the rule file {} has the name of the API rule for {}; \
                         rename one (or delete the API rule)",
                        r.name,
                        self.file_label,
                        show_key(*k)
                    ),
                ));
            }
            for k in rule_keys(r) {
                if let Some(p) = self.api_keys.get(&k) {
                    return Err(ApiError::new(
                        409,
                        "",
                        format!(
                            "{} is served by rule {:?} of the rule file {} and by the API rule \
                             {:?}: a VIP, port and protocol serve one rule; delete the API rule \
                             or change the file",
                            show_key(k),
                            r.name,
                            self.file_label,
                            self.rules[p].1.name
                        ),
                    ));
                }
                keys.insert(k, r.name.clone());
            }
        }
        self.file = file;
        self.file_keys = keys;
        Ok(())
    }

    fn insert(&mut self, req: LbRule, rule: Rule) {
        let k = key_of(&rule);
        for x in rule_keys(&rule) {
            self.api_keys.insert(x, k);
        }
        self.rules.insert(k, (req, rule));
    }

    fn remove(&mut self, k: &Key) -> Option<(LbRule, Rule)> {
        let (req, rule) = self.rules.remove(k)?;
        for x in rule_keys(&rule) {
            self.api_keys.remove(&x);
        }
        Some((req, rule))
    }

    /// `rule` (of service `service`) against the rule file and the other
    /// API rules: 409 naming both.
    fn conflicts(&self, rule: &Rule, service: &str) -> Result<(), ApiError> {
        let own = key_of(rule);
        for (j, k) in rule_keys(rule).enumerate() {
            // The primary VIP, or the secondary one at j - 1.
            let field = if j == 0 {
                "serviceArguments.externalIP".to_string()
            } else {
                format!("secondaryIPs[{}].secondaryIP", j - 1)
            };
            if let Some(name) = self.file_keys.get(&k) {
                return Err(ApiError::new(
                    409,
                    field,
                    format!(
                        "{} is served by rule {name:?} of the rule file {}, which the API does \
                         not change: remove it from the file first, or use another VIP or port",
                        show_key(k),
                        self.file_label
                    ),
                ));
            }
            match self.api_keys.get(&k) {
                Some(p) if *p != own => {
                    return Err(ApiError::new(
                        409,
                        field,
                        format!(
                            "{} is served by the API rule {:?}: a VIP, port and protocol serve \
                             one rule; delete that rule first",
                            show_key(k),
                            self.rules[p].1.name
                        ),
                    ))
                }
                _ => {}
            }
        }
        if let Some((old, _)) = self.rules.get(&own) {
            if old.service.name != service {
                return Err(ApiError::new(
                    409,
                    "serviceArguments.name",
                    format!(
                        "{} is the rule of {:?}, not {service:?}: delete it first (DELETE \
                         {BASE}/config/loadbalancer/name/{}), or use another VIP or port",
                        show_key(own),
                        old.service.name,
                        old.service.name
                    ),
                ));
            }
        }
        if self.file.iter().any(|f| f.name == rule.name) {
            return Err(ApiError::new(
                409,
                "serviceArguments.name",
                format!(
                    "{:?} is the name of a rule of the rule file {}; use another name",
                    rule.name, self.file_label
                ),
            ));
        }
        Ok(())
    }

    /// Everything about `req` that does not depend on other rules: the
    /// loxilb values this datapath takes, then every check of the rule
    /// file (values, endpoints, probes) and of the node.
    fn check(&self, req: &LbRule) -> Result<Rule, ApiError> {
        let s = &req.service;
        let bad = |f: &str, m: String| Err(ApiError::bad(&format!("serviceArguments.{f}"), m));
        if !s.private_ip.is_empty() {
            return bad(
                "privateIP",
                format!(
                    "{:?}: a private IP paired with the external one (cloud elastic IPs) is not \
                     supported; remove privateIP",
                    s.private_ip
                ),
            );
        }
        if s.proxyprotocolv2 {
            return bad(
                "proxyprotocolv2",
                "true: PROXY protocol v2 needs a proxying mode this datapath does not have; \
                 remove it"
                    .into(),
            );
        }
        if s.egress {
            return bad(
                "egress",
                "true: egress (SNAT of endpoint-initiated traffic) rules are not supported".into(),
            );
        }
        if s.block != 0 {
            return bad(
                "block",
                format!("{}: blocking by mark is not supported; use 0", s.block),
            );
        }
        if s.oper > 2 {
            return bad(
                "oper",
                format!(
                    "{} is not an operation (0 create or replace, 1 attach endpoints, 2 detach \
                     endpoints)",
                    s.oper
                ),
            );
        }
        if s.bgp != self.bgp {
            return bad(
                "BGP",
                if s.bgp {
                    "true, but this agent runs without BGP (--setBGP): no VIP is announced; \
                     start the agent with --setBGP or send false"
                        .into()
                } else {
                    "false, but this agent announces every VIP over BGP (--setBGP); a rule \
                     cannot opt out: send true"
                        .into()
                },
            );
        }
        let mode = usize::try_from(s.mode)
            .ok()
            .and_then(|m| MODES.get(m))
            .ok_or_else(|| {
                ApiError::bad(
                    "serviceArguments.mode",
                    format!(
                        "{} is not a loxilb mode (0 default, 1 onearm, 2 fullnat, 3 dsr, 4 \
                         fullproxy, 5 hostonearm)",
                        s.mode
                    ),
                )
            })?;
        let sel = SELS.get(s.sel as usize).ok_or_else(|| {
            ApiError::bad(
                "serviceArguments.sel",
                format!(
                    "{} is not a loxilb selection (0 rr, 1 hash, 2 priority, 3 persist, 4 lc, 5 \
                     n2, 6 n3)",
                    s.sel
                ),
            )
        })?;
        // The rule in the rule file's shape ([`config::parse_value`]).
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            m.insert(k.to_string(), v);
        };
        // The key, for the name: parsed leniently here, checked below.
        let proto = s.protocol.trim().to_ascii_lowercase();
        let name = match (
            s.external_ip.trim().parse::<IpAddr>(),
            Protocol::from_name(&proto),
        ) {
            (Ok(ip), Some(p)) => internal_name(&s.name, (ip, s.port, p)),
            _ => s.name.clone(),
        };
        if !name.is_empty() {
            put("name", json!(name));
        }
        put("vip", json!(s.external_ip));
        put("port", json!(s.port));
        put("protocol", json!(s.protocol));
        put("mode", json!(mode));
        put("selection", json!(sel));
        if s.inactive_timeout != 0 {
            put("timeout", json!(s.inactive_timeout));
        }
        if !req.secondary_ips.is_empty() {
            let ips: Vec<&str> = req
                .secondary_ips
                .iter()
                .map(|x| x.secondary_ip.as_str())
                .collect();
            put("secondary_vips", json!(ips));
        }
        if !req.allowed_sources.is_empty() {
            let prefixes: Vec<&str> = req
                .allowed_sources
                .iter()
                .map(|x| x.prefix.as_str())
                .collect();
            put("source_ranges", json!(prefixes));
        }
        let endpoints: Vec<serde_json::Value> = req
            .endpoints
            .iter()
            .map(|e| json!({"ip": e.endpoint_ip, "port": e.target_port, "weight": e.weight}))
            .collect();
        put("endpoints", json!(endpoints));
        let probetype = s.probetype.trim();
        if s.monitor {
            let kind = match (probetype, proto.as_str()) {
                ("", "sctp") => "sctp",
                ("", "udp") => "ping",
                ("", _) => "tcp",
                (t, _) => t,
            };
            let mut pm = serde_json::Map::new();
            pm.insert("type".into(), json!(kind));
            if s.probeport != 0 {
                pm.insert("port".into(), json!(s.probeport));
            }
            if !s.probereq.is_empty() {
                pm.insert("request".into(), json!(s.probereq));
            }
            if !s.proberesp.is_empty() {
                pm.insert("response".into(), json!(s.proberesp));
            }
            if s.probe_timeout != 0 {
                pm.insert("timeout".into(), json!(s.probe_timeout));
            }
            if s.probe_retries != 0 {
                pm.insert("retries".into(), json!(s.probe_retries));
            }
            put("probe", serde_json::Value::Object(pm));
        } else if !probetype.is_empty() && probetype != "none" {
            return bad(
                "Monitor",
                format!(
                    "false, but probetype is {probetype:?}: set Monitor to true to probe the \
                     endpoints, or remove probetype"
                ),
            );
        }
        let file = json!({ "rules": [m] });
        let map_err = |e: ConfigError| {
            let field = api_field(&e.field);
            let message = match field.as_str() {
                "serviceArguments.mode" => format!("{} ({mode}): {}", s.mode, e.message),
                "serviceArguments.sel" => format!("{} ({sel}): {}", s.sel, e.message),
                _ => e.message,
            };
            ApiError::bad(&field, message)
        };
        let mut rules = config::parse_value("request", file).map_err(map_err)?;
        (self.node_check)(&rules).map_err(map_err)?;
        Ok(rules.remove(0))
    }

    /// A rule created or changed: install, persist, remember. Its result
    /// is the response.
    fn post(&mut self, mut req: LbRule) -> Result<(), ApiError> {
        // Input-only view: endpoint state and counter are not stored.
        for e in &mut req.endpoints {
            e.state.clear();
            e.counter.clear();
        }
        let oper = req.service.oper;
        if oper != 0 {
            // Attach (1) / detach (2): the stored rule's endpoints with
            // these added / taken away.
            let probe = self.check(&LbRule {
                endpoints: vec![],
                ..req.clone()
            })?;
            let k = key_of(&probe);
            let Some((old, _)) = self.rules.get(&k) else {
                if oper == 2 {
                    return Err(ApiError::new(
                        404,
                        "serviceArguments.externalIP",
                        format!("no API rule for {} to detach endpoints from", show_key(k)),
                    ));
                }
                req.service.oper = 0;
                return self.post(req);
            };
            let mut eps = old.endpoints.clone();
            for e in std::mem::take(&mut req.endpoints) {
                let same = |x: &LbEndpoint| {
                    x.endpoint_ip.trim().parse::<IpAddr>().ok()
                        == e.endpoint_ip.trim().parse::<IpAddr>().ok()
                        && x.target_port == e.target_port
                };
                if oper == 1 {
                    match eps.iter_mut().find(|x| same(x)) {
                        Some(x) => x.weight = e.weight,
                        None => eps.push(e),
                    }
                } else {
                    eps.retain(|x| !same(x));
                }
            }
            req.endpoints = eps;
            req.service.oper = 0;
        }
        let rule = self.check(&req)?;
        self.conflicts(&rule, &req.service.name)?;
        let k = key_of(&rule);
        let old = self.rules.get(&k).cloned();
        if let Some((r0, rule0)) = &old {
            if *r0 == req && *rule0 == rule {
                return Ok(());
            }
        }
        self.sink
            .apply(std::slice::from_ref(&rule), &[])
            .map_err(|e| {
                ApiError::new(500, "", format!("installing {} failed: {e:#}", rule.name))
            })?;
        if let Err(e) = self.store.put(&req) {
            self.undo(old.as_ref().map(|x| &x.1), Some(&rule));
            return Err(ApiError::new(
                500,
                "",
                format!("{e:#}; the change was undone"),
            ));
        }
        self.insert(req, rule);
        self.compact();
        Ok(())
    }

    /// Put back `old` (or remove `new` when there was none) after a
    /// failure to persist.
    fn undo(&mut self, old: Option<&Rule>, new: Option<&Rule>) {
        let r = match (old, new) {
            (Some(o), _) => self.sink.apply(std::slice::from_ref(o), &[]),
            (None, Some(n)) => self.sink.apply(&[], std::slice::from_ref(n)),
            (None, None) => Ok(()),
        };
        if let Err(e) = r {
            tracing::error!("undoing an API change failed too: {e:#}");
        }
    }

    fn delete_keys(&mut self, keys: &[Key]) -> Result<(), ApiError> {
        let gone: Vec<Rule> = keys.iter().map(|k| self.rules[k].1.clone()).collect();
        self.sink
            .apply(&[], &gone)
            .map_err(|e| ApiError::new(500, "", format!("removing the rule(s) failed: {e:#}")))?;
        for k in keys {
            if let Err(e) = self.store.del(*k) {
                // Put back what is not yet persisted as gone.
                let back: Vec<Rule> = keys
                    .iter()
                    .filter(|x| self.rules.contains_key(x))
                    .map(|x| self.rules[x].1.clone())
                    .collect();
                if let Err(e2) = self.sink.apply(&back, &[]) {
                    tracing::error!("undoing an API delete failed too: {e2:#}");
                }
                return Err(ApiError::new(
                    500,
                    "",
                    format!("{e:#}; the rules not yet recorded as deleted were put back"),
                ));
            }
            self.remove(k);
        }
        self.compact();
        Ok(())
    }

    /// Rewrite the state file when its journal has grown (see
    /// [`store::Store`]); a failure leaves the journal, which still holds
    /// every change.
    fn compact(&mut self) {
        if self.store.due(self.rules.len()) {
            if let Err(e) = self.store.compact(self.rules.values().map(|(r, _)| r)) {
                tracing::warn!("{e:#}; the journal keeps the changes");
            }
        }
    }

    fn delete_tuple(&mut self, ip: &str, port: &str, proto: &str) -> Result<(), ApiError> {
        let ip: IpAddr = ip.parse().map_err(|_| {
            ApiError::bad("externalipaddress", format!("{ip:?} is not an IP address"))
        })?;
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                ApiError::bad("port", format!("{port:?} is not a port (1-65535)"))
            })?;
        let proto = Protocol::from_name(&proto.to_ascii_lowercase()).ok_or_else(|| {
            ApiError::bad(
                "protocol",
                format!("{proto:?} is not a protocol (tcp, udp, sctp)"),
            )
        })?;
        let k = (ip, port, proto);
        if let Some(name) = self.file_keys.get(&k) {
            return Err(ApiError::new(
                409,
                "",
                format!(
                    "{} is rule {name:?} of the rule file {}, which the API does not change: \
                     remove it from the file",
                    show_key(k),
                    self.file_label
                ),
            ));
        }
        if !self.rules.contains_key(&k) {
            return Err(ApiError::new(
                404,
                "",
                format!("no rule for {}", show_key(k)),
            ));
        }
        self.delete_keys(&[k])
    }

    fn delete_name(&mut self, name: &str) -> Result<(), ApiError> {
        let keys: Vec<Key> = self
            .rules
            .iter()
            .filter(|(_, (r, _))| r.service.name == name)
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            if self.file.iter().any(|r| r.name == name) {
                return Err(ApiError::new(
                    409,
                    "",
                    format!(
                        "{name:?} is a rule of the rule file {}, which the API does not \
                         change: remove it from the file",
                        self.file_label
                    ),
                ));
            }
            return Err(ApiError::new(404, "", format!("no rule named {name:?}")));
        }
        self.delete_keys(&keys)
    }

    /// Every rule, loxilb's shape: the rule file's (`managed: false`),
    /// then the API's as stored; each endpoint's `state` is `inactive`
    /// while its health probe finds it down, else `active`.
    pub fn list(&mut self) -> Value {
        let down = self.sink.endpoints_down();
        let with_state = |mut out: LbRule, r: &Rule| {
            // One output endpoint per rule endpoint, in order.
            for (o, e) in out.endpoints.iter_mut().zip(&r.endpoints) {
                let key = (r.name.clone(), e.ip, e.port);
                o.state = if down.contains(&key) {
                    "inactive"
                } else {
                    "active"
                }
                .into();
            }
            out
        };
        let mut out: Vec<LbRule> = self
            .file
            .iter()
            .map(|r| with_state(from_rule(r), r))
            .collect();
        out.extend(
            self.rules
                .values()
                .map(|(req, r)| with_state(req.clone(), r)),
        );
        json!({ "lbAttr": out })
    }

    fn conntrack(&mut self) -> Result<Value, ApiError> {
        let rows = self
            .sink
            .sessions()
            .map_err(|e| ApiError::new(500, "", format!("cannot read the sessions: {e:#}")))?;
        let mut by_key: HashMap<Key, &str> = HashMap::new();
        for r in self.file.iter().chain(self.rules.values().map(|(_, r)| r)) {
            for k in rule_keys(r) {
                by_key.insert(k, &r.name);
            }
        }
        let ct: Vec<Value> = rows
            .iter()
            .map(|r| {
                let proto = Protocol::from_name(&r.protocol);
                let serv = proto
                    .and_then(|p| by_key.get(&(r.service.ip(), r.service.port(), p)))
                    .copied()
                    .unwrap_or("");
                json!({
                    "protocol": r.protocol,
                    "sourceIP": r.client.ip().to_string(),
                    "sourcePort": r.client.port(),
                    "destinationIP": r.service.ip().to_string(),
                    "destinationPort": r.service.port(),
                    "conntrackState": r.state,
                    "conntrackAct": format!("endpoint {}", r.endpoint),
                    "packets": r.packets_in + r.packets_out,
                    "servName": serv,
                })
            })
            .collect();
        Ok(json!({ "ctAttr": ct }))
    }

    /// loxicmd's `get ep` (loxilb's `EndPointState`): one entry per probed
    /// endpoint of every rule. `hostName` is the endpoint's address,
    /// `description` names the rule and port; `probeType` in loxilb's
    /// words (`icmp`, `connect-tcp`, `connect-udp`, `connect-sctp`,
    /// `http`, `https`, `none`); `probeDuration` the interval in seconds;
    /// `currState` `ok` or `nok`. This agent keeps the last probe's time
    /// only: `lastDelay` (ours) has it, `minDelay` / `avgDelay` /
    /// `maxDelay` are empty. Ours too: `lastResult`, `probed`.
    fn endpoints(&mut self) -> Value {
        let specs: HashMap<&str, &loxilb_model::ProbeSpec> = self
            .file
            .iter()
            .chain(self.rules.values().map(|(_, r)| r))
            .filter_map(|r| Some((r.name.as_str(), r.probe.as_ref()?)))
            .collect();
        let mut rows = self.sink.probes();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        let attr: Vec<Value> = rows
            .iter()
            .map(|t| {
                let spec = specs.get(t.key.rule.as_str());
                let kind = match t.kind {
                    loxilb_model::ProbeKind::None => "none",
                    loxilb_model::ProbeKind::Ping => "icmp",
                    loxilb_model::ProbeKind::Tcp => "connect-tcp",
                    loxilb_model::ProbeKind::Udp => "connect-udp",
                    loxilb_model::ProbeKind::Sctp => "connect-sctp",
                    loxilb_model::ProbeKind::Http => "http",
                    loxilb_model::ProbeKind::Https => "https",
                };
                json!({
                    "hostName": t.key.addr.to_string(),
                    "description": format!("rule {} port {}", t.key.rule, t.key.port),
                    "inactiveReTries": spec.map_or(0, |s| s.retries),
                    "probeType": kind,
                    "probeReq": spec.and_then(|s| s.request.clone()).unwrap_or_default(),
                    "probeResp": spec.and_then(|s| s.response.clone()).unwrap_or_default(),
                    "probeDuration": spec.map_or(0, |s| s.interval.as_secs()),
                    "probePort": t.probe_addr.port(),
                    "minDelay": "",
                    "avgDelay": "",
                    "maxDelay": "",
                    "lastDelay": t
                        .last_latency
                        .map(|d| format!("{:.3}ms", d.as_secs_f64() * 1e3))
                        .unwrap_or_default(),
                    "currState": if t.up { "ok" } else { "nok" },
                    "lastResult": t.last_result,
                    "probed": t.probed,
                })
            })
            .collect();
        json!({ "Attr": attr })
    }

    /// loxicmd's `get bgpneighbor` (loxilb's `BGPNeighborEntry`):
    /// `ipAddress`, `remoteAs`, `state` (BIRD's word for it, lower case:
    /// `established`, `active`, `connect`, ...), `updowntime` (how long
    /// Established, `h:mm:ss`; empty otherwise). BGP off: an empty list.
    fn bgp_neighbors(&mut self) -> Result<Value, ApiError> {
        if !self.bgp {
            return Ok(json!({ "bgpNeiAttr": [] }));
        }
        let n = self.sink.bgp_neighbors().map_err(|e| {
            ApiError::new(503, "", format!("the BGP speaker does not answer: {e:#}"))
        })?;
        let attr: Vec<Value> = n
            .iter()
            .map(|x| {
                json!({
                    "ipAddress": x.address.to_string(),
                    "remoteAs": x.remote_as.unwrap_or(0),
                    "state": x.state.to_string().to_ascii_lowercase(),
                    "updowntime": x.uptime.map(|d| {
                        let s = d.as_secs();
                        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
                    }).unwrap_or_default(),
                })
            })
            .collect();
        Ok(json!({ "bgpNeiAttr": attr }))
    }

    /// One request (already authorized): status and JSON body.
    pub fn handle(&mut self, method: &http::Method, path: &str, body: &[u8]) -> (u16, Value) {
        match self.route(method, path, body) {
            Ok(v) => (200, v),
            Err(e) => (e.status, e.body()),
        }
    }

    fn route(&mut self, method: &http::Method, path: &str, body: &[u8]) -> Result<Value, ApiError> {
        use http::Method;
        let path = path.split('?').next().unwrap_or("");
        let path = path.trim_end_matches('/');
        let ok = || json!({ "result": "Success" });
        let status = || {
            json!({
                "status": "ok",
                "rules": { "file": self.file.len(), "api": self.rules.len() },
            })
        };
        if path.is_empty() {
            return match *method {
                Method::GET => Ok(status()),
                _ => Err(not_allowed(method, "/")),
            };
        }
        let Some(rest) = path.strip_prefix(BASE) else {
            return Err(ApiError::new(404, "", format!("no such path {path:?}")));
        };
        let seg: Vec<String> = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect();
        let seg: Vec<&str> = seg.iter().map(String::as_str).collect();
        match (method.clone(), seg.as_slice()) {
            (Method::GET, ["status"]) => Ok(status()),
            (Method::POST, ["config", "loadbalancer"]) => {
                let req = parse_json::<LbRule>(body)?;
                self.post(req)?;
                Ok(ok())
            }
            (Method::GET, ["config", "loadbalancer", "all"]) => Ok(self.list()),
            (
                Method::DELETE,
                ["config", "loadbalancer", "externalipaddress", ip, "port", port, "protocol", proto],
            ) => {
                self.delete_tuple(ip, port, proto)?;
                Ok(ok())
            }
            (Method::DELETE, ["config", "loadbalancer", "name", name]) => {
                self.delete_name(name)?;
                Ok(ok())
            }
            (Method::GET, ["config", "conntrack", "all"]) => self.conntrack(),
            (Method::GET, ["config", "endpoint", "all"]) => Ok(self.endpoints()),
            (Method::GET, ["config", "bgp", "neigh", "all"]) => self.bgp_neighbors(),
            (Method::POST, ["config", "cistate"]) => {
                let req = parse_json::<CiState>(body)?;
                self.post_cistate(req)?;
                Ok(ok())
            }
            (Method::GET, ["config", "cistate", "all"]) => Ok(json!({
                "Attr": self
                    .cistate
                    .values()
                    .map(|c| json!({
                        "instance": c.instance,
                        "state": c.state,
                        "sync": 0,
                        "vip": c.vip,
                    }))
                    .collect::<Vec<_>>()
            })),
            (_, ["status"])
            | (_, ["config", "loadbalancer"])
            | (_, ["config", "loadbalancer", "all"])
            | (_, ["config", "conntrack", "all"])
            | (_, ["config", "endpoint", "all"])
            | (_, ["config", "bgp", "neigh", "all"])
            | (_, ["config", "cistate"])
            | (_, ["config", "cistate", "all"])
            | (_, ["config", "loadbalancer", "name", _])
            | (_, ["config", "loadbalancer", "externalipaddress", _, "port", _, "protocol", _]) => {
                Err(not_allowed(method, path))
            }
            _ => Err(ApiError::new(404, "", format!("no such path {path:?}"))),
        }
    }
}

impl Api {
    /// kube-loxilb's role for this agent: MASTER announces every VIP as
    /// the active node, BACKUP with the worse path of `--bgp-backup-path`
    /// (the role matters only with BGP: ARP/ND for the VIPs is not this
    /// agent's in `run`). Several instances: MASTER if any is.
    fn post_cistate(&mut self, req: CiState) -> Result<(), ApiError> {
        let req = checked_role(req)?;
        let mut next = self.cistate.clone();
        next.insert(req.instance.clone(), req);
        let master = next.values().any(|c| c.state == "MASTER");
        let was = self.cistate.values().any(|c| c.state == "MASTER");
        self.sink
            .set_master(master)
            .map_err(|e| ApiError::new(500, "", format!("the role was not applied: {e:#}")))?;
        if let Err(e) = self.store.save_roles(next.values()) {
            if let Err(u) = self.sink.set_master(was) {
                tracing::error!("the cluster role could not be stored nor undone: {u:#}");
            }
            return Err(ApiError::new(
                500,
                "",
                format!("the role was not stored (and is undone): {e:#}"),
            ));
        }
        self.cistate = next;
        Ok(())
    }

    /// Apply the cluster roles restored from the state directory (none
    /// stored: nothing; the agent's default stands until kube-loxilb posts
    /// one).
    pub fn restore_role(&mut self) -> anyhow::Result<()> {
        if self.cistate.is_empty() {
            return Ok(());
        }
        let master = self.cistate.values().any(|c| c.state == "MASTER");
        tracing::info!(
            "cluster role restored from {}: {}",
            self.store.describe_roles(),
            if master { "MASTER" } else { "BACKUP" }
        );
        self.sink.set_master(master)
    }
}

/// A cluster role as this agent takes it: an instance name, MASTER or
/// BACKUP (any case), an IP address as the VIP (`0.0.0.0` when none).
fn checked_role(mut req: CiState) -> Result<CiState, ApiError> {
    if req.instance.is_empty() {
        return Err(ApiError::new(
            400,
            "instance",
            "an instance name is required",
        ));
    }
    req.state = req.state.to_ascii_uppercase();
    if !["MASTER", "BACKUP"].contains(&req.state.as_str()) {
        return Err(ApiError::new(
            400,
            "state",
            format!(
                "{:?} is not a state this agent takes: MASTER or BACKUP",
                req.state
            ),
        ));
    }
    if req.vip.is_empty() {
        req.vip = "0.0.0.0".into();
    }
    if req.vip.parse::<IpAddr>().is_err() {
        return Err(ApiError::new(
            400,
            "vip",
            format!("{:?} is not an IP address", req.vip),
        ));
    }
    Ok(req)
}

fn not_allowed(method: &http::Method, path: &str) -> ApiError {
    ApiError::new(405, "", format!("{path} does not take {method}"))
}

/// `%XX` escapes of a path segment (names may carry `:` or `/`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Strict JSON: the error names the path of the bad field.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // Broken JSON has no field to blame; a bad value does.
        let path = match e.inner().classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => String::new(),
            _ => config::field_path(e.path()),
        };
        ApiError::bad(&path, format!("bad request body: {}", e.inner()))
    })?;
    // Nothing after the value.
    de.end()
        .map_err(|e| ApiError::bad("", format!("bad request body: {e}")))?;
    Ok(v)
}

/// A rule file rule in loxilb's shape (for `GET .../all`). `dsr-ipip`
/// has no loxilb number and shows as 3 (dsr).
pub fn from_rule(r: &Rule) -> LbRule {
    let mode = match r.mode {
        Mode::Default => 0,
        Mode::OneArm => 1,
        Mode::FullNat => 2,
        Mode::Dsr | Mode::DsrIpip => 3,
    };
    let sel = match r.selection {
        Selection::RoundRobin => 0,
        Selection::Hash => 1,
        Selection::Persist => 3,
        Selection::LeastConn => 4,
    };
    let probe = r.probe.as_ref();
    LbRule {
        service: ServiceArgs {
            external_ip: r.vip.to_string(),
            port: r.port,
            protocol: r.protocol.to_string(),
            sel,
            mode,
            monitor: probe.is_some(),
            inactive_timeout: r.timeout_s,
            probetype: probe.map(|p| p.kind.to_string()).unwrap_or_default(),
            probeport: probe.and_then(|p| p.port).unwrap_or(0),
            probereq: probe.and_then(|p| p.request.clone()).unwrap_or_default(),
            proberesp: probe.and_then(|p| p.response.clone()).unwrap_or_default(),
            probe_retries: probe.map(|p| p.retries).unwrap_or(0),
            probe_timeout: probe.map(|p| p.timeout.as_secs() as u32).unwrap_or(0),
            name: r.name.clone(),
            ..Default::default()
        },
        secondary_ips: r
            .secondary_vips
            .iter()
            .map(|a| SecondaryIp {
                secondary_ip: a.to_string(),
            })
            .collect(),
        allowed_sources: r
            .source_ranges
            .iter()
            .map(|n| AllowedSource {
                prefix: n.to_string(),
            })
            .collect(),
        endpoints: r
            .endpoints
            .iter()
            .map(|e| LbEndpoint {
                endpoint_ip: e.ip.to_string(),
                target_port: e.port,
                weight: e.weight,
                ..Default::default()
            })
            .collect(),
    }
}

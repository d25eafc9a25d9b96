//! The custom resources users know from kube-loxilb, as Rust types (kube's
//! `CustomResource` derive), their `CustomResourceDefinition`s rendered to
//! YAML (`manifest/crds/`, written by `cargo run -p xtask -- gen-crds`),
//! and the strict validation of a BGP peer.
//!
//! - [`BGPPeerService`] (`bgppeer.loxilb.io/v1`, cluster-scoped): one BGP
//!   neighbour of every agent. Same kind, group and spec fields as
//!   kube-loxilb's, so its objects apply unchanged; the agents report the
//!   sessions in a `status` kube-loxilb does not have
//!   ([`BGPPeerServiceStatus`]: one entry per node, plus a summary state
//!   that `kubectl get` shows).
//! - [`BGPPolicyDefinedSetsService`], [`BGPPolicyDefinitionService`],
//!   [`BGPPolicyApplyService`] (GoBGP-style routing policy; cluster-scoped,
//!   each in its own group as in kube-loxilb). The types are defined so
//!   the CRDs can be installed and the objects read; nothing acts on them
//!   yet.
//!
//! The spec integers are `i64` (what the API server stores) rather than
//! the narrower types they become: an object whose value is out of range
//! must still be readable, so it can be reported ([`PeerSpecError`]) and
//! skipped instead of breaking the watch of every other object.

use std::net::IpAddr;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The BGP port used when `spec.remotePort` is not given.
pub const DEFAULT_BGP_PORT: u16 = 179;
/// AS_TRANS (RFC 6793): a placeholder for 4-octet AS numbers on the
/// wire, never a real AS.
pub const AS_TRANS: u32 = 23456;

/// A BGP neighbour of every agent: the agents open a session to it and
/// announce the VIPs of the Services they serve.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "bgppeer.loxilb.io",
    version = "v1",
    kind = "BGPPeerService",
    plural = "bgppeerservices",
    singular = "bgppeerservice",
    status = "BGPPeerServiceStatus",
    derive = "PartialEq",
    doc = "A BGP neighbour of every loxilb agent (kube-loxilb's BGPPeerService).",
    printcolumn = r#"{"name": "Peer", "type": "string", "jsonPath": ".spec.ipAddress", "description": "The neighbour's address"}"#,
    printcolumn = r#"{"name": "AS", "type": "integer", "jsonPath": ".spec.remoteAs", "description": "The neighbour's AS number"}"#,
    printcolumn = r#"{"name": "State", "type": "string", "jsonPath": ".status.state", "description": "Session state over all agents"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerServiceSpec {
    /// The neighbour's IPv4 or IPv6 address (unicast; not link-local).
    pub ip_address: String,
    /// The neighbour's AS number (1..=4294967295, not 23456). eBGP when it
    /// differs from the agents' AS (`--setBGP`), iBGP otherwise.
    #[schemars(range(min = 1, max = 4294967295i64))]
    pub remote_as: i64,
    /// The neighbour's BGP port (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub remote_port: Option<i64>,
    /// eBGP multihop: the neighbour may be several hops away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_multi_hop: Option<bool>,
}

/// What the agents report about a BGPPeerService.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerServiceStatus {
    /// Summary over the agents: the session state when every agent reports
    /// the same one (`Established`, `Active`, `Connect`, `Idle`, ...,
    /// `Invalid` when the spec cannot be used), `Mixed` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// One entry per agent (node), each written by that agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<BGPPeerNodeStatus>,
}

/// One agent's session with the neighbour.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerNodeStatus {
    /// The node the agent runs on.
    pub node: String,
    /// The BGP session state (RFC 4271 names), `Invalid` when the spec
    /// cannot be used, `Pending` before the speaker reports the session.
    pub state: String,
    /// When the session entered its current state (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub since: Option<String>,
    /// Routes (VIPs) currently announced to the neighbour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefixes_sent: Option<i64>,
    /// Why the last session ended, why it does not come up, or why the
    /// spec is invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A named set (prefixes, neighbours, AS paths, communities) BGP policies
/// refer to (kube-loxilb's BGPPolicyDefinedSetsService).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "bgppolicydefinedsets.loxilb.io",
    version = "v1",
    kind = "BGPPolicyDefinedSetsService",
    plural = "bgppolicydefinedsetsservices",
    singular = "bgppolicydefinedsetsservice",
    derive = "PartialEq",
    doc = "A named set BGP policies refer to (kube-loxilb's BGPPolicyDefinedSetsService).",
    printcolumn = r#"{"name": "Set", "type": "string", "jsonPath": ".spec.name", "description": "The set's name"}"#,
    printcolumn = r#"{"name": "Type", "type": "string", "jsonPath": ".spec.definedType", "description": "What the set holds"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPolicyDefinedSetsServiceSpec {
    /// The set's name, as policies refer to it.
    pub name: String,
    /// `prefix`, `neighbor`, `aspath`, `community`, `extcommunity`,
    /// `largecommunity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defined_type: Option<String>,
    /// The members of a set that is not a prefix set.
    #[serde(rename = "List", default, skip_serializing_if = "Option::is_none")]
    pub list: Option<Vec<String>>,
    /// The members of a prefix set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_list: Option<Vec<PolicyPrefix>>,
}

/// A prefix of a prefix set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPrefix {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_prefix: Option<String>,
    /// `MIN..MAX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masklength_range: Option<String>,
}

/// A routing policy: ordered statements of conditions and actions
/// (kube-loxilb's BGPPolicyDefinitionService).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "bgppolicydefinition.loxilb.io",
    version = "v1",
    kind = "BGPPolicyDefinitionService",
    plural = "bgppolicydefinitionservices",
    singular = "bgppolicydefinitionservice",
    derive = "PartialEq",
    doc = "A BGP routing policy (kube-loxilb's BGPPolicyDefinitionService).",
    printcolumn = r#"{"name": "Policy", "type": "string", "jsonPath": ".spec.name", "description": "The policy's name"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPolicyDefinitionServiceSpec {
    /// The policy's name, as BGPPolicyApplyService refers to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statements: Option<Vec<PolicyStatement>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<PolicyConditions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<PolicyActions>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp_conditions: Option<BgpConditions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_neighbor_set: Option<MatchNeighborSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_prefix_set: Option<MatchPrefixSet>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpConditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub afi_safi_in: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_path_length: Option<AsPathLength>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_as_path_set: Option<MatchAsPathSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_community_set: Option<MatchCommunitySet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_ext_community_set: Option<MatchCommunitySet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_large_community_set: Option<MatchCommunitySet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_in_list: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpki: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_type: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AsPathLength {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchAsPathSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_path_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_set_options: Option<String>,
}

/// Community, extended community and large community matches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchCommunitySet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_set_options: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchNeighborSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_set_option: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbor_set: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchPrefixSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_set_option: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_set: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyActions {
    /// `accept-route`, `reject-route`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_disposition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp_actions: Option<BgpActions>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpActions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_med: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_next_hop: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_local_pref: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_community: Option<SetCommunity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_ext_community: Option<SetCommunity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_large_community: Option<SetCommunity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_as_path_prepend: Option<SetAsPathPrepend>,
}

/// Community, extended community and large community actions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetCommunity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_community_method: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetAsPathPrepend {
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "as")]
    pub as_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_n: Option<i64>,
}

/// Applies policies to a neighbour's imports or exports (kube-loxilb's
/// BGPPolicyApplyService).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "bgppolicyapply.loxilb.io",
    version = "v1",
    kind = "BGPPolicyApplyService",
    plural = "bgppolicyapplyservices",
    singular = "bgppolicyapplyservice",
    derive = "PartialEq",
    doc = "Applies BGP policies to a neighbour (kube-loxilb's BGPPolicyApplyService).",
    printcolumn = r#"{"name": "Peer", "type": "string", "jsonPath": ".spec.ipAddress", "description": "The neighbour the policies apply to"}"#,
    printcolumn = r#"{"name": "Type", "type": "string", "jsonPath": ".spec.policyType", "description": "import or export"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPolicyApplyServiceSpec {
    /// The neighbour's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// `import` or `export`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_type: Option<String>,
    /// Names of BGPPolicyDefinitionService policies, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<String>>,
    /// The default action: `accept` or `reject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_action: Option<String>,
}

/// A valid BGP peer, ready for the speaker (the agent converts it to its
/// own peer type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerSpecPlain {
    pub ip: IpAddr,
    pub remote_as: u32,
    pub port: u16,
    /// `spec.setMultiHop: true` (eBGP multihop); `false` when absent.
    pub multihop: bool,
}

/// A spec field that cannot be used: which field, its value, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value:?}: {message}")]
pub struct PeerSpecError {
    /// The field's path, e.g. `spec.remoteAs`.
    pub field: &'static str,
    pub value: String,
    pub message: String,
}

pub const FIELD_IP: &str = "spec.ipAddress";
pub const FIELD_AS: &str = "spec.remoteAs";
pub const FIELD_PORT: &str = "spec.remotePort";

fn spec_err(
    field: &'static str,
    value: impl ToString,
    message: impl Into<String>,
) -> PeerSpecError {
    PeerSpecError {
        field,
        value: value.to_string(),
        message: message.into(),
    }
}

/// Why `ip` cannot be a BGP neighbour, if it cannot.
fn peer_ip_problem(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            Some("a link-local address (it would need an interface); use a global or ULA address")
        }
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped address; write the IPv4 address")
        }
        _ => None,
    }
}

/// Check a BGPPeerService spec strictly (the same rules as the agent's
/// `--extBGPPeers`): a unicast IPv4/IPv6 address written plainly (no
/// spaces, no prefix length, not link-local), an AS number 1..=4294967295
/// other than AS_TRANS, a port 1..=65535 (179 when absent).
pub fn validate_peer_spec(spec: &BGPPeerServiceSpec) -> Result<PeerSpecPlain, PeerSpecError> {
    let raw = spec.ip_address.as_str();
    let ip: IpAddr = raw.parse().map_err(|_| {
        spec_err(
            FIELD_IP,
            raw,
            "not an IP address (an IPv4 or IPv6 address, without prefix length or port)",
        )
    })?;
    if let Some(why) = peer_ip_problem(ip) {
        return Err(spec_err(
            FIELD_IP,
            raw,
            format!("cannot be a BGP neighbour: {why}"),
        ));
    }
    let asn = spec.remote_as;
    let remote_as = match asn {
        0 => {
            return Err(spec_err(
                FIELD_AS,
                asn,
                "AS 0 is not a valid AS number (1..=4294967295)",
            ))
        }
        n if n < 0 || n > u32::MAX as i64 => {
            return Err(spec_err(
                FIELD_AS,
                asn,
                "out of range: AS numbers are 1..=4294967295",
            ))
        }
        n if n == AS_TRANS as i64 => {
            return Err(spec_err(
                FIELD_AS,
                asn,
                "23456 is AS_TRANS (RFC 6793), a placeholder, not an AS",
            ))
        }
        n => n as u32,
    };
    let port = match spec.remote_port {
        None => DEFAULT_BGP_PORT,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            return Err(spec_err(
                FIELD_PORT,
                p,
                "not a port (1..=65535; omit the field for 179)",
            ))
        }
    };
    Ok(PeerSpecPlain {
        ip,
        remote_as,
        port,
        multihop: spec.set_multi_hop.unwrap_or(false),
    })
}

/// Every CRD this project defines, by its object name
/// (`<plural>.<group>`), sorted.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    let mut v = vec![
        BGPPeerService::crd(),
        BGPPolicyDefinedSetsService::crd(),
        BGPPolicyDefinitionService::crd(),
        BGPPolicyApplyService::crd(),
    ];
    v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    v
}

/// The header of every generated file.
pub const GENERATED_HEADER: &str = "# Generated from kube-watch/src/crds.rs by `cargo run -p xtask -- gen-crds`.\n# Do not edit: change the Rust types and run the task again.\n";

/// The generated files: (file name `<plural>.<group>.yaml`, contents).
/// Deterministic: keys are sorted, whatever the build's `serde_json`
/// features.
pub fn render_crds() -> Vec<(String, String)> {
    all_crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().expect("a CRD has a name");
            let json = serde_json::to_value(&crd).expect("a CRD serializes");
            let yaml = serde_norway::to_string(&sorted_yaml(&json)).expect("YAML serializes");
            (format!("{name}.yaml"), format!("{GENERATED_HEADER}{yaml}"))
        })
        .collect()
}

/// `v` as YAML with every mapping's keys sorted.
fn sorted_yaml(v: &serde_json::Value) -> serde_norway::Value {
    use serde_json::Value as J;
    use serde_norway::Value as Y;
    match v {
        J::Null => Y::Null,
        J::Bool(b) => Y::Bool(*b),
        J::Number(n) => serde_norway::to_value(n).expect("a number"),
        J::String(s) => Y::String(s.clone()),
        J::Array(a) => Y::Sequence(a.iter().map(sorted_yaml).collect()),
        J::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let mut m = serde_norway::Mapping::new();
            for k in keys {
                m.insert(Y::String(k.clone()), sorted_yaml(&o[k]));
            }
            Y::Mapping(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ip: &str, asn: i64, port: Option<i64>) -> BGPPeerServiceSpec {
        BGPPeerServiceSpec {
            ip_address: ip.into(),
            remote_as: asn,
            remote_port: port,
            set_multi_hop: None,
        }
    }

    #[test]
    fn valid_peers() {
        assert_eq!(
            validate_peer_spec(&spec("10.0.0.2", 65002, None)),
            Ok(PeerSpecPlain {
                ip: "10.0.0.2".parse().unwrap(),
                remote_as: 65002,
                port: 179,
                multihop: false
            })
        );
        let mut s = spec("2001:db8::1", 4294967295, Some(1179));
        s.set_multi_hop = Some(true);
        let p = validate_peer_spec(&s).unwrap();
        assert_eq!(
            (p.ip.to_string(), p.remote_as, p.port, p.multihop),
            ("2001:db8::1".into(), u32::MAX, 1179, true)
        );
        assert_eq!(
            validate_peer_spec(&spec("10.0.0.2", 1, Some(65535)))
                .unwrap()
                .port,
            65535
        );
    }

    #[test]
    fn invalid_peers_name_field_and_value() {
        for (s, field, value, why) in [
            (
                spec("10.0.0", 65002, None),
                FIELD_IP,
                "10.0.0",
                "not an IP address",
            ),
            (
                spec(" 10.0.0.2", 65002, None),
                FIELD_IP,
                " 10.0.0.2",
                "not an IP address",
            ),
            (
                spec("10.0.0.2/32", 65002, None),
                FIELD_IP,
                "10.0.0.2/32",
                "not an IP address",
            ),
            (spec("", 65002, None), FIELD_IP, "", "not an IP address"),
            (
                spec("0.0.0.0", 65002, None),
                FIELD_IP,
                "0.0.0.0",
                "unspecified",
            ),
            (
                spec("224.0.0.5", 65002, None),
                FIELD_IP,
                "224.0.0.5",
                "multicast",
            ),
            (
                spec("255.255.255.255", 65002, None),
                FIELD_IP,
                "255.255.255.255",
                "broadcast",
            ),
            (
                spec("fe80::1", 65002, None),
                FIELD_IP,
                "fe80::1",
                "link-local",
            ),
            (
                spec("::ffff:10.0.0.2", 65002, None),
                FIELD_IP,
                "::ffff:10.0.0.2",
                "IPv4-mapped",
            ),
            (spec("10.0.0.2", 0, None), FIELD_AS, "0", "AS 0"),
            (
                spec("10.0.0.2", 4294967296, None),
                FIELD_AS,
                "4294967296",
                "1..=4294967295",
            ),
            (spec("10.0.0.2", -1, None), FIELD_AS, "-1", "1..=4294967295"),
            (spec("10.0.0.2", 23456, None), FIELD_AS, "23456", "AS_TRANS"),
            (
                spec("10.0.0.2", 65002, Some(0)),
                FIELD_PORT,
                "0",
                "1..=65535",
            ),
            (
                spec("10.0.0.2", 65002, Some(65536)),
                FIELD_PORT,
                "65536",
                "1..=65535",
            ),
        ] {
            let e = validate_peer_spec(&s).unwrap_err();
            assert_eq!((e.field, e.value.as_str()), (field, value), "{e}");
            assert!(e.message.contains(why), "{e}");
            let text = e.to_string();
            assert!(text.starts_with(&format!("{field}: {value:?}: ")), "{text}");
        }
    }

    #[test]
    fn kube_loxilb_objects_read() {
        let p: BGPPeerService = serde_json::from_value(serde_json::json!({
            "apiVersion": "bgppeer.loxilb.io/v1", "kind": "BGPPeerService",
            "metadata": {"name": "peer1"},
            "spec": {"ipAddress": "192.168.1.1", "remoteAs": 65001, "remotePort": 179},
        }))
        .unwrap();
        assert_eq!(p.spec.remote_as, 65001);
        assert!(p.status.is_none());
        let d: BGPPolicyDefinedSetsService = serde_json::from_value(serde_json::json!({
            "apiVersion": "bgppolicydefinedsets.loxilb.io/v1", "kind": "BGPPolicyDefinedSetsService",
            "metadata": {"name": "policy-prefix"},
            "spec": {"name": "ps2", "definedType": "prefix", "List": ["x"],
                     "prefixList": [{"ipPrefix": "192.168.0.0/16", "masklengthRange": "16..24"}]},
        }))
        .unwrap();
        assert_eq!(d.spec.list.as_deref(), Some(&["x".to_string()][..]));
        assert_eq!(serde_json::to_value(&d.spec).unwrap()["List"][0], "x");
        let a: BGPPolicyApplyService = serde_json::from_value(serde_json::json!({
            "apiVersion": "bgppolicyapply.loxilb.io/v1", "kind": "BGPPolicyApplyService",
            "metadata": {"name": "policy-apply"},
            "spec": {"ipAddress": "10.10.10.254", "policyType": "import",
                     "policies": ["poltest6"], "routeAction": "accept"},
        }))
        .unwrap();
        assert_eq!(a.spec.policies.unwrap(), ["poltest6"]);
        let def: BGPPolicyDefinitionService = serde_json::from_value(serde_json::json!({
            "apiVersion": "bgppolicydefinition.loxilb.io/v1", "kind": "BGPPolicyDefinitionService",
            "metadata": {"name": "p"},
            "spec": {"name": "poltest6", "statements": [{"name": "s1",
                "conditions": {"matchPrefixSet": {"prefixSet": "ps2", "matchSetOption": "any"},
                               "bgpConditions": {"asPathLength": {"operator": "eq", "value": 2}}},
                "actions": {"routeDisposition": "accept-route",
                            "bgpActions": {"setLocalPref": 100,
                                           "setAsPathPrepend": {"as": "65005", "repeatN": 2}}}}]},
        }))
        .unwrap();
        let st = &def.spec.statements.unwrap()[0];
        assert_eq!(
            st.actions
                .as_ref()
                .unwrap()
                .bgp_actions
                .as_ref()
                .unwrap()
                .set_as_path_prepend,
            Some(SetAsPathPrepend {
                as_: Some("65005".into()),
                repeat_n: Some(2)
            })
        );
    }
}

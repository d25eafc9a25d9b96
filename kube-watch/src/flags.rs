//! The Kubernetes-related agent flags, parsed strictly from strings.
//!
//! Each `parse_*` function takes the flag's value and returns a typed value
//! or a [`FlagError`] naming the flag, the value and what is allowed. The
//! agent's CLI (`loxilb-agent kube`) uses them as clap `value_parser`s
//! through [`for_clap`], so a bad value is refused by clap at startup;
//! the flags that are checked together ([`lease_timings_of`],
//! [`status_form_of`]) take the typed values. [`KubeConfig`] is the typed
//! result with the defaults.
//!
//! Differences from kube-loxilb, on purpose:
//! - There are no default pools. kube-loxilb starts with
//!   `defaultPool=123.123.123.1/24` / `3ffe:cafe::1/96`, addresses nobody
//!   routes; here a Service that needs a pool that is not configured stays
//!   pending with an error naming the flag to set.
//! - `--setLBMode` 4 (fullproxy) and 5 (hostonearm) are refused.
//! - Pools may not overlap (checked here within one flag, and across flags
//!   by [`KubeConfig::ipam`]).

use std::net::IpAddr;

use ipnet::IpNet;
use loxilb_model::Mode;

use crate::{
    annotations::parse_pool_name,
    ipam::{
        Ipam, IpamError, IpamMode, PoolRange, PoolSpec, DEFAULT_POOL, FLAG_SECONDARY, FLAG_V4,
        FLAG_V6,
    },
};

pub const FLAG_LB_MODE: &str = "--setLBMode";
pub const FLAG_UNIQUE_IP: &str = "--setUniqueIP";
pub const FLAG_LB_CLASS: &str = "--loadBalancerClass";
pub const FLAG_POD_NETWORK: &str = "--usePodNetwork";
pub const FLAG_MONITOR: &str = "--monitor";
pub const FLAG_LB_HOSTNAME_STATUS: &str = "--setLBHostnameStatus";
pub const FLAG_ZONE: &str = "--zone";
pub const FLAG_NO_ZONE_NAME: &str = "--noZoneName";

/// kube-loxilb's default zone: the hostname prefix of [`StatusForm::Hostname`].
pub const DEFAULT_ZONE: &str = "llb";

/// The `loadBalancerClass` handled when `--loadBalancerClass` is not given.
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "loxilb.io/loxilb";

/// A flag value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {message}")]
pub struct FlagError {
    pub flag: &'static str,
    pub value: String,
    pub message: String,
}

/// A `parse_*` result for clap's `value_parser`: the error is only what is
/// wrong and what is allowed, since clap's own message names the flag and
/// the value (`invalid value '7' for '--setLBMode <0-3>': allowed values:
/// 0 (default), ...`).
pub fn for_clap<T>(r: Result<T, FlagError>) -> Result<T, String> {
    r.map_err(|e| e.message)
}

fn err(flag: &'static str, value: &str, message: impl Into<String>) -> FlagError {
    FlagError {
        flag,
        value: value.to_string(),
        message: message.into(),
    }
}

/// The Kubernetes side's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeConfig {
    /// `--cidrPools`: IPv4 pools.
    pub cidr_pools: Vec<PoolSpec>,
    /// `--cidr6Pools`: IPv6 pools.
    pub cidr6_pools: Vec<PoolSpec>,
    /// `--externalSecondaryCIDRs`: pools for SCTP secondary addresses.
    pub secondary_pools: Vec<PoolSpec>,
    /// `--setLBMode`: the mode of Services without `loxilb.io/lbmode`.
    pub lb_mode: Mode,
    /// `--setUniqueIP`: exclusive addresses.
    pub unique_ip: bool,
    /// `--loadBalancerClass`: the Services handled.
    pub load_balancer_class: String,
    /// `--usePodNetwork`: endpoints are pods, not nodes.
    pub use_pod_network: bool,
    /// `--monitor`: probe endpoints of every Service.
    pub monitor: bool,
    /// `--vipOwners`: who answers for the VIPs.
    pub vip_owners: VipOwners,
}

/// Who answers for each VIP on the wire (holds it on `lo`, announces it,
/// streams its sessions), `--vipOwners`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VipOwners {
    /// `leader`: the agent holding the leader Lease owns every VIP.
    #[default]
    Leader,
    /// `pool`: one Lease per address pool (`--cidrPools`, `--cidr6Pools`),
    /// its holder owns the VIPs of that pool; the agents spread the pools
    /// among themselves. Addresses outside every pool follow the leader.
    Pool,
}

/// The `--vipOwners` flag.
pub const FLAG_VIP_OWNERS: &str = "--vipOwners";

/// `--vipOwners`: `leader` or `pool`.
pub fn parse_vip_owners(value: &str) -> Result<VipOwners, FlagError> {
    match value.trim() {
        "leader" => Ok(VipOwners::Leader),
        "pool" => Ok(VipOwners::Pool),
        _ => Err(err(
            FLAG_VIP_OWNERS,
            value,
            "expected `leader` (the leader Lease's holder owns every VIP) or `pool` (one Lease per address pool: the pools are spread over the agents)",
        )),
    }
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            cidr_pools: Vec::new(),
            cidr6_pools: Vec::new(),
            secondary_pools: Vec::new(),
            lb_mode: Mode::Default,
            unique_ip: false,
            load_balancer_class: DEFAULT_LOAD_BALANCER_CLASS.to_string(),
            use_pod_network: false,
            monitor: false,
            vip_owners: VipOwners::Leader,
        }
    }
}

impl KubeConfig {
    pub fn ipam_mode(&self) -> IpamMode {
        if self.unique_ip {
            IpamMode::Exclusive
        } else {
            IpamMode::Shared
        }
    }

    /// The names of the VIP pools (`--cidrPools`, `--cidr6Pools`), each
    /// once, sorted: the owner groups of `--vipOwners=pool`.
    pub fn pool_names(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<&str> = self
            .cidr_pools
            .iter()
            .chain(&self.cidr6_pools)
            .map(|p| p.name.as_str())
            .collect();
        names.into_iter().map(String::from).collect()
    }

    /// An empty allocation table over the configured pools (checks that no
    /// two pools of any flag overlap).
    pub fn ipam(&self) -> Result<Ipam, IpamError> {
        Ipam::new(
            self.ipam_mode(),
            &self.cidr_pools,
            &self.cidr6_pools,
            &self.secondary_pools,
        )
    }
}

/// `--cidrPools`: `name=CIDR|first-last,...`, IPv4.
pub fn parse_cidr_pools(value: &str) -> Result<Vec<PoolSpec>, FlagError> {
    parse_pools(FLAG_V4, value)
}

/// `--cidr6Pools`: `name=CIDR|first-last,...`, IPv6.
pub fn parse_cidr6_pools(value: &str) -> Result<Vec<PoolSpec>, FlagError> {
    parse_pools(FLAG_V6, value)
}

/// `--externalSecondaryCIDRs`: `name=CIDR|first-last,...`, either family.
pub fn parse_secondary_cidrs(value: &str) -> Result<Vec<PoolSpec>, FlagError> {
    parse_pools(FLAG_SECONDARY, value)
}

/// A comma-separated list of `name=CIDR` or `name=first-last`; an item
/// without `name=` is the pool `defaultPool`. An empty value is no pools. A
/// CIDR with host bits (`123.123.123.1/24`, as kube-loxilb's examples
/// write) means its network. Names must be unique and pools must not
/// overlap.
fn parse_pools(flag: &'static str, value: &str) -> Result<Vec<PoolSpec>, FlagError> {
    const FORMAT: &str = "expected name=CIDR or name=first-last, comma-separated (e.g. defaultPool=192.0.2.0/24,pool2=198.51.100.10-198.51.100.20)";
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut pools = Vec::new();
    for item in value.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(err(flag, value, format!("empty item; {FORMAT}")));
        }
        let (name, spec) = match item.split_once('=') {
            Some((n, s)) => (n.trim(), s.trim()),
            None => (DEFAULT_POOL, item),
        };
        let name = parse_pool_name(name).map_err(|m| err(flag, value, m))?;
        let range = parse_range(spec)
            .map_err(|m| err(flag, value, format!("pool `{name}`: {m}; {FORMAT}")))?;
        pools.push(PoolSpec { name, range });
    }
    let none: &[PoolSpec] = &[];
    let (v4, v6, sec) = match flag {
        FLAG_V4 => (&pools[..], none, none),
        FLAG_V6 => (none, &pools[..], none),
        _ => (none, none, &pools[..]),
    };
    Ipam::new(IpamMode::Shared, v4, v6, sec).map_err(|e| err(flag, value, e.to_string()))?;
    Ok(pools)
}

fn parse_range(spec: &str) -> Result<PoolRange, String> {
    if spec.contains('/') {
        let net: IpNet = spec
            .parse()
            .map_err(|_| format!("`{spec}` is not a CIDR"))?;
        return Ok(PoolRange::Cidr(net.trunc()));
    }
    if let Some((a, b)) = spec.split_once('-') {
        let ip = |s: &str| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("`{}` is not an IP address", s.trim()))
        };
        let (first, last) = (ip(a)?, ip(b)?);
        let same_family = first.is_ipv4() == last.is_ipv4();
        let ordered = match (first, last) {
            (IpAddr::V4(x), IpAddr::V4(y)) => x <= y,
            (IpAddr::V6(x), IpAddr::V6(y)) => x <= y,
            _ => false,
        };
        if !same_family || !ordered {
            return Err(format!(
                "`{spec}`: a range is first-last of one family with first <= last"
            ));
        }
        return Ok(PoolRange::Range { first, last });
    }
    if let Ok(ip) = spec.parse::<IpAddr>() {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        return Err(format!(
            "`{spec}` is a single address; write {ip}/{len} for a one-address pool"
        ));
    }
    Err(format!("`{spec}` is neither a CIDR nor a first-last range"))
}

/// `--setLBMode`: 0 default, 1 onearm, 2 fullnat, 3 dsr.
pub fn parse_lb_mode(value: &str) -> Result<Mode, FlagError> {
    const ALLOWED: &str = "allowed values: 0 (default), 1 (onearm), 2 (fullnat), 3 (dsr)";
    match value.trim() {
        "0" => Ok(Mode::Default),
        "1" => Ok(Mode::OneArm),
        "2" => Ok(Mode::FullNat),
        "3" => Ok(Mode::Dsr),
        "4" => Err(err(
            FLAG_LB_MODE,
            value,
            format!("4 (fullproxy) is not supported by this load balancer; {ALLOWED}"),
        )),
        "5" => Err(err(
            FLAG_LB_MODE,
            value,
            format!("5 (hostonearm) is not supported by this load balancer; {ALLOWED}"),
        )),
        _ => Err(err(FLAG_LB_MODE, value, ALLOWED)),
    }
}

/// A boolean flag value, with the spellings Go's `strconv.ParseBool`
/// accepts (kube-loxilb manifests write `--setUniqueIP=false`).
pub fn parse_bool(flag: &'static str, value: &str) -> Result<bool, FlagError> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(err(flag, value, "allowed values: true, false")),
    }
}

/// A duration flag: a number of seconds (`4`, `0.5`) or with a unit
/// (`500ms`, `4s`, `1m`); above zero, at most an hour.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<std::time::Duration, FlagError> {
    let v = value.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else {
        (v, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x * scale <= 3600.0 => {
            Ok(std::time::Duration::from_secs_f64(x * scale))
        }
        _ => Err(err(
            flag,
            value,
            "not a duration; write seconds (4, 0.5) or with a unit (500ms, 4s, 1m), above 0 and at most 1h",
        )),
    }
}

/// (lease duration, renew deadline, retry period).
pub type LeaseTimings = (
    std::time::Duration,
    std::time::Duration,
    std::time::Duration,
);

/// The Lease timings from `--leaseDuration`, `--leaseRenewDeadline`,
/// `--leaseRetryPeriod` (each `None`: its default in `base`): retry <
/// renew deadline < duration, as client-go requires.
pub fn lease_timings(
    base: LeaseTimings,
    duration: Option<&str>,
    renew: Option<&str>,
    retry: Option<&str>,
) -> Result<LeaseTimings, FlagError> {
    lease_timings_of(
        base,
        duration
            .map(|v| parse_duration(FLAG_LEASE_DURATION, v))
            .transpose()?,
        renew
            .map(|v| parse_duration(FLAG_LEASE_RENEW, v))
            .transpose()?,
        retry
            .map(|v| parse_duration(FLAG_LEASE_RETRY, v))
            .transpose()?,
    )
}

/// [`lease_timings`] of values already parsed ([`parse_duration`]).
pub fn lease_timings_of(
    base: LeaseTimings,
    duration: Option<std::time::Duration>,
    renew: Option<std::time::Duration>,
    retry: Option<std::time::Duration>,
) -> Result<LeaseTimings, FlagError> {
    let d = duration.unwrap_or(base.0);
    let r = renew.unwrap_or(base.1);
    let p = retry.unwrap_or(base.2);
    if r >= d {
        return Err(err(
            FLAG_LEASE_RENEW,
            &format!("{r:?}"),
            format!("must be shorter than {FLAG_LEASE_DURATION} ({d:?}): a leader that cannot renew must step down before another agent takes over"),
        ));
    }
    if p >= r {
        return Err(err(
            FLAG_LEASE_RETRY,
            &format!("{p:?}"),
            format!("must be shorter than {FLAG_LEASE_RENEW} ({r:?}): the leader renews every retry period"),
        ));
    }
    Ok((d, r, p))
}

pub const FLAG_LEASE_DURATION: &str = "--leaseDuration";
pub const FLAG_LEASE_RENEW: &str = "--leaseRenewDeadline";
pub const FLAG_LEASE_RETRY: &str = "--leaseRetryPeriod";

/// `--zone`: the prefix of the status hostname (`<zone>-<ip>`), a DNS
/// label of lower-case letters, digits and `-` (kube-loxilb's zone name).
pub fn parse_zone(value: &str) -> Result<String, FlagError> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(value.to_string())
    } else {
        Err(err(
            FLAG_ZONE,
            value,
            format!(
                "not a zone name; allowed values: 1 to 63 lower-case letters, digits and `-`, not starting or ending with `-` (e.g. {DEFAULT_ZONE}, the default)"
            ),
        ))
    }
}

/// How `status.loadBalancer.ingress` names each VIP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StatusForm {
    /// `ip: <vip>`, `ipMode: VIP` (the default).
    #[default]
    Ip,
    /// kube-loxilb's form, for drop-in compatibility with tools that read
    /// it: `hostname: <zone>-<vip>` ([`crate::translate::status_hostname`]) and no `ip` (the
    /// API allows `ipMode` only with `ip`, so it is not set). Without an
    /// `ip`, kube-proxy does not short-cut the VIP inside the cluster:
    /// in-cluster clients go through the load balancer too, as with
    /// kube-loxilb.
    Hostname { zone: String },
}

/// How the status names the VIPs, from `--setLBHostnameStatus`, `--zone`
/// and `--noZoneName` (each `None` when not given).
///
/// kube-loxilb always writes hostnames `<zone>-<ip>` unless `--noZoneName`
/// is set; this agent writes plain IPs unless `--setLBHostnameStatus` is
/// set (or kube-loxilb's `--noZoneName=false` is given explicitly). `--zone`
/// (default `llb`) is the prefix. Contradictions are errors: hostnames
/// asked for and refused at once, or a `--zone` that nothing would use.
pub fn status_form(
    set_hostname: Option<&str>,
    zone: Option<&str>,
    no_zone_name: Option<&str>,
) -> Result<StatusForm, FlagError> {
    let hostname = set_hostname
        .map(|v| parse_bool(FLAG_LB_HOSTNAME_STATUS, v))
        .transpose()?;
    let no_zone = no_zone_name
        .map(|v| parse_bool(FLAG_NO_ZONE_NAME, v))
        .transpose()?;
    let zone = zone.map(parse_zone).transpose()?;
    status_form_of(hostname, zone, no_zone)
}

/// [`status_form`] of values already parsed ([`parse_bool`],
/// [`parse_zone`]).
pub fn status_form_of(
    hostname: Option<bool>,
    zone: Option<String>,
    no_zone: Option<bool>,
) -> Result<StatusForm, FlagError> {
    let on = match (hostname, no_zone) {
        (Some(h), Some(n)) if h == n => {
            return Err(err(
                FLAG_LB_HOSTNAME_STATUS,
                &h.to_string(),
                format!(
                    "contradicts {FLAG_NO_ZONE_NAME}={n}: {}; give only one of the two",
                    if h {
                        "one asks for hostnames <zone>-<ip> in the status, the other for plain IPs"
                    } else {
                        "one asks for plain IPs in the status, the other for hostnames <zone>-<ip>"
                    }
                ),
            ));
        }
        (Some(h), _) => h,
        (None, Some(n)) => !n,
        (None, None) => false,
    };
    match (on, zone) {
        (true, zone) => Ok(StatusForm::Hostname {
            zone: zone.unwrap_or_else(|| DEFAULT_ZONE.to_string()),
        }),
        (false, None) => Ok(StatusForm::Ip),
        (false, Some(z)) => Err(err(
            FLAG_ZONE,
            &z,
            format!(
                "the zone only names the status hostnames <zone>-<ip>, which are off (the status holds plain IPs); add {FLAG_LB_HOSTNAME_STATUS}=true or remove {FLAG_ZONE}"
            ),
        )),
    }
}

/// `--loadBalancerClass`: a label-style key, `[prefix/]name`, as the
/// Kubernetes API requires of `spec.loadBalancerClass`.
pub fn parse_load_balancer_class(value: &str) -> Result<String, FlagError> {
    let ok = match value.split_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix) && qualified_name_part(name),
        None => qualified_name_part(value),
    };
    if ok {
        Ok(value.to_string())
    } else {
        Err(err(
            FLAG_LB_CLASS,
            value,
            format!(
                "not a label-style key; allowed values: [prefix/]name with prefix a DNS subdomain and name at most 63 characters of letters, digits, `-`, `_`, `.` (e.g. {DEFAULT_LOAD_BALANCER_CLASS})"
            ),
        ))
    }
}

fn qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(crate::annotations::dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lease_timings_are_checked() {
        use std::time::Duration as D;
        let base = (D::from_secs(4), D::from_secs(3), D::from_secs(1));
        assert_eq!(lease_timings(base, None, None, None).unwrap(), base);
        assert_eq!(
            lease_timings(base, Some("10"), Some("8s"), Some("500ms")).unwrap(),
            (D::from_secs(10), D::from_secs(8), D::from_millis(500))
        );
        assert_eq!(parse_duration("--x", "1m").unwrap(), D::from_secs(60));
        assert_eq!(parse_duration("--x", "0.25").unwrap(), D::from_millis(250));
        for bad in ["0", "-1", "x", "2h", "", "1.5h", "NaN"] {
            let e = parse_duration(FLAG_LEASE_DURATION, bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--leaseDuration"), "{e}");
        }
        let e = lease_timings(base, Some("3"), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--leaseRenewDeadline") && e.contains("shorter than --leaseDuration"),
            "{e}"
        );
        let e = lease_timings(base, None, None, Some("3"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--leaseRetryPeriod") && e.contains("shorter than --leaseRenewDeadline"),
            "{e}"
        );
    }

    #[test]
    fn defaults() {
        let c = KubeConfig::default();
        assert_eq!(c.load_balancer_class, "loxilb.io/loxilb");
        assert_eq!(c.lb_mode, Mode::Default);
        assert!(c.cidr_pools.is_empty() && c.cidr6_pools.is_empty());
        assert!(!c.unique_ip && !c.use_pod_network && !c.monitor);
        assert_eq!(c.ipam_mode(), IpamMode::Shared);
        let c = KubeConfig {
            unique_ip: true,
            ..c
        };
        assert_eq!(c.ipam().unwrap().mode(), IpamMode::Exclusive);
    }

    #[test]
    fn cidr_pools() {
        let p =
            parse_cidr_pools("defaultPool=123.123.123.1/24, pool2=124.124.124.10-124.124.124.20")
                .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].to_string(), "defaultPool=123.123.123.0/24");
        assert_eq!(
            p[1].range,
            PoolRange::Range {
                first: ip("124.124.124.10"),
                last: ip("124.124.124.20")
            }
        );
        // A bare CIDR is the default pool.
        let p = parse_cidr_pools("192.0.2.0/24").unwrap();
        assert_eq!(p[0].name, DEFAULT_POOL);
        assert!(parse_cidr_pools("").unwrap().is_empty());
        assert!(parse_cidr_pools("  ").unwrap().is_empty());
    }

    #[test]
    fn cidr6_pools() {
        let p = parse_cidr6_pools("defaultPool=3ffe::1/96,p2=3fff::10-3fff::20").unwrap();
        assert_eq!(p[0].range, PoolRange::Cidr("3ffe::/96".parse().unwrap()));
        assert_eq!(p[1].range.family(), crate::IpFamily::V6);
        let e = parse_cidr6_pools("defaultPool=10.0.0.0/8").unwrap_err();
        assert!(e.message.contains("put it in --cidrPools"), "{e}");
        let e = parse_cidr_pools("defaultPool=3ffe::/96").unwrap_err();
        assert_eq!(e.flag, "--cidrPools");
        assert!(e.message.contains("put it in --cidr6Pools"), "{e}");
    }

    #[test]
    fn pool_errors() {
        for (v, want) in [
            ("a=10.0.0.0/24,", "empty item"),
            ("a=10.0.0.0/33", "`10.0.0.0/33` is not a CIDR"),
            ("a=10.0.0.9-10.0.0.1", "first <= last"),
            ("a=10.0.0.1-3ffe::1", "one family"),
            ("a=10.0.0.1-x", "`x` is not an IP address"),
            ("a=10.0.0.5", "write 10.0.0.5/32"),
            ("a=pool", "neither a CIDR nor a first-last range"),
            ("=10.0.0.0/24", "is not a pool name"),
            ("my pool=10.0.0.0/24", "is not a pool name"),
            ("a=10.0.0.0/24,a=10.0.1.0/24", "`a` is used twice"),
            ("a=10.0.0.0/24,b=10.0.0.128/25", "overlap"),
            ("10.0.0.0/24,10.0.1.0/24", "`defaultPool` is used twice"),
        ] {
            let e = parse_cidr_pools(v).unwrap_err();
            assert_eq!(e.value, v);
            assert!(e.message.contains(want), "{v}: {e}");
        }
        let e = parse_cidr_pools("a=10.0.0.5").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cidrPools \"a=10.0.0.5\": pool `a`: `10.0.0.5` is a single address; write 10.0.0.5/32 \
             for a one-address pool; expected name=CIDR or name=first-last, comma-separated \
             (e.g. defaultPool=192.0.2.0/24,pool2=198.51.100.10-198.51.100.20)"
        );
    }

    #[test]
    fn secondary_cidrs_take_both_families() {
        let p = parse_secondary_cidrs("s1=30.0.0.0/24,s2=3ffe:2::/64").unwrap();
        assert_eq!(p.len(), 2);
        let e = parse_secondary_cidrs("s1=30.0.0.0/24,s1=3ffe:2::/64").unwrap_err();
        assert_eq!(e.flag, "--externalSecondaryCIDRs");
    }

    #[test]
    fn pools_overlapping_across_flags() {
        let c = KubeConfig {
            cidr_pools: parse_cidr_pools("defaultPool=10.0.0.0/24").unwrap(),
            secondary_pools: parse_secondary_cidrs("s=10.0.0.0/28").unwrap(),
            ..KubeConfig::default()
        };
        assert!(c.ipam().unwrap_err().to_string().contains("overlap"));
    }

    #[test]
    fn lb_mode() {
        assert_eq!(parse_lb_mode("0"), Ok(Mode::Default));
        assert_eq!(parse_lb_mode("1"), Ok(Mode::OneArm));
        assert_eq!(parse_lb_mode("2"), Ok(Mode::FullNat));
        assert_eq!(parse_lb_mode("3"), Ok(Mode::Dsr));
        let e = parse_lb_mode("4").unwrap_err();
        assert!(e
            .message
            .starts_with("4 (fullproxy) is not supported by this load balancer"));
        let e = parse_lb_mode("5").unwrap_err();
        assert!(e.message.contains("hostonearm"));
        for v in ["6", "-1", "fullnat", ""] {
            let e = parse_lb_mode(v).unwrap_err();
            assert_eq!(
                e.message,
                "allowed values: 0 (default), 1 (onearm), 2 (fullnat), 3 (dsr)"
            );
            assert_eq!(e.flag, "--setLBMode");
        }
    }

    #[test]
    fn booleans() {
        for v in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_bool(FLAG_UNIQUE_IP, v), Ok(true));
        }
        for v in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_bool(FLAG_MONITOR, v), Ok(false));
        }
        let e = parse_bool(FLAG_POD_NETWORK, "yes").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--usePodNetwork \"yes\": allowed values: true, false"
        );
    }

    #[test]
    fn load_balancer_class() {
        for ok in ["loxilb.io/loxilb", "internal-vip", "example.com/a_b.c", "a"] {
            assert_eq!(parse_load_balancer_class(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "loxilb.io/",
            "/x",
            "Loxilb.IO/x",
            "a/b/c",
            "x-",
            "loxilb io",
            &"n".repeat(64),
        ] {
            let e = parse_load_balancer_class(bad).unwrap_err();
            assert!(e.message.contains("label-style key"), "{bad}: {e}");
        }
    }

    /// Every combination of the three status flags: the form written, or
    /// the error (flag named, what to do).
    #[test]
    fn status_form_table() {
        let host = |z: &str| {
            Ok(StatusForm::Hostname {
                zone: z.to_string(),
            })
        };
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Result<StatusForm, &'a str>,
        );
        let cases: &[Case] = &[
            (None, None, None, Ok(StatusForm::Ip)),
            (Some("false"), None, None, Ok(StatusForm::Ip)),
            (None, None, Some("true"), Ok(StatusForm::Ip)),
            (Some("false"), None, Some("true"), Ok(StatusForm::Ip)),
            (Some("true"), None, None, host("llb")),
            (Some("1"), Some("zone-a"), None, host("zone-a")),
            (None, None, Some("false"), host("llb")),
            (None, Some("llb2"), Some("false"), host("llb2")),
            (Some("true"), None, Some("false"), host("llb")),
            (
                Some("true"),
                None,
                Some("true"),
                Err("--setLBHostnameStatus \"true\": contradicts --noZoneName=true"),
            ),
            (
                Some("false"),
                None,
                Some("false"),
                Err("--setLBHostnameStatus \"false\": contradicts --noZoneName=false"),
            ),
            (
                None,
                Some("llb"),
                None,
                Err("--zone \"llb\": the zone only names the status hostnames"),
            ),
            (
                Some("false"),
                Some("z"),
                None,
                Err("add --setLBHostnameStatus=true or remove --zone"),
            ),
            (
                Some("yes"),
                None,
                None,
                Err("--setLBHostnameStatus \"yes\": allowed values: true, false"),
            ),
            (
                None,
                None,
                Some("no"),
                Err("--noZoneName \"no\": allowed values"),
            ),
            (
                Some("true"),
                Some("LLB"),
                None,
                Err("--zone \"LLB\": not a zone name"),
            ),
            (
                Some("true"),
                Some("-a"),
                None,
                Err("not starting or ending with `-`"),
            ),
            (
                Some("true"),
                Some(""),
                None,
                Err("--zone \"\": not a zone name"),
            ),
        ];
        for (h, z, n, want) in cases {
            let got = status_form(*h, *z, *n);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(*w, g, "{h:?} {z:?} {n:?}"),
                (Err(w), Err(e)) => {
                    let text = e.to_string();
                    assert!(text.contains(w), "{h:?} {z:?} {n:?}: {text}")
                }
                (w, g) => panic!("{h:?} {z:?} {n:?}: want {w:?}, got {g:?}"),
            }
        }
        assert!(parse_zone(&"a".repeat(63)).is_ok());
        assert!(parse_zone(&"a".repeat(64)).is_err());
    }
}

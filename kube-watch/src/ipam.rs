//! VIP address management: pools, allocation per Service, release, and
//! rebuilding the table from what is recorded on the Services.
//!
//! # Pools
//!
//! A pool is an IPv4 or IPv6 CIDR or an inclusive `first-last` range. From
//! an IPv4 CIDR the network and broadcast addresses are not handed out
//! (unless it is a /31 or /32, RFC 3021); from an IPv6 CIDR the first
//! address (the subnet-router anycast address, RFC 4291) is not handed out
//! (unless it is a /127 or /128). A range hands out every address in it.
//! Pools must not overlap. Primary pools (`--cidrPools`, `--cidr6Pools`) are
//! looked up by name and family (both families usually have a
//! `defaultPool`); secondary pools (`--externalSecondaryCIDRs`, for SCTP
//! multi-homing) by name alone.
//!
//! # Allocation
//!
//! [`Ipam::ensure`] takes an [`AllocRequest`] (the Service, the VIP families,
//! the pool, an optional static IP, the (port, protocol) pairs, secondary
//! IPs) and returns the Service's [`Allocation`]. It is idempotent and
//! sticky: a Service keeps its addresses as long as they still satisfy the
//! request, so calling it on every update churns nothing. Addresses are
//! handed out lowest first, so released ones are reused.
//!
//! - **Shared mode** (default): several Services may use the same address
//!   as long as their (port, protocol) pairs do not collide. A new Service
//!   gets the lowest address of the pool where its pairs are free.
//! - **Exclusive mode** (`--setUniqueIP`): an address belongs to one Service.
//!
//! A static IP (`loxilb.io/staticIP` or `spec.loadBalancerIP`) is used as
//! given, inside a pool or outside every pool, subject to the same sharing
//! rules. A failed `ensure` (pool exhausted, conflict, unknown pool) changes
//! nothing: the Service keeps what it had, or stays pending.
//!
//! # The allocation record
//!
//! The leader writes each Service's allocation into the annotation
//! [`RECORD_ANNOTATION`] (`loxilb.io/allocated`) before it programs rules or
//! writes `status.loadBalancer`, so the annotation is the source of truth
//! and the status only follows it. Format ([`AllocationRecord`]):
//!
//! ```text
//! ips=<vip>[,<vip>];ports=<port>/<proto>[,...][;secondary=<ip>[,<ip>...]]
//! ips=20.0.0.5,3ffe::5;ports=80/tcp,443/tcp
//! ips=20.0.0.7;ports=38412/sctp;secondary=30.0.0.2,31.0.0.2
//! ```
//!
//! `ips` holds one VIP per family, in the Service's family order; `ports`
//! the (port, protocol) pairs the addresses were allocated for (`tcp`,
//! `udp`, `sctp`; possibly empty); `secondary` the SCTP secondary
//! addresses. Sections are separated by `;`, items by `,`; unknown or
//! repeated sections are errors. The record keeps the ports of the
//! allocation rather than the current spec's, so a Service whose ports were
//! edited while no leader ran cannot make the rebuilt table inconsistent:
//! the next [`Ipam::ensure`] checks the new ports. A new leader calls
//! [`Ipam::rebuild`] with every recorded allocation, oldest Service first;
//! a record that conflicts with one adopted before it is reported and not
//! adopted (that Service is allocated again), so no address is ever given
//! twice and none leaks.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::IpNet;
use loxilb_model::Protocol;

use crate::{IpFamily, ServiceKey};

/// The Service annotation holding the allocation record.
pub const RECORD_ANNOTATION: &str = "loxilb.io/allocated";
/// The pool a Service's VIP comes from when it names none.
pub const DEFAULT_POOL: &str = "defaultPool";
/// At most this many secondary IPs per Service.
pub const MAX_SECONDARY_IPS: usize = 3;

/// The flag names, used in messages.
pub const FLAG_V4: &str = "--cidrPools";
pub const FLAG_V6: &str = "--cidr6Pools";
pub const FLAG_SECONDARY: &str = "--externalSecondaryCIDRs";

/// Addresses of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolRange {
    /// A CIDR (stored truncated to its network address).
    Cidr(IpNet),
    /// An inclusive range of one family, `first <= last`.
    Range { first: IpAddr, last: IpAddr },
}

impl PoolRange {
    pub fn family(&self) -> IpFamily {
        match self {
            PoolRange::Cidr(IpNet::V4(_)) => IpFamily::V4,
            PoolRange::Cidr(IpNet::V6(_)) => IpFamily::V6,
            PoolRange::Range { first, .. } => IpFamily::of(first),
        }
    }

    /// First and last address of the whole range (network to broadcast).
    fn span(&self) -> (u128, u128) {
        match self {
            PoolRange::Cidr(net) => (to_u128(net.network()), to_u128(net.broadcast())),
            PoolRange::Range { first, last } => (to_u128(*first), to_u128(*last)),
        }
    }

    /// First and last address handed out.
    pub fn assignable(&self) -> (IpAddr, IpAddr) {
        let (lo, hi) = self.assignable_u128();
        let f = self.family();
        (from_u128(f, lo), from_u128(f, hi))
    }

    fn assignable_u128(&self) -> (u128, u128) {
        let (lo, hi) = self.span();
        match self {
            PoolRange::Cidr(IpNet::V4(n)) if n.prefix_len() < 31 => (lo + 1, hi - 1),
            PoolRange::Cidr(IpNet::V6(n)) if n.prefix_len() < 127 => (lo + 1, hi),
            _ => (lo, hi),
        }
    }
}

impl fmt::Display for PoolRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolRange::Cidr(n) => write!(f, "{n}"),
            PoolRange::Range { first, last } => write!(f, "{first}-{last}"),
        }
    }
}

/// A named pool, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub range: PoolRange,
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.range)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(f: IpFamily, n: u128) -> IpAddr {
    match f {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Shared or exclusive address use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpamMode {
    /// Services share an address when their (port, protocol) pairs differ.
    Shared,
    /// One Service per address (`--setUniqueIP`).
    Exclusive,
}

/// A (port, protocol) pair of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub port: u16,
    pub protocol: Protocol,
}

impl PortKey {
    pub fn new(port: u16, protocol: Protocol) -> Self {
        PortKey { port, protocol }
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

fn port_list(ports: &[PortKey]) -> String {
    ports
        .iter()
        .map(PortKey::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a Service's secondary (SCTP multi-homing) addresses come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SecondaryRequest {
    #[default]
    None,
    /// One address from each named secondary pool.
    Pools(Vec<String>),
    /// These addresses (inside or outside the pools).
    Ips(Vec<IpAddr>),
}

/// What a Service asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocRequest {
    pub service: ServiceKey,
    /// One VIP per family, in this order (1 or 2 distinct families).
    pub families: Vec<IpFamily>,
    /// The primary pool name (for every family without a static IP).
    pub pool: String,
    /// A static VIP for its family.
    pub static_ip: Option<IpAddr>,
    pub ports: BTreeSet<PortKey>,
    pub secondary: SecondaryRequest,
}

/// One allocated address and the pool it lies in (`None`: outside every
/// pool, a static IP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatedIp {
    pub ip: IpAddr,
    pub pool: Option<String>,
}

/// A Service's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub service: ServiceKey,
    /// One per family, in the request's family order.
    pub vips: Vec<AllocatedIp>,
    pub secondary: Vec<AllocatedIp>,
    /// The (port, protocol) pairs the addresses are held for.
    pub ports: BTreeSet<PortKey>,
}

impl Allocation {
    /// The VIP of a family.
    pub fn vip(&self, family: IpFamily) -> Option<IpAddr> {
        self.vips
            .iter()
            .map(|a| a.ip)
            .find(|ip| IpFamily::of(ip) == family)
    }

    fn all_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vips.iter().chain(&self.secondary).map(|a| a.ip)
    }

    /// The record to write into [`RECORD_ANNOTATION`].
    pub fn record(&self) -> AllocationRecord {
        AllocationRecord {
            vips: self.vips.iter().map(|a| a.ip).collect(),
            secondary: self.secondary.iter().map(|a| a.ip).collect(),
            ports: self.ports.clone(),
        }
    }
}

/// The content of [`RECORD_ANNOTATION`]; see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationRecord {
    pub vips: Vec<IpAddr>,
    pub secondary: Vec<IpAddr>,
    pub ports: BTreeSet<PortKey>,
}

impl fmt::Display for AllocationRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |ips: &[IpAddr]| {
            ips.iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let ports: Vec<String> = self.ports.iter().map(PortKey::to_string).collect();
        write!(f, "ips={};ports={}", join(&self.vips), ports.join(","))?;
        if !self.secondary.is_empty() {
            write!(f, ";secondary={}", join(&self.secondary))?;
        }
        Ok(())
    }
}

impl FromStr for AllocationRecord {
    type Err = String;

    /// Strict: exactly the format [`fmt::Display`] writes.
    fn from_str(s: &str) -> Result<Self, String> {
        const FORMAT: &str =
            "expected ips=<ip>[,<ip>];ports=<port>/<tcp|udp|sctp>[,...][;secondary=<ip>[,...]]";
        let mut vips = None;
        let mut ports = None;
        let mut secondary = None;
        for section in s.split(';') {
            let (key, value) = section
                .split_once('=')
                .ok_or_else(|| format!("section `{section}` has no `=`; {FORMAT}"))?;
            let slot = match key {
                "ips" => &mut vips,
                "ports" => &mut ports,
                "secondary" => &mut secondary,
                _ => return Err(format!("unknown section `{key}`; {FORMAT}")),
            };
            if slot.replace(value).is_some() {
                return Err(format!("section `{key}` is given twice; {FORMAT}"));
            }
        }
        let ips = |v: &str| -> Result<Vec<IpAddr>, String> {
            v.split(',')
                .map(|x| {
                    x.parse::<IpAddr>()
                        .map_err(|_| format!("`{x}` is not an IP address; {FORMAT}"))
                })
                .collect()
        };
        let vips = ips(vips.ok_or_else(|| format!("no `ips` section; {FORMAT}"))?)?;
        let secondary = match secondary {
            Some(v) => ips(v)?,
            None => Vec::new(),
        };
        let mut set = BTreeSet::new();
        let ports = ports.ok_or_else(|| format!("no `ports` section; {FORMAT}"))?;
        if !ports.is_empty() {
            for p in ports.split(',') {
                let key = parse_port_key(p).ok_or_else(|| {
                    format!("`{p}` is not <port>/<tcp|udp|sctp> (port 1..=65535); {FORMAT}")
                })?;
                if !set.insert(key) {
                    return Err(format!("port `{p}` is given twice"));
                }
            }
        }
        let rec = AllocationRecord {
            vips,
            secondary,
            ports: set,
        };
        rec.validate()?;
        Ok(rec)
    }
}

fn parse_port_key(s: &str) -> Option<PortKey> {
    let (port, proto) = s.split_once('/')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    Some(PortKey { port, protocol })
}

impl AllocationRecord {
    /// One or two VIPs of distinct families, at most
    /// [`MAX_SECONDARY_IPS`] secondary addresses, no address twice.
    pub fn validate(&self) -> Result<(), String> {
        if self.vips.is_empty() || self.vips.len() > 2 {
            return Err(format!(
                "{} VIPs recorded; a record holds one or two (one per family)",
                self.vips.len()
            ));
        }
        if self.vips.len() == 2 && IpFamily::of(&self.vips[0]) == IpFamily::of(&self.vips[1]) {
            return Err(
                "two VIPs of the same family recorded; a record holds one per family".into(),
            );
        }
        if self.secondary.len() > MAX_SECONDARY_IPS {
            return Err(format!(
                "{} secondary IPs recorded; at most {MAX_SECONDARY_IPS}",
                self.secondary.len()
            ));
        }
        let all: Vec<&IpAddr> = self.vips.iter().chain(&self.secondary).collect();
        for (i, ip) in all.iter().enumerate() {
            if all[..i].contains(ip) {
                return Err(format!("{ip} is recorded twice"));
            }
        }
        Ok(())
    }
}

/// Why an allocation cannot be made. Every message says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The pools are misconfigured (start-up).
    #[error("{0}")]
    Config(String),
    /// The request itself is contradictory.
    #[error("{service}: {message}")]
    BadRequest {
        service: ServiceKey,
        message: String,
    },
    /// No pool with that name (and family).
    #[error(fmt = fmt_unknown_pool)]
    UnknownPool {
        pool: String,
        family: IpFamily,
        secondary: bool,
        known: Vec<String>,
    },
    /// No address of the pool is free for these ports.
    #[error(fmt = fmt_exhausted)]
    Exhausted {
        pool: String,
        range: String,
        flag: &'static str,
        ports: Vec<PortKey>,
        mode: IpamMode,
    },
    /// The address is used by another Service.
    #[error(fmt = fmt_in_use)]
    InUse {
        ip: IpAddr,
        /// The Service already using it.
        other: ServiceKey,
        /// The colliding pairs (shared mode); empty in exclusive mode.
        ports: Vec<PortKey>,
    },
    /// [`Ipam::adopt`] for a Service that already has an allocation.
    #[error("{0} already has an allocation; release it before adopting a recorded one")]
    AlreadyAllocated(ServiceKey),
}

/// [`IpamError::UnknownPool`]'s message.
fn fmt_unknown_pool(
    pool: &str,
    family: &IpFamily,
    secondary: &bool,
    known: &[String],
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    let (what, flag) = if *secondary {
        ("secondary pool".to_string(), FLAG_SECONDARY)
    } else if *family == IpFamily::V4 {
        (format!("{family} pool"), FLAG_V4)
    } else {
        (format!("{family} pool"), FLAG_V6)
    };
    let known = if known.is_empty() {
        "none are defined".to_string()
    } else {
        format!("defined: {}", known.join(", "))
    };
    write!(
        f,
        "no {what} named `{pool}` ({known}); define it with {flag} or select another with loxilb.io/poolSelect{}",
        if *secondary { "Secondary" } else { "" }
    )
}

/// [`IpamError::Exhausted`]'s message.
fn fmt_exhausted(
    pool: &str,
    range: &str,
    flag: &str,
    ports: &[PortKey],
    mode: &IpamMode,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    let why = match mode {
        IpamMode::Shared => format!(
            "no address where {} {} free",
            port_list(ports),
            if ports.len() == 1 { "is" } else { "are" }
        ),
        IpamMode::Exclusive => "no unused address (--setUniqueIP)".to_string(),
    };
    write!(
        f,
        "pool `{pool}` ({range}) is exhausted: {why}; free an address of the pool (delete a Service that uses it) or enlarge the pool ({flag})"
    )
}

/// [`IpamError::InUse`]'s message.
fn fmt_in_use(
    ip: &IpAddr,
    other: &ServiceKey,
    ports: &[PortKey],
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    if ports.is_empty() {
        write!(
            f,
            "{ip} is held by {other} and --setUniqueIP gives each Service its own address; request another address"
        )
    } else {
        write!(
            f,
            "{ip} is already used by {other} for {}; Services share an address only on different (port, protocol) pairs: change the port or request another address",
            port_list(ports)
        )
    }
}

/// A recorded allocation [`Ipam::rebuild`] did not adopt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildProblem {
    pub service: ServiceKey,
    pub error: IpamError,
}

impl fmt::Display for RebuildProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: recorded allocation not adopted ({}); the Service will be allocated again",
            self.service, self.error
        )
    }
}

/// One pool's occupancy ([`Ipam::pool_usage`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub family: IpFamily,
    /// From `--externalSecondaryCIDRs`.
    pub secondary: bool,
    /// Addresses it hands out.
    pub size: u128,
    /// Of those, held by a Service.
    pub used: u64,
}

#[derive(Clone, Debug)]
struct Pool {
    name: String,
    secondary: bool,
    family: IpFamily,
    range: PoolRange,
    first: u128,
    last: u128,
}

impl Pool {
    fn holds(&self, ip: IpAddr) -> bool {
        IpFamily::of(&ip) == self.family && (self.first..=self.last).contains(&to_u128(ip))
    }

    fn flag(&self) -> &'static str {
        match (self.secondary, self.family) {
            (true, _) => FLAG_SECONDARY,
            (false, IpFamily::V4) => FLAG_V4,
            (false, IpFamily::V6) => FLAG_V6,
        }
    }
}

/// Users of one address: Service -> its (port, protocol) pairs, ordered by
/// Service. A sorted vector: nearly every address has one user, and a
/// one-entry `BTreeMap` costs a whole node (~800 bytes here, 8 MB over
/// 10,000 addresses).
#[derive(Clone, Debug, Default)]
struct Users(Vec<(ServiceKey, BTreeSet<PortKey>)>);

impl Users {
    fn insert(&mut self, service: ServiceKey, ports: BTreeSet<PortKey>) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&service)) {
            Ok(i) => self.0[i].1 = ports,
            Err(i) => self.0.insert(i, (service, ports)),
        }
    }

    fn remove(&mut self, service: &ServiceKey) {
        if let Ok(i) = self.0.binary_search_by(|(k, _)| k.cmp(service)) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &BTreeSet<PortKey>)> {
        self.0.iter().map(|(k, p)| (k, p))
    }

    fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.0.iter().map(|(k, _)| k)
    }

    fn values(&self) -> impl Iterator<Item = &BTreeSet<PortKey>> {
        self.0.iter().map(|(_, p)| p)
    }
}

/// A set of addresses (as integers of one family) kept as maximal runs of
/// consecutive addresses, `first -> last` (inclusive): the lowest address
/// outside the set at or above `x` is found by jumping over runs, whatever
/// the number of addresses in them.
#[derive(Clone, Debug, Default)]
struct Runs(BTreeMap<u128, u128>);

impl Runs {
    /// The last address of the run holding `x`, if `x` is in the set.
    fn run_end(&self, x: u128) -> Option<u128> {
        self.0
            .range(..=x)
            .next_back()
            .and_then(|(_, &last)| (last >= x).then_some(last))
    }

    fn insert(&mut self, x: u128) {
        if self.run_end(x).is_some() {
            return;
        }
        let mut first = x;
        let mut last = x;
        if let Some(prev) = x.checked_sub(1) {
            if let Some((&s, _)) = self
                .0
                .range(..=prev)
                .next_back()
                .filter(|(_, &l)| l == prev)
            {
                first = s;
            }
        }
        if let Some(next) = x.checked_add(1) {
            if let Some(l) = self.0.remove(&next) {
                last = l;
            }
        }
        self.0.insert(first, last);
    }

    fn remove(&mut self, x: u128) {
        let Some((&first, &last)) = self.0.range(..=x).next_back() else {
            return;
        };
        if last < x {
            return;
        }
        self.0.remove(&first);
        if first < x {
            self.0.insert(first, x - 1);
        }
        if x < last {
            self.0.insert(x + 1, last);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the free-address search jumps over: per family, the addresses used
/// for each (port, protocol) pair (shared mode: an address is unusable for
/// a request when another Service uses one of its pairs there) or used at
/// all (`None`, exclusive mode). It follows [`Ipam::used`] address by
/// address, so an allocation costs the runs it jumps over, not the number
/// of Services (the table used to be walked from the pool's start).
type UseIndex = BTreeMap<(IpFamily, Option<PortKey>), Runs>;

/// The allocation table.
#[derive(Clone, Debug)]
pub struct Ipam {
    mode: IpamMode,
    pools: Vec<Pool>,
    used: BTreeMap<IpAddr, Users>,
    index: UseIndex,
    allocations: BTreeMap<ServiceKey, Allocation>,
}

impl Ipam {
    /// An empty table over these pools. Pools of the wrong family, repeated
    /// names within a list, and overlapping pools are errors.
    pub fn new(
        mode: IpamMode,
        v4: &[PoolSpec],
        v6: &[PoolSpec],
        secondary: &[PoolSpec],
    ) -> Result<Self, IpamError> {
        let mut pools: Vec<Pool> = Vec::new();
        for (list, flag, family, is_secondary) in [
            (v4, FLAG_V4, Some(IpFamily::V4), false),
            (v6, FLAG_V6, Some(IpFamily::V6), false),
            (secondary, FLAG_SECONDARY, None, true),
        ] {
            for (i, spec) in list.iter().enumerate() {
                let f = spec.range.family();
                if let Some(want) = family.filter(|w| *w != f) {
                    let other = if want == IpFamily::V4 {
                        FLAG_V6
                    } else {
                        FLAG_V4
                    };
                    return Err(IpamError::Config(format!(
                        "{flag}: pool {spec} is {f}, this flag takes {want} pools; put it in {other}"
                    )));
                }
                if let PoolRange::Range { first, last } = spec.range {
                    if IpFamily::of(&last) != f || to_u128(first) > to_u128(last) {
                        return Err(IpamError::Config(format!(
                            "{flag}: pool {spec}: a range is first-last of one family with first <= last"
                        )));
                    }
                }
                if list[..i].iter().any(|o| o.name == spec.name) {
                    return Err(IpamError::Config(format!(
                        "{flag}: pool name `{}` is used twice; pool names must be unique",
                        spec.name
                    )));
                }
                let (lo, hi) = spec.range.span();
                let (first, last) = spec.range.assignable_u128();
                let pool = Pool {
                    name: spec.name.clone(),
                    secondary: is_secondary,
                    family: f,
                    range: spec.range,
                    first,
                    last,
                };
                if let Some(o) = pools.iter().find(|o| {
                    let (olo, ohi) = o.range.span();
                    o.family == f && lo <= ohi && olo <= hi
                }) {
                    return Err(IpamError::Config(format!(
                        "pools {}={} ({}) and {spec} ({flag}) overlap; an address must belong to one pool only",
                        o.name,
                        o.range,
                        o.flag()
                    )));
                }
                pools.push(pool);
            }
        }
        Ok(Ipam {
            mode,
            pools,
            used: BTreeMap::new(),
            index: UseIndex::new(),
            allocations: BTreeMap::new(),
        })
    }

    pub fn mode(&self) -> IpamMode {
        self.mode
    }

    /// A Service's current allocation.
    pub fn allocation(&self, service: &ServiceKey) -> Option<&Allocation> {
        self.allocations.get(service)
    }

    /// Every allocation, by Service.
    /// Each pool's size and the addresses of it in use (held by at least
    /// one Service), in the order the flags list them.
    pub fn pool_usage(&self) -> Vec<PoolUsage> {
        let used: BTreeSet<IpAddr> = self
            .allocations
            .values()
            .flat_map(|a| a.all_ips())
            .collect();
        self.pools
            .iter()
            .map(|p| PoolUsage {
                name: p.name.clone(),
                family: p.family,
                secondary: p.secondary,
                size: p.last.saturating_sub(p.first).saturating_add(1),
                used: used.iter().filter(|ip| p.holds(**ip)).count() as u64,
            })
            .collect()
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// The Services using an address.
    pub fn users(&self, ip: IpAddr) -> Vec<ServiceKey> {
        self.used
            .get(&ip)
            .map(|u| u.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Make `req.service`'s allocation satisfy `req`, keeping what already
    /// does. On error nothing changes.
    pub fn ensure(&mut self, req: &AllocRequest) -> Result<Allocation, IpamError> {
        self.validate(req)?;
        let svc = &req.service;
        let current = self.allocations.get(svc);
        let bad = |message: String| IpamError::BadRequest {
            service: svc.clone(),
            message,
        };

        // Explicit addresses first, so the pools never hand them out again
        // within this request.
        let mut taken: Vec<IpAddr> = Vec::new();
        if let Some(ip) = req.static_ip {
            self.check_usable(ip, req)?;
            taken.push(ip);
        }
        if let SecondaryRequest::Ips(ips) = &req.secondary {
            for ip in ips {
                self.check_usable(*ip, req)?;
                taken.push(*ip);
            }
        }

        let mut vips = Vec::new();
        for &family in &req.families {
            let ip = match req.static_ip.filter(|ip| IpFamily::of(ip) == family) {
                Some(ip) => ip,
                None => {
                    let pool = self.primary_pool(&req.pool, family)?;
                    let kept = current.and_then(|c| {
                        c.vips
                            .iter()
                            .map(|a| a.ip)
                            .find(|ip| pool.holds(*ip) && !taken.contains(ip))
                    });
                    let ip = match kept {
                        Some(ip) => {
                            self.check_usable(ip, req)?;
                            ip
                        }
                        None => self.first_free(pool, req, &taken)?,
                    };
                    taken.push(ip);
                    ip
                }
            };
            vips.push(self.allocated(ip));
        }

        let secondary = match &req.secondary {
            SecondaryRequest::None => Vec::new(),
            SecondaryRequest::Ips(ips) => ips.iter().map(|ip| self.allocated(*ip)).collect(),
            SecondaryRequest::Pools(names) => {
                let mut out = Vec::new();
                for name in names {
                    let pool = self.secondary_pool(name)?;
                    if !req.families.contains(&pool.family) {
                        return Err(bad(format!(
                            "secondary pool `{name}` is {} but the Service's VIP is {}; secondary addresses must be of the VIP's family",
                            pool.family,
                            families(&req.families)
                        )));
                    }
                    let kept = current.and_then(|c| {
                        c.secondary
                            .iter()
                            .map(|a| a.ip)
                            .find(|ip| pool.holds(*ip) && !taken.contains(ip))
                    });
                    let ip = match kept {
                        Some(ip) => {
                            self.check_usable(ip, req)?;
                            ip
                        }
                        None => self.first_free(pool, req, &taken)?,
                    };
                    taken.push(ip);
                    out.push(self.allocated(ip));
                }
                out
            }
        };

        let alloc = Allocation {
            service: svc.clone(),
            vips,
            secondary,
            ports: req.ports.clone(),
        };
        self.commit(alloc.clone());
        Ok(alloc)
    }

    /// Free a Service's addresses (Service deleted, no longer ours, or no
    /// longer of type LoadBalancer). They are handed out again.
    pub fn release(&mut self, service: &ServiceKey) -> Option<Allocation> {
        let old = self.allocations.remove(service)?;
        for ip in old.all_ips() {
            let before = self.index_keys(ip);
            if let Some(users) = self.used.get_mut(&ip) {
                users.remove(service);
                if users.is_empty() {
                    self.used.remove(&ip);
                }
            }
            self.reindex(ip, before);
        }
        Some(old)
    }

    /// Take over a recorded allocation as it is (no pool or request check:
    /// the addresses were handed out before). Fails if an address conflicts
    /// with what is already in the table.
    pub fn adopt(
        &mut self,
        service: &ServiceKey,
        record: &AllocationRecord,
    ) -> Result<Allocation, IpamError> {
        if self.allocations.contains_key(service) {
            return Err(IpamError::AlreadyAllocated(service.clone()));
        }
        record.validate().map_err(|message| IpamError::BadRequest {
            service: service.clone(),
            message,
        })?;
        for ip in record.vips.iter().chain(&record.secondary) {
            self.check_conflict(*ip, service, &record.ports)?;
        }
        let alloc = Allocation {
            service: service.clone(),
            vips: record.vips.iter().map(|ip| self.allocated(*ip)).collect(),
            secondary: record
                .secondary
                .iter()
                .map(|ip| self.allocated(*ip))
                .collect(),
            ports: record.ports.clone(),
        };
        self.commit(alloc.clone());
        Ok(alloc)
    }

    /// Empty the table and adopt every record, in the order given (pass the
    /// oldest Service first: on a conflict the earlier record wins). Returns
    /// the records that were not adopted.
    pub fn rebuild(
        &mut self,
        records: impl IntoIterator<Item = (ServiceKey, AllocationRecord)>,
    ) -> Vec<RebuildProblem> {
        self.used.clear();
        self.index.clear();
        self.allocations.clear();
        records
            .into_iter()
            .filter_map(|(service, rec)| {
                self.adopt(&service, &rec)
                    .err()
                    .map(|error| RebuildProblem { service, error })
            })
            .collect()
    }

    fn validate(&self, req: &AllocRequest) -> Result<(), IpamError> {
        let bad = |message: String| {
            Err(IpamError::BadRequest {
                service: req.service.clone(),
                message,
            })
        };
        let f = &req.families;
        if f.is_empty() || f.len() > 2 || (f.len() == 2 && f[0] == f[1]) {
            return bad(format!(
                "asks for VIP families [{}]; one family, or IPv4 and IPv6",
                families(f)
            ));
        }
        if let Some(ip) = req.static_ip {
            if !f.contains(&IpFamily::of(&ip)) {
                return bad(format!(
                    "static IP {ip} is {} but the Service's VIP is {} (loxilb.io/ipam, spec.ipFamilies); give a static IP of that family",
                    IpFamily::of(&ip),
                    families(f)
                ));
            }
        }
        match &req.secondary {
            SecondaryRequest::None => {}
            SecondaryRequest::Pools(names) => {
                if names.len() > MAX_SECONDARY_IPS {
                    return bad(format!(
                        "{} secondary pools; at most {MAX_SECONDARY_IPS}",
                        names.len()
                    ));
                }
                if let Some((_, n)) = names
                    .iter()
                    .enumerate()
                    .find(|(i, n)| names[..*i].contains(n))
                {
                    return bad(format!("secondary pool `{n}` is named twice"));
                }
            }
            SecondaryRequest::Ips(ips) => {
                if ips.len() > MAX_SECONDARY_IPS {
                    return bad(format!(
                        "{} secondary IPs; at most {MAX_SECONDARY_IPS}",
                        ips.len()
                    ));
                }
                for (i, ip) in ips.iter().enumerate() {
                    if ips[..i].contains(ip) || req.static_ip == Some(*ip) {
                        return bad(format!(
                            "{ip} is given twice (VIP and secondary IPs must all differ)"
                        ));
                    }
                    if !f.contains(&IpFamily::of(ip)) {
                        return bad(format!(
                            "secondary IP {ip} is {} but the Service's VIP is {}; secondary addresses must be of the VIP's family",
                            IpFamily::of(ip),
                            families(f)
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn primary_pool(&self, name: &str, family: IpFamily) -> Result<&Pool, IpamError> {
        self.pools
            .iter()
            .find(|p| !p.secondary && p.family == family && p.name == name)
            .ok_or_else(|| IpamError::UnknownPool {
                pool: name.to_string(),
                family,
                secondary: false,
                known: self
                    .pools
                    .iter()
                    .filter(|p| !p.secondary && p.family == family)
                    .map(|p| p.name.clone())
                    .collect(),
            })
    }

    fn secondary_pool(&self, name: &str) -> Result<&Pool, IpamError> {
        self.pools
            .iter()
            .find(|p| p.secondary && p.name == name)
            .ok_or_else(|| IpamError::UnknownPool {
                pool: name.to_string(),
                family: IpFamily::V4,
                secondary: true,
                known: self
                    .pools
                    .iter()
                    .filter(|p| p.secondary)
                    .map(|p| p.name.clone())
                    .collect(),
            })
    }

    fn allocated(&self, ip: IpAddr) -> AllocatedIp {
        AllocatedIp {
            ip,
            pool: self.pool_of(ip, true).map(String::from),
        }
    }

    /// The name of the pool that hands `ip` out (`secondary`: secondary
    /// pools too); `None` outside every pool (a static address).
    pub fn pool_of(&self, ip: IpAddr, secondary: bool) -> Option<&str> {
        self.pools
            .iter()
            .find(|p| (secondary || !p.secondary) && p.holds(ip))
            .map(|p| p.name.as_str())
    }

    /// The first user of `users` (other than `service`) that `ports` collide
    /// with, and the colliding pairs (empty in exclusive mode).
    fn collision(
        &self,
        users: &Users,
        service: &ServiceKey,
        ports: &BTreeSet<PortKey>,
    ) -> Option<(ServiceKey, Vec<PortKey>)> {
        users
            .iter()
            .filter(|(other, _)| *other != service)
            .find_map(|(other, theirs)| match self.mode {
                IpamMode::Exclusive => Some((other.clone(), Vec::new())),
                IpamMode::Shared => {
                    let common: Vec<PortKey> = ports.intersection(theirs).copied().collect();
                    (!common.is_empty()).then(|| (other.clone(), common))
                }
            })
    }

    fn check_conflict(
        &self,
        ip: IpAddr,
        service: &ServiceKey,
        ports: &BTreeSet<PortKey>,
    ) -> Result<(), IpamError> {
        match self
            .used
            .get(&ip)
            .and_then(|u| self.collision(u, service, ports))
        {
            None => Ok(()),
            Some((other, ports)) => Err(IpamError::InUse { ip, other, ports }),
        }
    }

    fn check_usable(&self, ip: IpAddr, req: &AllocRequest) -> Result<(), IpamError> {
        self.check_conflict(ip, &req.service, &req.ports)
    }

    /// The lowest address of `pool` usable for `req` and not in `taken`.
    /// Jumps over the runs of addresses the index says are used (for one
    /// of the request's pairs in shared mode, at all in exclusive mode), so
    /// it never visits the whole pool nor every used address: a /64 costs
    /// what a /30 does, and the 10,001st Service what the first did.
    fn first_free(
        &self,
        pool: &Pool,
        req: &AllocRequest,
        taken: &[IpAddr],
    ) -> Result<IpAddr, IpamError> {
        let keys: Vec<Option<PortKey>> = match self.mode {
            IpamMode::Shared => req.ports.iter().copied().map(Some).collect(),
            IpamMode::Exclusive => vec![None],
        };
        let runs: Vec<&Runs> = keys
            .iter()
            .filter_map(|k| self.index.get(&(pool.family, *k)))
            .collect();
        let mut found = None;
        let mut cand = pool.first;
        'search: loop {
            let mut jumped = false;
            for r in &runs {
                if let Some(last) = r.run_end(cand) {
                    if last >= pool.last {
                        break 'search;
                    }
                    cand = last + 1;
                    jumped = true;
                }
            }
            if jumped {
                continue;
            }
            if !taken.contains(&from_u128(pool.family, cand)) {
                found = Some(cand);
                break;
            }
            if cand == pool.last {
                break;
            }
            cand += 1;
        }
        // The index counts the Service's own use of an address, which does
        // not collide with itself: such an address below the one found is
        // usable too (rare: e.g. its old secondary IP inside this pool).
        if let Some(a) = self.allocations.get(&req.service) {
            let own = a
                .all_ips()
                .filter(|ip| pool.holds(*ip) && !taken.contains(ip))
                .map(to_u128)
                .filter(|x| found.is_none_or(|f| *x < f))
                .filter(|x| {
                    let ip = from_u128(pool.family, *x);
                    self.used
                        .get(&ip)
                        .is_none_or(|u| self.collision(u, &req.service, &req.ports).is_none())
                })
                .min();
            if own.is_some() {
                found = own;
            }
        }
        let found = found.map(|x| from_u128(pool.family, x));
        #[cfg(test)]
        assert_eq!(
            found,
            self.first_free_linear(pool, req, taken),
            "the index disagrees with the plain search for {req:?}"
        );
        found.ok_or_else(|| IpamError::Exhausted {
            pool: pool.name.clone(),
            range: pool.range.to_string(),
            flag: pool.flag(),
            ports: req.ports.iter().copied().collect(),
            mode: self.mode,
        })
    }

    /// The plain search the index replaces: every address of the pool in
    /// order, checked against its users. Tests compare the two on every
    /// allocation.
    #[cfg(test)]
    fn first_free_linear(
        &self,
        pool: &Pool,
        req: &AllocRequest,
        taken: &[IpAddr],
    ) -> Option<IpAddr> {
        let lo = from_u128(pool.family, pool.first);
        let hi = from_u128(pool.family, pool.last);
        let mut used = self.used.range(lo..=hi).peekable();
        let mut cand = pool.first;
        loop {
            let ip = from_u128(pool.family, cand);
            while used.peek().is_some_and(|(u, _)| to_u128(**u) < cand) {
                used.next();
            }
            let users = used
                .peek()
                .filter(|(u, _)| to_u128(**u) == cand)
                .map(|(_, users)| *users);
            if !taken.contains(&ip)
                && users.is_none_or(|u| self.collision(u, &req.service, &req.ports).is_none())
            {
                return Some(ip);
            }
            if cand == pool.last {
                return None;
            }
            cand += 1;
        }
    }

    /// The index entries `ip` belongs to now.
    fn index_keys(&self, ip: IpAddr) -> BTreeSet<Option<PortKey>> {
        let Some(users) = self.used.get(&ip) else {
            return BTreeSet::new();
        };
        match self.mode {
            IpamMode::Exclusive => [None].into(),
            IpamMode::Shared => users.values().flatten().copied().map(Some).collect(),
        }
    }

    /// Bring the index up to date for `ip`, which belonged to `before`.
    fn reindex(&mut self, ip: IpAddr, before: BTreeSet<Option<PortKey>>) {
        let after = self.index_keys(ip);
        let family = IpFamily::of(&ip);
        let x = to_u128(ip);
        for k in before.difference(&after) {
            if let Some(r) = self.index.get_mut(&(family, *k)) {
                r.remove(x);
                if r.is_empty() {
                    self.index.remove(&(family, *k));
                }
            }
        }
        for k in after.difference(&before) {
            self.index.entry((family, *k)).or_default().insert(x);
        }
    }

    fn commit(&mut self, alloc: Allocation) {
        self.release(&alloc.service);
        for ip in alloc.all_ips() {
            let before = self.index_keys(ip);
            self.used
                .entry(ip)
                .or_default()
                .insert(alloc.service.clone(), alloc.ports.clone());
            self.reindex(ip, before);
        }
        self.allocations.insert(alloc.service.clone(), alloc);
    }
}

fn families(f: &[IpFamily]) -> String {
    f.iter()
        .map(IpFamily::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(name: &str, c: &str) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            range: PoolRange::Cidr(c.parse::<IpNet>().unwrap().trunc()),
        }
    }

    fn range(name: &str, a: &str, b: &str) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            range: PoolRange::Range {
                first: ip(a),
                last: ip(b),
            },
        }
    }

    fn key(n: &str) -> ServiceKey {
        ServiceKey::new("default", n)
    }

    fn tcp(ports: &[u16]) -> BTreeSet<PortKey> {
        ports
            .iter()
            .map(|p| PortKey::new(*p, Protocol::Tcp))
            .collect()
    }

    fn req(n: &str, ports: &[u16]) -> AllocRequest {
        AllocRequest {
            service: key(n),
            families: vec![IpFamily::V4],
            pool: DEFAULT_POOL.into(),
            static_ip: None,
            ports: tcp(ports),
            secondary: SecondaryRequest::None,
        }
    }

    fn ipam(mode: IpamMode, v4: &str) -> Ipam {
        Ipam::new(mode, &[cidr(DEFAULT_POOL, v4)], &[], &[]).unwrap()
    }

    fn vip(a: &Allocation) -> IpAddr {
        a.vips[0].ip
    }

    #[test]
    fn pool_usage_counts_addresses_held() {
        let mut t = ipam(IpamMode::Shared, "10.0.0.0/29");
        let u = t.pool_usage();
        assert_eq!(
            (u[0].name.as_str(), u[0].size, u[0].used),
            (DEFAULT_POOL, 6, 0)
        );
        t.ensure(&req("a", &[80])).unwrap();
        // Shared: b's port 81 fits a's address, still one address used.
        t.ensure(&req("b", &[81])).unwrap();
        assert_eq!(t.pool_usage()[0].used, 1);
        let mut x = ipam(IpamMode::Exclusive, "10.0.0.0/29");
        x.ensure(&req("a", &[80])).unwrap();
        x.ensure(&req("b", &[81])).unwrap();
        assert_eq!(x.pool_usage()[0].used, 2);
        x.release(&key("a"));
        assert_eq!(x.pool_usage()[0].used, 1);
    }

    #[test]
    fn assignable_addresses() {
        let a = |s: &PoolSpec| s.range.assignable();
        assert_eq!(
            a(&cidr("p", "10.0.0.0/24")),
            (ip("10.0.0.1"), ip("10.0.0.254"))
        );
        assert_eq!(
            a(&cidr("p", "10.0.0.0/30")),
            (ip("10.0.0.1"), ip("10.0.0.2"))
        );
        assert_eq!(
            a(&cidr("p", "10.0.0.0/31")),
            (ip("10.0.0.0"), ip("10.0.0.1"))
        );
        assert_eq!(
            a(&cidr("p", "10.0.0.7/32")),
            (ip("10.0.0.7"), ip("10.0.0.7"))
        );
        assert_eq!(a(&cidr("p", "3ffe::/126")), (ip("3ffe::1"), ip("3ffe::3")));
        assert_eq!(a(&cidr("p", "3ffe::/127")), (ip("3ffe::"), ip("3ffe::1")));
        assert_eq!(a(&cidr("p", "3ffe::9/128")), (ip("3ffe::9"), ip("3ffe::9")));
        assert_eq!(
            a(&range("p", "10.0.0.0", "10.0.0.255")),
            (ip("10.0.0.0"), ip("10.0.0.255")),
            "a range hands out every address"
        );
        assert_eq!(
            cidr("p", "123.123.123.1/24").to_string(),
            "p=123.123.123.0/24"
        );
        assert_eq!(
            range("q", "1.1.1.1", "1.1.1.9").to_string(),
            "q=1.1.1.1-1.1.1.9"
        );
    }

    #[test]
    fn network_and_broadcast_are_not_handed_out() {
        let mut m = ipam(IpamMode::Exclusive, "10.0.0.0/30");
        assert_eq!(vip(&m.ensure(&req("a", &[80])).unwrap()), ip("10.0.0.1"));
        assert_eq!(vip(&m.ensure(&req("b", &[80])).unwrap()), ip("10.0.0.2"));
        let e = m.ensure(&req("c", &[80])).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }), "{e}");
        let mut m = ipam(IpamMode::Exclusive, "10.0.0.4/31");
        assert_eq!(vip(&m.ensure(&req("a", &[80])).unwrap()), ip("10.0.0.4"));
        assert_eq!(vip(&m.ensure(&req("b", &[80])).unwrap()), ip("10.0.0.5"));
    }

    #[test]
    fn shared_mode_shares_on_distinct_ports() {
        let mut m = ipam(IpamMode::Shared, "10.0.0.0/29");
        let a = m.ensure(&req("a", &[80])).unwrap();
        let b = m.ensure(&req("b", &[443])).unwrap();
        assert_eq!(vip(&a), ip("10.0.0.1"));
        assert_eq!(vip(&b), ip("10.0.0.1"), "different port: same address");
        let c = m.ensure(&req("c", &[80])).unwrap();
        assert_eq!(vip(&c), ip("10.0.0.2"), "port 80 taken on .1");
        let mut udp = req("d", &[]);
        udp.ports = [PortKey::new(80, Protocol::Udp)].into();
        assert_eq!(
            vip(&m.ensure(&udp).unwrap()),
            ip("10.0.0.1"),
            "80/udp differs from 80/tcp"
        );
        assert_eq!(m.users(ip("10.0.0.1")), vec![key("a"), key("b"), key("d")]);
    }

    #[test]
    fn exclusive_mode_gives_each_service_its_own_address() {
        let mut m = ipam(IpamMode::Exclusive, "10.0.0.0/29");
        assert_eq!(vip(&m.ensure(&req("a", &[80])).unwrap()), ip("10.0.0.1"));
        assert_eq!(vip(&m.ensure(&req("b", &[443])).unwrap()), ip("10.0.0.2"));
        assert_eq!(m.mode(), IpamMode::Exclusive);
    }

    #[test]
    fn ensure_is_idempotent_and_sticky() {
        let mut m = ipam(IpamMode::Shared, "10.0.0.0/29");
        let a1 = m.ensure(&req("a", &[80])).unwrap();
        let a2 = m.ensure(&req("a", &[80])).unwrap();
        assert_eq!(a1, a2);
        // A port added that does not collide keeps the address.
        let a3 = m.ensure(&req("a", &[80, 8080])).unwrap();
        assert_eq!(vip(&a3), vip(&a1));
        assert_eq!(a3.ports, tcp(&[80, 8080]));
        assert_eq!(m.allocation(&key("a")), Some(&a3));
    }

    #[test]
    fn released_addresses_are_reused() {
        let mut m = ipam(IpamMode::Exclusive, "10.0.0.0/30");
        let a = m.ensure(&req("a", &[80])).unwrap();
        m.ensure(&req("b", &[80])).unwrap();
        assert!(m.ensure(&req("c", &[80])).is_err());
        assert_eq!(m.release(&key("a")), Some(a.clone()));
        assert_eq!(m.release(&key("a")), None, "second release: nothing");
        assert!(m.users(vip(&a)).is_empty());
        let c = m.ensure(&req("c", &[80])).unwrap();
        assert_eq!(vip(&c), vip(&a), "the freed address is handed out again");
        // Many create/delete cycles never exhaust the pool.
        m.release(&key("c"));
        for i in 0..1000 {
            let n = format!("x{i}");
            m.ensure(&req(&n, &[80]))
                .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
            m.release(&key(&n));
        }
    }

    #[test]
    fn exhaustion_is_a_typed_error_with_advice() {
        let mut m = ipam(IpamMode::Shared, "10.0.0.0/30");
        m.ensure(&req("a", &[80])).unwrap();
        m.ensure(&req("b", &[80])).unwrap();
        let e = m.ensure(&req("c", &[80])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pool `defaultPool` (10.0.0.0/30) is exhausted: no address where 80/tcp is free; \
             free an address of the pool (delete a Service that uses it) or enlarge the pool (--cidrPools)"
        );
        assert!(m.allocation(&key("c")).is_none());
        // Another port still fits.
        assert_eq!(vip(&m.ensure(&req("c", &[81])).unwrap()), ip("10.0.0.1"));
        let mut x = ipam(IpamMode::Exclusive, "10.0.0.1/32");
        x.ensure(&req("a", &[80])).unwrap();
        assert!(x
            .ensure(&req("b", &[81]))
            .unwrap_err()
            .to_string()
            .contains("--setUniqueIP"));
    }

    #[test]
    fn port_change_that_collides_keeps_the_old_allocation() {
        let mut m = ipam(IpamMode::Shared, "10.0.0.0/29");
        let a = m.ensure(&req("a", &[80])).unwrap();
        m.ensure(&req("b", &[443])).unwrap();
        let e = m.ensure(&req("a", &[80, 443])).unwrap_err();
        assert_eq!(
            e,
            IpamError::InUse {
                ip: ip("10.0.0.1"),
                other: key("b"),
                ports: vec![PortKey::new(443, Protocol::Tcp)],
            }
        );
        assert!(e
            .to_string()
            .contains("change the port or request another address"));
        assert_eq!(m.allocation(&key("a")), Some(&a), "unchanged on error");
    }

    #[test]
    fn static_ip_inside_and_outside_pools() {
        let mut m = ipam(IpamMode::Shared, "10.0.0.0/29");
        let mut r = req("a", &[80]);
        r.static_ip = Some(ip("10.0.0.5"));
        let a = m.ensure(&r).unwrap();
        assert_eq!(
            a.vips[0],
            AllocatedIp {
                ip: ip("10.0.0.5"),
                pool: Some(DEFAULT_POOL.into())
            }
        );
        r.service = key("b");
        r.static_ip = Some(ip("192.168.255.254"));
        let b = m.ensure(&r).unwrap();
        assert_eq!(
            b.vips[0],
            AllocatedIp {
                ip: ip("192.168.255.254"),
                pool: None
            }
        );
        assert_eq!(m.users(ip("192.168.255.254")), vec![key("b")]);
        // The same static IP for another Service on the same port collides.
        r.service = key("c");
        let e = m.ensure(&r).unwrap_err();
        assert!(
            matches!(e, IpamError::InUse { ref other, .. } if *other == key("b")),
            "{e}"
        );
        // ... on another port, shares it.
        r.ports = tcp(&[81]);
        assert_eq!(vip(&m.ensure(&r).unwrap()), ip("192.168.255.254"));
        // Dynamic allocations skip nothing they need not: .5 is shared too.
        assert_eq!(vip(&m.ensure(&req("d", &[80])).unwrap()), ip("10.0.0.1"));
        // A network address given statically is outside the assignable range.
        let mut n = req("e", &[80]);
        n.static_ip = Some(ip("10.0.0.0"));
        assert_eq!(m.ensure(&n).unwrap().vips[0].pool, None);
    }

    #[test]
    fn static_ip_in_exclusive_mode() {
        let mut m = ipam(IpamMode::Exclusive, "10.0.0.0/29");
        let a = m.ensure(&req("a", &[80])).unwrap();
        let mut r = req("b", &[443]);
        r.static_ip = Some(vip(&a));
        let e = m.ensure(&r).unwrap_err();
        assert!(e.to_string().contains("--setUniqueIP"), "{e}");
        r.static_ip = Some(ip("10.0.0.2"));
        m.ensure(&r).unwrap();
        assert_eq!(
            vip(&m.ensure(&req("c", &[80])).unwrap()),
            ip("10.0.0.3"),
            "static .2 skipped"
        );
    }

    #[test]
    fn switching_between_static_and_pool() {
        let mut m = ipam(IpamMode::Exclusive, "10.0.0.0/29");
        let mut r = req("a", &[80]);
        assert_eq!(vip(&m.ensure(&r).unwrap()), ip("10.0.0.1"));
        r.static_ip = Some(ip("172.16.0.1"));
        assert_eq!(vip(&m.ensure(&r).unwrap()), ip("172.16.0.1"));
        assert!(m.users(ip("10.0.0.1")).is_empty(), "old address released");
        r.static_ip = None;
        assert_eq!(
            vip(&m.ensure(&r).unwrap()),
            ip("10.0.0.1"),
            "outside the pool: new one"
        );
        // A static IP inside the pool is kept when the annotation goes away.
        r.static_ip = Some(ip("10.0.0.6"));
        m.ensure(&r).unwrap();
        r.static_ip = None;
        assert_eq!(vip(&m.ensure(&r).unwrap()), ip("10.0.0.6"));
    }

    #[test]
    fn pool_selection_and_unknown_pool() {
        let mut m = Ipam::new(
            IpamMode::Shared,
            &[
                cidr(DEFAULT_POOL, "10.0.0.0/24"),
                range("pool1", "20.0.0.10", "20.0.0.12"),
            ],
            &[],
            &[],
        )
        .unwrap();
        let mut r = req("a", &[80]);
        r.pool = "pool1".into();
        let a = m.ensure(&r).unwrap();
        assert_eq!(
            a.vips[0],
            AllocatedIp {
                ip: ip("20.0.0.10"),
                pool: Some("pool1".into())
            }
        );
        // Changing the pool moves the Service.
        r.pool = DEFAULT_POOL.into();
        assert_eq!(vip(&m.ensure(&r).unwrap()), ip("10.0.0.1"));
        assert!(m.users(ip("20.0.0.10")).is_empty());
        r.pool = "nope".into();
        let e = m.ensure(&r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no IPv4 pool named `nope` (defined: defaultPool, pool1); define it with --cidrPools \
             or select another with loxilb.io/poolSelect"
        );
        r.families = vec![IpFamily::V6];
        r.pool = DEFAULT_POOL.into();
        let e = m.ensure(&r).unwrap_err().to_string();
        assert!(
            e.contains("no IPv6 pool named `defaultPool` (none are defined)")
                && e.contains("--cidr6Pools"),
            "{e}"
        );
    }

    #[test]
    fn dual_stack() {
        let mut m = Ipam::new(
            IpamMode::Shared,
            &[cidr(DEFAULT_POOL, "10.0.0.0/24")],
            &[cidr(DEFAULT_POOL, "3ffe::/96")],
            &[],
        )
        .unwrap();
        let mut r = req("a", &[80]);
        r.families = vec![IpFamily::V6, IpFamily::V4];
        let a = m.ensure(&r).unwrap();
        assert_eq!(
            a.vips.iter().map(|x| x.ip).collect::<Vec<_>>(),
            vec![ip("3ffe::1"), ip("10.0.0.1")]
        );
        assert_eq!(a.vip(IpFamily::V4), Some(ip("10.0.0.1")));
        assert_eq!(a.vip(IpFamily::V6), Some(ip("3ffe::1")));
        // A static IPv4 with dual stack: the IPv6 one still comes from the pool.
        r.service = key("b");
        r.static_ip = Some(ip("192.0.2.1"));
        let b = m.ensure(&r).unwrap();
        assert_eq!(b.vip(IpFamily::V4), Some(ip("192.0.2.1")));
        assert_eq!(b.vip(IpFamily::V6), Some(ip("3ffe::2")));
        // All or nothing: a v6 failure leaves no v4 allocated.
        let mut m2 = Ipam::new(
            IpamMode::Exclusive,
            &[cidr(DEFAULT_POOL, "10.0.0.0/24")],
            &[cidr(DEFAULT_POOL, "3ffe::1/128")],
            &[],
        )
        .unwrap();
        let mut r = req("x", &[80]);
        r.families = vec![IpFamily::V4, IpFamily::V6];
        m2.ensure(&r).unwrap();
        r.service = key("y");
        assert!(matches!(m2.ensure(&r), Err(IpamError::Exhausted { .. })));
        assert!(m2.users(ip("10.0.0.2")).is_empty());
        assert!(m2.allocation(&key("y")).is_none());
    }

    #[test]
    fn large_ipv6_pool_is_cheap() {
        let mut m = Ipam::new(
            IpamMode::Exclusive,
            &[],
            &[cidr(DEFAULT_POOL, "3ffe::/32")],
            &[],
        )
        .unwrap();
        let mut r = req("a", &[80]);
        r.families = vec![IpFamily::V6];
        for i in 0..200 {
            r.service = key(&format!("s{i}"));
            m.ensure(&r).unwrap();
        }
        assert_eq!(
            m.allocation(&key("s199")).unwrap().vips[0].ip,
            ip("3ffe::c8")
        );
        let mut top = Ipam::new(
            IpamMode::Exclusive,
            &[],
            &[range(
                "p",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            )],
            &[],
        )
        .unwrap();
        r.pool = "p".into();
        for n in ["a", "b"] {
            r.service = key(n);
            top.ensure(&r).unwrap();
        }
        r.service = key("c");
        assert!(
            matches!(top.ensure(&r), Err(IpamError::Exhausted { .. })),
            "no overflow at the top"
        );
    }

    #[test]
    fn request_validation() {
        let mut m = ipam(IpamMode::Shared, "10.0.0.0/24");
        let mut r = req("a", &[80]);
        r.families = vec![];
        assert!(matches!(m.ensure(&r), Err(IpamError::BadRequest { .. })));
        r.families = vec![IpFamily::V4, IpFamily::V4];
        assert!(m.ensure(&r).is_err());
        r.families = vec![IpFamily::V4];
        r.static_ip = Some(ip("3ffe::1"));
        let e = m.ensure(&r).unwrap_err().to_string();
        assert!(
            e.contains("static IP 3ffe::1 is IPv6 but the Service's VIP is IPv4"),
            "{e}"
        );
        r.static_ip = Some(ip("1.1.1.1"));
        r.secondary = SecondaryRequest::Ips(vec![ip("1.1.1.1")]);
        assert!(m
            .ensure(&r)
            .unwrap_err()
            .to_string()
            .contains("given twice"));
        r.secondary = SecondaryRequest::Ips(vec![ip("3ffe::2")]);
        assert!(m
            .ensure(&r)
            .unwrap_err()
            .to_string()
            .contains("secondary IP 3ffe::2 is IPv6"));
        r.secondary = SecondaryRequest::Ips(vec![
            ip("2.2.2.1"),
            ip("2.2.2.2"),
            ip("2.2.2.3"),
            ip("2.2.2.4"),
        ]);
        assert!(m.ensure(&r).unwrap_err().to_string().contains("at most 3"));
        r.secondary = SecondaryRequest::Pools(vec!["p".into(), "p".into()]);
        assert!(m
            .ensure(&r)
            .unwrap_err()
            .to_string()
            .contains("named twice"));
        assert!(m.allocations().next().is_none());
    }

    #[test]
    fn secondary_addresses() {
        let mut m = Ipam::new(
            IpamMode::Shared,
            &[cidr(DEFAULT_POOL, "10.0.0.0/24")],
            &[],
            &[
                cidr("pool2", "30.0.0.0/30"),
                cidr("pool3", "31.0.0.0/24"),
                cidr("v6", "3ffe:1::/64"),
            ],
        )
        .unwrap();
        let sctp = |n: &str| {
            let mut r = req(n, &[]);
            r.ports = [PortKey::new(38412, Protocol::Sctp)].into();
            r
        };
        let mut r = sctp("a");
        r.secondary = SecondaryRequest::Pools(vec!["pool2".into(), "pool3".into()]);
        let a = m.ensure(&r).unwrap();
        assert_eq!(
            a.secondary,
            vec![
                AllocatedIp {
                    ip: ip("30.0.0.1"),
                    pool: Some("pool2".into())
                },
                AllocatedIp {
                    ip: ip("31.0.0.1"),
                    pool: Some("pool3".into())
                },
            ]
        );
        assert_eq!(m.ensure(&r).unwrap(), a, "sticky");
        // Same port on the second Service: other secondary addresses.
        r.service = key("b");
        let b = m.ensure(&r).unwrap();
        assert_eq!(b.secondary[0].ip, ip("30.0.0.2"));
        r.service = key("c");
        let e = m.ensure(&r).unwrap_err().to_string();
        assert!(
            e.contains("pool `pool2` (30.0.0.0/30) is exhausted")
                && e.contains("--externalSecondaryCIDRs"),
            "{e}"
        );
        assert!(m.allocation(&key("c")).is_none());
        // Unknown secondary pool; family mismatch.
        r.secondary = SecondaryRequest::Pools(vec!["nope".into()]);
        let e = m.ensure(&r).unwrap_err().to_string();
        assert!(
            e.contains("no secondary pool named `nope` (defined: pool2, pool3, v6)")
                && e.contains("poolSelectSecondary"),
            "{e}"
        );
        r.secondary = SecondaryRequest::Pools(vec!["v6".into()]);
        assert!(m
            .ensure(&r)
            .unwrap_err()
            .to_string()
            .contains("secondary pool `v6` is IPv6"));
        // Explicit secondary IPs, outside the pools, shared by port rules.
        let mut x = sctp("x");
        x.secondary = SecondaryRequest::Ips(vec![ip("1.1.1.1"), ip("2.2.2.2")]);
        let xa = m.ensure(&x).unwrap();
        assert_eq!(
            xa.secondary[1],
            AllocatedIp {
                ip: ip("2.2.2.2"),
                pool: None
            }
        );
        x.service = key("y");
        assert!(matches!(m.ensure(&x), Err(IpamError::InUse { .. })));
        // An explicit secondary IP is never handed out as someone's VIP.
        let mut z = sctp("z");
        z.static_ip = Some(ip("10.0.0.9"));
        z.secondary = SecondaryRequest::Ips(vec![ip("10.0.0.1")]);
        let mut m2 = ipam(IpamMode::Shared, "10.0.0.0/24");
        let za = m2.ensure(&z).unwrap();
        assert_eq!(za.vips[0].ip, ip("10.0.0.9"));
        let mut w = sctp("w");
        w.secondary = SecondaryRequest::None;
        assert_eq!(
            vip(&m2.ensure(&w).unwrap()),
            ip("10.0.0.2"),
            ".1 is z's secondary on the same port"
        );
    }

    #[test]
    fn pool_configuration_errors() {
        let e = Ipam::new(IpamMode::Shared, &[cidr("a", "3ffe::/64")], &[], &[]).unwrap_err();
        assert_eq!(e.to_string(), "--cidrPools: pool a=3ffe::/64 is IPv6, this flag takes IPv4 pools; put it in --cidr6Pools");
        let e = Ipam::new(IpamMode::Shared, &[], &[cidr("a", "10.0.0.0/8")], &[]).unwrap_err();
        assert!(e.to_string().contains("put it in --cidrPools"));
        let e = Ipam::new(
            IpamMode::Shared,
            &[cidr("a", "10.0.0.0/24"), cidr("a", "10.0.1.0/24")],
            &[],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("`a` is used twice"));
        let e = Ipam::new(
            IpamMode::Shared,
            &[cidr("a", "10.0.0.0/24")],
            &[],
            &[range("s", "10.0.0.200", "10.0.1.5")],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pools a=10.0.0.0/24 (--cidrPools) and s=10.0.0.200-10.0.1.5 (--externalSecondaryCIDRs) overlap; an address must belong to one pool only"
        );
        let e = Ipam::new(
            IpamMode::Shared,
            &[range("r", "10.0.0.9", "10.0.0.1")],
            &[],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("first <= last"));
        let e = Ipam::new(
            IpamMode::Shared,
            &[range("r", "10.0.0.1", "3ffe::1")],
            &[],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("one family"));
        // Same name in both families is normal.
        Ipam::new(
            IpamMode::Shared,
            &[cidr(DEFAULT_POOL, "10.0.0.0/24")],
            &[cidr(DEFAULT_POOL, "3ffe::/64")],
            &[],
        )
        .unwrap();
        // Adjacent pools do not overlap.
        Ipam::new(
            IpamMode::Shared,
            &[cidr("a", "10.0.0.0/25"), cidr("b", "10.0.0.128/25")],
            &[],
            &[],
        )
        .unwrap();
    }

    #[test]
    fn record_round_trip() {
        let rec = AllocationRecord {
            vips: vec![ip("20.0.0.5"), ip("3ffe::5")],
            secondary: vec![],
            ports: [
                PortKey::new(443, Protocol::Tcp),
                PortKey::new(80, Protocol::Tcp),
                PortKey::new(53, Protocol::Udp),
            ]
            .into(),
        };
        let s = rec.to_string();
        assert_eq!(s, "ips=20.0.0.5,3ffe::5;ports=53/udp,80/tcp,443/tcp");
        assert_eq!(s.parse::<AllocationRecord>().unwrap(), rec);
        let s = "ips=20.0.0.7;ports=38412/sctp;secondary=30.0.0.2,31.0.0.2";
        let rec: AllocationRecord = s.parse().unwrap();
        assert_eq!(rec.secondary, vec![ip("30.0.0.2"), ip("31.0.0.2")]);
        assert_eq!(rec.to_string(), s);
        let empty: AllocationRecord = "ips=1.2.3.4;ports=".parse().unwrap();
        assert!(empty.ports.is_empty());
        assert_eq!(empty.to_string(), "ips=1.2.3.4;ports=");
    }

    #[test]
    fn record_parse_errors() {
        for (s, want) in [
            ("", "has no `=`"),
            ("ips=1.2.3.4", "no `ports` section"),
            ("ports=80/tcp", "no `ips` section"),
            ("ips=1.2.3.4;ports=80/tcp;ips=1.2.3.5", "given twice"),
            (
                "ips=1.2.3.4;ports=80/tcp;color=red",
                "unknown section `color`",
            ),
            ("ips=1.2.3.x;ports=80/tcp", "`1.2.3.x` is not an IP address"),
            ("ips=;ports=80/tcp", "`` is not an IP address"),
            ("ips=1.2.3.4;ports=80/TCP", "`80/TCP` is not"),
            ("ips=1.2.3.4;ports=0/tcp", "`0/tcp` is not"),
            ("ips=1.2.3.4;ports=70000/tcp", "`70000/tcp` is not"),
            ("ips=1.2.3.4;ports=+80/tcp", "`+80/tcp` is not"),
            (
                "ips=1.2.3.4;ports=80/tcp,80/tcp",
                "port `80/tcp` is given twice",
            ),
            ("ips=1.2.3.4,1.2.3.5;ports=", "same family"),
            ("ips=1.2.3.4,3ffe::1,1.1.1.1;ports=", "3 VIPs recorded"),
            (
                "ips=1.2.3.4;ports=;secondary=1.2.3.4",
                "1.2.3.4 is recorded twice",
            ),
            (
                "ips=1.2.3.4;ports=;secondary=1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4",
                "at most 3",
            ),
        ] {
            let e = s.parse::<AllocationRecord>().unwrap_err();
            assert!(e.contains(want), "{s:?}: {e}");
        }
    }

    #[test]
    fn rebuild_restores_the_table_without_leak_or_double_allocation() {
        let mut m = Ipam::new(
            IpamMode::Shared,
            &[cidr(DEFAULT_POOL, "10.0.0.0/29")],
            &[cidr(DEFAULT_POOL, "3ffe::/120")],
            &[cidr("sec", "30.0.0.0/29")],
        )
        .unwrap();
        let mut a = req("a", &[80]);
        a.families = vec![IpFamily::V4, IpFamily::V6];
        m.ensure(&a).unwrap();
        m.ensure(&req("b", &[443])).unwrap();
        m.ensure(&req("c", &[80])).unwrap();
        let mut s = req("s", &[]);
        s.ports = [PortKey::new(38412, Protocol::Sctp)].into();
        s.secondary = SecondaryRequest::Pools(vec!["sec".into()]);
        s.static_ip = Some(ip("192.0.2.7"));
        m.ensure(&s).unwrap();
        m.release(&key("c"));

        // What a leader would write on each Service, parsed back.
        let records: Vec<(ServiceKey, AllocationRecord)> = m
            .allocations()
            .map(|a| (a.service.clone(), a.record().to_string().parse().unwrap()))
            .collect();

        let mut fresh = Ipam::new(
            IpamMode::Shared,
            &[cidr(DEFAULT_POOL, "10.0.0.0/29")],
            &[cidr(DEFAULT_POOL, "3ffe::/120")],
            &[cidr("sec", "30.0.0.0/29")],
        )
        .unwrap();
        assert!(fresh.rebuild(records).is_empty());
        let before: Vec<&Allocation> = m.allocations().collect();
        let after: Vec<&Allocation> = fresh.allocations().collect();
        assert_eq!(before, after);
        // Same requests again: no change (no churn after a leader change).
        assert_eq!(fresh.ensure(&a).unwrap(), *m.allocation(&key("a")).unwrap());
        assert_eq!(fresh.ensure(&s).unwrap(), *m.allocation(&key("s")).unwrap());
        // c's released address is free; nothing collides with a/b.
        assert_eq!(
            vip(&fresh.ensure(&req("d", &[80])).unwrap()),
            ip("10.0.0.2")
        );
        assert_eq!(
            vip(&fresh.ensure(&req("e", &[8080])).unwrap()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn rebuild_reports_conflicts_and_keeps_the_earlier_record() {
        let mut m = ipam(IpamMode::Exclusive, "10.0.0.0/29");
        m.ensure(&req("stale", &[1])).unwrap();
        let rec = |s: &str| s.parse::<AllocationRecord>().unwrap();
        let problems = m.rebuild(vec![
            (key("old"), rec("ips=10.0.0.1;ports=80/tcp")),
            (key("new"), rec("ips=10.0.0.1;ports=443/tcp")),
            (key("old"), rec("ips=10.0.0.3;ports=80/tcp")),
            (key("ok"), rec("ips=10.0.0.2;ports=80/tcp")),
        ]);
        assert!(
            m.allocation(&key("stale")).is_none(),
            "rebuild starts empty"
        );
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].service, key("new"));
        assert!(matches!(problems[0].error, IpamError::InUse { .. }));
        assert!(problems[0].to_string().contains("will be allocated again"));
        assert_eq!(problems[1].error, IpamError::AlreadyAllocated(key("old")));
        assert_eq!(m.users(ip("10.0.0.1")), vec![key("old")]);
        assert!(m.users(ip("10.0.0.3")).is_empty());
        // The loser gets a fresh address that is not double-allocated.
        assert_eq!(vip(&m.ensure(&req("new", &[443])).unwrap()), ip("10.0.0.3"));

        // Shared mode: the same address on distinct ports is fine.
        let mut s = ipam(IpamMode::Shared, "10.0.0.0/29");
        let problems = s.rebuild(vec![
            (key("a"), rec("ips=10.0.0.1;ports=80/tcp")),
            (key("b"), rec("ips=10.0.0.1;ports=443/tcp")),
            (key("c"), rec("ips=10.0.0.1;ports=443/tcp,8443/tcp")),
        ]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].service, key("c"));
        // A recorded address outside today's pools is kept as static.
        assert_eq!(
            s.adopt(&key("d"), &rec("ips=99.0.0.1;ports=80/tcp"))
                .unwrap()
                .vips[0]
                .pool,
            None
        );
    }

    #[test]
    fn adopt_validates_hand_made_records() {
        let mut m = ipam(IpamMode::Shared, "10.0.0.0/29");
        let bad = AllocationRecord {
            vips: vec![],
            secondary: vec![],
            ports: BTreeSet::new(),
        };
        assert!(matches!(
            m.adopt(&key("a"), &bad),
            Err(IpamError::BadRequest { .. })
        ));
    }

    /// Random allocations, releases and re-requests (ports, families,
    /// static and secondary addresses, both modes): every free-address
    /// search is checked against the plain one (inside `first_free`), and
    /// the index against a rebuild from the table.
    #[test]
    fn index_agrees_with_the_plain_search() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for mode in [IpamMode::Shared, IpamMode::Exclusive] {
            let mut m = Ipam::new(
                mode,
                &[cidr(DEFAULT_POOL, "10.0.0.0/27"), cidr("p2", "10.0.1.0/30")],
                &[cidr(DEFAULT_POOL, "3ffe::/123")],
                &[cidr("sec", "30.0.0.0/29")],
            )
            .unwrap();
            let ports = [
                PortKey::new(80, Protocol::Tcp),
                PortKey::new(443, Protocol::Tcp),
                PortKey::new(53, Protocol::Udp),
            ];
            for _ in 0..4000 {
                let name = format!("s{}", rnd(40));
                match rnd(10) {
                    0..=1 => {
                        m.release(&key(&name));
                    }
                    _ => {
                        let mut r = req(&name, &[]);
                        r.ports = ports.iter().filter(|_| rnd(2) == 0).copied().collect();
                        r.families = match rnd(4) {
                            0 => vec![IpFamily::V6],
                            1 => vec![IpFamily::V4, IpFamily::V6],
                            _ => vec![IpFamily::V4],
                        };
                        if rnd(5) == 0 {
                            r.pool = "p2".into();
                        }
                        if rnd(8) == 0 && r.families.contains(&IpFamily::V4) {
                            r.static_ip = Some(ip(&format!("10.0.0.{}", 1 + rnd(8))));
                        }
                        match rnd(8) {
                            0 if r.families == [IpFamily::V4] => {
                                r.secondary = SecondaryRequest::Pools(vec!["sec".into()])
                            }
                            1 if r.families == [IpFamily::V4] => {
                                let x = ip(&format!("10.0.0.{}", 9 + rnd(4)));
                                if r.static_ip != Some(x) {
                                    r.secondary = SecondaryRequest::Ips(vec![x]);
                                }
                            }
                            _ => {}
                        }
                        let _ = m.ensure(&r);
                    }
                }
                // The index is exactly what the table implies.
                let mut fresh = UseIndex::new();
                for ip in m.used.keys() {
                    for k in m.index_keys(*ip) {
                        fresh
                            .entry((IpFamily::of(ip), k))
                            .or_default()
                            .insert(to_u128(*ip));
                    }
                }
                let runs =
                    |x: &UseIndex| -> Vec<_> { x.iter().map(|(k, r)| (*k, r.0.clone())).collect() };
                assert_eq!(runs(&m.index), runs(&fresh));
            }
            assert!(m.allocations().count() > 10, "{mode:?}: the test allocates");
        }
    }

    #[test]
    fn runs_merge_and_split() {
        let mut r = Runs::default();
        for x in [5, 7, 6, 1, 2, u128::MAX, 0] {
            r.insert(x);
        }
        assert_eq!(
            r.0.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            vec![(0, 2), (5, 7), (u128::MAX, u128::MAX)]
        );
        assert_eq!(r.run_end(6), Some(7));
        assert_eq!(r.run_end(3), None);
        r.remove(6);
        r.remove(0);
        r.remove(u128::MAX);
        r.remove(4);
        assert_eq!(
            r.0.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            vec![(1, 2), (5, 5), (7, 7)]
        );
    }
}

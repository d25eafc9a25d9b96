//! The node's network state through netlink (no `ip` subprocess): the
//! links of the namespace (kind, state), their XDP features (the `netdev`
//! generic-netlink family), and the addresses the agent puts on a device
//! (VIPs), marked with the agent's address protocol so that after a crash
//! or a restart it finds exactly the addresses it added, and no other.
//!
//! Synchronous on purpose: each call is one request on its own socket,
//! answered by the kernel at once; callers on an async runtime run them
//! where blocking for a syscall is fine.

use std::{collections::HashMap, net::IpAddr};

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlag, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
    rule::{RuleAttribute, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_packet_utils::nla::Nla as _;
use netlink_sys::{
    protocols::{NETLINK_GENERIC, NETLINK_ROUTE},
    Socket, SocketAddr,
};

/// `IFA_PROTO` value of the addresses this agent adds (any value the
/// kernel does not use itself; 0x4c is "L").
pub const ADDR_PROTO: u8 = 0x4c;
const IFA_PROTO: u16 = 11;

fn socket(proto: isize) -> Result<Socket> {
    let mut s = Socket::new(proto).context("opening a netlink socket")?;
    s.bind_auto().context("binding a netlink socket")?;
    s.connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket")?;
    Ok(s)
}

/// Send one rtnetlink request and collect its answers (a dump's messages,
/// or nothing for an acknowledged change).
fn route_request(msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
    let s = socket(NETLINK_ROUTE)?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | flags;
    hdr.sequence_number = 1;
    let mut req = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    s.send(&buf, 0).context("sending a netlink request")?;
    let mut out = vec![];
    let mut rbuf = vec![0u8; 1 << 16];
    loop {
        let n = s.recv(&mut &mut rbuf[..], 0).context("reading netlink")?;
        let mut off = 0;
        while off < n {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n])
                .map_err(|e| anyhow!("undecodable netlink answer: {e}"))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(out),
                    Some(_) => return Err(e.to_io().into()),
                },
                NetlinkPayload::InnerMessage(i) => out.push(i),
                _ => {}
            }
            if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                return Ok(out);
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
}

/// One network device of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, `vlan`, `bond`, ...); `None`
    /// for a physical device (and loopback).
    pub kind: Option<String>,
    pub up: bool,
    pub loopback: bool,
    /// The hardware address (6 bytes on Ethernet), if any.
    pub mac: Option<[u8; 6]>,
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Other(s) => s.clone(),
        k => k.to_string(),
    }
}

/// Every link of this network namespace.
pub fn links() -> Result<Vec<Link>> {
    let msgs = route_request(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )
    .context("listing the network devices")?;
    let mut out = vec![];
    for m in msgs {
        let RouteNetlinkMessage::NewLink(l) = m else {
            continue;
        };
        let mut link = Link {
            index: l.header.index,
            name: String::new(),
            kind: None,
            up: l.header.flags.contains(&LinkFlag::Up),
            loopback: l.header.flags.contains(&LinkFlag::Loopback),
            mac: None,
        };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    link.mac = Some([a[0], a[1], a[2], a[3], a[4], a[5]])
                }
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(kind_name(k));
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(link);
    }
    Ok(out)
}

/// The index of device `name`, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn addr_message(ifindex: u32, ip: IpAddr) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.index = ifindex;
    m.header.prefix_len = if ip.is_ipv4() { 32 } else { 128 };
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.attributes.push(AddressAttribute::Local(ip));
    if ip.is_ipv4() {
        m.attributes.push(AddressAttribute::Address(ip));
    }
    m
}

/// Put `ip` (a host address: /32 or /128) on device `ifindex`, marked as
/// the agent's ([`ADDR_PROTO`]). Replacing an existing one is fine.
pub fn add_addr(ifindex: u32, ip: IpAddr) -> Result<()> {
    add_addr_for(ifindex, ip, None)
}

/// [`add_addr`], valid for `lifetime` (whole seconds, at least 1) from
/// now: the kernel removes the address once it passes, unless it is
/// added again before (which renews it). `None`: forever.
pub fn add_addr_for(ifindex: u32, ip: IpAddr, lifetime: Option<std::time::Duration>) -> Result<()> {
    let mut m = addr_message(ifindex, ip);
    m.attributes.push(AddressAttribute::Other(
        netlink_packet_utils::nla::DefaultNla::new(IFA_PROTO, vec![ADDR_PROTO]),
    ));
    if let Some(l) = lifetime {
        let secs = u32::try_from(l.as_secs().max(1)).unwrap_or(u32::MAX - 1);
        let mut c = netlink_packet_route::address::CacheInfo::default();
        c.ifa_preferred = secs;
        c.ifa_valid = secs;
        m.attributes.push(AddressAttribute::CacheInfo(c));
    }
    route_request(
        RouteNetlinkMessage::NewAddress(m),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .with_context(|| format!("adding {ip} to device {ifindex}"))?;
    Ok(())
}

/// Remove `ip` from device `ifindex`; an address already gone is fine.
pub fn del_addr(ifindex: u32, ip: IpAddr) -> Result<()> {
    match route_request(
        RouteNetlinkMessage::DelAddress(addr_message(ifindex, ip)),
        NLM_F_ACK,
    ) {
        Ok(_) => Ok(()),
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error())
                .is_some_and(|c| c == libc::EADDRNOTAVAIL || c == libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("removing {ip} from device {ifindex}")),
    }
}

/// One unicast route of the main table, both families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub dest: IpAddr,
    pub prefix_len: u8,
    /// `None` when directly connected.
    pub gateway: Option<IpAddr>,
    /// The output device's index (the first next hop's, for a multipath
    /// route).
    pub oif: u32,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(x) => Some(IpAddr::V4(*x)),
        RouteAddress::Inet6(x) => Some(IpAddr::V6(*x)),
        _ => None,
    }
}

/// The unicast routes of the main table (IPv4 and IPv6), from the kernel.
pub fn routes() -> Result<Vec<RouteEntry>> {
    let msgs = route_request(
        RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        NLM_F_DUMP,
    )
    .context("listing routes")?;
    let mut out = vec![];
    for m in msgs {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        let mut table = r.header.table as u32;
        let (mut dest, mut gateway, mut oif) = (None, None, 0);
        for a in &r.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(d) => dest = route_addr(d),
                RouteAttribute::Gateway(g) => gateway = route_addr(g),
                RouteAttribute::Oif(i) => oif = *i,
                RouteAttribute::MultiPath(hops) => {
                    if let Some(h) = hops.first() {
                        oif = h.interface_index;
                        gateway = h.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(g) => route_addr(g),
                            _ => None,
                        });
                    }
                }
                _ => {}
            }
        }
        if table != RouteHeader::RT_TABLE_MAIN as u32 || r.header.kind != RouteType::Unicast {
            continue;
        }
        let dest = match (dest, r.header.address_family) {
            (Some(d), _) => d,
            (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => continue,
        };
        out.push(RouteEntry {
            dest,
            prefix_len: r.header.destination_prefix_length,
            gateway,
            oif,
        });
    }
    Ok(out)
}

/// Whether the FIB's answer toward an address depends on that address
/// alone (and the device a packet came in on): `None` if so, else why not.
/// The datapath then keeps one next hop per endpoint for new sessions
/// (`cfg_flags::EP_NH_CACHE`). Not plain: a policy rule other than the
/// kernel's defaults (local, main, default), a multipath route or one
/// through a nexthop object (ECMP picks a path per flow), a
/// source-specific IPv6 route, a route by TOS.
pub fn routing_plain() -> Result<Option<String>> {
    let rules = route_request(
        RouteNetlinkMessage::GetRule(RuleMessage::default()),
        NLM_F_DUMP,
    )
    .context("listing policy rules")?;
    let rules: Vec<RuleMessage> = rules
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(r) => Some(r),
            _ => None,
        })
        .collect();
    if let Some(why) = rules_not_plain(&rules) {
        return Ok(Some(why));
    }
    let routes = route_request(
        RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        NLM_F_DUMP,
    )
    .context("listing routes")?;
    Ok(routes.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewRoute(r) => route_not_plain(r),
        _ => None,
    }))
}

/// `RTA_NH_ID`: the route's next hops are a nexthop object (maybe a group).
const RTA_NH_ID: u16 = 30;

/// Why one route makes the routing not plain (see [`routing_plain`]).
fn route_not_plain(r: &RouteMessage) -> Option<String> {
    let dest = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_addr(d),
        _ => None,
    });
    let what = || {
        format!(
            "{}/{}",
            dest.map(|d| d.to_string())
                .unwrap_or_else(|| "default".into()),
            r.header.destination_prefix_length
        )
    };
    if r.header.source_prefix_length != 0 {
        return Some(format!("route {} is source-specific", what()));
    }
    if r.header.tos != 0 {
        return Some(format!("route {} is by TOS", what()));
    }
    for a in &r.attributes {
        match a {
            RouteAttribute::MultiPath(h) if h.len() > 1 => {
                return Some(format!("route {} has {} next hops", what(), h.len()))
            }
            a if a.kind() == RTA_NH_ID => {
                return Some(format!("route {} goes through a nexthop object", what()))
            }
            _ => {}
        }
    }
    None
}

/// Why the policy rules make the routing not plain: any rule but the
/// kernel's defaults (priority 0 to table local, 32766 to main, 32767 to
/// default), with no selector.
fn rules_not_plain(rules: &[RuleMessage]) -> Option<String> {
    const DEFAULTS: [(u32, u32); 3] = [(0, 255), (32766, 254), (32767, 253)];
    rules.iter().find_map(|r| {
        let mut prio = 0;
        let mut table = r.header.table as u32;
        let mut selector = r.header.src_len != 0 || r.header.dst_len != 0 || r.header.tos != 0;
        for a in &r.attributes {
            match a {
                RuleAttribute::Priority(p) => prio = *p,
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Protocol(_) | RuleAttribute::SuppressPrefixLen(_) => {}
                RuleAttribute::SuppressIfGroup(_) => {}
                _ => selector = true,
            }
        }
        (selector || !DEFAULTS.contains(&(prio, table)))
            .then(|| format!("policy rule {prio} (table {table}) is not one of the defaults"))
    })
}

/// The address messages of device `ifindex`.
fn addresses(ifindex: u32) -> Result<Vec<AddressMessage>> {
    let msgs = route_request(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        NLM_F_DUMP,
    )
    .context("listing addresses")?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == ifindex => Some(a),
            _ => None,
        })
        .collect())
}

/// The IPv6 link-local addresses of device `ifindex`.
pub fn link_local6(ifindex: u32) -> Result<Vec<std::net::Ipv6Addr>> {
    let mut out = vec![];
    for a in addresses(ifindex)? {
        for at in &a.attributes {
            if let AddressAttribute::Address(IpAddr::V6(x)) = at {
                if x.segments()[0] & 0xffc0 == 0xfe80 {
                    out.push(*x);
                }
            }
        }
    }
    Ok(out)
}

/// The addresses on device `ifindex` that this agent added (marked with
/// [`ADDR_PROTO`]), of both families.
pub fn marked_addrs(ifindex: u32) -> Result<Vec<IpAddr>> {
    let mut out = vec![];
    for a in addresses(ifindex)? {
        let mut ip = None;
        let mut ours = false;
        for at in &a.attributes {
            match at {
                AddressAttribute::Local(x) => ip = Some(*x),
                AddressAttribute::Address(x) if ip.is_none() => ip = Some(*x),
                AddressAttribute::Other(n) if n.kind() == IFA_PROTO => {
                    let mut v = [0u8; 1];
                    n.emit_value(&mut v);
                    ours = v[0] == ADDR_PROTO;
                }
                _ => {}
            }
        }
        if let (Some(ip), true) = (ip, ours) {
            out.push(ip);
        }
    }
    Ok(out)
}

// ---- generic netlink: the `netdev` family's XDP features ----

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_NDO_XMIT`: the device takes XDP frames redirected to it.
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// Netlink attributes (type without flag bits, value) of `buf`.
fn nlas(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = vec![];
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len]));
        let adv = (len + 3) & !3;
        if adv >= buf.len() {
            break;
        }
        buf = &buf[adv..];
    }
    out
}

fn nla(ty: u16, val: &[u8]) -> Vec<u8> {
    let len = 4 + val.len();
    let mut v = Vec::with_capacity((len + 3) & !3);
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(val);
    v.resize((len + 3) & !3, 0);
    v
}

/// Send a generic-netlink request (`family`, `cmd`, attributes) and
/// return each answer's attribute bytes.
fn genl_request(
    s: &Socket,
    family: u16,
    cmd: u8,
    flags: u16,
    attrs: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let len = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[cmd, 1, 0, 0]);
    msg.extend_from_slice(attrs);
    s.send(&msg, 0)
        .context("sending a generic netlink request")?;
    let mut out = vec![];
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.recv(&mut &mut buf[..], 0).context("reading netlink")?;
        let mut off = 0;
        while off + 16 <= n {
            let mlen = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if mlen < 16 || off + mlen > n {
                bail!("malformed netlink answer");
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                    if code == 0 {
                        return Ok(out);
                    }
                    return Err(std::io::Error::from_raw_os_error(-code).into());
                }
                _ if mlen >= 20 => out.push(buf[off + 20..off + mlen].to_vec()),
                _ => {}
            }
            if flags & NLM_F_DUMP == 0 {
                return Ok(out);
            }
            off += (mlen + 3) & !3;
        }
    }
}

/// The `netdev` family: its id and its `mgmt` multicast group (device
/// added, removed, XDP features changed).
fn netdev_family(s: &Socket) -> Result<(u16, Option<u32>)> {
    let answers = genl_request(
        s,
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        0,
        &nla(CTRL_ATTR_FAMILY_NAME, b"netdev\0"),
    )
    .context("the kernel has no `netdev` generic netlink family (XDP features need Linux 6.3+)")?;
    let a = answers
        .first()
        .ok_or_else(|| anyhow!("no answer for the netdev family"))?;
    let mut id = None;
    let mut mgmt = None;
    for (ty, v) in nlas(a) {
        match ty {
            CTRL_ATTR_FAMILY_ID if v.len() >= 2 => id = Some(u16::from_ne_bytes([v[0], v[1]])),
            CTRL_ATTR_MCAST_GROUPS => {
                for (_, grp) in nlas(v) {
                    let g = nlas(grp);
                    let name = g.iter().find(|(t, _)| *t == CTRL_ATTR_MCAST_GRP_NAME);
                    let gid = g.iter().find(|(t, _)| *t == CTRL_ATTR_MCAST_GRP_ID);
                    if let (Some((_, n)), Some((_, i))) = (name, gid) {
                        if n.starts_with(b"mgmt") && i.len() >= 4 {
                            mgmt = Some(u32::from_ne_bytes([i[0], i[1], i[2], i[3]]));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok((
        id.ok_or_else(|| anyhow!("no id for the netdev family"))?,
        mgmt,
    ))
}

/// The XDP features (`NETDEV_XDP_ACT_*` bits) of every device of the
/// namespace, by ifindex.
pub fn xdp_features() -> Result<HashMap<u32, u64>> {
    let s = socket(NETLINK_GENERIC)?;
    let (family, _) = netdev_family(&s)?;
    let answers = genl_request(&s, family, NETDEV_CMD_DEV_GET, NLM_F_DUMP, &[])
        .context("reading the devices' XDP features")?;
    let mut out = HashMap::new();
    for a in answers {
        let mut idx = None;
        let mut feat = 0u64;
        for (ty, v) in nlas(&a) {
            match ty {
                NETDEV_A_DEV_IFINDEX if v.len() >= 4 => {
                    idx = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
                }
                NETDEV_A_DEV_XDP_FEATURES if v.len() >= 8 => {
                    feat = u64::from_ne_bytes(v[..8].try_into().unwrap())
                }
                _ => {}
            }
        }
        if let Some(i) = idx {
            out.insert(i, feat);
        }
    }
    Ok(out)
}

/// A blocking source of "devices may have changed" notices: link events
/// (rtnetlink) and XDP feature changes (`netdev` family). `wait` returns
/// when either socket has a message (or after `timeout`).
pub struct LinkEvents {
    route: Socket,
    netdev: Option<Socket>,
}

const RTNLGRP_LINK: u32 = 1;

impl LinkEvents {
    pub fn open() -> Result<Self> {
        let mut route = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        route
            .bind(&SocketAddr::new(0, 1 << (RTNLGRP_LINK - 1)))
            .context("subscribing to link events")?;
        let netdev = (|| -> Result<Socket> {
            let s = socket(NETLINK_GENERIC)?;
            let (_, mgmt) = netdev_family(&s)?;
            let g = mgmt.ok_or_else(|| anyhow!("no mgmt group"))?;
            s.add_membership(g)?;
            Ok(s)
        })()
        .ok();
        Ok(Self { route, netdev })
    }

    /// Block until a notice arrives or `timeout` passes; drains what is
    /// queued. Returns whether anything arrived.
    pub fn wait(&mut self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut fds = vec![libc::pollfd {
            fd: self.route.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(n) = &self.netdev {
            fds.push(libc::pollfd {
                fd: n.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r <= 0 {
            return false;
        }
        let mut buf = vec![0u8; 1 << 16];
        for (i, f) in fds.iter().enumerate() {
            if f.revents & libc::POLLIN == 0 {
                continue;
            }
            let s = if i == 0 {
                &self.route
            } else {
                self.netdev.as_ref().unwrap()
            };
            // Drain without blocking.
            while s.recv(&mut &mut buf[..], libc::MSG_DONTWAIT).is_ok() {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nla_round_trip() {
        let mut b = nla(2, b"netdev\0");
        b.extend(nla(7, &9u32.to_ne_bytes()));
        let got = nlas(&b);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (2, &b"netdev\0"[..]));
        assert_eq!(got[1].0, 7);
        assert_eq!(got[1].1, &9u32.to_ne_bytes()[..]);
        // A length past the buffer stops the walk.
        let mut bad = nla(1, b"abcd");
        bad[0] = 200;
        assert!(nlas(&bad).is_empty());
    }

    fn rule(prio: u32, table: u32, extra: Vec<RuleAttribute>) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.attributes = vec![RuleAttribute::Priority(prio), RuleAttribute::Table(table)];
        r.attributes.extend(extra);
        r
    }

    #[test]
    fn only_the_default_rules_are_plain() {
        let defaults = vec![
            rule(0, 255, vec![]),
            rule(32766, 254, vec![]),
            rule(32767, 253, vec![]),
        ];
        assert_eq!(rules_not_plain(&defaults), None);
        let mut more = defaults.clone();
        more.push(rule(100, 100, vec![]));
        assert!(rules_not_plain(&more)
            .unwrap()
            .contains("policy rule 100 (table 100)"));
        // A default priority and table with a selector is not the default.
        let from = vec![rule(32766, 254, vec![RuleAttribute::FwMark(1)])];
        assert!(rules_not_plain(&from).is_some());
        let mut src = rule(32766, 254, vec![]);
        src.header.src_len = 24;
        assert!(rules_not_plain(&[src]).is_some());
    }

    #[test]
    fn multipath_source_specific_and_tos_routes_are_not_plain() {
        use netlink_packet_route::route::RouteNextHop;
        let mut r = RouteMessage::default();
        r.header.destination_prefix_length = 24;
        r.attributes = vec![RouteAttribute::Destination(RouteAddress::Inet(
            "10.1.0.0".parse().unwrap(),
        ))];
        assert_eq!(route_not_plain(&r), None);
        let mut one = r.clone();
        one.attributes
            .push(RouteAttribute::MultiPath(vec![RouteNextHop::default()]));
        assert_eq!(route_not_plain(&one), None, "one next hop");
        let mut ecmp = r.clone();
        ecmp.attributes.push(RouteAttribute::MultiPath(vec![
            RouteNextHop::default(),
            RouteNextHop::default(),
        ]));
        assert_eq!(
            route_not_plain(&ecmp).as_deref(),
            Some("route 10.1.0.0/24 has 2 next hops")
        );
        let mut from = r.clone();
        from.header.source_prefix_length = 64;
        assert!(route_not_plain(&from).unwrap().contains("source-specific"));
        let mut tos = r;
        tos.header.tos = 0x10;
        assert!(route_not_plain(&tos).unwrap().contains("TOS"));
    }
}

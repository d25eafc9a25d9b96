//! Reference programs for the benchmark (`tests/src/bin/bench.rs`): the
//! least an XDP load balancer can do on each path, measured in the same run
//! as the datapath so each of its figures has a yardstick.
//!
//! - `ref_xdp_pass` / `ref_tc_pass`: the floor;
//! - `ref_xdp_parse_lookup` / `ref_tc_parse_lookup`: Ethernet / IPv4 (IHL
//!   5, no fragments) / TCP or UDP, one hash lookup of the service key;
//!   always passes;
//! - `ref_xdp_dnat`: the same, then a backend picked from the service's
//!   slice of an array by a flow hash, DNAT of the destination address and
//!   port with incremental IPv4 and L4 checksum updates (RFC 1624), MAC
//!   rewrite, `XDP_TX`;
//! - `ref_xdp_dnat_ct`: `ref_xdp_dnat` behind a conntrack LRU hash keyed
//!   by the 5-tuple: a hit uses its backend and counts the packet; a miss
//!   picks a backend and inserts the entry.
//! - `ref_xdp_dnat_ct_shape1` / `ref_xdp_dnat_ct_shape2`: `ref_xdp_dnat_ct`
//!   with the datapath's conntrack entry shape (the size of its key and
//!   value, its table size) instead of the minimal one, making one insert
//!   per new flow or two (a forward and a reply entry, as the datapath
//!   does): what the entry's size and the second insert cost, apart from
//!   everything else a new flow does.
//! - `ref_xdp_dnat_ct_lean`: `ref_xdp_dnat_ct` with the least entry that
//!   keeps every feature of the datapath's for an IPv4 session (16-byte
//!   key, 104-byte value: see `LeanVal`) in a table of the datapath's size,
//!   one insert: the floor under any entry layout that loses nothing.
//! - `ref_xdp_dnat_one`: `ref_xdp_dnat_ct_shape1` (one entry per session,
//!   the forward one) whose replies find that entry: a packet from an
//!   endpoint reads the service it serves from an endpoint index (an
//!   array, `REF_EP_IDX`), looks the forward entry up by (client, VIP),
//!   and is reverse-translated; what one entry per session would cost a
//!   reply and save a new flow.
//! - `ref_xdp_dnat_tbl` / `ref_xdp_dnat_tbl2`: the same entry shape in a
//!   set-associative table of two array maps (8 slots per bucket; a
//!   bucket's tags and last-seen ticks in one array, the slots in the
//!   other; a slot claimed by a compare-and-swap of its tag), one insert
//!   per miss or two: the verifier inlines array lookups, so neither a hit
//!   nor an insert calls into the kernel.
//!
//! A separate object with maps of its own: the agent never loads or
//! creates them. The key and value layouts are mirrored by the benchmark,
//! which fills the maps.
#![no_std]
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![no_main]

// The datapath's own conntrack key (the tuple in IPv4-mapped 16-byte
// addresses), for the references with its entry shape.
use loxilb_common::CtKey as DpKey;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    btf_maps::{Array, HashMap, LruHashMap},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Service key (network order): 8 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SvcKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Service: its backends are `backends[id .. id + nbackends]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SvcVal {
    pub id: u32,
    pub nbackends: u32,
}

/// A backend (network order): 12 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub mac: [u8; 6],
}

/// Conntrack key, the 5-tuple as received: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct CtVal {
    pub backend: u32,
    pub pad: u32,
    pub packets: u64,
}

#[btf_map]
static REF_SVC: HashMap<SvcKey, SvcVal, 65536> = HashMap::new();
#[btf_map]
static REF_BACKENDS: Array<Backend, 65536> = Array::new();
#[btf_map]
static REF_CT: LruHashMap<CtKey, CtVal, REF_CT_ENTRIES> = LruHashMap::new();
/// (Mirrored by the benchmark's `REF_CT_ENTRIES`.)
const REF_CT_ENTRIES: usize = 262_144;

const ETH_HLEN: usize = 14;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

struct Pkt {
    ip: usize,
    l4: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// Ethernet / IPv4 without options or fragments / TCP or UDP (the whole
/// L4 header in the frame).
#[inline(always)]
fn parse(data: usize, end: usize) -> Option<Pkt> {
    if data + ETH_HLEN + 20 > end {
        return None;
    }
    unsafe {
        if *((data + 12) as *const u16) != 0x0800u16.to_be() {
            return None;
        }
        let ip = data + ETH_HLEN;
        if *(ip as *const u8) != 0x45 {
            return None;
        }
        if *((ip + 6) as *const u16) & 0x3fffu16.to_be() != 0 {
            return None;
        }
        let proto = *((ip + 9) as *const u8);
        let l4 = ip + 20;
        let l4_len = if proto == IPPROTO_TCP {
            20
        } else if proto == IPPROTO_UDP {
            8
        } else {
            return None;
        };
        if l4 + l4_len > end {
            return None;
        }
        Some(Pkt {
            ip,
            l4,
            proto,
            saddr: *((ip + 12) as *const u32),
            daddr: *((ip + 16) as *const u32),
            sport: *(l4 as *const u16),
            dport: *((l4 + 2) as *const u16),
        })
    }
}

#[inline(always)]
fn svc_key(p: &Pkt) -> SvcKey {
    SvcKey {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        pad: 0,
    }
}

/// RFC 1624: checksum `c` after a 16-bit word changed from `old` to `new`.
#[inline(always)]
fn csum_replace2(c: u16, old: u16, new: u16) -> u16 {
    let mut s = (!c as u32) + (!old as u32) + new as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn csum_replace4(c: u16, old: u32, new: u32) -> u16 {
    let mut s = (!c as u32) + (!(old as u16) as u32) + (!((old >> 16) as u16) as u32);
    s += (new & 0xffff) + (new >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// DNAT to `b`, MACs rewritten (the old destination MAC becomes the
/// source), `XDP_TX`.
#[inline(always)]
fn dnat(ctx: &XdpContext, p: &Pkt, b: *const Backend) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end || p.l4 + 20 > end && p.proto == IPPROTO_TCP || p.l4 + 8 > end {
        return xdp_action::XDP_PASS;
    }
    unsafe {
        let (baddr, bport, bmac) = ((*b).addr, (*b).port, (*b).mac);
        let ipc = (p.ip + 10) as *mut u16;
        *ipc = csum_replace4(*ipc, p.daddr, baddr);
        *((p.ip + 16) as *mut u32) = baddr;
        let l4c = (p.l4 + if p.proto == IPPROTO_TCP { 16 } else { 6 }) as *mut u16;
        let mut lc = *l4c;
        if p.proto == IPPROTO_TCP || lc != 0 {
            lc = csum_replace4(lc, p.daddr, baddr);
            lc = csum_replace2(lc, p.dport, bport);
            if lc == 0 && p.proto == IPPROTO_UDP {
                lc = 0xffff;
            }
            *l4c = lc;
        }
        *((p.l4 + 2) as *mut u16) = bport;
        let eth = data as *mut [u16; 6];
        (*eth)[3] = (*eth)[0];
        (*eth)[4] = (*eth)[1];
        (*eth)[5] = (*eth)[2];
        (*eth)[0] = u16::from_ne_bytes([bmac[0], bmac[1]]);
        (*eth)[1] = u16::from_ne_bytes([bmac[2], bmac[3]]);
        (*eth)[2] = u16::from_ne_bytes([bmac[4], bmac[5]]);
    }
    xdp_action::XDP_TX
}

/// Flow hash of the 5-tuple (a multiply-xorshift mix).
#[inline(always)]
fn flow_hash(p: &Pkt) -> u32 {
    let mut h = p.saddr ^ p.daddr.rotate_left(7) ^ ((p.sport as u32) << 16 | p.dport as u32);
    h ^= p.proto as u32;
    h = h.wrapping_mul(0x9e37_79b1);
    h ^ (h >> 16)
}

/// The backend slot of `svc` for `p`.
#[inline(always)]
fn pick(svc: *const SvcVal, p: &Pkt) -> Option<u32> {
    let (id, n) = unsafe { ((*svc).id, (*svc).nbackends) };
    if n == 0 {
        return None;
    }
    Some(id.wrapping_add(flow_hash(p) % n))
}

#[xdp]
pub fn ref_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn ref_xdp_parse_lookup(ctx: XdpContext) -> u32 {
    if let Some(p) = parse(ctx.data(), ctx.data_end()) {
        if REF_SVC.get_ptr(&svc_key(&p)).is_some() {
            return xdp_action::XDP_PASS;
        }
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn ref_xdp_dnat(ctx: XdpContext) -> u32 {
    let Some(p) = parse(ctx.data(), ctx.data_end()) else {
        return xdp_action::XDP_PASS;
    };
    let Some(svc) = REF_SVC.get_ptr(&svc_key(&p)) else {
        return xdp_action::XDP_PASS;
    };
    let Some(slot) = pick(svc, &p) else {
        return xdp_action::XDP_DROP;
    };
    let Some(b) = REF_BACKENDS.get_ptr(slot) else {
        return xdp_action::XDP_DROP;
    };
    dnat(&ctx, &p, b)
}

/// What the conntrack references need of their key type: the key of a
/// tuple, the value for a backend, the hit's accounting.
trait Entry: Copy {
    type Val: Copy;
    fn of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self;
    fn val(backend: u32) -> Self::Val;
    /// Count a packet on the entry; its backend.
    unsafe fn hit(v: *mut Self::Val) -> u32;
}

impl Entry for CtKey {
    type Val = CtVal;
    #[inline(always)]
    fn of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            pad: [0; 3],
        }
    }
    #[inline(always)]
    fn val(backend: u32) -> CtVal {
        CtVal {
            backend,
            pad: 0,
            packets: 1,
        }
    }
    #[inline(always)]
    unsafe fn hit(v: *mut CtVal) -> u32 {
        unsafe {
            (*v).packets += 1;
            (*v).backend
        }
    }
}

/// A conntrack table of the references: the LRU hash, or the array table.
trait Sessions<K: Entry> {
    /// The backend of `key`'s entry (counted as a hit).
    fn hit(&self, key: &K) -> Option<u32>;
    /// Insert `key` -> `v`; false if it could not be.
    fn put(&self, key: &K, v: &K::Val) -> bool;
}

impl<K: Entry, const M: usize> Sessions<K> for LruHashMap<K, K::Val, M> {
    #[inline(always)]
    fn hit(&self, key: &K) -> Option<u32> {
        self.get_ptr_mut(key).map(|v| unsafe { K::hit(v) })
    }
    #[inline(always)]
    fn put(&self, key: &K, v: &K::Val) -> bool {
        self.insert(key, v, 0).is_ok()
    }
}

/// `ref_xdp_dnat` behind the conntrack table `ct`: a hit takes the entry's
/// backend, a miss picks one and inserts the entry; `TWO`: a reply entry
/// (keyed by the backend's reply tuple) is inserted before it.
#[inline(always)]
fn dnat_ct<K: Entry, T: Sessions<K>, const TWO: bool>(ctx: &XdpContext, ct: &T) -> u32 {
    let Some(p) = parse(ctx.data(), ctx.data_end()) else {
        return xdp_action::XDP_PASS;
    };
    let key = K::of(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let slot = match ct.hit(&key) {
        Some(slot) => slot,
        None => {
            let Some(svc) = REF_SVC.get_ptr(&svc_key(&p)) else {
                return xdp_action::XDP_PASS;
            };
            let Some(slot) = pick(svc, &p) else {
                return xdp_action::XDP_DROP;
            };
            let v = K::val(slot);
            if TWO {
                let Some(b) = REF_BACKENDS.get_ptr(slot) else {
                    return xdp_action::XDP_DROP;
                };
                let rev = unsafe { K::of((*b).addr, p.saddr, (*b).port, p.sport, p.proto) };
                if !ct.put(&rev, &v) {
                    return xdp_action::XDP_DROP;
                }
            }
            if !ct.put(&key, &v) {
                return xdp_action::XDP_DROP;
            }
            slot
        }
    };
    let Some(b) = REF_BACKENDS.get_ptr(slot) else {
        return xdp_action::XDP_DROP;
    };
    dnat(ctx, &p, b)
}

#[xdp]
pub fn ref_xdp_dnat_ct(ctx: XdpContext) -> u32 {
    dnat_ct::<CtKey, _, false>(&ctx, &REF_CT)
}

const SHAPE_REST: usize = (size_of::<loxilb_common::CtVal>() - 16) / 8;

/// A value of the datapath's conntrack value size.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ShapeVal {
    pub backend: u32,
    pub pad: u32,
    pub packets: u64,
    pub rest: [u64; SHAPE_REST],
}
const _: () = assert!(size_of::<ShapeVal>() == size_of::<loxilb_common::CtVal>());

#[btf_map]
static REF_CT_SHAPE: LruHashMap<DpKey, ShapeVal, { loxilb_common::MAX_CT_ENTRIES as usize }> =
    LruHashMap::new();

impl Entry for DpKey {
    type Val = ShapeVal;
    #[inline(always)]
    fn of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        DpKey {
            saddr: loxilb_common::v4_mapped(saddr),
            daddr: loxilb_common::v4_mapped(daddr),
            sport,
            dport,
            proto,
            _pad1: 0,
            _pad2: 0,
        }
    }
    #[inline(always)]
    fn val(backend: u32) -> ShapeVal {
        ShapeVal {
            backend,
            pad: 0,
            packets: 1,
            rest: [0; SHAPE_REST],
        }
    }
    #[inline(always)]
    unsafe fn hit(v: *mut ShapeVal) -> u32 {
        unsafe {
            (*v).packets += 1;
            (*v).backend
        }
    }
}

#[xdp]
pub fn ref_xdp_dnat_ct_shape1(ctx: XdpContext) -> u32 {
    dnat_ct::<DpKey, _, false>(&ctx, &REF_CT_SHAPE)
}

#[xdp]
pub fn ref_xdp_dnat_ct_shape2(ctx: XdpContext) -> u32 {
    dnat_ct::<DpKey, _, true>(&ctx, &REF_CT_SHAPE)
}

/// The least a session entry can hold and keep every feature the
/// datapath's does, for an IPv4 one-entry DNAT session (what a table of
/// IPv4 sessions apart from IPv6 ones would hold): 104 bytes. The
/// translated destination (4-byte address, port), direction, state and
/// mode (12 with padding); rule, idle timeout and endpoint counter index
/// (12); last seen (8); packets and bytes each way (32); a cached next hop
/// each way (ifindex, two MACs, expiry: 20 each). Under a 16-byte key.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LeanVal {
    pub backend: u32,
    pub pad: u32,
    pub packets: u64,
    pub rest: [u64; LEAN_REST],
}
const LEAN_REST: usize = 11;
const _: () = assert!(size_of::<LeanVal>() == 104);

/// The minimal reference's 5-tuple key (16 bytes), as a type of its own
/// so that it can carry [`LeanVal`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LeanKey(CtKey);
const _: () = assert!(size_of::<LeanKey>() == 16);

#[btf_map]
static REF_CT_LEAN: LruHashMap<LeanKey, LeanVal, { loxilb_common::MAX_CT_ENTRIES as usize }> =
    LruHashMap::new();

impl Entry for LeanKey {
    type Val = LeanVal;
    #[inline(always)]
    fn of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        LeanKey(CtKey::of(saddr, daddr, sport, dport, proto))
    }
    #[inline(always)]
    fn val(backend: u32) -> LeanVal {
        LeanVal {
            backend,
            pad: 0,
            packets: 1,
            rest: [0; LEAN_REST],
        }
    }
    #[inline(always)]
    unsafe fn hit(v: *mut LeanVal) -> u32 {
        unsafe {
            (*v).packets += 1;
            (*v).backend
        }
    }
}

#[xdp]
pub fn ref_xdp_dnat_ct_lean(ctx: XdpContext) -> u32 {
    dnat_ct::<LeanKey, _, false>(&ctx, &REF_CT_LEAN)
}

// One entry per session (the forward one), the reply direction found
// through it: a reply, from an endpoint, reads the endpoint index (an
// array: the verifier inlines its lookup) for the service that endpoint
// serves, and looks the forward entry up by (client, VIP). A reply then
// costs one hash lookup as with two entries, every other packet one
// inlined array read more, and a new flow makes one insert.

/// An endpoint index slot (network order): the endpoint and the service
/// (VIP, port) it serves; `proto` 0 = free. Filled by the benchmark at
/// `loxilb_common::ep_index_slot`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EpIdx {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub vip: u32,
    pub vport: u16,
    pub pad2: u16,
}

#[btf_map]
static REF_EP_IDX: Array<EpIdx, { loxilb_common::EP_INDEX_SLOTS as usize }> = Array::new();

/// If `p` comes from an indexed endpoint: the key of the forward entry
/// its session would have (client -> VIP), and the VIP and port.
#[inline(always)]
fn reply_fwd_key(p: &Pkt) -> Option<(DpKey, u32, u16)> {
    // (An IPv4 address folds to itself: `loxilb_common::addr_fold`.)
    let e = REF_EP_IDX.get_ptr(loxilb_common::ep_index_slot(p.saddr, p.sport, p.proto))?;
    unsafe {
        if (*e).proto != p.proto || (*e).addr != p.saddr || (*e).port != p.sport {
            return None;
        }
        let (vip, vport) = ((*e).vip, (*e).vport);
        Some((DpKey::of(p.daddr, vip, p.dport, vport, p.proto), vip, vport))
    }
}

/// Reverse DNAT: the source (the endpoint) rewritten to `vip`:`vport`,
/// checksums updated, MACs swapped, `XDP_TX`.
#[inline(always)]
fn rnat(ctx: &XdpContext, p: &Pkt, vip: u32, vport: u16) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end || p.l4 + 20 > end && p.proto == IPPROTO_TCP || p.l4 + 8 > end {
        return xdp_action::XDP_PASS;
    }
    unsafe {
        let ipc = (p.ip + 10) as *mut u16;
        *ipc = csum_replace4(*ipc, p.saddr, vip);
        *((p.ip + 12) as *mut u32) = vip;
        let l4c = (p.l4 + if p.proto == IPPROTO_TCP { 16 } else { 6 }) as *mut u16;
        let mut lc = *l4c;
        if p.proto == IPPROTO_TCP || lc != 0 {
            lc = csum_replace4(lc, p.saddr, vip);
            lc = csum_replace2(lc, p.sport, vport);
            if lc == 0 && p.proto == IPPROTO_UDP {
                lc = 0xffff;
            }
            *l4c = lc;
        }
        *(p.l4 as *mut u16) = vport;
        let eth = data as *mut [u16; 6];
        let d = [(*eth)[0], (*eth)[1], (*eth)[2]];
        (*eth)[0] = (*eth)[3];
        (*eth)[1] = (*eth)[4];
        (*eth)[2] = (*eth)[5];
        (*eth)[3] = d[0];
        (*eth)[4] = d[1];
        (*eth)[5] = d[2];
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn ref_xdp_dnat_one(ctx: XdpContext) -> u32 {
    let Some(p) = parse(ctx.data(), ctx.data_end()) else {
        return xdp_action::XDP_PASS;
    };
    if let Some((key, vip, vport)) = reply_fwd_key(&p) {
        if let Some(v) = REF_CT_SHAPE.get_ptr_mut(&key) {
            // Only from the session's own endpoint.
            if let Some(b) = REF_BACKENDS.get_ptr(unsafe { (*v).backend }) {
                if unsafe { (*b).addr == p.saddr && (*b).port == p.sport } {
                    // The reply direction's packets.
                    unsafe { (*v).rest[0] += 1 };
                    return rnat(&ctx, &p, vip, vport);
                }
            }
        }
    }
    dnat_ct::<DpKey, _, false>(&ctx, &REF_CT_SHAPE)
}

// A session table of our own in array maps: set-associative, `TBL_WAYS`
// slots per bucket, with the datapath's entry shape (its key, a value of
// its value's size, its table size). Array lookups are inlined by the
// verifier, so neither the lookup nor the insert calls into the kernel:
// what a table built this way could cost next to the LRU hash.

/// Slots per bucket: one 64-byte line of tags and last-seen ticks.
const TBL_WAYS: usize = 8;
const TBL_SLOTS: u32 = loxilb_common::MAX_CT_ENTRIES;
const TBL_BUCKETS: u32 = TBL_SLOTS / TBL_WAYS as u32;
/// A tag being written (even: never a live tag, which is odd).
const TBL_BUSY: u64 = 2;

/// A bucket's slots: the tag of the key each holds (0: free, odd: in use)
/// and when it was last seen (jiffies, low 32 bits).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TblBucket {
    pub tag: [u64; TBL_WAYS],
    pub seen: [u32; TBL_WAYS],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TblSlot {
    pub key: DpKey,
    pub val: ShapeVal,
}

#[btf_map]
static REF_TBL_BUCKETS: Array<TblBucket, { TBL_BUCKETS as usize }> = Array::new();
#[btf_map]
static REF_TBL_SLOTS: Array<TblSlot, { TBL_SLOTS as usize }> = Array::new();

/// 64-bit multiply-xorshift over the key's ten words.
#[inline(always)]
fn tbl_hash(k: &DpKey) -> u64 {
    let w = unsafe { &*(k as *const DpKey as *const [u64; 5]) };
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    while i < 5 {
        h = (h ^ w[i]).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 32;
        i += 1;
    }
    h
}

#[inline(always)]
fn tbl_key_eq(a: &DpKey, b: &DpKey) -> bool {
    let a = unsafe { &*(a as *const DpKey as *const [u64; 5]) };
    let b = unsafe { &*(b as *const DpKey as *const [u64; 5]) };
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
}

#[inline(always)]
fn jiffies32() -> u32 {
    unsafe { aya_ebpf::helpers::bpf_jiffies64() as u32 }
}

/// The slot holding `key`, counted as seen; its backend.
#[inline(always)]
fn tbl_lookup(key: &DpKey, h: u64) -> Option<u32> {
    let bi = (h as u32) & (TBL_BUCKETS - 1);
    let tag = h | 1;
    let b = REF_TBL_BUCKETS.get_ptr_mut(bi)?;
    let mut w = 0;
    while w < TBL_WAYS {
        if unsafe { (*b).tag[w] } == tag {
            let s = REF_TBL_SLOTS.get_ptr_mut(bi * TBL_WAYS as u32 + w as u32)?;
            unsafe {
                if tbl_key_eq(&(*s).key, key) {
                    let backend = (*s).val.backend;
                    // Still the same occupant (not rewritten while read).
                    if (*b).tag[w] != tag {
                        return None;
                    }
                    (*s).val.packets += 1;
                    (*b).seen[w] = jiffies32();
                    return Some(backend);
                }
            }
        }
        w += 1;
    }
    None
}

/// Put `key` -> `val` in a free slot of its bucket, else in the one seen
/// longest ago: claimed by a compare-and-swap of its tag, written, then
/// tagged.
#[inline(always)]
fn tbl_insert(key: &DpKey, h: u64, val: &ShapeVal) -> bool {
    let bi = (h as u32) & (TBL_BUCKETS - 1);
    let tag = h | 1;
    let Some(b) = REF_TBL_BUCKETS.get_ptr_mut(bi) else {
        return false;
    };
    let now = jiffies32();
    let mut victim = 0usize;
    let mut oldest = 0u32;
    let mut w = 0;
    while w < TBL_WAYS {
        let (t, seen) = unsafe { ((*b).tag[w], (*b).seen[w]) };
        if t == 0 {
            victim = w;
            break;
        }
        let age = now.wrapping_sub(seen);
        if t != TBL_BUSY && age >= oldest {
            oldest = age;
            victim = w;
        }
        w += 1;
    }
    let old = unsafe { (*b).tag[victim] };
    if old == TBL_BUSY {
        return false;
    }
    let tp = unsafe { core::ptr::addr_of_mut!((*b).tag[victim]) };
    let claimed = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(tp, old, TBL_BUSY)
        .1
    };
    if !claimed {
        return false;
    }
    let Some(s) = REF_TBL_SLOTS.get_ptr_mut(bi * TBL_WAYS as u32 + victim as u32) else {
        return false;
    };
    unsafe {
        (*s).key = *key;
        (*s).val = *val;
        (*b).seen[victim] = now;
        core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::SeqCst }>(tp, tag);
    }
    true
}

/// The array table (`REF_TBL_BUCKETS`, `REF_TBL_SLOTS`).
struct ArrayTable;

impl Sessions<DpKey> for ArrayTable {
    #[inline(always)]
    fn hit(&self, key: &DpKey) -> Option<u32> {
        tbl_lookup(key, tbl_hash(key))
    }
    #[inline(always)]
    fn put(&self, key: &DpKey, v: &ShapeVal) -> bool {
        tbl_insert(key, tbl_hash(key), v)
    }
}

#[xdp]
pub fn ref_xdp_dnat_tbl(ctx: XdpContext) -> u32 {
    dnat_ct::<DpKey, _, false>(&ctx, &ArrayTable)
}

#[xdp]
pub fn ref_xdp_dnat_tbl2(ctx: XdpContext) -> u32 {
    dnat_ct::<DpKey, _, true>(&ctx, &ArrayTable)
}

#[classifier]
pub fn ref_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[classifier]
pub fn ref_tc_parse_lookup(ctx: TcContext) -> i32 {
    if let Some(p) = parse(ctx.data(), ctx.data_end()) {
        if REF_SVC.get_ptr(&svc_key(&p)).is_some() {
            return TC_ACT_OK;
        }
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

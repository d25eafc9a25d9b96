//! The one definition of every map key and value shared by the eBPF datapath
//! (`loxilb-ebpf`) and the agent (`loxilb-agent`).
//!
//! Rules for everything in this crate:
//! - `#[repr(C)]`, every byte accounted for (explicit `_pad` fields), no
//!   `bool` or `enum` fields: the kernel and userspace see the same bytes.
//! - Sizes are asserted at compile time, so a layout change is a build error
//!   rather than a silent mismatch.
//! - Addresses and ports are stored in **network byte order** exactly as they
//!   appear on the wire (the datapath never swaps them on the hot path); the
//!   `user` feature adds helpers that convert for the agent.
//! - One set of maps serves both address families: an address is an
//!   [`Addr`] (16 bytes); an IPv4 address is stored IPv4-mapped
//!   (`::ffff:a.b.c.d`). A session of a NAT64 rule is then an ordinary
//!   conntrack entry whose two sides differ in family.
#![no_std]

pub mod crc32c;

use core::mem::size_of;

/// Bump when any map layout below changes: pinned maps of another layout
/// version are never adopted (the agent refuses with a clear message).
pub const LAYOUT_VERSION: u32 = 16;

/// Names of the maps, as pinned under the agent's bpffs directory.
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const ENDPOINTS: &str = "LB_ENDPOINTS";
    pub const CONNTRACK: &str = "LB_CT";
    pub const STATS: &str = "LB_STATS";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const ADDR_FILTER: &str = "LB_ADDR_FILTER";
    pub const SEL_TABLE: &str = "LB_SEL_TABLE";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const SRC_RANGES: &str = "LB_SRC_RANGES";
    pub const RULE_STATS: &str = "LB_RULE_STATS";
    pub const EP_STATS: &str = "LB_EP_STATS";
    pub const EP_ACTIVE: &str = "LB_EP_ACTIVE";
    pub const VIPS: &str = "LB_VIPS";
    /// Every VIP of a rule (SCTP multihoming: primary and secondaries).
    pub const RULE_VIPS: &str = "LB_RULE_VIPS";
    /// SCTP associations (multihoming): their endpoint and client
    /// addresses, by verification tag.
    pub const SCTP_ASSOC: &str = "LB_SCTP_ASSOC";
    /// Tail-call arrays (refilled with the programs of each load). Pinned
    /// with the rest: the kernel empties a program array when no process
    /// or pin holds it, which would cut an attached program (`--keep`) off
    /// its IPv6 and new-flow halves.
    pub const JMP_XDP: &str = "LB_JMP_XDP";
    pub const JMP_TC: &str = "LB_JMP_TC";
    /// How translated packets leave through each device (by ifindex):
    /// XDP redirect or the kernel stack ([`crate::DevFwd`]), decided by the
    /// agent from the device's kind and XDP features.
    pub const DEV_FWD: &str = "LB_DEV_FWD";
    /// The next hop toward each endpoint (by its `EpVal::stat_idx`), for a
    /// new session's first packet ([`crate::EpNh`]).
    pub const EP_NH: &str = "LB_EP_NH";
    /// The node's own address toward each endpoint (by its
    /// `EpVal::stat_idx`), the source of a new onearm or NAT64 session
    /// ([`crate::EpSrc`]).
    pub const EP_SRC: &str = "LB_EP_SRC";
    /// Each endpoint by its slot (`EpVal::stat_idx`): what the selection
    /// table's entries point at ([`crate::SelChunk`]).
    pub const EP_SLOTS: &str = "LB_EP_SLOTS";
    /// The endpoint index ([`crate::EpIndex`], at
    /// [`crate::ep_index_slot`]): the DNAT service each indexed endpoint
    /// serves, through which its replies find one-entry sessions
    /// ([`crate::ct_state::ONE`]).
    pub const EP_INDEX: &str = "LB_EP_INDEX";
    /// The datapath's clock ([`crate::Clock`]): not pinned, calibrated by
    /// the agent after every load (its programs are the ones reading it).
    pub const CLOCK: &str = "LB_CLOCK";
    /// Every map, in a fixed order (used to pin/unpin/adopt them all).
    pub const ALL: [&str; 22] = [
        SERVICES,
        ENDPOINTS,
        CONNTRACK,
        STATS,
        CONFIG,
        ADDR_FILTER,
        SEL_TABLE,
        AFFINITY,
        SRC_RANGES,
        RULE_STATS,
        EP_STATS,
        EP_ACTIVE,
        VIPS,
        RULE_VIPS,
        SCTP_ASSOC,
        JMP_XDP,
        JMP_TC,
        DEV_FWD,
        EP_NH,
        EP_SRC,
        EP_SLOTS,
        EP_INDEX,
    ];
}

/// Slots of the tail-call arrays (`map_names::JMP_XDP` / `JMP_TC`): the
/// IPv4 program of a hook hands IPv6 packets to its IPv6 program, and each
/// hands conntrack misses to its new-flow program.
pub const JMP_V6: u32 = 0;
pub const JMP_NEW4: u32 = 1;
pub const JMP_NEW6: u32 = 2;
/// SCTP INIT / INIT-ACK handling (multihoming), per family.
pub const JMP_SCTP4: u32 = 3;
pub const JMP_SCTP6: u32 = 4;
/// One INIT / INIT-ACK parameter per call (the SCTP programs' walk over
/// the address parameters: a tail call per parameter, so the verifier sees
/// one parameter at a time), either family.
pub const JMP_SCTP_PARAM: u32 = 5;
/// IPv6 replies to one-entry sessions ([`ct_state::ONE`]): the IPv6
/// program hands a packet from an endpoint the index holds to this one,
/// which finds its session through the index (the IPv6 program has no
/// verifier budget left for that second way to a session); a miss goes
/// back to the IPv6 program, told not to hand it over again.
pub const JMP_ONE6: u32 = 6;
pub const JMP_SLOTS: u32 = 8;

/// Program names inside the eBPF object.
pub mod prog_names {
    pub const XDP_MAIN: &str = "loxilb_xdp";
    /// The IPv6 half of `XDP_MAIN`, tail-called through `JMP_XDP`.
    pub const XDP_V6: &str = "loxilb_xdp6";
    pub const TC_MAIN: &str = "loxilb_tc";
    /// The IPv6 half of `TC_MAIN`, tail-called through `JMP_TC`.
    pub const TC_V6: &str = "loxilb_tc6";
    /// New-flow programs (tail-called on a conntrack miss).
    pub const XDP_NEW4: &str = "loxilb_xdp_new4";
    pub const XDP_NEW6: &str = "loxilb_xdp_new6";
    pub const TC_NEW4: &str = "loxilb_tc_new4";
    pub const TC_NEW6: &str = "loxilb_tc_new6";
    /// SCTP INIT / INIT-ACK programs (tail-called).
    pub const XDP_SCTP4: &str = "loxilb_xdp_sctp4";
    pub const XDP_SCTP6: &str = "loxilb_xdp_sctp6";
    pub const TC_SCTP4: &str = "loxilb_tc_sctp4";
    pub const TC_SCTP6: &str = "loxilb_tc_sctp6";
    pub const XDP_SCTP_PARAM: &str = "loxilb_xdp_sctp_param";
    pub const TC_SCTP_PARAM: &str = "loxilb_tc_sctp_param";
    /// IPv6 replies to one-entry sessions (tail-called).
    pub const XDP_ONE6: &str = "loxilb_xdp_one6";
    pub const TC_ONE6: &str = "loxilb_tc_one6";
    /// What goes in each tail-call array, by slot.
    pub const XDP_JUMPS: [(u32, &str); 7] = [
        (super::JMP_V6, XDP_V6),
        (super::JMP_NEW4, XDP_NEW4),
        (super::JMP_NEW6, XDP_NEW6),
        (super::JMP_SCTP4, XDP_SCTP4),
        (super::JMP_SCTP6, XDP_SCTP6),
        (super::JMP_SCTP_PARAM, XDP_SCTP_PARAM),
        (super::JMP_ONE6, XDP_ONE6),
    ];
    pub const TC_JUMPS: [(u32, &str); 7] = [
        (super::JMP_V6, TC_V6),
        (super::JMP_NEW4, TC_NEW4),
        (super::JMP_NEW6, TC_NEW6),
        (super::JMP_SCTP4, TC_SCTP4),
        (super::JMP_SCTP6, TC_SCTP6),
        (super::JMP_SCTP_PARAM, TC_SCTP_PARAM),
        (super::JMP_ONE6, TC_ONE6),
    ];
    /// TC egress: translates ICMP errors the node's stack generates about
    /// translated packets (e.g. fragmentation needed on forward).
    pub const TC_EGRESS: &str = "loxilb_tc_egress";
    pub const XDP_PASS: &str = "loxilb_xdp_pass";
    pub const XDP_DECAP: &str = "loxilb_decap";
    /// Reads the kernel's clocks into `LB_CLOCK` (run by the agent through
    /// `BPF_PROG_TEST_RUN` to calibrate the datapath's clock; never
    /// attached).
    pub const XDP_CLOCK: &str = "loxilb_clock";
}

/// Map capacities.
pub const MAX_SERVICES: u32 = 16_384;
/// Selection-table chunks (all rules, both banks): room for 64 `hash` rules
/// with a full Maglev table in both banks, and thousands of small ones.
pub const MAX_SEL_CHUNKS: u32 = 1 << 18;
pub const MAX_AFFINITY: u32 = 262_144;
pub const MAX_SRC_RANGES: u32 = 65_536;
pub const MAX_ENDPOINT_SLOTS: u32 = 262_144;
pub const MAX_CT_ENTRIES: u32 = 524_288;

/// Endpoints of a rule live in two banks; the agent fills the idle bank and
/// then flips `SvcVal::ep_bank` with one map update, so the datapath never
/// sees a half-written endpoint set.
pub const EP_BANK_SHIFT: u32 = 16;
/// Most endpoints a rule may have (per bank).
pub const MAX_EPS_PER_RULE: u32 = 1 << EP_BANK_SHIFT;

/// IP protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IP address of either family, as four 32-bit words in network byte
/// order (exactly the 16 bytes of an IPv6 address as loaded from a packet).
/// An IPv4 address `a.b.c.d` is stored IPv4-mapped: `::ffff:a.b.c.d`.
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped address (`0000:ffff`, as loaded).
pub const V4_MAPPED_W2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv4 address (network order, as loaded from a packet) IPv4-mapped.
#[inline(always)]
pub const fn v4_mapped(a: u32) -> Addr {
    [0, 0, V4_MAPPED_W2, a]
}

/// Whether `a` is an IPv4-mapped address (an IPv4 address in our maps).
#[inline(always)]
pub const fn is_v4(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_W2
}

/// An address of the agent's world as stored in the maps.
pub fn addr_from_ip(ip: core::net::IpAddr) -> Addr {
    match ip {
        core::net::IpAddr::V4(a) => v4_mapped(u32::from_ne_bytes(a.octets())),
        core::net::IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The address an [`Addr`] from the maps stands for (IPv4-mapped ones as
/// IPv4).
pub fn ip_from_addr(a: &Addr) -> core::net::IpAddr {
    if is_v4(a) {
        return core::net::IpAddr::V4(core::net::Ipv4Addr::from(a[3].to_ne_bytes()));
    }
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    core::net::IpAddr::V6(core::net::Ipv6Addr::from(o))
}

/// The 32 bits of an address the hashes use: the IPv4 address itself, or
/// the XOR of an IPv6 address's words (for IPv4-mapped addresses the first
/// three words XOR to a constant, so IPv4 hashes stay as they were).
#[inline(always)]
pub const fn addr_fold(a: &Addr) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ V4_MAPPED_W2 ^ a[3]
}

/// Load-balancing mode of a rule (`SvcVal::mode`).
pub mod lb_mode {
    /// DNAT: destination rewritten to the endpoint, client source IP kept.
    pub const DEFAULT: u8 = 0;
    /// Source rewritten to the node's own address toward the endpoint
    /// (from the FIB), source port allocated.
    pub const ONEARM: u8 = 1;
    /// Source rewritten to the full-NAT source (`GlobalCfg::fullnat_src`,
    /// else the service VIP), source port allocated.
    pub const FULLNAT: u8 = 2;
    /// Direct server return, L2: only the destination MAC changes (to the
    /// endpoint's); the endpoint holds the VIP and replies directly.
    pub const DSR: u8 = 3;
    /// Direct server return over IPIP: the packet is encapsulated to the
    /// endpoint (outer source: the node's address toward it).
    pub const DSR_IPIP: u8 = 4;

    /// Either DSR mode: the packet keeps its tuple, and the session has no
    /// reply entry.
    #[inline(always)]
    pub const fn is_dsr(mode: u8) -> bool {
        mode == DSR || mode == DSR_IPIP
    }
}

/// Endpoint selection of a rule (`SvcVal::sel`).
pub mod lb_sel {
    pub const RR: u8 = 0;
    pub const HASH: u8 = 1;
    pub const PERSIST: u8 = 2;
    pub const LC: u8 = 3;
}

/// `EpVal::flags` bits.
pub mod ep_flags {
    /// New sessions avoid this endpoint (health probes drive it).
    pub const INACTIVE: u32 = 1;
}

/// Key of the service map: (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcKey {
    /// VIP (IPv4-mapped for IPv4), network byte order.
    pub addr: Addr,
    /// Service port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A load-balancing rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcVal {
    /// Stable id of the rule (key of its endpoints and counters).
    pub rule_id: u32,
    /// Number of endpoints in the active bank.
    pub ep_count: u32,
    /// Idle timeout of sessions of this rule, seconds.
    pub timeout_s: u32,
    /// Round-robin cursor, advanced by the datapath (racy by design: a lost
    /// increment only skews the rotation, never the correctness).
    pub rr_next: u32,
    /// Which endpoint bank (0 or 1) is live.
    pub ep_bank: u8,
    /// `lb_mode::*`.
    pub mode: u8,
    /// `lb_sel::*`.
    pub sel: u8,
    /// `svc_flags::*`.
    pub flags: u8,
    /// Entries in the rule's selection table (active bank): the sequence
    /// `rr` walks, or the Maglev table `hash` indexes.
    pub table_len: u32,
    /// Source-IP affinity lifetime for `persist`, seconds.
    pub persist_timeout_s: u32,
    /// Where the live selection table starts in `LB_SEL_TABLE` (a chunk
    /// index: entry `pos` is in chunk `sel_base + pos / SEL_CHUNK`).
    pub sel_base: u32,
}

/// `SvcVal::flags` bits.
pub mod svc_flags {
    /// The rule restricts client sources (`LB_SRC_RANGES`).
    pub const SRC_RANGES: u8 = 1;
}

/// Entries per selection-table chunk.
pub const SEL_CHUNK: u32 = 32;
/// The largest Maglev lookup table (prime) of a `hash` rule; smaller rules
/// get smaller tables (the agent's `selection::maglev_size`).
pub const MAGLEV_M: u32 = 65537;
/// Largest selection table a rule may have.
pub const MAX_SEL_TABLE: u32 = MAGLEV_M;

/// `SEL_CHUNK` consecutive entries of a selection table: endpoint slots
/// (`EpVal::stat_idx`), each an index into `LB_EP_SLOTS`, so the datapath
/// reaches the endpoint with an array read rather than a second hash
/// lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelChunk {
    pub ep: [u32; SEL_CHUNK as usize],
}

/// Key of the source-IP affinity map (`persist`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffKey {
    pub rule_id: u32,
    /// Client address, network byte order.
    pub client: Addr,
}

/// Where a client of a `persist` rule goes, and since when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffVal {
    /// The endpoint (checked against the live endpoint set before use).
    pub ep_addr: Addr,
    pub ep_port: u16,
    pub _pad1: u16,
    /// The endpoint's slot (`EpVal::stat_idx`).
    pub ep_idx: u32,
    /// Coarse monotonic ns of the last new session that used it.
    pub last_seen_ns: u64,
}

/// Data part of an `LB_SRC_RANGES` LPM key: the rule id (big-endian, so
/// it is matched as the first 32 bits of the prefix) then the address
/// (an IPv4 prefix `a.b.c.d/n` is stored as `::ffff:a.b.c.d/(96+n)`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRangeData {
    pub rule_id_be: u32,
    pub addr: Addr,
}

/// Per-rule counters (per-CPU array indexed by rule id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_sessions: u64,
    /// New connections dropped: no active endpoint.
    pub drop_no_endpoint: u64,
    /// New connections dropped: source not in the rule's source ranges.
    pub drop_src_range: u64,
    pub _reserved: [u64; 3],
}

/// The flow hash `hash` rules select with (also used by the agent and the
/// tests to predict the chosen slot). Inputs as loaded from the packet.
#[inline(always)]
pub const fn flow_hash(saddr: &Addr, daddr: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = addr_fold(saddr) ^ 0x9e37_79b9;
    h = mix32(h ^ addr_fold(daddr));
    h = mix32(h ^ (((sport as u32) << 16) | dport as u32));
    mix32(h ^ proto as u32)
}

/// murmur3's 32-bit finaliser.
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Slots of an endpoint index (a power of two): see [`ep_index_slot`].
pub const EP_INDEX_SLOTS: u32 = 65_536;

/// The slot of endpoint (`addr`, `port`, `proto`) (`addr` folded by
/// [`addr_fold`], `port` in network order) in a direct-mapped endpoint
/// index of `EP_INDEX_SLOTS` slots: what a reply packet, from an endpoint,
/// reads to find its one-entry session's forward entry
/// ([`ct_state::ONE`], [`EpIndex`]).
pub const fn ep_index_slot(addr: u32, port: u16, proto: u8) -> u32 {
    mix32(addr ^ ((port as u32) << 8) ^ proto as u32) & (EP_INDEX_SLOTS - 1)
}

/// Key of the endpoint map: (rule, bank << EP_BANK_SHIFT | index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EpKey {
    pub rule_id: u32,
    pub slot: u32,
}

impl EpKey {
    #[inline(always)]
    pub const fn new(rule_id: u32, bank: u8, index: u32) -> Self {
        Self {
            rule_id,
            slot: ((bank as u32) << EP_BANK_SHIFT) | (index & (MAX_EPS_PER_RULE - 1)),
        }
    }
}

/// One endpoint of a rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpVal {
    /// Endpoint address (IPv4-mapped for IPv4), network byte order. An
    /// IPv6 rule with IPv4 endpoints is a NAT64 rule.
    pub addr: Addr,
    /// Endpoint port, network byte order.
    pub port: u16,
    pub weight: u16,
    /// `ep_flags::*`.
    pub flags: u32,
    /// The endpoint's slot: the index of its counters in `LB_EP_STATS` /
    /// `LB_EP_ACTIVE`, of its next hop in `LB_EP_NH` and of itself in
    /// `LB_EP_SLOTS` (allocated by the agent, one per (rule, endpoint),
    /// stable while the endpoint stays in its rule).
    pub stat_idx: u32,
    /// The rule the endpoint belongs to (a `persist` client's remembered
    /// slot is used only while it still holds an endpoint of that rule).
    pub rule_id: u32,
}

/// Most VIPs one rule has: the primary and up to three secondaries (SCTP
/// multihoming, kube-loxilb's `loxilb.io/secondaryIPs`).
pub const MAX_RULE_VIPS: usize = 4;

/// The VIPs of a rule, primary first (`LB_RULE_VIPS`, key: rule id). Every
/// VIP also has its own `LB_SERVICES` entry with the same rule id; this is
/// what SCTP's INIT-ACK rewrite tells the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleVips {
    pub n: u32,
    pub _pad: u32,
    pub vips: [Addr; MAX_RULE_VIPS],
}

/// Key of `LB_SCTP_ASSOC`: an association of a rule, by the verification
/// tag packets toward one side carry (the tag that side chose).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AssocKey {
    pub rule_id: u32,
    /// Network byte order, as in the packet.
    pub vtag: u32,
}

/// An SCTP association through the load balancer: its paths, as pairs
/// (`eps[k]`, `vips[k]`): the endpoint address `eps[k]` is what a client
/// packet to `vips[k]` goes to, and what the client sees as `vips[k]`.
/// Pair 0 is the path the association started on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AssocVal {
    /// Path pairs: endpoint address `eps[k]` is shown to the client as
    /// `vips[k]`. `vips` is the association's order of the rule's VIPs:
    /// the one it started on first, then the rule's others in rule order.
    pub eps: [Addr; MAX_RULE_VIPS],
    pub vips: [Addr; MAX_RULE_VIPS],
    /// The client's addresses (its INIT's source first, then its address
    /// parameters), and how the endpoint sees each: the same in default
    /// mode; in fullnat the session's source for the first, `vips[i]` for
    /// the others.
    pub clients: [Addr; MAX_RULE_VIPS],
    pub xclients: [Addr; MAX_RULE_VIPS],
    /// Endpoint port, service port, client port, and the client port as
    /// the endpoint sees it (network order).
    pub ep_port: u16,
    pub vport: u16,
    pub cport: u16,
    pub xcport: u16,
    /// The endpoint's counter index (`EpVal::stat_idx`).
    pub ep_stat: u32,
    /// Pairs in use, client addresses known, VIPs in `vips`.
    pub n_pairs: u8,
    pub n_clients: u8,
    pub n_vips: u8,
    /// `lb_mode::*` of the rule when the association started.
    pub mode: u8,
    /// The client's and the endpoint's initiate tags (as loaded; the
    /// endpoint's 0 until its INIT-ACK): the record's keys.
    pub ctag: u32,
    pub etag: u32,
}

pub const MAX_SCTP_ASSOC: u32 = 65_536;

/// `SctpWalk::kind`.
pub mod sctp_walk {
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    /// `SctpWalk::stage`: the parameter walk is over; the SCTP program
    /// being entered again only translates and forwards.
    pub const DONE: u8 = 2;
    pub const WALKING: u8 = 1;
}

/// The state of one INIT / INIT-ACK's parameter walk between the tail
/// calls that make it (per-CPU scratch, kernel-side only: a packet's tail
/// calls run on one CPU, start to end).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SctpWalk {
    /// INIT-ACK: the packet's source (the endpoint address it came from).
    pub source: Addr,
    pub now: u64,
    pub rule_id: u32,
    /// INIT: the client's initiate tag. INIT-ACK: the endpoint's initiate
    /// tag (`tag_b`: the client's, the packet's verification tag).
    pub tag_a: u32,
    pub tag_b: u32,
    /// The session's idle timeout (for the reply sessions made).
    pub timeout_s: u32,
    /// The SCTP header's offset from the frame start.
    pub l4_off: u16,
    /// The next parameter's offset from the SCTP header.
    pub off: u16,
    /// End of the INIT / INIT-ACK chunk, from the SCTP header.
    pub chunk_end: u16,
    /// Bytes of the SCTP packet (what CRC32c covers).
    pub l4_len: u16,
    /// `sctp_walk::INIT` / `INIT_ACK`; `sctp_walk::WALKING` / `DONE`.
    pub kind: u8,
    pub stage: u8,
    /// Parameters looked at so far.
    pub idx: u8,
    /// The rule restricts client sources (`svc_flags::SRC_RANGES`).
    pub ranges: u8,
    /// An IPv6 packet (which SCTP program to return to).
    pub v6: u8,
    /// `lb_mode::*` of the session.
    pub mode: u8,
    pub _pad: u16,
}

/// Distinct endpoints (over all rules) that have counters.
pub const MAX_EP_STATS: u32 = 131_072;

/// Per-endpoint counters (per-CPU array indexed by `EpVal::stat_idx`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_sessions: u64,
    pub _reserved: u64,
}

/// Connection-tracking key: the packet's 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Padding as scalar fields, not a byte array: the BPF backend turns
    // zeroing a byte array into a byte-by-byte memset call.
    pub _pad1: u8,
    pub _pad2: u16,
}

/// `CtVal::dir`.
pub mod ct_dir {
    /// Client -> service (the entry created on the first packet).
    pub const FORWARD: u8 = 0;
    /// Endpoint -> client (the reply direction).
    pub const REPLY: u8 = 1;
}

/// `CtVal::state` bits.
pub mod ct_state {
    pub const FIN_FWD: u8 = 1;
    pub const FIN_REPLY: u8 = 2;
    pub const RST: u8 = 4;
    /// Both FINs or an RST seen: the session now lives only for
    /// `CT_CLOSE_TIMEOUT_S`, and a new SYN on the tuple starts a new session.
    pub const CLOSING: u8 = 8;
    /// The session no longer counts as active on its endpoint
    /// (`LB_EP_ACTIVE` was decremented; never twice).
    pub const RELEASED: u8 = 16;
    /// Opened by a TCP SYN or an SCTP INIT, and the client has not yet
    /// acknowledged (TCP: its first packet with ACK and without SYN; SCTP:
    /// its first packet that is not an INIT, the COOKIE ECHO; either
    /// clears this in the forward entry, which holds the session's state:
    /// the reply entry keeps the bit it was created with): the session's
    /// idle timeout is at most `CT_OPENING_TIMEOUT_S`
    /// ([`CtVal::idle_timeout_s`](super::CtVal::idle_timeout_s)), so a SYN
    /// flood's entries go within a minute, not the rule's timeout. The
    /// agent's expiry applies it (the datapath's own idle check goes by
    /// `timeout_s` alone: one branch fewer on every packet's path, and a
    /// flood's tuples never come back for it to matter).
    pub const OPENING: u8 = 32;
    /// The session has one entry, the forward one (a DNAT session whose
    /// endpoint is in the endpoint index for the session's VIP and port):
    /// the endpoint's replies find it through the index
    /// ([`crate::EpIndex`]), and it holds both directions' state, the
    /// reply direction's counters (`rpackets`, `rbytes`) and next hop
    /// (`rnh`). [`CtVal::has_peer`] is false.
    pub const ONE: u8 = 64;
}

/// How long a TCP session lingers after both FINs or an RST, seconds.
pub const CT_CLOSE_TIMEOUT_S: u32 = 10;

/// The idle timeout of an entry with `timeout_s` and `state`
/// (`ct_state::*`), seconds: see [`CtVal::idle_timeout_s`].
#[inline(always)]
pub const fn idle_timeout_s(timeout_s: u32, state: u8) -> u32 {
    if state & ct_state::OPENING != 0 && timeout_s > CT_OPENING_TIMEOUT_S {
        CT_OPENING_TIMEOUT_S
    } else {
        timeout_s
    }
}

/// The longest a session opened by a SYN lives idle before its handshake
/// completes (`ct_state::OPENING`), seconds: Linux conntrack's SYN_RECV
/// timeout, and longer than the gap before a client's sixth SYN (32 s),
/// which refreshes it.
pub const CT_OPENING_TIMEOUT_S: u32 = 60;

/// Connection-tracking value: what the packet is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtVal {
    /// The tuple after translation (network byte order). Of another family
    /// than the key for NAT64 sessions. DSR sessions (the packet keeps its
    /// tuple): `xdaddr` is the endpoint the frame goes to; `xsaddr` is
    /// IPIP DSR's outer source, cached with the next hop (zero until then,
    /// and for L2 DSR); the ports are the packet's own. See
    /// [`CtVal::dsr_endpoint`].
    pub xsaddr: Addr,
    pub xdaddr: Addr,
    pub xsport: u16,
    pub xdport: u16,
    pub rule_id: u32,
    /// Idle timeout, seconds (from the rule; shortened when TCP closes).
    pub timeout_s: u32,
    /// SCTP: the initiate tag of the client's INIT that started the
    /// association this session belongs to (as loaded); 0 otherwise.
    pub sctp_tag: u32,
    /// CLOCK_MONOTONIC at tick resolution (the datapath clock: see [`Clock`]) of the
    /// last packet in this direction.
    pub last_seen_ns: u64,
    /// Packets and bytes seen in this direction (approximate under races).
    pub packets: u64,
    pub bytes: u64,
    /// `ct_dir::*`.
    pub dir: u8,
    /// `ct_state::*`.
    pub state: u8,
    /// `lb_mode::*` the session was created with.
    pub mode: u8,
    pub _pad1: u8,
    /// The endpoint's counter index (`EpVal::stat_idx`).
    pub ep_stat: u32,
    /// Cached next hop for this direction (from `bpf_fib_lookup`).
    pub nh: NextHop,
    /// One-entry sessions ([`ct_state::ONE`]): the reply direction's
    /// cached next hop (toward the client), packets and bytes. Zero
    /// otherwise.
    pub rnh: NextHop,
    pub rpackets: u64,
    pub rbytes: u64,
}

/// A cached next hop (from `bpf_fib_lookup`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress ifindex (0 = none cached).
    pub ifindex: u32,
    /// Destination then source MAC, as 16-bit words.
    pub macs: [u16; 6],
    /// When it must be looked up again: the datapath clock ([`Clock`]) in
    /// [`nh_tick`]s, wrapping (see [`nh_fresh`]). 4 bytes where a u64 of
    /// nanoseconds took 8: a session entry has two next hops.
    pub expiry: u32,
}

/// The datapath clock `now_ns` in next-hop ticks (2^20 ns, about 1 ms),
/// wrapping every 52 days.
#[inline(always)]
pub const fn nh_tick(now_ns: u64) -> u32 {
    (now_ns >> NH_TICK_SHIFT) as u32
}

/// The length of a next-hop tick, as a shift of nanoseconds.
pub const NH_TICK_SHIFT: u32 = 20;

/// How long a session trusts its cached next hop, in [`nh_tick`]s.
pub const NH_CACHE_TICKS: u32 = (NH_CACHE_NS >> NH_TICK_SHIFT) as u32;

/// Whether a next hop expiring at tick `expiry` is fresh at `now_ns`: the
/// expiry lies within [`NH_CACHE_TICKS`] ahead (wrapping), so a stale or
/// never-written value is never taken for fresh, whenever the clock wraps.
#[inline(always)]
pub const fn nh_fresh(expiry: u32, now_ns: u64) -> bool {
    let ahead = expiry.wrapping_sub(nh_tick(now_ns));
    ahead != 0 && ahead <= NH_CACHE_TICKS
}

/// An endpoint index slot (`map_names::EP_INDEX`, at [`ep_index_slot`]):
/// the endpoint (`addr`, `port`, `proto`; network order) serves the DNAT
/// service `vip`:`vport`, and nothing else that could claim its replies.
/// `proto` 0: an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpIndex {
    pub addr: Addr,
    pub vip: Addr,
    pub port: u16,
    pub vport: u16,
    pub proto: u8,
    /// `ep_index_flags::*`.
    pub flags: u8,
    pub _pad2: u16,
}

/// `EpIndex::flags` bits.
pub mod ep_index_flags {
    /// The endpoint no longer serves only this service (it left the rule,
    /// or another rule took it too): its live one-entry sessions still
    /// find their replies through the slot, new sessions to it have two
    /// entries. The agent empties the slot once no session needs it.
    pub const DRAINING: u8 = 1;
}

impl CtKey {
    /// Key of the entry for the other direction of the session whose entry
    /// `v` this key holds: the translated tuple, reversed (a reply comes
    /// from where the packet was sent, to where it was sent from). `None`
    /// for DSR sessions, which have no reply entry. Derived, not stored:
    /// the value stays small, and the session table's insert cost grows
    /// with the element's size.
    #[inline(always)]
    pub fn peer(&self, v: &CtVal) -> Option<CtKey> {
        if !v.has_peer() {
            return None;
        }
        Some(CtKey {
            saddr: v.xdaddr,
            daddr: v.xsaddr,
            sport: v.xdport,
            dport: v.xsport,
            proto: self.proto,
            _pad1: 0,
            _pad2: 0,
        })
    }
}

impl CtVal {
    /// A DSR session's endpoint (`xdaddr`: the packet itself is not
    /// translated); `None` for any other mode.
    #[inline(always)]
    pub const fn dsr_endpoint(&self) -> Option<Addr> {
        if lb_mode::is_dsr(self.mode) {
            Some(self.xdaddr)
        } else {
            None
        }
    }

    /// The idle timeout this entry lives by, seconds: `timeout_s`, at most
    /// [`CT_OPENING_TIMEOUT_S`] while the handshake is open
    /// (`ct_state::OPENING`). The agent's expiry and session sync go by
    /// this (a reply entry by its forward entry's state, where it has one).
    #[inline(always)]
    pub const fn idle_timeout_s(&self) -> u32 {
        idle_timeout_s(self.timeout_s, self.state)
    }

    /// Whether the session has an entry for the other direction (all but
    /// DSR); its key is `CtKey::peer` (the datapath derives it the same
    /// way, into per-CPU scratch rather than onto its stack).
    #[inline(always)]
    pub const fn has_peer(&self) -> bool {
        !lb_mode::is_dsr(self.mode) && self.state & ct_state::ONE == 0
    }
}

/// How long a session trusts its cached next hop before asking the FIB
/// again: a route or neighbour change reaches live sessions within this.
pub const NH_CACHE_NS: u64 = 1_000_000_000;

/// `LB_EP_NH` value: the FIB's answer toward one endpoint, written by the
/// datapath when a packet toward it needed a FIB lookup and read by the
/// first packet of a new session to that endpoint, which then skips the
/// lookup (a session's later packets use the next hop cached in its own
/// entry). Used only when the agent found the node's routing plain
/// (`cfg_flags::EP_NH_CACHE`: the FIB's answer depends on the destination
/// alone), and only for a packet toward the same address, arriving on the
/// same device, no longer than the one the FIB checked, within
/// `NH_CACHE_NS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpNh {
    /// The address looked up (the endpoint's; a slot reused for another
    /// endpoint does not match).
    pub dst: Addr,
    /// Egress device (0: empty).
    pub ifindex: u32,
    /// The device the packet that filled it arrived on.
    pub in_ifindex: u32,
    /// [dst MAC, src MAC] as 16-bit words.
    pub macs: [u16; 6],
    /// The longest packet (IP total length) the FIB said fits.
    pub max_len: u16,
    /// `ep_nh_flags::*`.
    pub flags: u16,
    pub expiry_ns: u64,
}

/// `LB_EP_SRC` value: the node's own address toward one endpoint (the
/// FIB's source for it), written by the datapath when a new onearm or
/// NAT64 session asked the FIB, and read by the next new session to that
/// endpoint instead of asking again. Used only as `EpNh` is (the agent
/// found the node's routing plain, `cfg_flags::EP_NH_CACHE`), only for the
/// same address (`dst`: a slot reused for another endpoint does not
/// match) and a packet arriving on the same device, within
/// `NH_CACHE_NS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpSrc {
    /// The endpoint's address looked up.
    pub dst: Addr,
    /// The source the FIB gave for it (never all zero when `expiry_ns` is
    /// set).
    pub src: Addr,
    /// When it must be looked up again (the datapath clock, [`Clock`]).
    pub expiry_ns: u64,
    /// The device the packet that filled it arrived on.
    pub in_ifindex: u32,
    pub _pad: u32,
}

/// `EpNh::flags` bits.
pub mod ep_nh_flags {
    /// The next hop is the endpoint itself (it is on the segment of
    /// `EpNh::ifindex`): what an L2 DSR frame, still addressed to the VIP,
    /// needs.
    pub const DIRECT: u16 = 1;
}

/// Global datapath counters: index into the per-CPU `LB_STATS` array.
pub mod stat {
    /// Packets seen by the program.
    pub const RX: u32 = 0;
    /// Passed untouched: not IPv4 or not for a service.
    pub const PASS_NOT_SERVICE: u32 = 1;
    /// IPv4 fragments passed to the stack untouched.
    pub const PASS_FRAGMENT: u32 = 2;
    /// Truncated or malformed headers: passed untouched.
    pub const PASS_MALFORMED: u32 = 3;
    /// New sessions created.
    pub const NEW_SESSION: u32 = 4;
    /// Packets translated on an existing session.
    pub const CT_HIT: u32 = 5;
    /// Dropped: the service has no (active) endpoint.
    pub const DROP_NO_ENDPOINT: u32 = 6;
    /// Translated packets forwarded by XDP redirect / TX.
    pub const FWD_REDIRECT: u32 = 7;
    /// Translated packets handed to the stack (no neighbour yet, VLAN, ...).
    pub const FWD_STACK: u32 = 8;
    /// Sessions found idle past their timeout and replaced.
    pub const CT_EXPIRED: u32 = 9;
    /// Failed to insert a conntrack entry: packet dropped.
    pub const DROP_CT_FULL: u32 = 10;
    /// TTL would expire on forward: handed to the stack (ICMP time exceeded).
    pub const PASS_TTL: u32 = 11;
    /// New connection from a source outside the rule's source ranges.
    pub const DROP_SRC_RANGE: u32 = 12;
    /// Onearm/full-NAT: no free source port for the new session.
    pub const DROP_SNAT_EXHAUSTED: u32 = 13;
    /// DSR: the endpoint is not directly connected (or has no route).
    pub const DROP_DSR_NO_L2: u32 = 14;
    /// IPIP DSR: the encapsulated packet would exceed the MTU.
    pub const DROP_ENCAP_MTU: u32 = 15;
    /// Onearm: no route toward the endpoint (no source address for it).
    pub const DROP_NO_ROUTE: u32 = 16;
    /// DSR: the endpoint's (or next hop's) MAC is not known yet; the agent
    /// keeps endpoint neighbours resolved, so this should be transient.
    pub const DROP_NO_NEIGH: u32 = 17;
    /// Echo requests to a VIP answered.
    pub const ICMP_ECHO_REPLIED: u32 = 18;
    /// ICMP errors about a translated packet, translated back.
    pub const ICMP_ERR_XLATED: u32 = 19;
    /// IPv6 with an extension header that is not walked (or more than the
    /// walk's bound, or a routing header with segments left): passed
    /// untouched.
    pub const PASS_IPV6_EXT: u32 = 20;
    /// NAT64: a packet that could not be translated (options, no room):
    /// dropped.
    pub const DROP_NAT64: u32 = 21;
    /// SCTP with a chunk length under 4 or past the packet: dropped.
    pub const DROP_SCTP_MALFORMED: u32 = 22;
    /// Translated packets handed to the stack because XDP cannot transmit
    /// through their egress device (a bridge, bond, VLAN, tunnel, a veth
    /// whose peer takes no XDP frames, a device the agent has not
    /// classified): the stack forwards them instead (`LB_DEV_FWD`).
    pub const FWD_STACK_DEVICE: u32 = 23;
    /// L2 DSR: the endpoint's device cannot take XDP redirects and the
    /// stack cannot send a frame addressed to the VIP: dropped.
    pub const DROP_DSR_NO_REDIRECT: u32 = 24;
    /// New flows refused by the new-flow rate limit
    /// (`GlobalCfg::new_flow_interval_ns`): dropped, no session made.
    pub const DROP_NEW_FLOW_RATE: u32 = 25;
    pub const COUNT: u32 = 26;
}

/// Human names of the `stat::*` counters, by index.
pub const STAT_NAMES: [&str; stat::COUNT as usize] = [
    "rx",
    "pass_not_service",
    "pass_fragment",
    "pass_malformed",
    "new_session",
    "ct_hit",
    "drop_no_endpoint",
    "fwd_redirect",
    "fwd_stack",
    "ct_expired",
    "drop_ct_full",
    "pass_ttl",
    "drop_src_range",
    "drop_snat_exhausted",
    "drop_dsr_no_l2",
    "drop_encap_mtu",
    "drop_no_route",
    "drop_no_neigh",
    "icmp_echo_replied",
    "icmp_err_xlated",
    "pass_ipv6_ext",
    "drop_nat64",
    "drop_sctp_malformed",
    "fwd_stack_device",
    "drop_dsr_no_redirect",
    "drop_new_flow_rate",
];

/// Global configuration (single-entry array `LB_CONFIG`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCfg {
    /// Must equal `LAYOUT_VERSION` (written by the agent).
    pub layout_version: u32,
    /// `cfg_flags::*`.
    pub flags: u32,
    /// Full-NAT source address toward IPv4 endpoints (network order);
    /// 0 = the service VIP (for NAT64 rules, which have no IPv4 VIP: the
    /// node's own address toward the endpoint).
    pub fullnat_src: u32,
    /// Source ports onearm/full-NAT sessions are given (host order,
    /// inclusive).
    pub snat_port_lo: u16,
    pub snat_port_hi: u16,
    /// Full-NAT source address toward IPv6 endpoints; all zero = the
    /// service VIP.
    pub fullnat_src6: Addr,
    /// New-flow rate limit, per CPU: at most one new session every
    /// `new_flow_interval_ns` on average, `new_flow_burst` at once (a
    /// generic cell rate algorithm over `LB_NEW_FLOW_TAT`); 0 = no limit.
    /// A flood of new flows then cannot churn the session table faster than
    /// this, so established sessions are not evicted by it.
    pub new_flow_interval_ns: u32,
    pub new_flow_burst: u32,
}

/// `LB_CLOCK` value: how the datapath tells the time.
///
/// Every time the datapath keeps (a session's last packet, next-hop and
/// affinity expiry, the new-flow rate limit) is `CLOCK_MONOTONIC` in ns at
/// tick resolution, as `bpf_ktime_get_coarse_ns()` returns it and as the
/// agent compares it. That helper is a call (~10-30 ns per packet, half of
/// it the return's speculation barrier on some CPUs); the jiffies counter is
/// one load (`bpf_jiffies64()` is inlined by the JIT) and advances on the
/// same tick. So the datapath reads `jiffies * ns_per_jiffy + offset_ns`
/// (wrapping), with both factors fitted by the agent against the coarse
/// clock after every load and checked on every upkeep tick; while
/// `ns_per_jiffy` is 0 (not calibrated) it calls the helper.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    /// Nanoseconds per jiffy (the kernel's `TICK_NSEC`); 0 = use
    /// `bpf_ktime_get_coarse_ns()`.
    pub ns_per_jiffy: u64,
    /// `CLOCK_MONOTONIC - jiffies * ns_per_jiffy` (wrapping).
    pub offset_ns: u64,
    /// Written by `loxilb_clock`: `bpf_jiffies64()` and
    /// `bpf_ktime_get_coarse_ns()` read in the same tick.
    pub sample_jiffies: u64,
    pub sample_coarse_ns: u64,
}

impl Clock {
    /// The datapath's time at `jiffies` (calibrated clocks only).
    #[inline(always)]
    pub const fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.ns_per_jiffy)
            .wrapping_add(self.offset_ns)
    }
}

/// Default source-port range of onearm/full-NAT sessions.
pub const SNAT_PORT_LO: u16 = 32768;
pub const SNAT_PORT_HI: u16 = 60999;

/// `LB_DEV_FWD` value: how translated packets leave through one device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevFwd {
    /// `dev_fwd::REDIRECT` or `dev_fwd::STACK`.
    pub mode: u32,
    /// Why (`dev_fwd::WHY_*`), for the CLI.
    pub why: u32,
    /// The device's name (NUL-padded), for the CLI and bpftool: the CLI
    /// may run in another network namespace than the agent.
    pub name: [u8; 16],
}

/// Values of [`DevFwd`]. A device absent from `LB_DEV_FWD` is `STACK`.
pub mod dev_fwd {
    /// Hand the packet to the kernel stack (XDP_PASS, before any rewrite
    /// of MACs or TTL): the stack routes and transmits it.
    pub const STACK: u32 = 0;
    /// XDP redirect (or XDP_TX) delivers through this device.
    pub const REDIRECT: u32 = 1;
    /// The device takes XDP frames (its driver has `ndo_xdp_xmit`; a veth
    /// whose peer runs an XDP program or has GRO on).
    pub const WHY_XMIT_OK: u32 = 1;
    /// A veth whose peer has neither an XDP program nor GRO: frames
    /// redirected into it would be dropped.
    pub const WHY_VETH_PEER: u32 = 2;
    /// The driver cannot transmit XDP frames (no `ndo_xdp_xmit`).
    pub const WHY_NO_XMIT: u32 = 3;
    /// A Linux bridge: XDP cannot transmit into it (the kernel drops such
    /// frames silently); the stack forwards through its FDB.
    pub const WHY_BRIDGE: u32 = 4;
    /// A bond, VLAN, macvlan/ipvlan, tunnel or other virtual device:
    /// the stack's path through it is kept.
    pub const WHY_VIRTUAL: u32 = 5;
    /// Down or loopback.
    pub const WHY_DOWN: u32 = 6;
    /// The CLI's words for `WHY_*`, by value.
    pub const WHY_NAMES: [&str; 7] = [
        "",
        "takes XDP frames (ndo_xdp_xmit)",
        "veth whose peer has no XDP program and no GRO",
        "driver cannot transmit XDP frames",
        "bridge (XDP cannot transmit into it)",
        "virtual device (bond, VLAN, tunnel, ...)",
        "down or loopback",
    ];
}

pub mod cfg_flags {
    /// Never redirect in XDP; hand translated packets to the stack instead.
    pub const FORWARD_VIA_STACK: u32 = 1;
    /// The node's routing is plain (the agent checks: no policy rules but
    /// the defaults, no multipath or source-specific routes): a new
    /// session may use the next hop cached per endpoint (`LB_EP_NH`).
    pub const EP_NH_CACHE: u32 = 2;
}

/// Cheap pre-filter: one bit per hashed address, set by the agent for every
/// VIP and endpoint address. A packet whose destination and source bits are
/// both clear cannot belong to a service or a session, so it is passed after
/// one array read instead of two hash lookups.
pub const ADDR_FILTER_WORDS: u32 = 1024;

/// The bit (word index, bit index) of an IPv4 address (network byte order,
/// as loaded from the packet) in the address filter.
#[inline(always)]
pub const fn addr_filter_bit(addr: u32) -> (u32, u32) {
    let h = addr.wrapping_mul(0x9E37_79B1) >> 16; // 16 bits
    (h >> 6, h & 63)
}

/// One's-complement Internet checksum helpers (RFC 1071 / RFC 1624).
///
/// All values are 16-bit words *as loaded from memory* (native order on the
/// host, whatever order the packet had): one's-complement sums do not depend
/// on byte order as long as the checksum field is loaded the same way.
pub mod csum {
    /// Fold a 32-bit one's-complement accumulator to 16 bits.
    #[inline(always)]
    pub const fn fold(mut s: u32) -> u16 {
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s as u16
    }

    /// Checksum after one 16-bit word changed from `old` to `new`
    /// (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
    #[inline(always)]
    pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
        !fold((!check) as u32 + (!old) as u32 + new as u32)
    }

    /// Checksum after one 32-bit field changed from `old` to `new`
    /// (both as loaded from memory).
    #[inline(always)]
    pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
        let c = replace2(check, old as u16, new as u16);
        replace2(c, (old >> 16) as u16, (new >> 16) as u16)
    }

    /// Full one's-complement sum over `data` (words loaded big-endian),
    /// added to `init`; not complemented.
    pub fn sum_be(data: &[u8], init: u32) -> u32 {
        let mut s = init as u64;
        let mut i = 0;
        while i + 1 < data.len() {
            s += u16::from_be_bytes([data[i], data[i + 1]]) as u64;
            i += 2;
        }
        if i < data.len() {
            s += (data[i] as u64) << 8;
        }
        while s > 0xffff_ffff {
            s = (s & 0xffff_ffff) + (s >> 32);
        }
        s as u32
    }

    /// The Internet checksum of `data` (big-endian value, ready to store).
    pub fn checksum_be(data: &[u8]) -> u16 {
        !fold(sum_be(data, 0))
    }
}

/// Asserts, at compile time, that a struct's fields follow each other with
/// no gap and fill it exactly: every padding byte is an explicit field.
macro_rules! no_implicit_padding {
    ($t:ty { $($f:ident : $ft:ty),+ $(,)? }) => {
        const _: () = {
            let mut off = 0usize;
            $(
                assert!(core::mem::offset_of!($t, $f) == off, concat!(stringify!($t), ".", stringify!($f), ": implicit padding before it"));
                off += size_of::<$ft>();
            )+
            assert!(off == size_of::<$t>(), concat!(stringify!($t), ": implicit padding at the end"));
        };
    };
}

no_implicit_padding!(SvcKey {
    addr: Addr,
    port: u16,
    proto: u8,
    _pad: u8
});
no_implicit_padding!(SvcVal {
    rule_id: u32,
    ep_count: u32,
    timeout_s: u32,
    rr_next: u32,
    ep_bank: u8,
    mode: u8,
    sel: u8,
    flags: u8,
    table_len: u32,
    persist_timeout_s: u32,
    sel_base: u32,
});
no_implicit_padding!(EpKey {
    rule_id: u32,
    slot: u32
});
no_implicit_padding!(EpVal {
    addr: Addr,
    port: u16,
    weight: u16,
    flags: u32,
    stat_idx: u32,
    rule_id: u32
});
no_implicit_padding!(CtKey {
    saddr: Addr,
    daddr: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    _pad1: u8,
    _pad2: u16
});
no_implicit_padding!(CtVal {
    xsaddr: Addr,
    xdaddr: Addr,
    xsport: u16,
    xdport: u16,
    rule_id: u32,
    timeout_s: u32,
    sctp_tag: u32,
    last_seen_ns: u64,
    packets: u64,
    bytes: u64,
    dir: u8,
    state: u8,
    mode: u8,
    _pad1: u8,
    ep_stat: u32,
    nh: NextHop,
    rnh: NextHop,
    rpackets: u64,
    rbytes: u64,
});
no_implicit_padding!(NextHop {
    ifindex: u32,
    macs: [u16; 6],
    expiry: u32,
});
no_implicit_padding!(EpIndex {
    addr: Addr,
    vip: Addr,
    port: u16,
    vport: u16,
    proto: u8,
    flags: u8,
    _pad2: u16,
});
no_implicit_padding!(GlobalCfg {
    layout_version: u32,
    flags: u32,
    fullnat_src: u32,
    snat_port_lo: u16,
    snat_port_hi: u16,
    fullnat_src6: Addr,
    new_flow_interval_ns: u32,
    new_flow_burst: u32
});
no_implicit_padding!(AffKey {
    rule_id: u32,
    client: Addr
});
no_implicit_padding!(AffVal {
    ep_addr: Addr,
    ep_port: u16,
    _pad1: u16,
    ep_idx: u32,
    last_seen_ns: u64
});
no_implicit_padding!(SrcRangeData {
    rule_id_be: u32,
    addr: Addr
});
no_implicit_padding!(RuleStats {
    packets: u64,
    bytes: u64,
    new_sessions: u64,
    drop_no_endpoint: u64,
    drop_src_range: u64,
    _reserved: [u64; 3],
});
no_implicit_padding!(RuleVips {
    n: u32,
    _pad: u32,
    vips: [Addr; MAX_RULE_VIPS]
});
no_implicit_padding!(AssocKey {
    rule_id: u32,
    vtag: u32
});
no_implicit_padding!(AssocVal {
    eps: [Addr; MAX_RULE_VIPS],
    vips: [Addr; MAX_RULE_VIPS],
    clients: [Addr; MAX_RULE_VIPS],
    xclients: [Addr; MAX_RULE_VIPS],
    ep_port: u16,
    vport: u16,
    cport: u16,
    xcport: u16,
    ep_stat: u32,
    n_pairs: u8,
    n_clients: u8,
    n_vips: u8,
    mode: u8,
    ctag: u32,
    etag: u32
});
no_implicit_padding!(SctpWalk {
    source: Addr,
    now: u64,
    rule_id: u32,
    tag_a: u32,
    tag_b: u32,
    timeout_s: u32,
    l4_off: u16,
    off: u16,
    chunk_end: u16,
    l4_len: u16,
    kind: u8,
    stage: u8,
    idx: u8,
    ranges: u8,
    v6: u8,
    mode: u8,
    _pad: u16
});
no_implicit_padding!(EpNh {
    dst: Addr,
    ifindex: u32,
    in_ifindex: u32,
    macs: [u16; 6],
    max_len: u16,
    flags: u16,
    expiry_ns: u64
});
no_implicit_padding!(EpSrc {
    dst: Addr,
    src: Addr,
    expiry_ns: u64,
    in_ifindex: u32,
    _pad: u32
});
no_implicit_padding!(EpStats {
    packets: u64,
    bytes: u64,
    new_sessions: u64,
    _reserved: u64
});

// Compile-time layout checks: kernel and userspace share these bytes.
const _: () = assert!(size_of::<SvcKey>() == 20);
const _: () = assert!(size_of::<Clock>() == 32);
const _: () = assert!(size_of::<DevFwd>() == 24);
const _: () = assert!(size_of::<SvcVal>() == 32);
const _: () = assert!(size_of::<SelChunk>() == 128);
const _: () = assert!(size_of::<AffKey>() == 20);
const _: () = assert!(size_of::<AffVal>() == 32);
const _: () = assert!(size_of::<SrcRangeData>() == 20);
const _: () = assert!(size_of::<RuleStats>() == 64);
const _: () = assert!(size_of::<EpStats>() == 32);
const _: () = assert!(size_of::<EpNh>() == 48);
const _: () = assert!(size_of::<EpSrc>() == 48);
const _: () = assert!(MAX_EPS_PER_RULE - 1 <= u16::MAX as u32);
const _: () = assert!(size_of::<EpKey>() == 8);
const _: () = assert!(size_of::<EpVal>() == 32);
const _: () = assert!(size_of::<CtKey>() == 40);
const _: () = assert!(size_of::<CtVal>() == 136);
const _: () = assert!(core::mem::offset_of!(CtVal, last_seen_ns) == 48);
const _: () = assert!(core::mem::offset_of!(CtVal, nh) == 80);
const _: () = assert!(core::mem::offset_of!(CtVal, rnh) == 100);
const _: () = assert!(core::mem::offset_of!(CtVal, rpackets) == 120);
const _: () = assert!(size_of::<NextHop>() == 20);
const _: () = assert!(NH_CACHE_TICKS > 0 && NH_CACHE_TICKS < 1 << 30);
const _: () = assert!(size_of::<EpIndex>() == 40);
const _: () = assert!(size_of::<GlobalCfg>() == 40);
const _: () = assert!(size_of::<RuleVips>() == 72);
const _: () = assert!(size_of::<SctpWalk>() == 56);
const _: () = assert!(size_of::<AssocKey>() == 8);
const _: () = assert!(size_of::<AssocVal>() == 280);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), fully padded plain-old-data.
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for Clock {}
    unsafe impl aya::Pod for DevFwd {}
    unsafe impl aya::Pod for SvcVal {}
    unsafe impl aya::Pod for EpKey {}
    unsafe impl aya::Pod for EpVal {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtVal {}
    unsafe impl aya::Pod for EpIndex {}
    unsafe impl aya::Pod for GlobalCfg {}
    unsafe impl aya::Pod for SelChunk {}
    unsafe impl aya::Pod for AffKey {}
    unsafe impl aya::Pod for AffVal {}
    unsafe impl aya::Pod for SrcRangeData {}
    unsafe impl aya::Pod for RuleStats {}
    unsafe impl aya::Pod for EpStats {}
    unsafe impl aya::Pod for EpNh {}
    unsafe impl aya::Pod for EpSrc {}
    unsafe impl aya::Pod for RuleVips {}
    unsafe impl aya::Pod for AssocKey {}
    unsafe impl aya::Pod for AssocVal {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_next_hop_is_fresh_only_within_its_cache_time_across_the_clock_wrap() {
        let tick = 1u64 << NH_TICK_SHIFT;
        for start in [5 * tick, (u32::MAX as u64 - 3) * tick, (1u64 << 60) + 7] {
            let expiry = nh_tick(start).wrapping_add(NH_CACHE_TICKS);
            assert!(nh_fresh(expiry, start), "at {start}: just cached");
            assert!(nh_fresh(expiry, start + NH_CACHE_NS / 2), "at {start}");
            // Past its expiry, by a tick or by half the clock's range.
            let past = start + (NH_CACHE_TICKS as u64 + 1) * tick;
            assert!(!nh_fresh(expiry, past), "at {start}: expired");
            assert!(!nh_fresh(expiry, start + (1u64 << 31) * tick));
            // Never written, or from far in the past or the future.
            assert!(!nh_fresh(nh_tick(start), start), "expires now");
            assert!(!nh_fresh(expiry.wrapping_add(1000), start), "too far ahead");
        }
        assert!(!nh_fresh(0, 0));
        // A second's worth of ticks, less than a second.
        assert!(NH_CACHE_TICKS as u64 * tick <= NH_CACHE_NS);
    }

    #[test]
    fn an_open_handshake_shortens_the_idle_timeout_never_lengthens_it() {
        let v = |timeout_s, state| CtVal {
            timeout_s,
            state,
            ..Default::default()
        };
        assert_eq!(v(1800, 0).idle_timeout_s(), 1800);
        assert_eq!(
            v(1800, ct_state::OPENING).idle_timeout_s(),
            CT_OPENING_TIMEOUT_S
        );
        // A rule's shorter timeout, or a close's, stays.
        assert_eq!(v(20, ct_state::OPENING).idle_timeout_s(), 20);
        assert_eq!(
            v(CT_CLOSE_TIMEOUT_S, ct_state::OPENING | ct_state::CLOSING).idle_timeout_s(),
            CT_CLOSE_TIMEOUT_S
        );
    }

    #[test]
    fn ep_key_banks_do_not_overlap() {
        let a = EpKey::new(7, 0, MAX_EPS_PER_RULE - 1);
        let b = EpKey::new(7, 1, 0);
        assert_ne!(a, b);
        assert_eq!(b.slot, 1 << EP_BANK_SHIFT);
        // index is masked into its bank, never spills into the other one
        assert_eq!(EpKey::new(7, 0, MAX_EPS_PER_RULE).slot, 0);
    }

    #[test]
    fn each_entrys_reply_key_is_its_translation_reversed() {
        // Full-NAT: client 192.168.0.2:40000 -> VIP 20.0.0.1:80 becomes
        // 20.0.0.1:33000 -> endpoint 10.0.1.10:8080, and back.
        let (client, vip, ep) = (
            v4_mapped(u32::from_be_bytes([192, 168, 0, 2]).to_be()),
            v4_mapped(u32::from_be_bytes([20, 0, 0, 1]).to_be()),
            v4_mapped(u32::from_be_bytes([10, 0, 1, 10]).to_be()),
        );
        let key = |saddr, daddr, sport: u16, dport: u16| CtKey {
            saddr,
            daddr,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let x = |xsaddr, xdaddr, xsport: u16, xdport: u16, mode| CtVal {
            xsaddr,
            xdaddr,
            xsport: xsport.to_be(),
            xdport: xdport.to_be(),
            mode,
            ..Default::default()
        };
        let fwd = key(client, vip, 40000, 80);
        let rev = key(ep, vip, 8080, 33000);
        let fv = x(vip, ep, 33000, 8080, lb_mode::FULLNAT);
        let rv = x(vip, client, 80, 40000, lb_mode::FULLNAT);
        assert_eq!(fwd.peer(&fv), Some(rev));
        assert_eq!(rev.peer(&rv), Some(fwd));
        // DSR: one entry, no reply key.
        for mode in [lb_mode::DSR, lb_mode::DSR_IPIP] {
            assert_eq!(fwd.peer(&x(client, vip, 40000, 80, mode)), None);
        }
    }

    #[test]
    fn csum_incremental_matches_full_recompute() {
        // An IPv4 header (checksum zeroed), from a real capture.
        let mut h: [u8; 20] = [
            0x45, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 0xac, 0x10, 0x0a, 0x63, 0xac,
            0x10, 0x0a, 0x0c,
        ];
        let c = csum::checksum_be(&h);
        assert_eq!(c, 0xb1e6);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        // Change the destination address and update incrementally, with the
        // words loaded in native order as the datapath does.
        let old = u32::from_ne_bytes(h[16..20].try_into().unwrap());
        let newb = [10u8, 1, 2, 3];
        let new = u32::from_ne_bytes(newb);
        let chk = u16::from_ne_bytes(h[10..12].try_into().unwrap());
        let inc = csum::replace4(chk, old, new);
        h[16..20].copy_from_slice(&newb);
        h[10..12].copy_from_slice(&inc.to_ne_bytes());
        assert_eq!(
            csum::fold(csum::sum_be(&h, 0)),
            0xffff,
            "header must verify"
        );
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(inc.to_ne_bytes(), csum::checksum_be(&h).to_be_bytes());
    }

    #[test]
    fn csum_replace2_port_change() {
        let mut seg = [0x12u8, 0x34, 0x00, 0x50, 0xde, 0xad, 0xbe, 0xef, 0, 0];
        let c = csum::checksum_be(&seg);
        seg[8..10].copy_from_slice(&c.to_be_bytes());
        let old = u16::from_ne_bytes([seg[2], seg[3]]);
        let new = u16::from_ne_bytes(8080u16.to_be_bytes());
        let inc = csum::replace2(u16::from_ne_bytes([seg[8], seg[9]]), old, new);
        seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
        seg[8..10].copy_from_slice(&inc.to_ne_bytes());
        assert_eq!(csum::fold(csum::sum_be(&seg, 0)), 0xffff);
    }

    #[test]
    fn addr_filter_bit_in_range() {
        for a in [0u32, 1, 0xffff_ffff, 0x0a00_0001, 0x6401_a8c0] {
            let (w, b) = addr_filter_bit(a);
            assert!(w < ADDR_FILTER_WORDS && b < 64);
        }
    }

    #[test]
    fn addr_round_trips_both_families() {
        for ip in ["10.1.2.3", "0.0.0.0", "2001:db8::1", "::1", "::fffe:0:1"] {
            let ip: core::net::IpAddr = ip.parse().unwrap();
            let a = addr_from_ip(ip);
            assert_eq!(is_v4(&a), ip.is_ipv4(), "{ip}");
            assert_eq!(ip_from_addr(&a), ip);
        }
        // IPv4 keeps its old hash: the mapped prefix folds away.
        let a = u32::from_ne_bytes([10, 0, 0, 1]);
        assert_eq!(addr_fold(&v4_mapped(a)), a);
        // The mapped form matches the packet bytes of ::ffff:10.0.0.1.
        let six: core::net::IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(addr_from_ip(six), v4_mapped(a));
    }

    #[test]
    fn stat_names_cover_every_counter() {
        for i in 0..=stat::DROP_SCTP_MALFORMED {
            assert!(
                !STAT_NAMES[i as usize].is_empty(),
                "counter {i} has no name"
            );
        }
    }
}

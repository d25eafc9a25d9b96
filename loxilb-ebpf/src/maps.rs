//! Every map of the datapath. Keys and values come from `loxilb-common`,
//! the one definition shared with the agent; maps are BTF-defined so
//! `bpftool map dump` prints named fields.

use aya_ebpf::{
    btf_maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use loxilb_common::{
    stat, Addr, AffKey, AffVal, AssocKey, AssocVal, Clock, CtKey, CtVal, DevFwd, EpIndex, EpKey,
    EpNh, EpSrc, EpStats, EpVal, GlobalCfg, RuleStats, RuleVips, SctpWalk, SelChunk, SrcRangeData,
    SvcKey, SvcVal, ADDR_FILTER_WORDS, EP_INDEX_SLOTS, MAX_AFFINITY, MAX_CT_ENTRIES,
    MAX_ENDPOINT_SLOTS, MAX_EP_STATS, MAX_SCTP_ASSOC, MAX_SEL_CHUNKS, MAX_SERVICES, MAX_SRC_RANGES,
};

#[btf_map]
pub static LB_SERVICES: HashMap<SvcKey, SvcVal, { MAX_SERVICES as usize }> = HashMap::new();

/// Each rule's endpoint banks, in order: the agent's record (read back
/// when it adopts pinned maps); the datapath reads `LB_EP_SLOTS`.
#[btf_map]
pub static LB_ENDPOINTS: HashMap<EpKey, EpVal, { MAX_ENDPOINT_SLOTS as usize }> = HashMap::new();

#[btf_map]
pub static LB_CT: LruHashMap<CtKey, CtVal, { MAX_CT_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static LB_STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static LB_CONFIG: Array<GlobalCfg, 1> = Array::new();

/// The datapath's clock (`loxilb_common::Clock`; not pinned).
#[btf_map]
pub static LB_CLOCK: Array<Clock, 1> = Array::new();

/// How translated packets leave through each device, by ifindex (the
/// agent classifies every device of the namespace; absent = the stack).
#[btf_map]
pub static LB_DEV_FWD: HashMap<u32, DevFwd, 4096> = HashMap::new();

#[btf_map]
pub static LB_ADDR_FILTER: Array<u64, { ADDR_FILTER_WORDS as usize }> = Array::new();

/// Selection tables (rr sequence / Maglev table), in chunks: each (rule,
/// bank) holds a run of consecutive chunks from `SvcVal::sel_base`,
/// placed by the agent (`sel_space`).
#[btf_map]
pub static LB_SEL_TABLE: Array<SelChunk, { MAX_SEL_CHUNKS as usize }> = Array::new();

/// Source-IP affinity of `persist` rules.
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffKey, AffVal, { MAX_AFFINITY as usize }> = LruHashMap::new();

/// Allowed client prefixes per rule (`loadBalancerSourceRanges`).
#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SrcRangeData, u32, { MAX_SRC_RANGES as usize }> = LpmTrie::new();

/// Per-rule counters, indexed by rule id.
#[btf_map]
pub static LB_RULE_STATS: PerCpuArray<RuleStats, { MAX_SERVICES as usize + 1 }> =
    PerCpuArray::new();

/// The VIPs (network order) -> flags; echo requests to them are answered.
#[btf_map]
pub static LB_VIPS: HashMap<Addr, u32, { MAX_SERVICES as usize }> = HashMap::new();

/// Every VIP of a rule (primary first), by rule id.
#[btf_map]
pub static LB_RULE_VIPS: HashMap<u32, RuleVips, { MAX_SERVICES as usize }> = HashMap::new();

/// SCTP associations by (rule, verification tag).
#[btf_map]
pub static LB_SCTP_ASSOC: LruHashMap<AssocKey, AssocVal, { MAX_SCTP_ASSOC as usize }> =
    LruHashMap::new();

/// Per-CPU scratch for an association record being built.
#[btf_map]
pub static LB_SCRATCH_ASSOC: PerCpuArray<AssocVal, 1> = PerCpuArray::new();

/// Per-CPU scratch: an INIT / INIT-ACK's parameter walk between the tail
/// calls that make it (`sctp`).
#[btf_map]
pub static LB_SCRATCH_WALK: PerCpuArray<SctpWalk, 1> = PerCpuArray::new();

/// Per-endpoint counters, indexed by `EpVal::stat_idx`.
#[btf_map]
pub static LB_EP_STATS: PerCpuArray<EpStats, { MAX_EP_STATS as usize }> = PerCpuArray::new();

/// Active sessions per endpoint (shared, atomically updated; `lc` reads
/// it; the agent re-counts it from conntrack now and then to undo the drift
/// of sessions that vanished by LRU eviction).
#[btf_map]
pub static LB_EP_ACTIVE: Array<u64, { MAX_EP_STATS as usize }> = Array::new();

/// The next hop toward each endpoint, indexed by `EpVal::stat_idx`, for
/// a new session's first packet (see `loxilb_common::EpNh`).
#[btf_map]
pub static LB_EP_NH: Array<EpNh, { MAX_EP_STATS as usize }> = Array::new();

/// The node's own address toward each endpoint, indexed by
/// `EpVal::stat_idx`, for a new onearm or NAT64 session (see
/// `loxilb_common::EpSrc`).
#[btf_map]
pub static LB_EP_SRC: Array<EpSrc, { MAX_EP_STATS as usize }> = Array::new();

/// The endpoint index (`loxilb_common::EpIndex`, written by the agent):
/// an array, so the lookup every service packet makes is inlined.
#[btf_map]
pub static LB_EP_INDEX: Array<EpIndex, { EP_INDEX_SLOTS as usize }> = Array::new();

/// Each endpoint by its slot (`EpVal::stat_idx`), written by the agent with
/// the rule's endpoint bank (`LB_ENDPOINTS`, its record of each bank in
/// order); the selection table's entries are these slots, so picking an
/// endpoint costs an array read, not a hash lookup.
#[btf_map]
pub static LB_EP_SLOTS: Array<EpVal, { MAX_EP_STATS as usize }> = Array::new();

#[inline(always)]
pub fn ep_active_add(idx: u32, delta: i64) {
    if let Some(p) = LB_EP_ACTIVE.get_ptr_mut(idx) {
        // The BPF target has no `AtomicU64::fetch_add` in core; the
        // intrinsic lowers to a BPF atomic add (`lock *(u64 *)p += v`).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p,
                delta as u64,
            );
        }
    }
}

#[inline(always)]
pub fn ep_active(idx: u32) -> u64 {
    match LB_EP_ACTIVE.get_ptr(idx) {
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => u64::MAX,
    }
}

#[inline(always)]
pub fn ep_stats(idx: u32) -> Option<*mut EpStats> {
    LB_EP_STATS.get_ptr_mut(idx)
}

#[inline(always)]
pub fn src_allowed(rule_id: u32, saddr: &Addr) -> bool {
    let key = LpmKey::new(
        160,
        SrcRangeData {
            rule_id_be: rule_id.to_be(),
            addr: *saddr,
        },
    );
    LB_SRC_RANGES.get(&key).is_some()
}

#[inline(always)]
pub fn rule_stats(rule_id: u32) -> Option<*mut RuleStats> {
    LB_RULE_STATS.get_ptr_mut(rule_id)
}

/// The new-flow rate limit's state, per CPU: the theoretical arrival time
/// (ns, coarse monotonic clock) of the next new flow (see `lb`).
#[btf_map]
pub static LB_NEW_FLOW_TAT: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Per-CPU scratch space for building conntrack values (keeps them off the
/// 512-byte BPF stack). Not pinned: it holds nothing between packets.
#[btf_map]
pub static LB_SCRATCH_CT: PerCpuArray<CtVal, 2> = PerCpuArray::new();

/// Per-CPU scratch for conntrack keys: slot 0 the key of a session's
/// other direction, derived from its entry (`conntrack::peer_of`), slot 1
/// a one-entry session's key found from its reply (`conntrack::one_reply`):
/// 40 bytes each that the programs' full stacks have no room for. Not
/// pinned.
#[btf_map]
pub static LB_SCRATCH_KEY: PerCpuArray<CtKey, 2> = PerCpuArray::new();

/// Per-CPU scratch the IPv6 parser passes its L4 offset through (see
/// `parse::parse6`).
#[btf_map]
pub static LB_SCRATCH_OFF: PerCpuArray<u32, 1> = PerCpuArray::new();

/// Per-CPU: set by the IPv6 one-entry reply program when it hands a
/// packet it found no session for back to the IPv6 program, which clears
/// it and looks the packet up by its own tuple.
#[btf_map]
pub static LB_SKIP_ONE6: PerCpuArray<u32, 1> = PerCpuArray::new();

/// Per-CPU scratch for the service key of a new flow.
#[btf_map]
pub static LB_SCRATCH_SVC: PerCpuArray<SvcKey, 1> = PerCpuArray::new();

/// Per-CPU scratch for the endpoint a new flow goes to.
#[btf_map]
pub static LB_SCRATCH_EP: PerCpuArray<EpVal, 1> = PerCpuArray::new();

/// Per-CPU scratch for an affinity value being written.
#[btf_map]
pub static LB_SCRATCH_AFF: PerCpuArray<AffVal, 1> = PerCpuArray::new();

/// Per-CPU scratch for `bpf_fib_lookup` parameters (64 bytes the stack
/// cannot spare).
#[btf_map]
pub static LB_SCRATCH_FIB: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup, 1> = PerCpuArray::new();

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = LB_STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

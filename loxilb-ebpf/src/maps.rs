//! Every map of the datapath. Keys and values come from `loxilb-common`,
//! the one definition shared with the agent; maps are BTF-defined so
//! `bpftool map dump` prints named fields.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use loxilb_common::{
    stat, AffKey4, AffVal4, CtKey4, CtVal4, EpKey, EpVal, GlobalCfg, RuleStats, SelChunk, SelKey,
    SrcRangeData4, SvcKey4, SvcVal4, ADDR_FILTER_WORDS, MAX_AFFINITY, MAX_CT_ENTRIES,
    MAX_ENDPOINT_SLOTS, MAX_SEL_CHUNKS, MAX_SERVICES, MAX_SRC_RANGES,
};

#[btf_map]
pub static LB_SERVICES4: HashMap<SvcKey4, SvcVal4, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map]
pub static LB_ENDPOINTS: HashMap<EpKey, EpVal, { MAX_ENDPOINT_SLOTS as usize }> = HashMap::new();

#[btf_map]
pub static LB_CT4: LruHashMap<CtKey4, CtVal4, { MAX_CT_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static LB_STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static LB_CONFIG: Array<GlobalCfg, 1> = Array::new();

#[btf_map]
pub static LB_ADDR_FILTER: Array<u64, { ADDR_FILTER_WORDS as usize }> = Array::new();

/// Selection tables (rr sequence / Maglev table), in chunks; allocated on
/// use, since most rules have small tables.
#[btf_map]
pub static LB_SEL_TABLE: HashMap<
    SelKey,
    SelChunk,
    { MAX_SEL_CHUNKS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Source-IP affinity of `persist` rules.
#[btf_map]
pub static LB_AFFINITY4: LruHashMap<AffKey4, AffVal4, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Allowed client prefixes per rule (`loadBalancerSourceRanges`).
#[btf_map]
pub static LB_SRC_RANGES4: LpmTrie<SrcRangeData4, u32, { MAX_SRC_RANGES as usize }> =
    LpmTrie::new();

/// Per-rule counters, indexed by rule id.
#[btf_map]
pub static LB_RULE_STATS: PerCpuArray<RuleStats, { MAX_SERVICES as usize + 1 }> =
    PerCpuArray::new();

#[inline(always)]
pub fn src_allowed(rule_id: u32, saddr: u32) -> bool {
    let key = LpmKey::new(
        64,
        SrcRangeData4 {
            rule_id_be: rule_id.to_be(),
            addr: saddr,
        },
    );
    LB_SRC_RANGES4.get(&key).is_some()
}

#[inline(always)]
pub fn rule_stats(rule_id: u32) -> Option<*mut RuleStats> {
    LB_RULE_STATS.get_ptr_mut(rule_id)
}

/// Per-CPU scratch space for building conntrack values (keeps them off the
/// 512-byte BPF stack). Not pinned: it holds nothing between packets.
#[btf_map]
pub static LB_SCRATCH_CT: PerCpuArray<CtVal4, 2> = PerCpuArray::new();

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = LB_STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

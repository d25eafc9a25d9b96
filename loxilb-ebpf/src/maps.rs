//! Every map of the datapath. Keys and values come from `loxilb-common`,
//! the one definition shared with the agent; maps are BTF-defined so
//! `bpftool map dump` prints named fields.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use loxilb_common::{
    stat, CtKey4, CtVal4, EpKey, EpVal, GlobalCfg, SvcKey4, SvcVal4, ADDR_FILTER_WORDS,
    MAX_CT_ENTRIES, MAX_ENDPOINT_SLOTS, MAX_SERVICES,
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

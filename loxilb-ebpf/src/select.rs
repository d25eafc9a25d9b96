//! Endpoint selection. Round-robin for now, skipping endpoints marked
//! inactive (bounded number of tries).

use loxilb_common::{ep_flags, EpKey, EpVal, SvcVal4};

use crate::maps::LB_ENDPOINTS;

const MAX_TRIES: u32 = 8;

#[inline(always)]
pub fn select(svc: *mut SvcVal4) -> Option<EpVal> {
    unsafe {
        let n = (*svc).ep_count;
        if n == 0 {
            return None;
        }
        let rule = (*svc).rule_id;
        let bank = (*svc).ep_bank;
        let mut i = 0;
        while i < MAX_TRIES {
            let cur = (*svc).rr_next;
            (*svc).rr_next = cur.wrapping_add(1);
            let idx = cur % n;
            if let Some(ep) = LB_ENDPOINTS.get_ptr(EpKey::new(rule, bank, idx)) {
                let ep = *ep;
                if ep.flags & ep_flags::INACTIVE == 0 {
                    return Some(ep);
                }
            }
            i += 1;
        }
        None
    }
}

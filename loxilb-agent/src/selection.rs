//! Selection tables the datapath picks endpoints from (one per rule, in the
//! `LB_SEL_TABLE` map): a weighted round-robin sequence for `rr` and
//! `persist`, a Maglev lookup table for `hash`.

use loxilb_common::{MAGLEV_M, MAX_SEL_TABLE};

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weights reduced by their gcd and, if their sum does not fit a table,
/// scaled down proportionally (every endpoint keeps at least one slot).
fn normalise(weights: &[u16], cap: u64) -> Vec<u64> {
    let g = weights.iter().fold(0u64, |g, w| gcd(g, *w as u64)).max(1);
    let mut w: Vec<u64> = weights.iter().map(|w| (*w as u64 / g).max(1)).collect();
    let sum: u64 = w.iter().sum();
    if sum > cap {
        w = w.iter().map(|x| (x * cap / sum).max(1)).collect();
    }
    w
}

/// Smooth weighted round-robin (as nginx does it): each endpoint appears in
/// proportion to its weight, spread out rather than in runs. With equal
/// weights this is simply 0, 1, ..., n-1.
pub fn rr_table(weights: &[u16]) -> Vec<u16> {
    if weights.is_empty() {
        return vec![];
    }
    let w = normalise(weights, MAX_SEL_TABLE as u64);
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut cur = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            cur[i] += w[i] as i64;
            if cur[i] > cur[best] {
                best = i;
            }
        }
        cur[best] -= total;
        out.push(best as u16);
    }
    out
}

/// FNV-1a, 64-bit: a stable hash of an endpoint's identity, so its Maglev
/// preferences do not depend on its position in the list.
fn fnv1a(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // final avalanche (splitmix64)
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Maglev table sizes (primes), smallest first. A rule's table is the
/// smallest with at least `MAGLEV_SLOTS_PER_EP` slots per endpoint (twice
/// the paper's bound for shares within about 1 % of each other; with 100,
/// removing one of 10 endpoints moved 12 % of flows rather than 10 %): a
/// rule with a few endpoints gets 1,021 slots (32 map chunks, 4 KiB, which stay in
/// the CPU's cache) instead of 65,537 (2,049 chunks, 256 KiB, one of them
/// cold for almost every new flow).
pub const MAGLEV_SIZES: [u32; 4] = [1021, 4093, 16381, MAGLEV_M];
/// Slots per endpoint a Maglev table has at least (up to `MAGLEV_M`).
pub const MAGLEV_SLOTS_PER_EP: usize = 200;

/// The Maglev table size for `n` endpoints. Adding or removing endpoints
/// within one size keeps Maglev's minimal disruption; crossing a size
/// (5 -> 6 endpoints, 20 -> 21, 81 -> 82) rebuilds the table, so new
/// flows' choices move as after a restart (sessions keep their endpoint).
pub fn maglev_size(n: usize) -> u32 {
    MAGLEV_SIZES
        .iter()
        .copied()
        .find(|m| *m as usize >= n.saturating_mul(MAGLEV_SLOTS_PER_EP))
        .unwrap_or(MAGLEV_M)
}

/// Maglev (Eisenbud et al., NSDI '16) lookup table over endpoints
/// identified by `ids`, of `maglev_size(ids.len())` slots, weighted: an
/// endpoint of weight w takes w turns per round of table filling. Adding
/// or removing one of N endpoints moves about 1/N of the slots (within one
/// table size).
pub fn maglev_table(ids: &[Vec<u8>], weights: &[u16]) -> Vec<u16> {
    let n = ids.len();
    if n == 0 {
        return vec![];
    }
    let m = maglev_size(n) as u64;
    let w = normalise(weights, 1 << 16);
    let offset: Vec<u64> = ids.iter().map(|id| fnv1a(id, 0x5eed_0001) % m).collect();
    let skip: Vec<u64> = ids
        .iter()
        .map(|id| fnv1a(id, 0x5eed_0002) % (m - 1) + 1)
        .collect();
    // Endpoints take their turns in the order of their identities, not of
    // the list: the same set gives the same table however it was listed
    // (e.g. by two load-balancer nodes).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| ids[*a].cmp(&ids[*b]));
    let mut next = vec![0u64; n];
    let mut table = vec![u16::MAX; m as usize];
    let mut filled = 0u64;
    'fill: loop {
        for &i in &order {
            for _ in 0..w[i] {
                // next preferred slot of endpoint i that is still free
                let mut c = (offset[i] + next[i] * skip[i]) % m;
                while table[c as usize] != u16::MAX {
                    next[i] += 1;
                    c = (offset[i] + next[i] * skip[i]) % m;
                }
                table[c as usize] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use loxilb_common::flow_hash;

    fn ids(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1).into_bytes())
            .collect()
    }

    fn flows() -> impl Iterator<Item = u32> {
        (0..100_000u32).map(|i| {
            flow_hash(
                &loxilb_common::v4_mapped((0x0a00_0000 + i).to_be()),
                &loxilb_common::v4_mapped(0x1400_0064u32.to_be()),
                (1024 + (i % 60000) as u16).to_be(),
                80u16.to_be(),
                6,
            )
        })
    }

    #[test]
    fn rr_table_equal_weights_is_identity() {
        assert_eq!(rr_table(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(rr_table(&[5, 5]), vec![0, 1], "gcd-reduced");
        assert!(rr_table(&[]).is_empty());
    }

    #[test]
    fn rr_table_honours_weights_smoothly() {
        let t = rr_table(&[3, 1]);
        assert_eq!(t.len(), 4);
        assert_eq!(t.iter().filter(|e| **e == 0).count(), 3);
        // smooth: never the light endpoint twice in a row
        let t = rr_table(&[1, 2, 7]);
        let counts: Vec<usize> = (0..3)
            .map(|e| t.iter().filter(|x| **x == e).count())
            .collect();
        assert_eq!(counts, vec![1, 2, 7]);
        assert!(t.windows(2).all(|w| !(w[0] == 0 && w[1] == 0)));
    }

    #[test]
    fn rr_table_caps_huge_weight_sums() {
        let w = vec![65535u16; 4096];
        let t = rr_table(&w);
        assert!(t.len() <= MAX_SEL_TABLE as usize);
        let w: Vec<u16> = (0..3000).map(|i| if i == 0 { 60000 } else { 7 }).collect();
        let t = rr_table(&w);
        assert!(t.len() <= MAX_SEL_TABLE as usize);
        for e in 0..3000u16 {
            assert!(t.contains(&e), "endpoint {e} lost its slot");
        }
    }

    #[test]
    fn maglev_fills_every_slot_evenly() {
        for n in [7usize, 30, 100, 700] {
            let t = maglev_table(&ids(n), &vec![1; n]);
            assert_eq!(t.len(), maglev_size(n) as usize);
            assert!(t.iter().all(|e| (*e as usize) < n));
            let ideal = t.len() as f64 / n as f64;
            for e in 0..n as u16 {
                let c = t.iter().filter(|x| **x == e).count() as f64;
                assert!(
                    (c - ideal).abs() / ideal < 0.02 || (c - ideal).abs() <= 1.0,
                    "{n} endpoints, endpoint {e}: {c} slots of {}",
                    t.len()
                );
            }
        }
    }

    #[test]
    fn maglev_size_grows_with_the_endpoints() {
        assert_eq!(maglev_size(1), 1021);
        assert_eq!(maglev_size(5), 1021);
        assert_eq!(maglev_size(6), 4093);
        assert_eq!(maglev_size(20), 4093);
        assert_eq!(maglev_size(21), 16381);
        assert_eq!(maglev_size(81), 16381);
        assert_eq!(maglev_size(82), MAGLEV_M);
        assert_eq!(maglev_size(5000), MAGLEV_M);
        for m in MAGLEV_SIZES {
            assert!(
                (2..m).take_while(|d| d * d <= m).all(|d| m % d != 0),
                "{m} is prime"
            );
        }
    }

    /// Removing or adding one of N endpoints remaps at most 1/N of flows
    /// plus a small slack (measured over 100k synthetic flows).
    #[test]
    fn maglev_remaps_about_one_nth() {
        for n in [3usize, 5, 10, 20, 50, 200] {
            let all = ids(n);
            let before = maglev_table(&all, &vec![1; n]);
            // remove endpoint n/2
            let gone = n / 2;
            let rest: Vec<Vec<u8>> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, v)| v.clone())
                .collect();
            let after = maglev_table(&rest, &vec![1; n - 1]);
            assert_eq!(before.len(), after.len(), "n={n}: one table size");
            let mut moved = 0;
            let mut total = 0;
            for h in flows() {
                let slot = (h as usize) % before.len();
                let b = &all[before[slot] as usize];
                let a = &rest[after[slot] as usize];
                total += 1;
                if a != b {
                    moved += 1;
                }
            }
            let frac = moved as f64 / total as f64;
            let bound = 1.0 / n as f64 + 0.02;
            assert!(
                frac <= bound,
                "n={n}: {frac:.4} of flows moved, bound {bound:.4}"
            );
            // adding it back: the same bound
            let mut moved = 0;
            for h in flows() {
                let slot = (h as usize) % before.len();
                if rest[after[slot] as usize] != all[before[slot] as usize] {
                    moved += 1;
                }
            }
            assert!(moved as f64 / total as f64 <= bound);
        }
    }

    #[test]
    fn maglev_honours_weights() {
        let t = maglev_table(&ids(3), &[1, 2, 5]);
        let share: Vec<f64> = (0..3u16)
            .map(|e| t.iter().filter(|x| **x == e).count() as f64 / t.len() as f64)
            .collect();
        for (s, want) in share.iter().zip([1.0 / 8.0, 2.0 / 8.0, 5.0 / 8.0]) {
            assert!((s - want).abs() < 0.01, "share {s:.4} want {want:.4}");
        }
    }

    #[test]
    fn maglev_is_independent_of_list_order() {
        let a = ids(6);
        let mut b = a.clone();
        b.reverse();
        let ta = maglev_table(&a, &[1; 6]);
        let tb = maglev_table(&b, &[1; 6]);
        assert_eq!(ta.len(), tb.len());
        for slot in 0..ta.len() {
            assert_eq!(a[ta[slot] as usize], b[tb[slot] as usize]);
        }
    }
}

//! Where each rule's selection tables live in `LB_SEL_TABLE`: an array of
//! chunks in which every (rule, bank) holds one run of consecutive chunks,
//! so the datapath finds a table entry at `SvcVal::sel_base + pos / 32`
//! with an array read instead of a hash lookup. First fit over the free
//! runs, neighbours merged when a run is given back.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

/// The free runs of a chunk array of `size` chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelSpace {
    /// Free runs: start -> length, never adjacent (merged on release).
    free: BTreeMap<u32, u32>,
    size: u32,
}

impl SelSpace {
    /// Every chunk free.
    pub fn new(size: u32) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        SelSpace { free, size }
    }

    /// Mark `[start, start + n)` used (a run adopted maps hold); it must
    /// be free: an overlapping or out-of-range run is refused (the maps are
    /// not what this agent wrote).
    pub fn take(&mut self, start: u32, n: u32) -> Result<()> {
        let Some((&fs, &fl)) = self.free.range(..=start).next_back() else {
            bail!("selection chunks {start}+{n} are not free");
        };
        let end = start as u64 + n as u64;
        if end > fs as u64 + fl as u64 {
            bail!("selection chunks {start}+{n} are not free");
        }
        self.free.remove(&fs);
        if start > fs {
            self.free.insert(fs, start - fs);
        }
        let tail = (fs as u64 + fl as u64 - end) as u32;
        if tail > 0 {
            self.free.insert(end as u32, tail);
        }
        Ok(())
    }

    /// A run of `n` consecutive chunks (the lowest that fits).
    pub fn alloc(&mut self, n: u32) -> Result<u32> {
        if n == 0 {
            return Ok(0);
        }
        let Some((&start, _)) = self.free.iter().find(|(_, len)| **len >= n) else {
            bail!(
                "no room for a selection table of {n} chunks ({} of {} chunks free, the \
                 largest free run {}): remove rules or endpoints, or use smaller tables \
                 (hash rules take the most)",
                self.free_chunks(),
                self.size,
                self.free.values().max().copied().unwrap_or(0)
            );
        };
        self.take(start, n)?;
        Ok(start)
    }

    /// Give back the run `[start, start + n)` (from [`SelSpace::alloc`]).
    pub fn release(&mut self, start: u32, n: u32) {
        if n == 0 {
            return;
        }
        let mut start = start;
        let mut n = n;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                n += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + n)) {
            self.free.remove(&(start + n));
            n += nl;
        }
        self.free.insert(start, n);
    }

    /// Chunks not in use.
    pub fn free_chunks(&self) -> u32 {
        self.free.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_neighbours_merge_on_release() {
        let mut s = SelSpace::new(100);
        let a = s.alloc(10).unwrap();
        let b = s.alloc(20).unwrap();
        let c = s.alloc(30).unwrap();
        assert_eq!((a, b, c), (0, 10, 30));
        assert_eq!(s.free_chunks(), 40);
        // A hole of 20 at 10: a run of 25 does not fit there, 15 does.
        s.release(b, 20);
        assert_eq!(s.alloc(25).unwrap(), 60);
        assert_eq!(s.alloc(15).unwrap(), 10);
        // 5 left at 25 and 15 at 85.
        assert!(s.alloc(16).is_err());
        assert_eq!(s.alloc(15).unwrap(), 85);
        // Releasing everything merges back into one run.
        for (start, n) in [(0, 10), (10, 15), (30, 30), (60, 25), (85, 15)] {
            s.release(start, n);
        }
        assert_eq!(s, SelSpace::new(100));
        assert_eq!(s.alloc(100).unwrap(), 0);
    }

    #[test]
    fn a_full_space_says_what_is_free() {
        let mut s = SelSpace::new(10);
        s.alloc(4).unwrap();
        s.alloc(2).unwrap();
        s.release(0, 4);
        let e = s.alloc(5).unwrap_err().to_string();
        assert!(e.contains("8 of 10 chunks free"), "{e}");
        assert!(e.contains("largest free run 4"), "{e}");
        assert_eq!(s.alloc(0).unwrap(), 0, "an empty table needs no room");
    }

    #[test]
    fn adopted_runs_are_taken_and_overlaps_refused() {
        let mut s = SelSpace::new(100);
        s.take(50, 10).unwrap();
        s.take(0, 5).unwrap();
        assert_eq!(s.free_chunks(), 85);
        assert!(s.take(55, 10).is_err(), "overlaps 50+10");
        assert!(s.take(95, 10).is_err(), "beyond the end");
        assert_eq!(s.free_chunks(), 85, "a refused run takes nothing");
        assert_eq!(s.alloc(45).unwrap(), 5);
        assert_eq!(s.alloc(40).unwrap(), 60);
    }
}

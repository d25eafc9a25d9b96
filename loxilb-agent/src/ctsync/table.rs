//! The one seam between the sync and the kernel: a node's session table
//! and the rule tables it is translated through. [`PinnedTable`] works on
//! the agent's pinned maps; [`MemTable`] is the in-memory double for tests.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
use loxilb_common::{
    map_names as mn, AssocKey, AssocVal, CtKey, CtVal, EpIndex, EpKey, EpVal, SvcKey, SvcVal,
};

/// A node's conntrack table and its rules.
pub trait SessionTable: Send {
    /// Every entry of the session table.
    fn sessions(&mut self) -> Result<Vec<(CtKey, CtVal)>>;
    /// One entry (to confirm a key missing from a scan is really gone).
    fn get(&mut self, k: &CtKey) -> Result<Option<CtVal>>;
    fn put(&mut self, k: &CtKey, v: &CtVal) -> Result<()>;
    /// Remove an entry; a missing one is fine.
    fn remove(&mut self, k: &CtKey) -> Result<()>;
    fn services(&mut self) -> Result<Vec<(SvcKey, SvcVal)>>;
    fn endpoints(&mut self) -> Result<Vec<(EpKey, EpVal)>>;
    /// The clock the datapath stamps `last_seen_ns` with.
    fn now_ns(&self) -> u64;
    /// SCTP multihoming association records (`LB_SCTP_ASSOC`). The
    /// defaults are a table without any.
    fn assocs(&mut self) -> Result<Vec<(AssocKey, AssocVal)>> {
        Ok(vec![])
    }
    fn get_assoc(&mut self, _k: &AssocKey) -> Result<Option<AssocVal>> {
        Ok(None)
    }
    fn put_assoc(&mut self, _k: &AssocKey, _v: &AssocVal) -> Result<()> {
        Ok(())
    }
    fn remove_assoc(&mut self, _k: &AssocKey) -> Result<()> {
        Ok(())
    }
    /// Slot `slot` of the node's endpoint index (`LB_EP_INDEX`, at
    /// `ep_index_slot`), `None` when it is empty. The default is a table
    /// without an index (every synced one-entry session then gets a reply
    /// entry: see `Applier`).
    fn ep_index(&mut self, _slot: u32) -> Result<Option<EpIndex>> {
        Ok(None)
    }
}

/// The maps a running agent pinned in its pin directory (opened by path:
/// no access to the agent's in-memory objects is needed).
pub struct PinnedTable {
    dir: PathBuf,
    ct: BpfHashMap<MapData, CtKey, CtVal>,
    svcs: BpfHashMap<MapData, SvcKey, SvcVal>,
    eps: BpfHashMap<MapData, EpKey, EpVal>,
    assoc: BpfHashMap<MapData, AssocKey, AssocVal>,
    ep_index: Array<MapData, EpIndex>,
}

/// The map pinned as `name` in `dir`, as the type this agent expects.
fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let d = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let m = Map::from_map_data(d).with_context(|| format!("opening {}", path.display()))?;
    T::try_from(m).with_context(|| {
        format!(
            "{} is not the map this agent expects (another layout?)",
            path.display()
        )
    })
}

impl PinnedTable {
    /// Open the maps pinned in `dir` (the agent's `--pin-dir`), checking
    /// that their layout is this agent's.
    pub fn open(dir: &Path) -> Result<Self> {
        crate::datapath::PinnedMaps::open(dir)?;
        Ok(PinnedTable {
            dir: dir.to_path_buf(),
            ct: open(dir, mn::CONNTRACK)?,
            svcs: open(dir, mn::SERVICES)?,
            eps: open(dir, mn::ENDPOINTS)?,
            assoc: open(dir, mn::SCTP_ASSOC)?,
            ep_index: open(dir, mn::EP_INDEX)?,
        })
    }
}

/// Every entry of a (LRU) hash map; entries vanishing during the walk are
/// skipped.
fn read_all<K: aya::Pod, V: aya::Pod>(m: &BpfHashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    let mut v = vec![];
    for kv in m.iter() {
        match kv {
            Ok(kv) => v.push(kv),
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(v)
}

impl SessionTable for PinnedTable {
    fn sessions(&mut self) -> Result<Vec<(CtKey, CtVal)>> {
        read_all(&self.ct)
            .with_context(|| format!("reading {}/{}", self.dir.display(), mn::CONNTRACK))
    }
    fn get(&mut self, k: &CtKey) -> Result<Option<CtVal>> {
        match self.ct.get(k, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    fn put(&mut self, k: &CtKey, v: &CtVal) -> Result<()> {
        self.ct
            .insert(k, v, 0)
            .with_context(|| format!("writing {}/{}", self.dir.display(), mn::CONNTRACK))
    }
    fn remove(&mut self, k: &CtKey) -> Result<()> {
        match self.ct.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e)
                .with_context(|| format!("deleting from {}/{}", self.dir.display(), mn::CONNTRACK)),
        }
    }
    fn services(&mut self) -> Result<Vec<(SvcKey, SvcVal)>> {
        read_all(&self.svcs)
    }
    fn endpoints(&mut self) -> Result<Vec<(EpKey, EpVal)>> {
        read_all(&self.eps)
    }
    fn now_ns(&self) -> u64 {
        crate::show::monotonic_ns()
    }
    fn assocs(&mut self) -> Result<Vec<(AssocKey, AssocVal)>> {
        read_all(&self.assoc)
            .with_context(|| format!("reading {}/{}", self.dir.display(), mn::SCTP_ASSOC))
    }
    fn get_assoc(&mut self, k: &AssocKey) -> Result<Option<AssocVal>> {
        match self.assoc.get(k, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    fn put_assoc(&mut self, k: &AssocKey, v: &AssocVal) -> Result<()> {
        self.assoc
            .insert(k, v, 0)
            .with_context(|| format!("writing {}/{}", self.dir.display(), mn::SCTP_ASSOC))
    }
    fn remove_assoc(&mut self, k: &AssocKey) -> Result<()> {
        match self.assoc.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| {
                format!("deleting from {}/{}", self.dir.display(), mn::SCTP_ASSOC)
            }),
        }
    }
    fn ep_index(&mut self, slot: u32) -> Result<Option<EpIndex>> {
        let e = self
            .ep_index
            .get(&slot, 0)
            .with_context(|| format!("reading {}/{}", self.dir.display(), mn::EP_INDEX))?;
        Ok((e.proto != 0).then_some(e))
    }
}

/// What a [`MemTable`] holds (shared between clones).
#[derive(Debug, Default)]
pub struct MemState {
    pub ct: HashMap<CtKey, CtVal>,
    pub svcs: Vec<(SvcKey, SvcVal)>,
    pub eps: Vec<(EpKey, EpVal)>,
    pub assoc: HashMap<AssocKey, AssocVal>,
    /// The endpoint index's non-empty slots, by slot.
    pub ep_index: HashMap<u32, EpIndex>,
    pub now_ns: u64,
    /// Entries written, over the table's life.
    pub puts: u64,
}

/// An in-memory session table; clones share one [`MemState`].
#[derive(Clone, Debug, Default)]
pub struct MemTable(pub Arc<Mutex<MemState>>);

impl MemTable {
    pub fn with<T>(&self, f: impl FnOnce(&mut MemState) -> T) -> T {
        f(&mut self.0.lock().expect("MemTable lock"))
    }

    /// The table's clock.
    pub fn now(&self) -> u64 {
        self.with(|s| s.now_ns)
    }
}

impl SessionTable for MemTable {
    fn sessions(&mut self) -> Result<Vec<(CtKey, CtVal)>> {
        Ok(self.with(|s| s.ct.iter().map(|(k, v)| (*k, *v)).collect()))
    }
    fn get(&mut self, k: &CtKey) -> Result<Option<CtVal>> {
        Ok(self.with(|s| s.ct.get(k).copied()))
    }
    fn put(&mut self, k: &CtKey, v: &CtVal) -> Result<()> {
        self.with(|s| {
            s.puts += 1;
            s.ct.insert(*k, *v)
        });
        Ok(())
    }
    fn remove(&mut self, k: &CtKey) -> Result<()> {
        self.with(|s| s.ct.remove(k));
        Ok(())
    }
    fn services(&mut self) -> Result<Vec<(SvcKey, SvcVal)>> {
        Ok(self.with(|s| s.svcs.clone()))
    }
    fn endpoints(&mut self) -> Result<Vec<(EpKey, EpVal)>> {
        Ok(self.with(|s| s.eps.clone()))
    }
    fn now_ns(&self) -> u64 {
        self.0.lock().expect("MemTable lock").now_ns
    }
    fn assocs(&mut self) -> Result<Vec<(AssocKey, AssocVal)>> {
        Ok(self.with(|s| s.assoc.iter().map(|(k, v)| (*k, *v)).collect()))
    }
    fn get_assoc(&mut self, k: &AssocKey) -> Result<Option<AssocVal>> {
        Ok(self.with(|s| s.assoc.get(k).copied()))
    }
    fn put_assoc(&mut self, k: &AssocKey, v: &AssocVal) -> Result<()> {
        self.with(|s| s.assoc.insert(*k, *v));
        Ok(())
    }
    fn remove_assoc(&mut self, k: &AssocKey) -> Result<()> {
        self.with(|s| s.assoc.remove(k));
        Ok(())
    }
    fn ep_index(&mut self, slot: u32) -> Result<Option<EpIndex>> {
        Ok(self.with(|s| s.ep_index.get(&slot).copied().filter(|e| e.proto != 0)))
    }
}

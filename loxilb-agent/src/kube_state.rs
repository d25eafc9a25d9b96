//! What the Kubernetes controller last reported: whether this agent leads
//! (allocates addresses, writes status), how full each address pool is,
//! how many Services it knows, and how many reconciles it ran, how long
//! they took and how many failed. Published in the agent's state directory
//! (`kube.json`) when it changes, read by the metrics endpoint.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One address pool's occupancy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolState {
    pub name: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// From `--externalSecondaryCIDRs`.
    pub secondary: bool,
    /// Addresses it hands out (at most `u64::MAX`).
    pub size: u64,
    /// Of those, held by at least one Service.
    pub used: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KubeState {
    pub leader: bool,
    pub pools: Vec<PoolState>,
    /// Services of our class the controller knows.
    pub services: u64,
    /// The controller's work since start (counts only grow).
    #[serde(default)]
    pub reconcile: ReconcileCounts,
}

/// `kube_watch::reconcile::ReconcileStats`, as published.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcileCounts {
    pub reconciles: u64,
    pub conflicts: u64,
    pub errors: u64,
    pub seconds: f64,
    pub sink_errors: u64,
}

const FILE: &str = "kube.json";

impl KubeState {
    pub fn publish(&self, pin_dir: &Path) -> Result<()> {
        let dir = crate::node::state_dir(pin_dir);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("kube.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(&tmp, dir.join(FILE))?;
        Ok(())
    }

    pub fn read(pin_dir: &Path) -> Option<KubeState> {
        let text = std::fs::read_to_string(crate::node::state_dir(pin_dir).join(FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

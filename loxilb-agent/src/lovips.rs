//! The VIPs this node holds on `lo` (so that it answers ARP/ND for them),
//! with a dead-man switch: each is added with a lifetime of [`LIFETIME`]
//! and renewed every [`RENEW`] by a thread of its own. An agent that dies
//! without cleaning up (SIGKILL, a crash, the OOM killer) stops renewing,
//! and the kernel removes its VIPs within the lifetime: a node whose agent
//! is gone does not keep answering for VIPs another node took over.
//!
//! Every change goes through one lock, which the renewal also takes, so a
//! VIP given up is never renewed after it was removed.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use tracing::warn;

use crate::netlink;

/// How long a VIP stays on `lo` without renewal.
pub const LIFETIME: Duration = Duration::from_secs(3);
/// How often the held VIPs are renewed.
pub const RENEW: Duration = Duration::from_secs(1);

struct State {
    held: BTreeSet<IpAddr>,
    stopped: bool,
}

/// The VIPs on device `lo` (by index) and their renewal.
pub struct LoVips {
    lo: u32,
    state: Arc<Mutex<State>>,
}

impl LoVips {
    /// Start renewing on device `lo`, holding `held` (what a previous
    /// agent left there, kept until the caller decides).
    pub fn start(lo: u32, held: BTreeSet<IpAddr>) -> Result<LoVips> {
        let state = Arc::new(Mutex::new(State {
            held,
            stopped: false,
        }));
        let s = state.clone();
        std::thread::Builder::new()
            .name("lo-vips".into())
            .spawn(move || renew(lo, &s))
            .context("starting the VIP renewal thread")?;
        Ok(LoVips { lo, state })
    }

    /// Put `vip` on `lo` (with its lifetime).
    pub fn add(&self, vip: IpAddr) -> Result<()> {
        let mut st = self.state.lock().expect("lo-vips lock");
        netlink::add_addr_for(self.lo, vip, Some(LIFETIME))?;
        st.held.insert(vip);
        Ok(())
    }

    /// Take `vip` off `lo` (it is no longer renewed, removed or not).
    pub fn remove(&self, vip: IpAddr) -> Result<()> {
        let mut st = self.state.lock().expect("lo-vips lock");
        st.held.remove(&vip);
        netlink::del_addr(self.lo, vip)
    }

    /// The VIPs held.
    pub fn held(&self) -> BTreeSet<IpAddr> {
        self.state.lock().expect("lo-vips lock").held.clone()
    }

    /// Stop renewing (the VIPs stay until removed or their lifetime ends).
    pub fn stop(&self) {
        let mut st = self.state.lock().expect("lo-vips lock");
        st.stopped = true;
        st.held.clear();
    }
}

impl Drop for LoVips {
    fn drop(&mut self) {
        self.stop();
    }
}

fn renew(lo: u32, state: &Mutex<State>) {
    loop {
        std::thread::sleep(RENEW);
        let st = state.lock().expect("lo-vips lock");
        if st.stopped {
            return;
        }
        for v in &st.held {
            if let Err(e) = netlink::add_addr_for(lo, *v, Some(LIFETIME)) {
                warn!(vip = %v, "renewing the VIP on lo: {e:#}");
            }
        }
    }
}

//! The VIPs this node holds on `lo` (so that it answers ARP/ND for them),
//! with a dead-man switch: each is added with a lifetime (see
//! [`lifetime_for`]: [`LIFETIME`] with the default Lease, down to
//! [`MIN_LIFETIME`] with a sub-second one) and renewed four times per
//! lifetime by a thread of its own. An agent that dies
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

/// How long a VIP stays on `lo` without renewal, at most (the default
/// 4 s Lease's).
pub const LIFETIME: Duration = Duration::from_secs(3);
/// The shortest lifetime: the kernel counts lifetimes in seconds and
/// checks them about once a second.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// The VIPs' lifetime with a Lease of `lease_duration`: its duration in
/// whole seconds (rounded up) within [`MIN_LIFETIME`, `LIFETIME`], so a
/// killed agent's VIPs leave its node about when a backup may take them
/// over (with a 600 ms Lease: 1 s, gone 1-2 s after the kill).
pub fn lifetime_for(lease_duration: Duration) -> Duration {
    let secs = lease_duration.as_secs() + u64::from(lease_duration.subsec_nanos() > 0);
    Duration::from_secs(secs).clamp(MIN_LIFETIME, LIFETIME)
}

struct State {
    held: BTreeSet<IpAddr>,
    stopped: bool,
}

/// The VIPs on device `lo` (by index) and their renewal.
pub struct LoVips {
    lo: u32,
    lifetime: Duration,
    state: Arc<Mutex<State>>,
}

impl LoVips {
    /// Start renewing on device `lo`, holding `held` (what a previous
    /// agent left there, kept until the caller decides); each VIP is given
    /// `lifetime` and renewed every quarter of it.
    pub fn start(lo: u32, held: BTreeSet<IpAddr>, lifetime: Duration) -> Result<LoVips> {
        let state = Arc::new(Mutex::new(State {
            held,
            stopped: false,
        }));
        let s = state.clone();
        std::thread::Builder::new()
            .name("lo-vips".into())
            .spawn(move || renew(lo, lifetime, &s))
            .context("starting the VIP renewal thread")?;
        Ok(LoVips {
            lo,
            lifetime,
            state,
        })
    }

    /// Put `vip` on `lo` (with its lifetime).
    pub fn add(&self, vip: IpAddr) -> Result<()> {
        let mut st = self.state.lock().expect("lo-vips lock");
        netlink::add_addr_for(self.lo, vip, Some(self.lifetime))?;
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

fn renew(lo: u32, lifetime: Duration, state: &Mutex<State>) {
    loop {
        std::thread::sleep(lifetime / 4);
        let st = state.lock().expect("lo-vips lock");
        if st.stopped {
            return;
        }
        for v in &st.held {
            if let Err(e) = netlink::add_addr_for(lo, *v, Some(lifetime)) {
                warn!(vip = %v, "renewing the VIP on lo: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifetime_follows_the_lease() {
        let ms = Duration::from_millis;
        assert_eq!(lifetime_for(ms(600)), MIN_LIFETIME);
        assert_eq!(lifetime_for(ms(1000)), Duration::from_secs(1));
        assert_eq!(lifetime_for(ms(1001)), Duration::from_secs(2));
        assert_eq!(lifetime_for(ms(2500)), Duration::from_secs(3));
        assert_eq!(lifetime_for(Duration::from_secs(4)), LIFETIME);
        assert_eq!(lifetime_for(Duration::from_secs(15)), LIFETIME);
    }
}

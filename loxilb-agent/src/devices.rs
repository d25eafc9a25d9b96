//! How translated packets leave through each device: XDP redirect where
//! it can deliver, the kernel stack everywhere else.
//!
//! XDP can transmit only through a device whose driver takes XDP frames
//! (`ndo_xdp_xmit`; for a veth, when its peer runs an XDP program or has
//! GRO on). A frame redirected anywhere else — a Linux bridge, a bond, a
//! VLAN or tunnel device, a veth into a plain pod — is dropped by the
//! kernel without a trace. So the agent classifies every device of the
//! namespace ([`classify`]) from its kind and its XDP features, writes the
//! result to `LB_DEV_FWD`, and again whenever a link or its XDP features
//! change ([`watch`]); the datapath redirects only through devices marked
//! `REDIRECT` and hands the rest to the stack (counted as
//! `fwd_stack_device`). A bridge is left to the stack (it forwards through
//! its FDB), as are bonds, VLANs and tunnels, whose stack path carries
//! their own logic (hashing, tagging, encapsulation).

use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::{bail, Result};
use loxilb_common::{dev_fwd, DevFwd};
use tracing::{info, warn};

use crate::netlink::{self, Link, XDP_ACT_NDO_XMIT};

/// `--forward`: how translated packets leave the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardMode {
    /// Per device: XDP redirect where it delivers, else the stack.
    Auto,
    /// Like `auto`, and every attached interface must take XDP redirects
    /// (the agent refuses to start otherwise).
    Xdp,
    /// Always the kernel stack (`--forward-via-stack`).
    Stack,
}

/// The forwarding of one device: from its kind, state and XDP features
/// (`None`: unknown, e.g. a kernel without the `netdev` family). What XDP
/// can do there, whatever `--forward` says: `--forward=stack` is a global
/// switch of the datapath (DSR frames, which the stack cannot send, still
/// use XDP where the device allows).
pub fn classify(link: &Link, features: Option<u64>) -> DevFwd {
    let mut name = [0u8; 16];
    let n = link.name.len().min(15);
    name[..n].copy_from_slice(&link.name.as_bytes()[..n]);
    let stack = |why| DevFwd {
        mode: dev_fwd::STACK,
        why,
        name,
    };
    if !link.up || link.loopback {
        return stack(dev_fwd::WHY_DOWN);
    }
    let veth = match link.kind.as_deref() {
        None => false,
        Some("veth") => true,
        Some("bridge") => return stack(dev_fwd::WHY_BRIDGE),
        Some(_) => return stack(dev_fwd::WHY_VIRTUAL),
    };
    if features.is_some_and(|f| f & XDP_ACT_NDO_XMIT != 0) {
        DevFwd {
            mode: dev_fwd::REDIRECT,
            why: dev_fwd::WHY_XMIT_OK,
            name,
        }
    } else if veth {
        stack(dev_fwd::WHY_VETH_PEER)
    } else {
        stack(dev_fwd::WHY_NO_XMIT)
    }
}

/// The words for a device's forwarding, e.g. `xdp redirect (takes XDP
/// frames (ndo_xdp_xmit))` or `stack (bridge ...)`.
pub fn describe(d: &DevFwd) -> String {
    let how = if d.mode == dev_fwd::REDIRECT {
        "xdp redirect"
    } else {
        "stack"
    };
    let why = dev_fwd::WHY_NAMES
        .get(d.why as usize)
        .copied()
        .unwrap_or("?");
    format!("{how} ({why})")
}

/// The device name a [`DevFwd`] carries.
pub fn name_of(d: &DevFwd) -> String {
    let end = d.name.iter().position(|b| *b == 0).unwrap_or(d.name.len());
    String::from_utf8_lossy(&d.name[..end]).into_owned()
}

/// Every device of the namespace, classified.
pub fn survey() -> Result<Vec<(Link, DevFwd)>> {
    let links = netlink::links()?;
    let feats = match netlink::xdp_features() {
        Ok(f) => Some(f),
        Err(e) => {
            warn!("cannot read XDP features ({e:#}); every device is handed to the stack");
            None
        }
    };
    Ok(links
        .into_iter()
        .map(|l| {
            let f = feats
                .as_ref()
                .map(|f| f.get(&l.index).copied().unwrap_or(0));
            let d = classify(&l, f);
            (l, d)
        })
        .collect())
}

/// `--forward=xdp`: every attached interface must take XDP redirects
/// (replies and requests leave through them); refuse otherwise, saying
/// which and why.
pub fn check_attached(ifaces: &[String], devs: &[(Link, DevFwd)], mode: ForwardMode) -> Result<()> {
    if mode != ForwardMode::Xdp {
        return Ok(());
    }
    let mut bad = vec![];
    for i in ifaces {
        match devs.iter().find(|(l, _)| &l.name == i) {
            Some((_, d)) if d.mode == dev_fwd::REDIRECT => {}
            Some((_, d)) => bad.push(format!("{i}: {}", describe(d))),
            None => bad.push(format!("{i}: no such device")),
        }
    }
    if !bad.is_empty() {
        bail!(
            "--forward=xdp: XDP redirect cannot deliver through {}; use --forward=auto (the stack \
             forwards through those devices), or make them XDP targets (a veth's peer needs an XDP \
             program or GRO: `ethtool -K <peer> gro on`)",
            bad.join("; ")
        );
    }
    Ok(())
}

/// Log each device's forwarding (at start) or each change (`prev`).
pub fn log_changes(devs: &[(Link, DevFwd)], prev: &HashMap<u32, DevFwd>) {
    for (l, d) in devs {
        match prev.get(&l.index) {
            Some(p) if p == d => {}
            Some(_) => info!(device = %l.name, "forwarding now: {}", describe(d)),
            None => info!(device = %l.name, "forwarding: {}", describe(d)),
        }
    }
}

/// Keep `LB_DEV_FWD` (pinned in `pin_dir`) up to date: re-classify on
/// every link event and XDP feature change, and every 10 s in case a
/// notice was missed. Runs on its own thread for the agent's lifetime.
pub fn watch(pin_dir: &Path, mut known: HashMap<u32, DevFwd>) -> Result<()> {
    let mut events = netlink::LinkEvents::open()?;
    let path = pin_dir.join(loxilb_common::map_names::DEV_FWD);
    std::thread::Builder::new()
        .name("device-watch".into())
        .spawn(move || loop {
            if events.wait(Duration::from_secs(10)) {
                // Let a burst (a device created and configured) settle.
                std::thread::sleep(Duration::from_millis(50));
                while events.wait(Duration::from_millis(0)) {}
            }
            let devs = match survey() {
                Ok(d) => d,
                Err(e) => {
                    warn!("cannot list the network devices: {e:#}");
                    continue;
                }
            };
            let now: HashMap<u32, DevFwd> = devs.iter().map(|(l, d)| (l.index, *d)).collect();
            if now == known {
                continue;
            }
            log_changes(&devs, &known);
            match crate::datapath::write_dev_fwd_pinned(&path, &now) {
                Ok(()) => known = now,
                Err(e) => {
                    if !path.exists() {
                        return; // the agent is exiting (maps unpinned)
                    }
                    warn!("cannot update {}: {e:#}", path.display());
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(kind: Option<&str>, up: bool) -> Link {
        Link {
            index: 7,
            name: "x".into(),
            kind: kind.map(str::to_string),
            up,
            loopback: false,
            mac: None,
        }
    }

    #[test]
    fn only_devices_that_take_xdp_frames_get_redirects() {
        let ok = Some(XDP_ACT_NDO_XMIT | 1 | 2);
        let no = Some(1 | 2);
        let r = |d: DevFwd| (d.mode, d.why);
        use dev_fwd::*;
        assert_eq!(r(classify(&link(None, true), ok)), (REDIRECT, WHY_XMIT_OK));
        assert_eq!(
            r(classify(&link(Some("veth"), true), ok)),
            (REDIRECT, WHY_XMIT_OK)
        );
        assert_eq!(
            r(classify(&link(Some("veth"), true), no)),
            (STACK, WHY_VETH_PEER)
        );
        assert_eq!(r(classify(&link(None, true), no)), (STACK, WHY_NO_XMIT));
        assert_eq!(r(classify(&link(None, true), None)), (STACK, WHY_NO_XMIT));
        // Kinds the stack must handle, whatever their features say (a
        // bond advertises ndo_xdp_xmit when its slaves do).
        assert_eq!(
            r(classify(&link(Some("bridge"), true), ok)),
            (STACK, WHY_BRIDGE)
        );
        for k in [
            "bond",
            "vlan",
            "macvlan",
            "vxlan",
            "dummy",
            "wireguard",
            "team",
        ] {
            assert_eq!(
                r(classify(&link(Some(k), true), ok)),
                (STACK, WHY_VIRTUAL),
                "{k}"
            );
        }
        assert_eq!(r(classify(&link(None, false), ok)), (STACK, WHY_DOWN));
        let mut lo = link(None, true);
        lo.loopback = true;
        assert_eq!(r(classify(&lo, ok)), (STACK, WHY_DOWN));
    }

    #[test]
    fn the_name_travels_with_the_decision() {
        let mut l = link(None, true);
        l.name = "a-very-long-device-name".into();
        assert_eq!(name_of(&classify(&l, None)), "a-very-long-dev");
        l.name = "eth0".into();
        assert_eq!(name_of(&classify(&l, None)), "eth0");
    }

    #[test]
    fn forward_xdp_refuses_attached_devices_it_cannot_reach() {
        let mut a = link(Some("veth"), true);
        a.name = "lb0".into();
        let mut b = link(Some("bridge"), true);
        b.name = "br1".into();
        b.index = 8;
        let devs = vec![
            (a.clone(), classify(&a, Some(XDP_ACT_NDO_XMIT))),
            (b.clone(), classify(&b, Some(0))),
        ];
        let ifs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_attached(&ifs(&["lb0"]), &devs, ForwardMode::Xdp).is_ok());
        let e = check_attached(&ifs(&["lb0", "br1"]), &devs, ForwardMode::Xdp)
            .unwrap_err()
            .to_string();
        assert!(e.contains("br1: stack (bridge"), "{e}");
        assert!(e.contains("--forward=auto"), "{e}");
        let e = check_attached(&ifs(&["nope"]), &devs, ForwardMode::Xdp)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope: no such device"), "{e}");
        // auto accepts anything: the stack takes what XDP cannot.
        assert!(check_attached(&ifs(&["br1"]), &devs, ForwardMode::Auto).is_ok());
    }
}

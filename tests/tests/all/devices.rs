//! Forwarding per egress device: real devices classified by what XDP can
//! transmit through (veth with and without a receiving peer, bridge,
//! macvlan, VXLAN, down), the datapath handing packets for a device XDP
//! cannot reach to the stack untouched by the forwarding step (a packet
//! table), and the VIP addresses the agent marks as its own.

use loxilb_agent::{
    devices::{self, ForwardMode},
    netlink,
};
use loxilb_common::{dev_fwd, DevFwd};
use loxilb_tests::tables::expect_frame;
use loxilb_tests::{
    fib::{self, run_tc, run_xdp, verdict, EP1_MAC, LB_TO_EP_MAC},
    need_root,
    netns::{counter, sh, Netns},
    packet::{diff, Frame, SYN},
};

fn by_name(devs: &[(netlink::Link, DevFwd)], name: &str) -> DevFwd {
    devs.iter()
        .find(|(l, _)| l.name == name)
        .unwrap_or_else(|| panic!("{name} not listed in {devs:?}"))
        .1
}

#[test]
fn devices_are_classified_by_what_xdp_can_transmit_through() {
    if !need_root("devices_are_classified_by_what_xdp_can_transmit_through") {
        return;
    }
    let ns = Netns::new(&format!("lxdev-{}", std::process::id())).unwrap();
    for cmd in [
        "ip link add v0 type veth peer name v0p",
        "ip link add v1 type veth peer name v1p",
        "ip link add br0 type bridge",
        // (this kernel has no 802.1Q nor bonding: a macvlan and a VXLAN
        // device stand for the virtual devices; the unit tests cover the
        // kinds by name)
        "ip link add link v1 name mv0 type macvlan mode bridge",
        "ip link add vx0 type vxlan id 42 dstport 4789 local 10.99.0.1",
        "ip link add v2 type veth peer name v2p",
    ] {
        ns.sh(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    for d in ["v0", "v0p", "v1", "v1p", "br0", "mv0", "vx0"] {
        ns.sh(&["ip", "link", "set", d, "up"]).unwrap();
    }
    // v2 stays down. v0's peer has GRO on (it takes XDP frames); v1's
    // peer has neither GRO nor an XDP program.
    ns.sh(&["ethtool", "-K", "v0p", "gro", "on"]).unwrap();
    ns.sh(&["ethtool", "-K", "v1p", "gro", "off"]).unwrap();
    let devs = ns.run(|| devices::survey().unwrap());
    let m = |n: &str| {
        let d = by_name(&devs, n);
        (d.mode, d.why)
    };
    assert_eq!(m("v0"), (dev_fwd::REDIRECT, dev_fwd::WHY_XMIT_OK));
    assert_eq!(m("v1"), (dev_fwd::STACK, dev_fwd::WHY_VETH_PEER));
    assert_eq!(m("br0"), (dev_fwd::STACK, dev_fwd::WHY_BRIDGE));
    assert_eq!(m("mv0"), (dev_fwd::STACK, dev_fwd::WHY_VIRTUAL));
    assert_eq!(m("vx0"), (dev_fwd::STACK, dev_fwd::WHY_VIRTUAL));
    assert_eq!(m("v2"), (dev_fwd::STACK, dev_fwd::WHY_DOWN));
    assert_eq!(m("lo"), (dev_fwd::STACK, dev_fwd::WHY_DOWN));
    // Turning GRO on at v1's peer makes v1 a redirect target.
    ns.sh(&["ethtool", "-K", "v1p", "gro", "on"]).unwrap();
    let devs = ns.run(|| devices::survey().unwrap());
    assert_eq!(by_name(&devs, "v1").mode, dev_fwd::REDIRECT);
    // --forward=xdp refuses an attached bridge, naming it.
    let devs = ns.run(|| devices::survey().unwrap());
    let e = devices::check_attached(&["v0".into(), "br0".into()], &devs, ForwardMode::Xdp)
        .unwrap_err()
        .to_string();
    assert!(e.contains("br0: stack (bridge"), "{e}");
}

#[test]
fn vips_on_lo_are_marked_as_the_agents_own() {
    if !need_root("vips_on_lo_are_marked_as_the_agents_own") {
        return;
    }
    let ns = Netns::new(&format!("lxvip-{}", std::process::id())).unwrap();
    // An address the operator put there is never the agent's.
    ns.sh(&["ip", "addr", "add", "192.0.2.50/32", "dev", "lo"])
        .unwrap();
    let (listed, after_del) = ns.run(|| {
        let lo = netlink::ifindex("lo").unwrap();
        netlink::add_addr(lo, "192.0.2.1".parse().unwrap()).unwrap();
        netlink::add_addr(lo, "2001:db8::1".parse().unwrap()).unwrap();
        // Again: replacing is fine.
        netlink::add_addr(lo, "192.0.2.1".parse().unwrap()).unwrap();
        let mut listed = netlink::marked_addrs(lo).unwrap();
        listed.sort();
        netlink::del_addr(lo, "192.0.2.1".parse().unwrap()).unwrap();
        // Already gone: fine.
        netlink::del_addr(lo, "192.0.2.1".parse().unwrap()).unwrap();
        (listed, netlink::marked_addrs(lo).unwrap())
    });
    assert_eq!(
        listed,
        vec![
            "192.0.2.1".parse::<std::net::IpAddr>().unwrap(),
            "2001:db8::1".parse().unwrap()
        ]
    );
    assert_eq!(
        after_del,
        vec!["2001:db8::1".parse::<std::net::IpAddr>().unwrap()]
    );
    let shown = ns.sh(&["ip", "addr", "show", "dev", "lo"]).unwrap();
    assert!(shown.contains("192.0.2.50/32"), "{shown}");
    assert!(shown.contains("2001:db8::1/128"), "{shown}");
    assert!(!shown.contains("192.0.2.1/32"), "{shown}");
}

const RULES: &str = r#"
rules:
  - name: web
    vip: 20.0.0.100
    port: 80
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.10, port: 8080 }
"#;

/// Toward a device XDP cannot transmit through, the translated packet is
/// handed to the stack with its MACs and TTL as they came (the stack
/// routes it: a rewritten destination MAC would make it drop the frame as
/// not addressed to this host), and counted; once the device takes XDP
/// frames again, the same flow is redirected. TC redirects through any
/// device.
#[test]
fn packets_for_a_device_xdp_cannot_reach_go_to_the_stack_untouched() {
    if !need_root("packets_for_a_device_xdp_cannot_reach_go_to_the_stack_untouched") {
        return;
    }
    fib::with_datapath_rules("devstack", RULES, |dp, _| {
        // d0 (toward the endpoints) stops taking XDP frames.
        sh(&["ethtool", "-K", "d0p", "gro", "off"]).unwrap();
        let devs = dp.update_devices().unwrap();
        assert_eq!(by_name(&devs, "d0").why, dev_fwd::WHY_VETH_PEER);
        let syn = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
        let dnat = syn.with("192.168.0.2", 40000, "10.0.1.10", 8080);
        let (v, out) = run_xdp(dp, &syn.bytes());
        assert_eq!(v, verdict::XDP_PASS);
        assert_eq!(
            out,
            dnat.bytes(),
            "translated, MACs and TTL untouched:\n{}",
            diff(&out, &dnat.bytes())
        );
        let stats = loxilb_agent::show::stats_table(&dp.stats().unwrap());
        assert_eq!(counter(&stats, "fwd_stack_device"), 1, "{stats}");
        assert_eq!(counter(&stats, "fwd_redirect"), 0, "{stats}");
        // The TC hook's redirect is an ordinary transmit: it may go.
        let (v, out) = run_tc(dp, &syn.bytes());
        let routed = dnat.routed(LB_TO_EP_MAC, EP1_MAC).bytes();
        assert_eq!(v, verdict::TC_ACT_REDIRECT);
        expect_frame("TC redirect", &out, &routed);
        // GRO back on: the next packet of the flow is redirected by XDP.
        sh(&["ethtool", "-K", "d0p", "gro", "on"]).unwrap();
        let devs = dp.update_devices().unwrap();
        assert_eq!(by_name(&devs, "d0").mode, dev_fwd::REDIRECT);
        let (v, out) = run_xdp(dp, &syn.bytes());
        assert_eq!(v, verdict::XDP_REDIRECT);
        expect_frame("XDP redirect with GRO on", &out, &routed);
    });
}

//! A network namespace whose FIB routes the packet-table and benchmark
//! packets (so `bpf_fib_lookup` succeeds under BPF_PROG_TEST_RUN), and the
//! MAC addresses its interfaces and neighbours use.

use crate::netns::Netns;

/// Verdicts BPF_PROG_TEST_RUN returns (XDP actions; TC actions).
pub mod verdict {
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_REDIRECT: u32 = 7;
}

/// MAC of the load balancer's interface towards the endpoints (d0).
pub const LB_TO_EP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xd0, 0x01];
/// Neighbour entry of endpoint 10.0.1.10.
pub const EP1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0a];
/// Neighbour entry of endpoint 10.0.1.11.
pub const EP2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0b];
/// MAC of the load balancer's interface towards the client (d1).
pub const LB_TO_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xd1, 0x01];
/// Neighbour entry of the client 192.168.0.2 (also `Frame`'s default source MAC).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A namespace whose FIB can route the test packets: endpoints behind d0
/// (10.0.1.10/11, fd00:1::10/11), the client behind d1 (192.168.0.2,
/// fd00:c::2), neighbours resolved, forwarding on for both families.
pub fn fib_netns(name: &str) -> Netns {
    let ns = Netns::new(name).expect("netns");
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for cmd in [
        // (no dummy module in this kernel: veth pairs with both ends here)
        vec![
            "ip",
            "link",
            "add",
            "d0",
            "address",
            &mac(LB_TO_EP_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "d0p",
        ],
        vec![
            "ip",
            "link",
            "add",
            "d1",
            "address",
            &mac(LB_TO_CLIENT_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "d1p",
        ],
        vec!["ip", "link", "set", "d0p", "up"],
        vec!["ip", "link", "set", "d1p", "up"],
        // GRO on the peers makes d0 and d1 take XDP frames (a NAPI context
        // on the receiving end), so the agent marks them for redirect.
        vec!["ethtool", "-K", "d0p", "gro", "on"],
        vec!["ethtool", "-K", "d1p", "gro", "on"],
        vec!["ip", "addr", "add", "10.0.1.1/24", "dev", "d0"],
        vec!["ip", "addr", "add", "192.168.0.1/24", "dev", "d1"],
        vec!["ip", "link", "set", "d0", "up"],
        vec!["ip", "link", "set", "d1", "up"],
        vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        // IPv6: the same layout (endpoints fd00:1::10/11 behind d0, the
        // client fd00:c::2 behind d1); `nodad` so the addresses are usable
        // at once.
        vec!["ip", "addr", "add", "fd00:1::1/64", "dev", "d0", "nodad"],
        vec!["ip", "addr", "add", "fd00:c::1/64", "dev", "d1", "nodad"],
        vec!["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
    ] {
        ns.sh(&cmd).unwrap();
    }
    // Neighbours, resolved for good: (address, MAC, device).
    let neighbours = [
        ("10.0.1.10", EP1_MAC, "d0"),
        ("10.0.1.11", EP2_MAC, "d0"),
        ("192.168.0.2", CLIENT_MAC, "d1"),
        ("fd00:1::10", EP1_MAC, "d0"),
        ("fd00:1::11", EP2_MAC, "d0"),
        ("fd00:c::2", CLIENT_MAC, "d1"),
    ];
    for (addr, m, dev) in neighbours {
        ns.sh(&[
            "ip",
            "neigh",
            "add",
            addr,
            "lladdr",
            &mac(m),
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    ns
}

/// Load the datapath inside a fresh [`fib_netns`], apply `rules` (a rule
/// file's text) through the agent's own reconciler, and run `f` on the
/// thread that lives in that namespace (BPF_PROG_TEST_RUN uses the
/// caller's namespace for the FIB lookup). The namespace goes afterwards.
pub fn with_datapath(
    tag: &str,
    rules: &str,
    f: impl FnOnce(&mut loxilb_agent::datapath::Datapath) + Send + 'static,
) {
    with_datapath_rules(tag, rules, |dp, _| f(dp))
}

/// [`with_datapath`], also handing `f` the reconciler (to apply new rule
/// files mid-test) and the namespace's name (for extra routes).
pub fn with_datapath_rules(
    tag: &str,
    rules: &str,
    f: impl FnOnce(&mut loxilb_agent::datapath::Datapath, &mut loxilb_agent::rules::Rules)
        + Send
        + 'static,
) {
    let ns = fib_netns(&format!("lxpt-{tag}-{}", std::process::id()));
    let path = format!("/var/run/netns/{}", ns.name);
    let rules = rules.to_string();
    let r = std::thread::spawn(move || {
        crate::netns::enter(&path).unwrap();
        let mut dp = load_datapath();
        let rules = loxilb_agent::config::parse("test-rules.yaml", &rules).unwrap();
        let mut r = loxilb_agent::rules::Rules::adopt(vec![]);
        r.apply(&rules, &mut dp).unwrap();
        f(&mut dp, &mut r);
    })
    .join();
    drop(ns);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// Load the datapath in the calling thread's namespace (a [`fib_netns`])
/// and classify its devices as the agent does, so XDP redirects through
/// d0 and d1; the namespace's routing is plain, so new sessions use the
/// next hop kept per endpoint, as the agent sets it.
pub fn load_datapath() -> loxilb_agent::datapath::Datapath {
    let mut dp = loxilb_agent::datapath::Datapath::load(None).expect("load datapath");
    dp.check_routing().expect("read the namespace's routing");
    assert!(
        dp.config().unwrap().flags & loxilb_common::cfg_flags::EP_NH_CACHE != 0,
        "a new namespace's routing is plain"
    );
    let devs = dp.update_devices().expect("classify devices");
    for d in ["d0", "d1"] {
        let (_, f) = devs
            .iter()
            .find(|(l, _)| l.name == d)
            .unwrap_or_else(|| panic!("{d} not listed"));
        assert_eq!(
            f.mode,
            loxilb_common::dev_fwd::REDIRECT,
            "{d} must take XDP redirects"
        );
    }
    dp
}

/// Run the XDP datapath once on `input`: (verdict, output bytes).
pub fn run_xdp(dp: &mut loxilb_agent::datapath::Datapath, input: &[u8]) -> (u32, Vec<u8>) {
    run_prog(dp, loxilb_common::prog_names::XDP_MAIN, input)
}

/// Run the TC (ingress) datapath once on `input`: (verdict, output bytes).
pub fn run_tc(dp: &mut loxilb_agent::datapath::Datapath, input: &[u8]) -> (u32, Vec<u8>) {
    test_run(dp.tc_program().unwrap(), input)
}

/// Run one of the object's XDP programs once on `input`.
pub fn run_prog(
    dp: &mut loxilb_agent::datapath::Datapath,
    name: &str,
    input: &[u8],
) -> (u32, Vec<u8>) {
    test_run(dp.xdp_program(name).unwrap(), input)
}

fn test_run<P>(prog: &P, input: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> aya::programs::TestRun<
        Opts<'a> = aya::programs::TestRunOptions<'a>,
        Result = aya::programs::TestRunResult,
    >,
{
    use aya::programs::TestRunOptions;
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// Destination address and port of an untagged Ethernet/IPv4/TCP-or-UDP
/// frame without IP options.
pub fn dst_of(frame: &[u8]) -> (std::net::Ipv4Addr, u16) {
    let a = std::net::Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    (a, u16::from_be_bytes([frame[36], frame[37]]))
}

/// Source address and port of such a frame.
pub fn src_of(frame: &[u8]) -> (std::net::Ipv4Addr, u16) {
    let a = std::net::Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    (a, u16::from_be_bytes([frame[34], frame[35]]))
}

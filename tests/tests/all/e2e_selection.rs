//! Endpoint selection with real traffic through the XDP datapath: `hash`
//! keeps a flow on its backend after its session is gone and across the
//! removal of another backend; `persist` keeps a client on one backend
//! across new flows and session expiry; weights split flows in proportion.
//! UDP from fixed client ports: the same 5-tuple can be sent again at will
//! (TCP would meet TIME_WAIT).

use std::{collections::BTreeMap, net::UdpSocket, time::Duration};

use loxilb_tests::{
    need_root,
    netns::{parse_reply, Agent, Netns, Scene, Topology, VIP},
};

/// One UDP request from `port` on the client to the VIP: the backend that
/// answered.
fn ask_from(ns: &Netns, port: u16) -> String {
    let to: std::net::SocketAddr = format!("{VIP}:53").parse().unwrap();
    ns.run(move || {
        let u = UdpSocket::bind(("0.0.0.0", port)).expect("bind the client port");
        u.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        for _ in 0..4 {
            u.send_to(b"which", to).unwrap();
            let mut b = [0u8; 512];
            if let Ok((n, _)) = u.recv_from(&mut b) {
                return parse_reply(&String::from_utf8_lossy(&b[..n]))
                    .unwrap()
                    .backend;
            }
        }
        panic!("no reply to the flow from port {port}");
    })
}

fn rules(t: &Topology, selection: &str, backends: &[(usize, u16)]) -> String {
    let eps: String = backends
        .iter()
        .map(|(i, w)| {
            format!(
                "      - {{ ip: {}, port: 5353, weight: {w} }}\n",
                t.backend_ip(*i)
            )
        })
        .collect();
    // (persist_timeout applies to persist only; the rule file says so.)
    let persist = if selection == "persist" {
        "    persist_timeout: 3600\n"
    } else {
        ""
    };
    format!(
        "rules:\n  - name: dns\n    vip: {VIP}\n    port: 53\n    protocol: udp\n    selection: {selection}\n    timeout: 1\n{persist}    endpoints:\n{eps}"
    )
}

fn scene(prefix: &str, selection: &str, backends: &[(usize, u16)]) -> Scene {
    let b = backends.to_vec();
    let sel = selection.to_string();
    Scene::new(
        prefix,
        3,
        (8080, 5353),
        |_, _| {},
        move |t| rules(t, &sel, &b),
    )
}

/// Let every session idle out (rule timeout 1 s).
fn expire() {
    std::thread::sleep(Duration::from_millis(2500));
}

#[test]
fn hash_keeps_flows_after_expiry_and_across_a_backend_removal() {
    if !need_root("hash_keeps_flows_after_expiry_and_across_a_backend_removal") {
        return;
    }
    let all = [(1, 1), (2, 1), (3, 1)];
    let e = scene("lxsh", "hash", &all);
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let ports: Vec<u16> = (41000..41045).collect();
    let before: BTreeMap<u16, String> = ports
        .iter()
        .map(|p| (*p, ask_from(&e.t.client, *p)))
        .collect();
    let used: std::collections::BTreeSet<&String> = before.values().collect();
    assert_eq!(
        used.len(),
        3,
        "hash spreads flows over every backend: {before:?}"
    );
    expire();
    for p in &ports {
        assert_eq!(
            ask_from(&e.t.client, *p),
            before[p],
            "flow {p} after its session expired"
        );
    }
    // Backend 3 goes: its flows move, the others' stay.
    agent.reload(&e.cfg, &rules(&e.t, "hash", &all[..2]));
    expire();
    let mut kept = 0;
    let mut others = 0;
    for p in &ports {
        let now = ask_from(&e.t.client, *p);
        assert_ne!(now, "b3", "flow {p} still on the removed backend");
        if before[p] != "b3" {
            others += 1;
            if now == before[p] {
                kept += 1;
            }
        }
    }
    assert!(
        kept * 100 >= others * 90,
        "Maglev moves few flows of the remaining backends: {kept} of {others} kept"
    );
    agent.stop().unwrap();
}

#[test]
fn persist_keeps_a_client_on_one_backend() {
    if !need_root("persist_keeps_a_client_on_one_backend") {
        return;
    }
    let e = scene("lxsp", "persist", &[(1, 1), (2, 1), (3, 1)]);
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let first = ask_from(&e.t.client, 42000);
    for p in 42001..42020 {
        assert_eq!(ask_from(&e.t.client, p), first, "new flow from port {p}");
    }
    expire();
    assert_eq!(
        ask_from(&e.t.client, 42100),
        first,
        "affinity outlives the sessions"
    );
    agent.stop().unwrap();
}

#[test]
fn weights_split_new_flows_in_proportion() {
    if !need_root("weights_split_new_flows_in_proportion") {
        return;
    }
    let e = scene("lxsw", "rr", &[(1, 3), (2, 1)]);
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let mut count: BTreeMap<String, u32> = BTreeMap::new();
    for p in 43000..43040 {
        *count.entry(ask_from(&e.t.client, p)).or_default() += 1;
    }
    let b1 = count.get("b1").copied().unwrap_or(0);
    let b2 = count.get("b2").copied().unwrap_or(0);
    assert_eq!(b1 + b2, 40, "{count:?}");
    assert!(
        (28..=32).contains(&b1),
        "weights 3:1 over 40 flows: {count:?}"
    );
    agent.stop().unwrap();
}

//! The agent as a whole, with real traffic and real peers: health probes
//! take a dead backend out of service and bring it back; BGP announces the
//! VIPs of the rule file to a GoBGP router and withdraws removed ones.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use loxilb_tests::{
    bgp_peer::{eventually, veth, GobgpNeighbor, GobgpPeer, Listen},
    need_root,
    netns::{Agent, Conn, Netns, Scene, Topology, VIP},
};

fn rules(t: &Topology, backends: &[usize], probe: bool, vips: &[&str]) -> String {
    let mut out = String::from("rules:\n");
    for vip in vips {
        out += &format!("  - name: web-{vip}\n    vip: {vip}\n    port: 80\n    protocol: tcp\n    endpoints:\n");
        for i in backends {
            out += &format!("      - {{ ip: {}, port: 8080 }}\n", t.backend_ip(*i));
        }
        if probe {
            out += "    probe: { type: tcp, timeout: 0.3, interval: 0.3, retries: 2 }\n";
        }
    }
    out
}

#[test]
fn health_probes_take_a_dead_backend_out_and_bring_it_back() {
    if !need_root("health_probes_take_a_dead_backend_out_and_bring_it_back") {
        return;
    }
    let s = Scene::new(
        "lxa1",
        2,
        (8080, 5353),
        |_, _| {},
        |t| rules(t, &[1, 2], true, &[VIP]),
    );
    let mut agent = Agent::start(&s.t, &s.cfg, &[]).expect("agent");
    assert_eq!(s.backends_reached(Scene::vip(80), 6).len(), 2);
    // Backend 2's own servers stop: the probes notice within
    // interval x retries, and new connections only reach backend 1.
    let b2 = &s.t.backends[1];
    b2.sh(&["nft", "add", "table", "inet", "lxa"]).unwrap();
    b2.sh(&[
        "nft",
        "add",
        "chain",
        "inet",
        "lxa",
        "in",
        "{ type filter hook input priority 0; }",
    ])
    .unwrap();
    b2.sh(&[
        "nft", "add", "rule", "inet", "lxa", "in", "tcp", "dport", "8080", "reject", "with", "tcp",
        "reset",
    ])
    .unwrap();
    agent
        .wait_for_log("endpoint down", Duration::from_secs(5))
        .expect("the probe marks the endpoint down");
    let seen = s.backends_reached(Scene::vip(80), 8);
    assert_eq!(
        seen,
        BTreeSet::from(["b1".to_string()]),
        "new connections avoid the dead backend"
    );
    let eps = agent.cli("endpoints").unwrap();
    let line = eps
        .lines()
        .find(|l| l.contains(&format!("{}:8080", s.t.backend_ip(2))))
        .unwrap();
    assert!(line.contains("inactive") && line.contains("down"), "{eps}");
    // Back: one good probe and it takes traffic again.
    b2.sh(&["nft", "delete", "table", "inet", "lxa"]).unwrap();
    agent
        .wait_for_log("endpoint up", Duration::from_secs(5))
        .expect("the probe marks the endpoint up");
    let seen = eventually("backend 2 serves again", Duration::from_secs(5), || {
        let s2 = s.backends_reached(Scene::vip(80), 6);
        if s2.len() == 2 {
            Ok(s2)
        } else {
            Err(format!("{s2:?}"))
        }
    });
    assert_eq!(seen.len(), 2);
    agent.stop().unwrap();
}

#[test]
fn bgp_announces_the_vips_of_the_rule_file_and_withdraws_removed_ones() {
    if !need_root("bgp_announces_the_vips_of_the_rule_file_and_withdraws_removed_ones") {
        return;
    }
    let s = Scene::new(
        "lxa2",
        1,
        (8080, 5353),
        |_, _| {},
        |t| rules(t, &[1], false, &[VIP, "20.0.0.101"]),
    );
    // A router namespace attached to the LB.
    let router = Netns::new("lxa2-r").unwrap();
    veth(
        &s.t.lb,
        "lbr",
        &["10.99.0.1/24"],
        &router,
        "r0",
        &["10.99.0.2/24"],
    )
    .unwrap();
    let g = GobgpPeer::start(
        &router,
        65002,
        Ipv4Addr::new(10, 99, 0, 2),
        Listen::Port(179),
        &[GobgpNeighbor::new("10.99.0.1", 65001)],
    )
    .unwrap();
    // With the REST API, as kube-loxilb's `--setRoles` drives a remote
    // loxilb: its cistate makes this agent MASTER or BACKUP.
    let args = [
        "--setBGP",
        "65001",
        "--extBGPPeers",
        "10.99.0.2:65002",
        "--api-listen",
        "127.0.0.1:11111",
        "--insecure-api",
        "--bgp-backup-path=prepend:2",
    ];
    let mut agent = Agent::start(&s.t, &s.cfg, &args).expect("agent");
    let have = |want: &[&str]| {
        let routes = g.routes().map_err(|e| e.to_string())?;
        let got: BTreeSet<String> = routes.iter().map(|r| r.prefix.clone()).collect();
        let want: BTreeSet<String> = want.iter().map(|w| format!("{w}/32")).collect();
        if got == want
            && routes
                .iter()
                .all(|r| r.next_hop == Some("10.99.0.1".parse().unwrap()))
        {
            Ok(())
        } else {
            Err(format!("{routes:?}"))
        }
    };
    eventually(
        "both VIPs at the router, next hop the LB",
        Duration::from_secs(30),
        || have(&[VIP, "20.0.0.101"]),
    );
    let bgp = agent.cli("bgp").unwrap();
    assert!(
        bgp.contains("10.99.0.2") && bgp.contains("65002") && bgp.contains("Established"),
        "{bgp}"
    );
    // BACKUP: the VIPs go out with the AS twice more; MASTER: as before.
    // One request to the agent's API (in the LB's namespace): the whole
    // response.
    let api = |method: &str, path: &str, body: &str| {
        let req = format!(
            "{method} /netlox/v1{path} HTTP/1.1\r\nhost: x\r\ncontent-type: \
             application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.t.lb.run(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect("127.0.0.1:11111").unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        })
    };
    let cistate = |state: &str| {
        let body = format!(r#"{{"instance":"llb-inst0","state":"{state}","vip":"0.0.0.0"}}"#);
        let out = api("POST", "/config/cistate", &body);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    };
    // loxicmd's `get bgpneighbor` through the API: the router's session.
    let neighbors = api("GET", "/config/bgp/neigh/all", "");
    assert!(
        neighbors.starts_with("HTTP/1.1 200")
            && neighbors.contains(r#""ipAddress":"10.99.0.2""#)
            && neighbors.contains(r#""remoteAs":65002"#)
            && neighbors.contains(r#""state":"established""#),
        "{neighbors}"
    );
    let path_len = |want: usize| {
        let routes = g.routes().map_err(|e| e.to_string())?;
        if routes.len() == 2 && routes.iter().all(|r| r.as_path == vec![65001; want]) {
            Ok(())
        } else {
            Err(format!("{routes:?}"))
        }
    };
    cistate("BACKUP");
    eventually("announced as a backup", Duration::from_secs(15), || {
        path_len(3)
    });
    cistate("MASTER");
    eventually("announced as the master", Duration::from_secs(15), || {
        path_len(1)
    });
    // The role survives a restart of the agent (kube-loxilb posts it only
    // when it changes): BACKUP again after the restart.
    cistate("BACKUP");
    eventually("a backup again", Duration::from_secs(15), || path_len(3));
    agent.stop().unwrap();
    eventually("withdrawn while stopped", Duration::from_secs(15), || {
        have(&[])
    });
    let mut agent = Agent::start(&s.t, &s.cfg, &args).expect("agent again");
    eventually(
        "announced as a backup after the restart",
        Duration::from_secs(30),
        || path_len(3),
    );
    assert!(
        agent.log_text().contains("cluster role restored"),
        "{}",
        agent.log_text()
    );
    cistate("MASTER");
    eventually("the master again", Duration::from_secs(15), || path_len(1));
    // Remove one VIP's rule: withdrawn.
    agent.reload(&s.cfg, &rules(&s.t, &[1], false, &[VIP]));
    eventually(
        "the removed VIP is withdrawn",
        Duration::from_secs(15),
        || have(&[VIP]),
    );
    // Traffic still flows for the other.
    Conn::open(&s.t.client, Scene::vip(80))
        .unwrap()
        .ask("x")
        .unwrap();
    agent.stop().unwrap();
    eventually(
        "everything withdrawn when the agent stops",
        Duration::from_secs(15),
        || have(&[]),
    );
    drop(g);
}

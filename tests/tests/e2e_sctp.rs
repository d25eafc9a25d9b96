//! End-to-end SCTP through the XDP datapath with real SCTP stacks
//! (usrsctp in raw-IP mode, `tests/sctp/`): an association from the client
//! to the VIP, DNAT to a backend listening on another port (the datapath
//! rewrites the ports and updates the CRC32c incrementally; the stacks
//! verify it), the client's address kept, data echoed both ways.
//! Multihoming (secondary VIPs) is not done yet.

use std::{net::IpAddr, time::Duration};

use loxilb_tests::{
    need_root,
    netns::{Agent, Scene, VIP},
    sctp_peers::{need_tools, SctpClient, SctpServer},
};

#[test]
fn sctp_association_through_the_vip_with_port_translation() {
    let name = "sctp_association_through_the_vip_with_port_translation";
    if !need_root(name) || !need_tools(name) {
        return;
    }
    // TCP/UDP servers are not needed; the scene gives the topology, the
    // rule file and cleanup.
    let e = Scene::new(
        "lxsc",
        1,
        (18080, 15353),
        |_, _| {},
        |t| {
            format!(
                "rules:\n  - name: diameter\n    vip: {VIP}\n    port: 3868\n    protocol: sctp\n    endpoints:\n      - {{ ip: {}, port: 30868 }}\n",
                t.backend_ip(1)
            )
        },
    );
    let t = &e.t;
    let server = SctpServer::spawn(&t.backends[0], &[IpAddr::V4(t.backend_ip(1))], 30868)
        .expect("SCTP server");
    let mut agent = Agent::start(t, &e.cfg, &[]).expect("agent");
    let client = SctpClient::spawn(
        &t.client,
        &[IpAddr::V4(t.client_ip())],
        &[VIP.parse().unwrap()],
        3868,
    )
    .expect("SCTP client");
    client
        .wait_up(Duration::from_secs(10))
        .unwrap_or_else(|err| panic!("{err}\nserver:\n{}", server.peer.transcript()));
    // Data both ways, several times.
    for _ in 0..3 {
        client
            .wait_fresh_echo(Duration::from_secs(5))
            .unwrap_or_else(|err| panic!("{err}\n{}", client.peer.transcript()));
    }
    // The backend saw the client's own address (DNAT keeps it).
    let d = server
        .peer
        .wait_for(|e| e.is("data"), Duration::from_secs(2))
        .unwrap();
    assert_eq!(
        d.addr("from"),
        Some(IpAddr::V4(t.client_ip())),
        "{}",
        d.line
    );
    // One association all along.
    assert_eq!(client.peer.of_kind("connected").len(), 1);
    let sessions = agent.cli("sessions").unwrap();
    assert!(sessions.contains("sctp"), "{sessions}");
    let stats = agent.cli("stats").unwrap();
    assert_eq!(
        loxilb_tests::netns::counter(&stats, "drop_sctp_malformed"),
        0,
        "{stats}"
    );
    agent.stop().unwrap();
}

//! Two syncers over loopback TCP with mutual TLS, on in-memory tables.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncWriteExt;

use super::{
    tls::tests::{tempdir::Dir, TestCa},
    wire::{self, Hello, Msg},
    xlate::tests as x,
    Config, MemTable, Syncer,
};

fn node(sender: bool) -> MemTable {
    let t = MemTable::default();
    t.with(|s| {
        if sender {
            s.svcs = vec![x::svc("20.0.0.100", 80, 1)];
            s.eps = vec![
                x::ep(1, 0, "10.0.1.10", 8080, 0),
                x::ep(1, 1, "10.0.1.11", 8080, 1),
            ];
            s.now_ns = 1_000_000_000_000;
        } else {
            s.svcs = vec![x::svc("20.0.0.101", 80, 1), x::svc("20.0.0.100", 80, 2)];
            s.eps = vec![
                x::ep(2, 0, "10.0.1.10", 8080, 7),
                x::ep(2, 1, "10.0.1.11", 8080, 8),
            ];
            s.now_ns = 5_000_000_000;
        }
    });
    t
}

/// A sender (`a`) with one session (both directions) through
/// 20.0.0.100:80, and a backup (`b`) with none.
fn one_session() -> (MemTable, MemTable) {
    let (a, b) = (node(true), node(false));
    a.with(|s| {
        s.ct.extend(x::session(
            "192.168.0.2",
            1,
            "20.0.0.100",
            "10.0.1.10",
            1,
            0,
            0,
        ))
    });
    (a, b)
}

fn cfg(dir: &Dir) -> Config {
    Config {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_dir: dir.0.clone(),
        interval: Duration::from_millis(20),
        node_name: "test".into(),
        ..Default::default()
    }
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A backup on `b`, an active sender on `a` dialling it.
fn pair(
    ca_a: &TestCa,
    ca_b: &TestCa,
    trust_a: &TestCa,
    a: &MemTable,
    b: &MemTable,
    tweak: impl FnOnce(&mut Config),
) -> (Syncer, Syncer, Dir, Dir) {
    let db = ca_b.dir(ca_b, "b");
    let rx = Syncer::start_with_table(Box::new(b.clone()), cfg(&db)).unwrap();
    let da = ca_a.dir(trust_a, "a");
    let mut c = cfg(&da);
    c.listen = None;
    c.peers = vec![rx.local_addr().unwrap()];
    tweak(&mut c);
    let tx = Syncer::start_with_table(Box::new(a.clone()), c).unwrap();
    tx.set_active(true);
    (tx, rx, da, db)
}

#[test]
fn sessions_stream_to_the_backup_and_follow_changes() {
    let ca = TestCa::new("ca");
    let (a, b) = (node(true), node(false));
    let now = a.now();
    let s1 = x::session(
        "192.168.0.2",
        40000,
        "20.0.0.100",
        "10.0.1.11",
        1,
        1,
        now - 1000,
    );
    a.with(|s| s.ct.extend(s1));
    let (tx, rx, _da, _db) = pair(&ca, &ca, &ca, &a, &b, |_| {});
    wait_for("the snapshot", 10, || b.with(|s| s.ct.len() == 2));
    b.with(|s| {
        for (k, _) in s1 {
            assert_eq!((s.ct[&k].rule_id, s.ct[&k].ep_stat), (2, 8));
        }
    });
    // A new session, then one ending.
    let s2 = x::session("192.168.0.3", 40000, "20.0.0.100", "10.0.1.10", 1, 0, now);
    a.with(|s| s.ct.extend(s2));
    wait_for("the new session", 10, || b.with(|s| s.ct.len() == 4));
    a.with(|s| {
        for (k, _) in s1 {
            s.ct.remove(&k);
        }
    });
    wait_for("the removal", 10, || b.with(|s| s.ct.len() == 2));
    let st = tx.stats();
    assert_eq!(st.role, "active");
    assert_eq!(st.peers[0].state, "streaming");
    assert_eq!(st.peers[0].snapshots, 1);
    assert_eq!(st.peers[0].entries_sent, 4);
    assert_eq!(st.peers[0].removes_sent, 2);
    let sr = rx.stats();
    assert_eq!(sr.role, "backup");
    assert_eq!(sr.inbound.connected, 1);
    assert_eq!(sr.inbound.apply.applied, 4);
    assert_eq!(sr.inbound.apply.removed, 2);
    assert_eq!(sr.inbound.apply.snapshots, 1);
    // Roles swap: the new active node keeps the sessions, the old one
    // stops sending.
    tx.set_active(false);
    rx.set_active(true);
    wait_for("the old sender to stop", 10, || {
        rx.stats().inbound.connected == 0 && tx.stats().peers[0].state == "idle"
    });
    b.with(|s| assert_eq!(s.ct.len(), 2));
}

#[test]
fn a_slow_receiver_is_resynced_not_buffered() {
    let ca = TestCa::new("ca");
    let (a, b) = (node(true), node(false));
    let (tx, _rx, _da, _db) = pair(&ca, &ca, &ca, &a, &b, |c| {
        c.batch = 2;
        c.queue = 1;
    });
    wait_for("streaming", 10, || tx.stats().peers[0].state == "streaming");
    // 20 sessions in one scan: 20 batches for a queue of one.
    let now = a.now();
    a.with(|s| {
        for i in 0..20 {
            s.ct.extend(x::session(
                "192.168.0.2",
                1000 + i,
                "20.0.0.100",
                "10.0.1.10",
                1,
                0,
                now,
            ));
        }
    });
    wait_for("the resync", 10, || b.with(|s| s.ct.len() == 40));
    let st = tx.stats();
    assert!(st.peers[0].resyncs >= 1, "{st:?}");
    assert!(st.peers[0].snapshots >= 2, "{st:?}");
}

#[test]
fn a_rule_arriving_after_its_sessions_brings_a_resync() {
    let ca = TestCa::new("ca");
    let (a, b) = one_session();
    // B has no rule for 20.0.0.100:80 yet.
    let web = b.with(|s| {
        let i = s.svcs.iter().position(|(_, v)| v.rule_id == 2).unwrap();
        s.svcs.remove(i)
    });
    let (tx, rx, _da, _db) = pair(&ca, &ca, &ca, &a, &b, |_| {});
    wait_for("the drops", 10, || {
        rx.stats().inbound.apply.dropped_no_rule == 2
    });
    b.with(|s| s.svcs.push(web));
    wait_for("the resync", 10, || b.with(|s| s.ct.len() == 2));
    assert_eq!(tx.stats().peers[0].resyncs_asked, 1);
    assert_eq!(rx.stats().inbound.apply.resyncs_requested, 1);
}

#[test]
fn a_sender_of_another_ca_is_refused() {
    let ca = TestCa::new("ca");
    let other = TestCa::new("other");
    let (a, b) = one_session();
    // Signed by another CA, though it trusts the backup's.
    let (tx, rx, _da, _db) = pair(&other, &ca, &ca, &a, &b, |_| {});
    wait_for("the refusal", 10, || rx.stats().inbound.refused_tls >= 1);
    let e = rx.stats().inbound.last_refused.unwrap();
    assert!(e.contains("TLS"), "{e}");
    wait_for("the sender's error", 10, || {
        tx.stats().peers[0].last_error.is_some()
    });
    assert_eq!(tx.stats().peers[0].snapshots, 0);
    b.with(|s| assert!(s.ct.is_empty()));
    assert_eq!(rx.stats().inbound.connections, 0);
}

#[test]
fn a_backup_of_another_ca_is_not_sent_to() {
    let ca = TestCa::new("ca");
    let other = TestCa::new("other");
    let (a, b) = one_session();
    // The sender's certificate is fine, but it trusts only `other`.
    let (tx, rx, _da, _db) = pair(&ca, &ca, &other, &a, &b, |_| {});
    wait_for("the sender's error", 10, || {
        tx.stats().peers[0].last_error.is_some()
    });
    let e = tx.stats().peers[0].last_error.clone().unwrap();
    assert!(
        e.contains("TLS handshake") && e.contains("UnknownIssuer"),
        "{e}"
    );
    b.with(|s| assert!(s.ct.is_empty()));
    assert_eq!(rx.stats().inbound.connections, 0);
}

/// A raw TLS client of the backup: `cert` None presents no certificate.
async fn raw_client(
    addr: std::net::SocketAddr,
    trust: &TestCa,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(trust.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("b".try_into().unwrap(), tcp)
        .await
}

#[test]
fn no_certificate_and_plaintext_are_refused() {
    let ca = TestCa::new("ca");
    let b = node(false);
    let db = ca.dir(&ca, "b");
    let rx = Syncer::start_with_table(Box::new(b.clone()), cfg(&db)).unwrap();
    let addr = rx.local_addr().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // No client certificate: the handshake (or the first read, TLS
        // 1.3 reports the refusal after the client's finish) fails.
        if let Ok(mut s) = raw_client(addr, &ca).await {
            let hello = wire::encode(&Msg::Hello(Hello::ours(wire::ROLE_SENDER, "x")));
            let _ = s.write_all(&hello).await;
            let _ = s.flush().await;
            let r = wire::read_msg(&mut s).await;
            assert!(!matches!(r, Ok(Some(Msg::Hello(_)))), "{r:?}");
        }
        // Plaintext: a hello without TLS.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let hello = wire::encode(&Msg::Hello(Hello::ours(wire::ROLE_SENDER, "x")));
        tcp.write_all(&hello).await.unwrap();
        let r = wire::read_msg(&mut tcp).await;
        assert!(!matches!(r, Ok(Some(Msg::Hello(_)))), "{r:?}");
    });
    wait_for("two refusals", 10, || rx.stats().inbound.refused_tls >= 2);
    assert_eq!(rx.stats().inbound.connections, 0);
}

/// A TLS client with a certificate of `ca`, for speaking the protocol by
/// hand.
async fn client_of(
    dir: &Dir,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let t = super::tls::Tls::load(&dir.0, None).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(t.client)
        .connect(t.server_name, tcp)
        .await
        .unwrap()
}

#[test]
fn a_version_mismatch_is_refused_with_a_reason() {
    let ca = TestCa::new("ca");
    let b = node(false);
    let db = ca.dir(&ca, "b");
    let rx = Syncer::start_with_table(Box::new(b.clone()), cfg(&db)).unwrap();
    let addr = rx.local_addr().unwrap();
    let da = ca.dir(&ca, "a");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = client_of(&da, addr).await;
        let mut h = Hello::ours(wire::ROLE_SENDER, "old-agent");
        h.layout = 1;
        s.write_all(&wire::encode(&Msg::Hello(h))).await.unwrap();
        match wire::read_msg(&mut s).await.unwrap() {
            Some(Msg::Error(t)) => {
                assert!(
                    t.contains("layout 1") && t.contains("same agent version"),
                    "{t}"
                )
            }
            m => panic!("{m:?}"),
        }
    });
    assert_eq!(rx.stats().inbound.refused_hello, 1);
}

/// Two nodes, each the owner of one VIP (per-Service owner groups): each
/// streams its own VIP's sessions to the other and takes the other's;
/// neither overwrites a session of a VIP it owns. When one VIP moves,
/// its new owner streams its sessions, the old owner keeps them (as
/// synced), and their ends follow from the new owner.
#[test]
fn two_owners_stream_to_each_other_and_a_vip_moves() {
    let ca = TestCa::new("ca");
    let table = |now| {
        let t = MemTable::default();
        t.with(|s| {
            s.svcs = vec![x::svc("20.0.0.100", 80, 1), x::svc("20.0.0.101", 80, 2)];
            s.eps = vec![
                x::ep(1, 0, "10.0.1.10", 8080, 0),
                x::ep(2, 0, "10.0.1.10", 8080, 1),
            ];
            s.now_ns = now;
        });
        t
    };
    let (a, b) = (table(1_000_000_000_000), table(5_000_000_000));
    let sa = x::session("192.168.0.2", 1, "20.0.0.100", "10.0.1.10", 1, 0, 0);
    let sb = x::session("192.168.0.3", 1, "20.0.0.101", "10.0.1.10", 2, 1, 0);
    a.with(|s| s.ct.extend(sa));
    b.with(|s| s.ct.extend(sb));
    let (da, db) = (ca.dir(&ca, "a"), ca.dir(&ca, "b"));
    let start = |t: &MemTable, d: &Dir, name: &str| {
        let mut c = cfg(d);
        c.node_name = name.into();
        Syncer::start_with_table(Box::new(t.clone()), c).unwrap()
    };
    let (na, nb) = (start(&a, &da, "a"), start(&b, &db, "b"));
    na.set_peers(vec![nb.local_addr().unwrap()]);
    nb.set_peers(vec![na.local_addr().unwrap()]);
    let vips = |v: &[&str]| super::Owned::Vips(v.iter().map(|a| a.parse().unwrap()).collect());
    na.set_owned(vips(&["20.0.0.100"]));
    nb.set_owned(vips(&["20.0.0.101"]));
    wait_for("both sessions on both nodes", 10, || {
        a.with(|s| s.ct.len() == 4) && b.with(|s| s.ct.len() == 4)
    });
    for t in [&a, &b] {
        t.with(|s| {
            for (k, _) in sa.iter().chain(&sb) {
                assert!(s.ct.contains_key(k));
            }
        });
    }
    let (st_a, st_b) = (na.stats(), nb.stats());
    assert_eq!(
        (st_a.role.as_str(), st_a.owned.as_str()),
        ("active", "20.0.0.100")
    );
    assert_eq!(st_b.owned, "20.0.0.101");
    assert_eq!(
        (st_a.inbound.apply.applied, st_b.inbound.apply.applied),
        (2, 2)
    );
    assert_eq!(st_a.inbound.tracked, 2, "b's session, synced");
    // 20.0.0.100 moves to b: b streams it (the copy it took from a), a
    // keeps it and follows b's word on it.
    na.set_owned(vips(&[]));
    nb.set_owned(vips(&["20.0.0.100", "20.0.0.101"]));
    wait_for("a takes both from b", 10, || {
        na.stats().inbound.tracked == 4
    });
    assert_eq!(na.stats().role, "backup");
    b.with(|s| {
        for (k, _) in sa {
            s.ct.remove(&k);
        }
    });
    wait_for("the end of a's old session followed from b", 10, || {
        a.with(|s| s.ct.len() == 2)
    });
    a.with(|s| assert!(sb.iter().all(|(k, _)| s.ct.contains_key(k))));
    assert_eq!(nb.stats().inbound.apply.ignored_owned, 0);
}

#[test]
fn bad_config_and_files_are_named() {
    let ca = TestCa::new("ca");
    let d = ca.dir(&ca, "cfg");
    let mut c = cfg(&d);
    c.batch = 1;
    let e = Syncer::start_with_table(Box::new(MemTable::default()), c)
        .err()
        .unwrap();
    assert!(e.to_string().contains("batch"), "{e}");
    let mut c = cfg(&d);
    c.tls_dir = d.0.join("missing");
    let e = format!(
        "{:#}",
        Syncer::start_with_table(Box::new(MemTable::default()), c)
            .err()
            .unwrap()
    );
    assert!(e.contains("missing/ca.crt"), "{e}");
    let rx = Syncer::start_with_table(Box::new(MemTable::default()), cfg(&d)).unwrap();
    let mut c = cfg(&d);
    c.listen = rx.local_addr();
    let e = format!(
        "{:#}",
        Syncer::start_with_table(Box::new(MemTable::default()), c)
            .err()
            .unwrap()
    );
    assert!(e.contains("cannot listen on 127.0.0.1"), "{e}");
}

#[test]
fn peers_from_a_flag() {
    let p = super::parse_peers("10.0.0.2, 10.0.0.3:9000,[fd00::1]:7000,fd00::2,localhost").unwrap();
    let want: Vec<std::net::SocketAddr> = [
        "10.0.0.2:22222",
        "10.0.0.3:9000",
        "[fd00::1]:7000",
        "[fd00::2]:22222",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    assert_eq!(p[..4], want[..]);
    assert_eq!(p[4].port(), super::DEFAULT_PORT);
    assert!(p[4].ip().is_loopback());
    assert!(super::parse_peers("").unwrap().is_empty());
    let e = format!("{:#}", super::parse_peers("10.0.0.2:99999").unwrap_err());
    assert!(e.contains("10.0.0.2:99999"), "{e}");
}

/// A sender whose connection vanishes is dialled back: a listener that
/// answers (the agent lives, it only stopped sending) gives no hint; one
/// that refuses (the agent is gone) gives a takeover hint with its Lease
/// identity, once.
#[test]
fn a_sender_found_dead_gives_a_takeover_hint() {
    let ca = TestCa::new("ca");
    let (a, b) = (node(true), node(false));
    let (tx, rx, _da, _db) = pair(&ca, &ca, &ca, &a, &b, |c| {
        c.listen = Some("127.0.0.1:0".parse().unwrap());
        c.identity = "agent-a".into();
    });
    let mut hints = rx.takeover_hints().expect("hints");
    assert!(rx.takeover_hints().is_none(), "handed out once");
    wait_for("streaming", 10, || rx.stats().inbound.connected == 1);
    // Alive: it steps down (its connections close, its listener stays).
    tx.set_active(false);
    wait_for("the sender gone", 10, || rx.stats().inbound.connected == 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(hints.try_recv().is_err(), "no hint for a live agent");
    assert_eq!(rx.stats().inbound.senders_dead, 0);
    // Back, then gone for good (its listener closes with it).
    tx.set_active(true);
    wait_for("streaming again", 10, || rx.stats().inbound.connected == 1);
    tx.stop();
    wait_for("the hint", 10, || rx.stats().inbound.senders_dead == 1);
    assert_eq!(hints.try_recv().unwrap(), "agent-a");
    assert!(hints.try_recv().is_err());
    let st = rx.stats();
    assert!(
        st.inbound
            .last_dead
            .as_deref()
            .unwrap()
            .starts_with("agent-a (127.0.0.1:"),
        "{:?}",
        st.inbound.last_dead
    );
}

/// Peers set while running: the active node dials the new one at once,
/// leaves itself out, and hangs up on a peer no longer listed.
#[test]
fn peers_follow_set_peers_and_leave_this_node_out() {
    let ca = TestCa::new("ca");
    let (a, b) = (node(true), node(false));
    let (tx, rx, _da, _db) = pair(&ca, &ca, &ca, &a, &b, |c| {
        c.listen = Some("127.0.0.1:0".parse().unwrap());
        c.peers = vec![];
    });
    wait_for("active", 10, || tx.stats().role == "active");
    assert!(tx.stats().peers.is_empty());
    let me = tx.local_addr().unwrap();
    tx.set_peers(vec![me, rx.local_addr().unwrap(), me]);
    wait_for("streaming to the new peer", 10, || {
        rx.stats().inbound.connected == 1
    });
    let st = tx.stats();
    assert_eq!(
        st.peers.len(),
        1,
        "itself left out, listed once: {:?}",
        st.peers
    );
    assert_eq!(st.peers[0].addr, rx.local_addr().unwrap().to_string());
    assert_eq!(st.inbound.connections, 0, "never dialled itself");
    tx.set_peers(vec![]);
    wait_for("the peer dropped", 10, || rx.stats().inbound.connected == 0);
    assert!(tx.stats().peers.is_empty());
}

/// A rotated Secret: the backup's `ca.crt` changes on disk to trust the
/// sender's new CA; the next connection uses it without a restart (the
/// sender, refused before, now streams). A later change that does not
/// load (a broken key) keeps the working certificates in use.
#[test]
fn certificates_are_reloaded_when_their_files_change() {
    let ca = TestCa::new("ca");
    let other = TestCa::new("other");
    let (a, b) = one_session();
    // The sender's certificate is of `other`; the backup trusts `ca` only.
    let (tx, rx, da, db) = pair(&other, &ca, &ca, &a, &b, |_| {});
    wait_for("the refusal", 10, || rx.stats().inbound.refused_tls >= 1);
    assert_eq!(rx.stats().tls_reloads, 0);
    // The backup's CA bundle now holds both CAs.
    std::fs::write(
        db.0.join(super::CA_FILE),
        format!("{}{}", ca.cert_pem, other.cert_pem),
    )
    .unwrap();
    wait_for("the snapshot after the reload", 20, || {
        b.with(|s| s.ct.len() == 2)
    });
    assert_eq!(rx.stats().tls_reloads, 1);
    assert_eq!(tx.stats().peers[0].snapshots, 1);
    // A half-written key: refused once, the loaded certificates kept.
    let key = std::fs::read(db.0.join(super::KEY_FILE)).unwrap();
    std::fs::write(db.0.join(super::KEY_FILE), &key[..key.len() / 2]).unwrap();
    let addr = rx.local_addr().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Handshakes still succeed with the certificates loaded before.
        for _ in 0..2 {
            let mut s = client_of(&da, addr).await;
            let _ = s.shutdown().await;
        }
    });
    assert_eq!(rx.stats().tls_reloads, 1, "the broken key was not loaded");
    // Whole again: loads at the next connection.
    std::fs::write(db.0.join(super::KEY_FILE), &key).unwrap();
    rt.block_on(async {
        let mut s = client_of(&da, addr).await;
        let _ = s.shutdown().await;
    });
    // The file equals the one loaded before the break: nothing to reload.
    assert_eq!(rx.stats().tls_reloads, 1);
    b.with(|s| assert_eq!(s.ct.len(), 2));
}

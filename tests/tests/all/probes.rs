//! Health probes against real servers in network namespaces: the prober
//! runs in the lb namespace (on a Tokio runtime whose threads live there)
//! and probes a backend namespace; every probe type is shown up, then
//! down (server killed, nftables drop, wrong answer) and up again.
//! Short intervals (150 ms) and timeouts (200 ms), retries 2.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use loxilb_agent::probe::{
    ProbeKind, ProbeSpec, Prober, Target, TargetKey, TargetStatus, Transition,
};
use loxilb_tests::{
    need_root,
    netns::{enter, Netns, Servers, Topology},
    probe_peers::{HttpPeer, NftDrop, SctpEcho, USRSCTP_ECHO_PORT},
};
use tokio::{sync::mpsc::UnboundedReceiver, time::Instant};

const INTERVAL: Duration = Duration::from_millis(150);
const TIMEOUT: Duration = Duration::from_millis(200);
/// Longest wait for an expected transition.
const WAIT: Duration = Duration::from_secs(5);

fn spec(kind: ProbeKind) -> ProbeSpec {
    ProbeSpec {
        interval: INTERVAL,
        timeout: TIMEOUT,
        retries: 2,
        ..ProbeSpec::new(kind)
    }
}

fn backend(t: &Topology) -> (&Netns, IpAddr) {
    (&t.backends[0], IpAddr::V4(t.backend_ip(1)))
}

/// Run `f` to completion on a Tokio runtime whose threads all live in
/// `ns` (so the prober's sockets are the namespace's).
fn in_ns<F>(ns: &Netns, f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            enter(&path).expect("setns");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f)
        });
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Transitions, kept per target until a test asks for them.
struct Events {
    rx: UnboundedReceiver<Transition>,
    pending: Vec<Transition>,
}

impl Events {
    fn new(rx: UnboundedReceiver<Transition>) -> Self {
        Events {
            rx,
            pending: vec![],
        }
    }

    /// The next transition of `key`; it must be to `up`, within WAIT.
    async fn expect(&mut self, key: &TargetKey, up: bool) -> Transition {
        let state = if up { "up" } else { "down" };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.pending.iter().position(|t| &t.key == key) {
                let t = self.pending.remove(i);
                eprintln!(
                    "transition: {} {} ({})",
                    t.key,
                    if t.up { "up" } else { "down" },
                    t.reason
                );
                assert_eq!(
                    t.up, up,
                    "{key}: expected a transition to {state}, got {t:?}"
                );
                return t;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(t)) => self.pending.push(t),
                Ok(None) => panic!("transition channel closed"),
                Err(_) => panic!("{key}: no transition to {state} within {WAIT:?}"),
            }
        }
    }

    /// No transition of `key` arrived so far.
    fn assert_none(&mut self, key: &TargetKey) {
        while let Ok(t) = self.rx.try_recv() {
            self.pending.push(t);
        }
        let mine: Vec<_> = self.pending.iter().filter(|t| &t.key == key).collect();
        assert!(mine.is_empty(), "{key}: unexpected transitions {mine:?}");
    }
}

/// Wait for `key`'s first successful probe (a new target starts up, so
/// there is no transition to wait for).
async fn probed_up(p: &Prober, key: &TargetKey) -> TargetStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = p.status(key).expect("a target");
        if st.probed && st.last_ok == Some(true) {
            assert!(st.up, "{st:?}");
            assert_eq!(st.state(), "up");
            assert!(st.last_latency.is_some_and(|l| l < TIMEOUT), "{st:?}");
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: not probed up within {WAIT:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reason_has(t: &Transition, any_of: &[&str]) {
    assert!(
        any_of.iter().any(|s| t.reason.contains(s)),
        "{}: reason {:?} mentions none of {any_of:?}",
        t.key,
        t.reason
    );
}

#[test]
fn probe_tcp_up_killed_down_back_up_dropped_down_back_up() {
    if !need_root("probe_tcp_up_killed_down_back_up_dropped_down_back_up") {
        return;
    }
    let t = Topology::new("pbtcp", 1).unwrap();
    let (b, ip) = backend(&t);
    let servers = Servers::start(b, "b1", 8080, 9090).unwrap();
    let key = TargetKey::new("tcp-rule", ip, 8080);
    in_ns(&t.lb, async {
        let (p, rx) = Prober::new(16);
        let mut ev = Events::new(rx);
        p.set_targets([Target::new(key.clone(), spec(ProbeKind::Tcp))])
            .unwrap();
        let st = probed_up(&p, &key).await;
        assert_eq!(st.last_result, "TCP connected");

        drop(servers); // the server dies
        let tr = ev.expect(&key, false).await;
        assert_eq!(
            tr.reason,
            "TCP connect: connection refused (2 failed probes in a row)"
        );
        let st = p.status(&key).unwrap();
        assert_eq!(
            (st.up, st.state(), st.last_ok),
            (false, "down", Some(false))
        );
        assert!(st.consecutive_failures >= 2);

        let servers = Servers::start(b, "b1", 8080, 9090).unwrap();
        let tr = ev.expect(&key, true).await;
        assert_eq!(tr.reason, "TCP connected");

        let nft = NftDrop::input(b, "probetest", "tcp dport 8080 drop").unwrap();
        let tr = ev.expect(&key, false).await;
        assert_eq!(
            tr.reason,
            "no answer within 200ms (2 failed probes in a row)"
        );
        // A timed-out probe lasts its timeout (the timer may be a little late).
        let l = p.status(&key).unwrap().last_latency.unwrap();
        assert!(
            l >= TIMEOUT && l < TIMEOUT + Duration::from_millis(100),
            "{l:?}"
        );
        drop(nft);
        ev.expect(&key, true).await;
        drop(servers);
    });
}

#[test]
fn probe_udp_icmp_unreachable_wrong_reply_and_drop() {
    if !need_root("probe_udp_icmp_unreachable_wrong_reply_and_drop") {
        return;
    }
    let t = Topology::new("pbudp", 1).unwrap();
    let (b, ip) = backend(&t);
    // Port-unreachable errors are rate-limited per peer (1/s after a
    // burst); probes here come every 150 ms.
    b.sh(&["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])
        .unwrap();
    let servers = Servers::start(b, "b1", 8080, 9090).unwrap();
    let plain = TargetKey::new("udp-plain", ip, 9090);
    let resp = TargetKey::new("udp-resp", ip, 9090);
    let wrong = TargetKey::new("udp-wrong", ip, 9090);
    let with = |req: &str, want: &str| ProbeSpec {
        request: Some(req.into()),
        response: Some(want.into()),
        ..spec(ProbeKind::Udp)
    };
    in_ns(&t.lb, async {
        let (p, rx) = Prober::new(16);
        let mut ev = Events::new(rx);
        let mut targets = vec![
            Target::new(plain.clone(), spec(ProbeKind::Udp)),
            Target::new(resp.clone(), with("hello", "echo=hello")),
            Target::new(wrong.clone(), with("hello", "echo=bye")),
        ];
        p.set_targets(targets.clone()).unwrap();
        let st = probed_up(&p, &plain).await;
        assert!(st.last_result.starts_with("UDP reply of "), "{st:?}");
        let st = probed_up(&p, &resp).await;
        assert_eq!(st.last_result, "UDP reply contains \"echo=hello\"");

        // A reply without the expected text: down; fixed spec: up again
        // (the spec change keeps the down state and restarts probing).
        let tr = ev.expect(&wrong, false).await;
        reason_has(&tr, &["does not contain \"echo=bye\""]);
        targets[2].spec = with("hello", "echo=hello");
        let r = p.set_targets(targets.clone()).unwrap();
        assert_eq!((r.changed, r.unchanged), (vec![wrong.clone()], 2));
        ev.expect(&wrong, true).await;

        // Server killed: the kernel answers ICMP port unreachable.
        drop(servers);
        for k in [&plain, &resp, &wrong] {
            let tr = ev.expect(k, false).await;
            assert_eq!(
                tr.reason,
                "UDP: ICMP port unreachable (2 failed probes in a row)"
            );
        }
        let servers = Servers::start(b, "b1", 8080, 9090).unwrap();
        for k in [&plain, &resp, &wrong] {
            ev.expect(k, true).await;
        }

        // Silently dropped: only probes that want an answer notice; a
        // plain UDP probe (no proberesp) takes silence as up.
        let nft = NftDrop::input(b, "probetest", "udp dport 9090 drop").unwrap();
        let tr = ev.expect(&resp, false).await;
        assert_eq!(
            tr.reason,
            "no answer within 200ms (2 failed probes in a row)"
        );
        ev.expect(&wrong, false).await;
        ev.assert_none(&plain);
        let st = p.status(&plain).unwrap();
        assert!(st.up);
        assert_eq!(st.last_result, "UDP: no ICMP error within 100ms");
        drop(nft);
        ev.expect(&resp, true).await;
        ev.expect(&wrong, true).await;
        ev.assert_none(&plain);
        drop(servers);
    });
}

#[test]
fn probe_http_status_body_killed_and_dropped() {
    if !need_root("probe_http_status_body_killed_and_dropped") {
        return;
    }
    http_case("pbhttp", false);
}

#[test]
fn probe_https_self_signed_status_body_killed_and_dropped() {
    if !need_root("probe_https_self_signed_status_body_killed_and_dropped") {
        return;
    }
    http_case("pbtls", true);
}

fn http_case(prefix: &str, tls: bool) {
    let t = Topology::new(prefix, 1).unwrap();
    let (b, ip) = backend(&t);
    let (kind, scheme, port) = if tls {
        (ProbeKind::Https, "HTTPS", 8443)
    } else {
        (ProbeKind::Http, "HTTP", 8081)
    };
    // The endpoint serves on port 80; the probe goes to `port`.
    let key = TargetKey::new("web", ip, 80);
    let s = ProbeSpec {
        port: Some(port),
        request: Some("healthz".into()),
        response: Some("alive".into()),
        ..spec(kind)
    };
    let peer = HttpPeer::start(b, port, tls, "service alive").unwrap();
    in_ns(&t.lb, async {
        let (p, rx) = Prober::new(16);
        let mut ev = Events::new(rx);
        p.set_targets([Target::new(key.clone(), s)]).unwrap();
        let st = probed_up(&p, &key).await;
        assert_eq!(
            st.last_result,
            format!("{scheme}: status 200, body contains \"alive\"")
        );
        assert_eq!(st.probe_addr.port(), port);
        assert!(peer.requests().iter().all(|r| r == "GET /healthz HTTP/1.1"));
        assert!(!peer.requests().is_empty());

        // Wrong body.
        peer.set_body("degraded");
        let tr = ev.expect(&key, false).await;
        assert_eq!(
            tr.reason,
            format!("{scheme}: status 200 but the body does not contain \"alive\" (2 failed probes in a row)")
        );
        peer.set_body("alive again");
        ev.expect(&key, true).await;

        // Not 2xx.
        peer.set_status(503);
        let tr = ev.expect(&key, false).await;
        assert_eq!(
            tr.reason,
            format!("{scheme}: status 503 Service Unavailable (2 failed probes in a row)")
        );
        peer.set_status(200);
        ev.expect(&key, true).await;

        // Server killed, then back.
        drop(peer);
        let tr = ev.expect(&key, false).await;
        reason_has(&tr, &["TCP connect: connection refused"]);
        let peer = HttpPeer::start(b, port, tls, "alive").unwrap();
        ev.expect(&key, true).await;

        // Dropped by nftables, then allowed.
        let nft = NftDrop::input(b, "probetest", &format!("tcp dport {port} drop")).unwrap();
        let tr = ev.expect(&key, false).await;
        assert_eq!(
            tr.reason,
            "no answer within 200ms (2 failed probes in a row)"
        );
        drop(nft);
        ev.expect(&key, true).await;
        drop(peer);
    });
}

#[test]
fn probe_sctp_against_usrsctp_over_raw_ip() {
    if !need_root("probe_sctp_against_usrsctp_over_raw_ip") {
        return;
    }
    let t = Topology::new("pbsctp", 1).unwrap();
    let (b, ip) = backend(&t);
    let echo = SctpEcho::start(b).unwrap();
    let key = TargetKey::new("sctp-rule", ip, USRSCTP_ECHO_PORT);
    let closed = TargetKey::new("sctp-closed", ip, 9999);
    in_ns(&t.lb, async {
        let (p, rx) = Prober::new(16);
        let mut ev = Events::new(rx);
        p.set_targets([
            Target::new(key.clone(), spec(ProbeKind::Sctp)),
            Target::new(closed.clone(), spec(ProbeKind::Sctp)),
        ])
        .unwrap();
        let st = probed_up(&p, &key).await;
        assert_eq!(st.last_result, "SCTP INIT-ACK");
        // Nobody on the port: usrsctp stays silent (its blackhole setting)
        // or aborts.
        let tr = ev.expect(&closed, false).await;
        reason_has(&tr, &["no answer within 200ms", "SCTP ABORT"]);
        // Many probes later the server still answers: every INIT-ACK was
        // followed by our ABORT, no association piles up.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let st = p.status(&key).unwrap();
        assert!(
            st.up && st.last_ok == Some(true) && st.probes >= 8,
            "{st:?}"
        );
        ev.assert_none(&key);

        echo.kill();
        let tr = ev.expect(&key, false).await;
        // The backend kernel has no SCTP: it answers ICMP protocol
        // unreachable (rate-limited: otherwise the probe times out).
        reason_has(
            &tr,
            &[
                "SCTP: ICMP protocol unreachable (no SCTP there)",
                "no answer within 200ms",
            ],
        );
        let echo = SctpEcho::start(b).unwrap();
        let tr = ev.expect(&key, true).await;
        assert_eq!(tr.reason, "SCTP INIT-ACK");

        let nft = NftDrop::input(b, "probetest", "meta l4proto sctp drop").unwrap();
        let tr = ev.expect(&key, false).await;
        assert_eq!(
            tr.reason,
            "no answer within 200ms (2 failed probes in a row)"
        );
        drop(nft);
        ev.expect(&key, true).await;
        drop(echo);
    });
}

/// Takes the backend's link down; restores it (and its default route) on drop.
struct LinkDown<'a>(&'a Netns, Ipv4Addr);

impl<'a> LinkDown<'a> {
    fn new(ns: &'a Netns, gw: Ipv4Addr) -> Self {
        ns.sh(&["ip", "link", "set", "b0", "down"]).unwrap();
        LinkDown(ns, gw)
    }
}

impl Drop for LinkDown<'_> {
    fn drop(&mut self) {
        let _ = self.0.sh(&["ip", "link", "set", "b0", "up"]);
        let _ = self.0.sh(&[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            &self.1.to_string(),
        ]);
    }
}

#[test]
fn probe_ping_up_dropped_down_unplugged_down_back_up() {
    if !need_root("probe_ping_up_dropped_down_unplugged_down_back_up") {
        return;
    }
    let t = Topology::new("pbping", 1).unwrap();
    let (b, ip) = backend(&t);
    let key = TargetKey::new("ping-rule", ip, 8080);
    let absent = TargetKey::new(
        "ping-absent",
        IpAddr::V4(Ipv4Addr::new(10, t.net, 1, 99)),
        80,
    );
    let gw = Ipv4Addr::new(10, t.net, 1, 1);
    in_ns(&t.lb, async {
        let (p, rx) = Prober::new(16);
        let mut ev = Events::new(rx);
        p.set_targets([
            Target::new(key.clone(), spec(ProbeKind::Ping)),
            Target::new(absent.clone(), spec(ProbeKind::Ping)),
        ])
        .unwrap();
        let st = probed_up(&p, &key).await;
        assert_eq!(st.last_result, "ICMP echo reply");
        // Nobody has the address (ARP fails).
        let tr = ev.expect(&absent, false).await;
        reason_has(&tr, &["no answer within 200ms", "ping: host unreachable"]);

        let nft = NftDrop::input(b, "probetest", "icmp type echo-request drop").unwrap();
        let tr = ev.expect(&key, false).await;
        assert_eq!(
            tr.reason,
            "no answer within 200ms (2 failed probes in a row)"
        );
        drop(nft);
        let tr = ev.expect(&key, true).await;
        assert_eq!(tr.reason, "ICMP echo reply");

        let unplugged = LinkDown::new(b, gw);
        let tr = ev.expect(&key, false).await;
        reason_has(&tr, &["no answer within 200ms", "ping: host unreachable"]);
        drop(unplugged);
        ev.expect(&key, true).await;
    });
}

/// TCP sockets in state `02` (SYN_SENT) in this thread's namespace.
fn syn_sent() -> usize {
    std::fs::read_to_string("/proc/thread-self/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("02"))
        .count()
}

#[test]
fn probe_in_flight_bound_holds_with_real_sockets() {
    if !need_root("probe_in_flight_bound_holds_with_real_sockets") {
        return;
    }
    let t = Topology::new("pbmany", 1).unwrap();
    let (b, ip) = backend(&t);
    // Every SYN is dropped: each probe holds its socket for the whole timeout.
    let _nft = NftDrop::input(b, "probetest", "tcp dport 20000-20399 drop").unwrap();
    in_ns(&t.lb, async {
        let (p, _rx) = Prober::new(16);
        let targets: Vec<Target> = (20000..20400u16)
            .map(|port| {
                Target::new(
                    TargetKey::new("many", ip, port),
                    ProbeSpec {
                        timeout: Duration::from_millis(300),
                        ..spec(ProbeKind::Tcp)
                    },
                )
            })
            .collect();
        assert_eq!(p.set_targets(targets).unwrap().added.len(), 400);
        let (mut max_flight, mut max_syn) = (0, 0);
        let end = Instant::now() + Duration::from_millis(2000);
        while Instant::now() < end {
            let (f, s) = (p.in_flight(), syn_sent());
            // The semaphore count is exact. The socket listing is not a
            // snapshot: probes' sockets closing and the next ones opening
            // while it is read can both show (seen: 5 extra under load),
            // hence the slack of 8.
            assert!(
                f <= 16 && s <= 16 + 8,
                "in flight {f}, SYN_SENT sockets {s}"
            );
            max_flight = max_flight.max(f);
            max_syn = max_syn.max(s);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(max_flight, 16, "the bound is used");
        assert!(max_syn >= 12, "sockets really open: {max_syn}");
        let probed = p.snapshot().iter().filter(|s| s.probed).count();
        // 2 s / 300 ms per probe * 16 slots: about 100 probes done, in
        // the order they queued (the slots are handed out fairly).
        assert!((48..=130).contains(&probed), "{probed} targets probed");
        assert!(p
            .snapshot()
            .iter()
            .filter(|s| s.probed)
            .all(|s| s.last_result == "no answer within 300ms"));
    });
}

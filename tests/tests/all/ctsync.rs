//! Conntrack sync between two real datapaths: sessions made on one node
//! (packets through BPF_PROG_TEST_RUN) reach the other over mutual-TLS
//! TCP on loopback, renumbered to its own rule ids and endpoint counters,
//! and an established packet through the second node is translated exactly
//! as the first translated it; ended sessions go on the second too, and
//! SCTP association records follow the same way.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use loxilb_agent::ctsync::SessionTable;
use loxilb_agent::{
    ctsync::{self, Syncer},
    datapath::{remove_pins, Datapath, PinnedMaps},
    rules::RuleTable,
};
use loxilb_common::{ct_state, AssocKey, AssocVal, CtKey, CtVal, EpVal, SvcKey, IPPROTO_UDP};
use loxilb_tests::tables::expect_frame;
use loxilb_tests::{
    certs::Certs,
    fib::{self, run_xdp, verdict::XDP_REDIRECT},
    need_root,
    netns::Netns,
    packet::{Frame, ACK, RST, SYN},
};

/// Node A's rules.
const RULES_A: &str = r#"
rules:
  - name: web
    vip: 20.0.0.100
    port: 80
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.10, port: 8080 }
      - { ip: 10.0.1.11, port: 8080 }
  - name: fnat
    vip: 20.0.0.100
    port: 81
    protocol: tcp
    mode: fullnat
    endpoints:
      - { ip: 10.0.1.10, port: 8081 }
      - { ip: 10.0.1.11, port: 8081 }
  - name: dns
    vip: 20.0.0.100
    port: 53
    protocol: udp
    endpoints:
      - { ip: 10.0.1.10, port: 5353 }
"#;

/// Node B: the same rules in another order, and two A does not have that
/// come first (the reconciler numbers new rules in key order), so that
/// rule ids and endpoint counter indexes differ. The second also has dns's
/// endpoint: B's endpoint index does not hold it (two services claim it),
/// so the dns session, of one entry on A, gets two on B.
const RULES_B: &str = r#"
rules:
  - name: extra
    vip: 20.0.0.50
    port: 80
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.11, port: 9000 }
      - { ip: 10.0.1.10, port: 9000 }
  - name: dns-too
    vip: 20.0.0.51
    port: 53
    protocol: udp
    endpoints:
      - { ip: 10.0.1.10, port: 5353 }
  - name: dns
    vip: 20.0.0.100
    port: 53
    protocol: udp
    endpoints:
      - { ip: 10.0.1.10, port: 5353 }
  - name: fnat
    vip: 20.0.0.100
    port: 81
    protocol: tcp
    mode: fullnat
    endpoints:
      - { ip: 10.0.1.11, port: 8081 }
      - { ip: 10.0.1.10, port: 8081 }
  - name: web
    vip: 20.0.0.100
    port: 80
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.11, port: 8080 }
      - { ip: 10.0.1.10, port: 8080 }
"#;

type Job = Box<dyn FnOnce(&mut Datapath) + Send>;

/// A datapath pinned in its own directory, loaded and driven on a thread
/// inside its own FIB namespace (BPF_PROG_TEST_RUN's FIB lookups use the
/// caller's namespace). Pins and namespace go on drop, also on failure.
struct Node {
    pin_dir: PathBuf,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _ns: Netns,
}

impl Node {
    fn new(tag: &str, rules: &str) -> Node {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lxct-{tag}-{}", std::process::id()));
        remove_pins(&pin_dir);
        let ns = fib::fib_netns(&format!("lxct-{tag}-{}", std::process::id()));
        let path = format!("/var/run/netns/{}", ns.name);
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let (dir, rules) = (pin_dir.clone(), rules.to_string());
        let thread = std::thread::spawn(move || {
            loxilb_tests::netns::enter(&path).unwrap();
            let mut dp = Datapath::load(Some(&dir)).expect("load datapath");
            dp.update_devices().expect("classify devices");
            let rules = loxilb_agent::config::parse("rules.yaml", &rules).unwrap();
            loxilb_agent::rules::Rules::adopt(vec![])
                .apply(&rules, &mut dp)
                .unwrap();
            ready_tx.send(()).unwrap();
            while let Ok(job) = rx.recv() {
                job(&mut dp);
            }
            let _ = dp.shutdown(false);
        });
        let node = Node {
            pin_dir,
            jobs: Some(jobs),
            thread: Some(thread),
            _ns: ns,
        };
        ready.recv().expect("the node's thread failed to start");
        node
    }

    /// Run `f` on the node's datapath, in its namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Datapath) -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .unwrap()
            .send(Box::new(move |dp| {
                let _ = tx.send(f(dp));
            }))
            .expect("node thread gone");
        rx.recv().expect("the job panicked on the node's thread")
    }

    fn xdp(&self, frame: Vec<u8>) -> (u32, Vec<u8>) {
        self.run(move |dp| run_xdp(dp, &frame))
    }

    fn sessions(&self) -> HashMap<CtKey, CtVal> {
        PinnedMaps::open(&self.pin_dir)
            .unwrap()
            .sessions()
            .unwrap()
            .into_iter()
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_pins(&self.pin_dir);
    }
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    t0.elapsed()
}

/// Rule id by identity, and (rule id, endpoint address, port) -> counter
/// index, of a node.
/// (rule id, endpoint address, port) -> endpoint counter index.
type EpIndex = HashMap<(u32, [u32; 4], u16), u32>;

fn tables(dir: &Path) -> (HashMap<SvcKey, u32>, EpIndex) {
    let m = PinnedMaps::open(dir).unwrap();
    let svcs = m
        .services()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.rule_id))
        .collect();
    let eps = m
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|(k, v): (_, EpVal)| ((k.rule_id, v.addr, v.port), v.stat_idx))
        .collect();
    (svcs, eps)
}

fn src_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

#[test]
fn sessions_sync_to_a_backup_that_then_translates_them_the_same() {
    if !need_root("sessions_sync_to_a_backup_that_then_translates_them_the_same") {
        return;
    }
    let certs = Certs::new(&["node-a", "node-b"]);
    let a = Node::new("a", RULES_A);
    let b = Node::new("b", RULES_B);

    // Sessions on A: two TCP (round robin: one per endpoint), a full-NAT
    // one (A allocates its source port), a UDP one.
    let c = "192.168.0.2";
    let firsts = [
        Frame::tcp(c, 40000, "20.0.0.100", 80, SYN),
        Frame::tcp(c, 40001, "20.0.0.100", 80, SYN),
        Frame::tcp(c, 40002, "20.0.0.100", 81, SYN),
        Frame::udp(c, 40003, "20.0.0.100", 53),
    ];
    let mut outs = vec![];
    for f in &firsts {
        let (v, out) = a.xdp(f.bytes());
        assert_eq!(v, XDP_REDIRECT, "A: new session");
        outs.push(out);
    }
    let fnat_port = src_port(&outs[2]);
    // Established packets of each session, both directions, as A
    // translates them.
    let est = [
        Frame::tcp(c, 40000, "20.0.0.100", 80, ACK),
        Frame::tcp("10.0.1.10", 8080, c, 40000, ACK),
        Frame::tcp(c, 40001, "20.0.0.100", 80, ACK),
        Frame::tcp("10.0.1.11", 8080, c, 40001, ACK),
        Frame::tcp(c, 40002, "20.0.0.100", 81, ACK),
        Frame::tcp("10.0.1.10", 8081, "20.0.0.100", fnat_port, ACK),
        Frame::udp(c, 40003, "20.0.0.100", 53),
        Frame::udp("10.0.1.10", 5353, c, 40003),
    ];
    let on_a: Vec<(u32, Vec<u8>)> = est.iter().map(|f| a.xdp(f.bytes())).collect();
    for (i, (v, _)) in on_a.iter().enumerate() {
        assert_eq!(*v, XDP_REDIRECT, "A: established packet {i}");
    }
    let a_ct = a.sessions();
    assert_eq!(
        a_ct.len(),
        5,
        "A: four sessions, the DNAT ones of one entry (their endpoints are \
         indexed), the full-NAT one of two"
    );
    assert_eq!(
        a_ct.values()
            .filter(|v| v.state & ct_state::ONE != 0)
            .count(),
        3
    );

    // B is a backup listening on loopback; A the active node dialling it.
    let cfg = |dir: &Path| ctsync::Config {
        tls_dir: dir.to_path_buf(),
        interval: Duration::from_millis(50),
        ..Default::default()
    };
    let rx = Syncer::start(
        &b.pin_dir,
        ctsync::Config {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            node_name: "node-b".into(),
            ..cfg(&certs.dirs[1])
        },
    )
    .unwrap();
    let tx = Syncer::start(
        &a.pin_dir,
        ctsync::Config {
            peers: vec![rx.local_addr().unwrap()],
            node_name: "node-a".into(),
            ..cfg(&certs.dirs[0])
        },
    )
    .unwrap();
    tx.set_active(true);
    // Five entries on A, six on B: the dns session's reply entry is made
    // there.
    let took = wait_for("A's sessions on B", 20, || b.sessions().len() == 6);
    eprintln!("snapshot of 5 entries applied on B after {took:?}");

    // Each entry on B: A's, with B's rule id and endpoint counter index
    // and no cached next hop.
    let (a_svcs, a_eps) = tables(&a.pin_dir);
    let (b_svcs, b_eps) = tables(&b.pin_dir);
    let b_ct = b.sessions();
    let mut renumbered = 0;
    for (k, va) in &a_ct {
        let vb = b_ct.get(k).unwrap_or_else(|| panic!("{k:?} missing on B"));
        let svc = a_svcs
            .iter()
            .find(|(_, id)| **id == va.rule_id)
            .map(|(s, _)| *s)
            .unwrap();
        let (_, ep_addr, ep_port) = *a_eps
            .iter()
            .find(|((r, _, _), i)| *r == va.rule_id && **i == va.ep_stat)
            .unwrap()
            .0;
        assert_eq!(vb.rule_id, b_svcs[&svc], "{k:?}: B's rule id");
        assert_eq!(
            vb.ep_stat,
            b_eps[&(vb.rule_id, ep_addr, ep_port)],
            "{k:?}: B's counter index of the endpoint"
        );
        assert_ne!(
            vb.rule_id, va.rule_id,
            "{k:?}: the nodes number rules differently"
        );
        if vb.ep_stat != va.ep_stat {
            renumbered += 1;
        }
        assert_eq!((vb.nh.ifindex, vb.nh.expiry), (0, 0));
        // The dns session is of two entries on B (its endpoint is not in
        // B's index); the web ones of one, as on A.
        let state = if k.proto == IPPROTO_UDP {
            va.state & !ct_state::ONE
        } else {
            va.state
        };
        assert_eq!(
            (vb.xsaddr, vb.xdaddr, vb.xsport, vb.xdport, vb.dir, vb.mode, vb.state),
            (va.xsaddr, va.xdaddr, va.xsport, va.xdport, va.dir, va.mode, state),
            "{k:?}: translation and state"
        );
        // The age carried over: B's last packet is A's (one clock here).
        assert!(
            vb.last_seen_ns.abs_diff(va.last_seen_ns) < 500_000_000,
            "{k:?}: last seen {} on A, {} on B",
            va.last_seen_ns,
            vb.last_seen_ns
        );
    }
    assert!(
        renumbered >= 3,
        "the nodes number endpoint counters differently ({renumbered} of 5)"
    );
    // B's own entry: the dns session's reply entry.
    let (dns_k, dns_v) = a_ct.iter().find(|(k, _)| k.proto == IPPROTO_UDP).unwrap();
    assert_ne!(dns_v.state & ct_state::ONE, 0, "of one entry on A");
    let made: Vec<(&CtKey, &CtVal)> = b_ct.iter().filter(|(k, _)| !a_ct.contains_key(k)).collect();
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(Some(*made[0].0), dns_k.peer(&b_ct[dns_k]));
    assert_eq!(made[0].1.dir, loxilb_common::ct_dir::REPLY);
    assert!(rx.stats().inbound.apply.one_split >= 1);

    // The point: B translates the established packets exactly as A did.
    for (i, f) in est.iter().enumerate() {
        let (v, out) = b.xdp(f.bytes());
        assert_eq!(v, on_a[i].0, "B: verdict of established packet {i}");
        expect_frame(&format!("B: packet {i}"), &out, &on_a[i].1);
    }
    // ... and counts them on its own endpoint counters.
    let b_web = b_svcs[&a_svcs
        .iter()
        .find(|(k, _)| u16::from_be(k.port) == 80)
        .map(|(k, _)| *k)
        .unwrap()];
    let ep10 = b_eps[&(
        b_web,
        loxilb_common::addr_from_ip("10.0.1.10".parse().unwrap()),
        8080u16.to_be(),
    )];
    let ep_stats = b.run(move |dp| dp.ep_stats(&[ep10]).unwrap());
    assert!(ep_stats[0].0.packets >= 2, "{ep_stats:?}");

    // An RST on A closes the session: B hears of the new state.
    let (k40000, _) = a_ct
        .iter()
        .find(|(k, _)| u16::from_be(k.sport) == 40000)
        .map(|(k, v)| (*k, *v))
        .unwrap();
    a.xdp(Frame::tcp(c, 40000, "20.0.0.100", 80, RST | ACK).bytes());
    wait_for("the closing state on B", 10, || {
        b.sessions()
            .get(&k40000)
            .is_some_and(|v| v.state & ct_state::CLOSING != 0)
    });
    // SCTP multihoming association records (two keys: the client's and
    // the endpoint's tag) of the fnat rule follow with B's numbers.
    let fnat_key = *a_svcs.keys().find(|k| u16::from_be(k.port) == 81).unwrap();
    let (a_fnat, b_fnat) = (a_svcs[&fnat_key], b_svcs[&fnat_key]);
    let ep10_8081 = (
        loxilb_common::addr_from_ip("10.0.1.10".parse().unwrap()),
        8081u16.to_be(),
    );
    let assoc = AssocVal {
        eps: [ep10_8081.0, [0; 4], [0; 4], [0; 4]],
        vips: [fnat_key.addr, [0; 4], [0; 4], [0; 4]],
        ep_port: ep10_8081.1,
        vport: 81u16.to_be(),
        ep_stat: a_eps[&(a_fnat, ep10_8081.0, ep10_8081.1)],
        n_pairs: 1,
        n_vips: 1,
        ctag: 0x11,
        etag: 0x22,
        ..Default::default()
    };
    let mut a_table = ctsync::PinnedTable::open(&a.pin_dir).unwrap();
    for vtag in [0x11, 0x22] {
        let k = AssocKey {
            rule_id: a_fnat,
            vtag,
        };
        a_table.put_assoc(&k, &assoc).unwrap();
    }
    let b_assocs = || -> HashMap<AssocKey, AssocVal> {
        PinnedMaps::open(&b.pin_dir)
            .unwrap()
            .associations()
            .unwrap()
            .into_iter()
            .collect()
    };
    wait_for("the associations on B", 10, || b_assocs().len() == 2);
    let mut want = assoc;
    want.ep_stat = b_eps[&(b_fnat, ep10_8081.0, ep10_8081.1)];
    assert_ne!(want.ep_stat, assoc.ep_stat);
    for vtag in [0x11, 0x22] {
        let k = AssocKey {
            rule_id: b_fnat,
            vtag,
        };
        assert_eq!(
            b_assocs().get(&k),
            Some(&want),
            "association {vtag:#x} on B"
        );
    }
    a_table
        .remove_assoc(&AssocKey {
            rule_id: a_fnat,
            vtag: 0x22,
        })
        .unwrap();
    wait_for("the association's removal on B", 10, || {
        b_assocs().len() == 1
    });

    // The web rule's sessions end on A: they go on B, the others stay.
    let a_web = a_svcs
        .iter()
        .find(|(k, _)| u16::from_be(k.port) == 80)
        .map(|(_, id)| *id)
        .unwrap();
    assert_eq!(a.run(move |dp| dp.flush_sessions(a_web).unwrap()), 2);
    wait_for("the ended sessions to go on B", 10, || {
        b.sessions().len() == 4
    });
    assert!(!b.sessions().contains_key(&k40000));
    let st = rx.stats();
    assert_eq!(st.inbound.apply.dropped_no_rule, 0);
    assert_eq!(st.inbound.apply.dropped_no_endpoint, 0);
    assert!(st.inbound.apply.removed >= 2, "{st:?}");

    // Throughput: 20,000 sessions (copies of the full-NAT one, client and
    // source port alike) at once on A.
    let n: u16 = 20_000;
    let fwd = *a_ct
        .iter()
        .find(|(k, _)| u16::from_be(k.sport) == 40002)
        .unwrap()
        .1;
    let fk = *a_ct
        .iter()
        .find(|(k, _)| u16::from_be(k.sport) == 40002)
        .unwrap()
        .0;
    let rk = fk.peer(&fwd).expect("a full-NAT session has a reply entry");
    let rev = a_ct[&rk];
    a.run(move |dp| {
        let now = loxilb_agent::show::monotonic_ns();
        for i in 0..n {
            let port = (10_000 + i).to_be();
            let mut k = fk;
            k.sport = port;
            let mut r = rk;
            r.dport = port;
            let v = CtVal {
                xsport: port,
                last_seen_ns: now,
                ..fwd
            };
            let rv = CtVal {
                xdport: port,
                last_seen_ns: now,
                ..rev
            };
            dp.insert_session(k, v).unwrap();
            dp.insert_session(r, rv).unwrap();
        }
    });
    let want = 3 + 2 * n as usize;
    let took = wait_for("20,000 sessions on B", 60, || {
        b.sessions().len() == want + 1
    });
    // What one read of LB_CT costs (best of five: the machine may be
    // busy); the kernel's walk covers every bucket of the map.
    let t_read = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            assert_eq!(a_table.sessions().unwrap().len(), want);
            t0.elapsed()
        })
        .min()
        .unwrap();
    eprintln!("reading {want} entries of LB_CT takes {t_read:?}");
    eprintln!(
        "{} entries synced in {took:?} ({:.0} entries/s, scan interval 50 ms)",
        2 * n,
        (2 * n) as f64 / took.as_secs_f64()
    );
    let st = tx.stats();
    eprintln!(
        "A: last scan {} entries in {:.1} ms; peer {:?}",
        st.last_scan_entries, st.last_scan_ms, st.peers[0]
    );
    assert_eq!(a.run(|dp| dp.clear_sessions().unwrap()), want);
    let took = wait_for("their removal on B", 60, || b.sessions().is_empty());
    eprintln!("{want} removals synced in {took:?}");
    let scans = tx.stats().scans;
    wait_for("two more scans", 10, || tx.stats().scans >= scans + 2);
    eprintln!(
        "A: a scan of the empty table takes {:.1} ms",
        tx.stats().last_scan_ms
    );

    tx.stop();
    rx.stop();
}

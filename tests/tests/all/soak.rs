//! Soak: the real agent for a while (60 s by default, `LOXILB_SOAK_SECS`;
//! `scripts/soak.sh` runs 10 minutes) with steady new TCP connections
//! from the client (each one a request and its answer), one long-lived
//! connection asked every second, and the rule file reloaded every
//! second (alternating between two versions that keep the service and
//! its backends but change its idle timeout and a second rule). Every 10 s
//! it prints connections made and failed, the agent's RSS and the
//! session table's occupancy. Asserted: no connection failed, the long one
//! never broke, every reload was applied, RSS stayed flat (the last sample
//! within bounds of the first after the warm-up) and occupancy stayed
//! within what the connection rate and the close timeout leave.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use loxilb_tests::{
    need_root,
    netns::{Agent, Conn, Scene, Topology, VIP},
};

fn rules(t: &Topology, version: u32) -> String {
    let timeout = if version.is_multiple_of(2) { 300 } else { 240 };
    let mut out = format!(
        "rules:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    timeout: {timeout}\n    endpoints:\n      - {{ ip: {}, port: 8080 }}\n      - {{ ip: {}, port: 8080 }}\n",
        t.backend_ip(1),
        t.backend_ip(2)
    );
    if !version.is_multiple_of(2) {
        out += &format!(
            "  - name: extra\n    vip: {VIP}\n    port: 81\n    protocol: tcp\n    endpoints:\n      - {{ ip: {}, port: 8080 }}\n",
            t.backend_ip(1)
        );
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Live sessions in the table (`loxilb-agent -o json sessions`).
fn occupancy(t: &Topology) -> usize {
    let j = loxilb_tests::netns::sh(&[
        loxilb_tests::netns::agent_bin().to_str().unwrap(),
        "--pin-dir",
        t.pin_dir().to_str().unwrap(),
        "-o",
        "json",
        "sessions",
    ])
    .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&j)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn soak_new_connections_a_long_one_and_reloads_every_second() {
    let name = "soak_new_connections_a_long_one_and_reloads_every_second";
    if !need_root(name) {
        return;
    }
    // Runs alone: see `loxilb_tests::exclusive`.
    let _alone = loxilb_tests::exclusive(name);
    let secs: u64 = std::env::var("LOXILB_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
        .max(20);
    let s = Scene::new("lxsoak", 2, (8080, 5353), |_, _| {}, |t| rules(t, 0));
    let mut agent = Agent::start(&s.t, &s.cfg, &[]).expect("agent");
    let pid = agent.pid().unwrap();
    let mut long = Conn::open(&s.t.client, Scene::vip(80)).expect("the long connection");
    let long_backend = long.ask("first").unwrap().backend;

    // New connections, one every 20 ms, from a thread in the client's
    // namespace.
    let stop = Arc::new(AtomicBool::new(false));
    let (made, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let client = {
        let (stop, made, failed, first_error) = (
            stop.clone(),
            made.clone(),
            failed.clone(),
            first_error.clone(),
        );
        let ns_name = s.t.client.name.clone();
        std::thread::spawn(move || {
            loxilb_tests::netns::enter(&format!("/var/run/netns/{ns_name}")).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r =
                    std::net::TcpStream::connect_timeout(&Scene::vip(80), Duration::from_secs(3))
                        .map_err(anyhow::Error::from)
                        .and_then(|st| {
                            st.set_read_timeout(Some(Duration::from_secs(3)))?;
                            let mut c = Conn::from_stream(st);
                            c.ask(&format!("n{i}"))
                        });
                match r {
                    Ok(_) => made.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error
                            .lock()
                            .unwrap()
                            .get_or_insert(format!("connection {i}: {e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let t0 = Instant::now();
    let mut version = 0;
    let mut samples: Vec<(u64, u64, usize)> = vec![];
    let mut next_sample = Duration::from_secs(10);
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        version += 1;
        agent.reload(&s.cfg, &rules(&s.t, version));
        let r = long
            .ask(&format!("long{version}"))
            .unwrap_or_else(|e| panic!("the long connection broke at {:?}: {e:#}", t0.elapsed()));
        assert_eq!(
            r.backend, long_backend,
            "the long connection kept its backend"
        );
        if t0.elapsed() >= next_sample {
            next_sample += Duration::from_secs(10);
            let (rss, occ) = (rss_kib(pid), occupancy(&s.t));
            eprintln!(
                "soak {:>4.0} s: {} connections, {} failed, {version} reloads, agent RSS {} KiB, {occ} session entries",
                t0.elapsed().as_secs_f64(),
                made.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
                rss
            );
            samples.push((t0.elapsed().as_secs(), rss, occ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let (made, failed) = (made.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed; first: {:?}",
        made + failed,
        first_error.lock().unwrap()
    );
    assert!(
        made as f64 >= secs as f64 * 10.0,
        "only {made} connections in {secs} s"
    );
    // Every write was applied (the file watch may apply one twice) and
    // none failed.
    assert!(agent.log_count("reload applied") >= version as usize);
    assert_eq!(agent.log_count("reload failed"), 0, "{}", agent.log_text());
    // Flat: after the warm-up (the first sample), RSS grows by at most a
    // quarter plus 8 MiB. The session table holds what the connection rate
    // leaves in it: a closed session stays CT_CLOSE_TIMEOUT_S after its
    // close and up to one 10 s upkeep period more before the agent removes
    // it, so the table settles below rate x (that + 10 s + 5 s of grace).
    // A leak (sessions never removed) grows with the run instead: 60 s of
    // connections already exceed the bound.
    let (_, rss0, occ0) = samples[0];
    let (at, rss1, occ1) = *samples.last().unwrap();
    assert!(
        rss1 <= rss0 + rss0 / 4 + 8 * 1024,
        "RSS grew from {rss0} to {rss1} KiB by {at} s: {samples:?}"
    );
    let rate = made as f64 / t0.elapsed().as_secs_f64();
    let settle = (loxilb_common::CT_CLOSE_TIMEOUT_S + 10 + 5) as f64;
    let bound = (rate * settle) as usize + 50;
    assert!(
        occ1 <= bound,
        "session entries grew from {occ0} to {occ1} by {at} s, over {bound} ({rate:.1} connections/s x {settle} s + 50): {samples:?}"
    );
    eprintln!(
        "{name}: {secs} s, {made} connections, 0 failed, {version} reloads; RSS {rss0} -> {rss1} KiB, session entries {occ0} -> {occ1}"
    );
    agent.stop().unwrap();
}

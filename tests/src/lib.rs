//! Shared test machinery: packet builders, network-namespace topologies
//! that clean up after themselves, real TCP/UDP servers and clients.

pub mod bgp_peer;
pub mod certs;
pub mod fib;
pub mod kube_api;
pub mod netns;
pub mod oracle;
pub mod packet;
pub mod probe_peers;
pub mod sctp_packet;
pub mod sctp_peers;
pub mod tables;

/// Coarse monotonic time (CLOCK_MONOTONIC_COARSE), the clock the
/// datapath stamps sessions with (see `loxilb_common::Clock`).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Root tests call this first. Without root they skip with a clear
/// message, unless LOXILB_REQUIRE_ROOT=1 (CI), where a skip is a failure.
///
/// With root, the calling test thread also takes its share of the
/// process-wide run lock (see [`exclusive`]) and holds it until the
/// thread ends (libtest runs every test on a thread of its own), so a
/// test that must run alone waits for the running ones and keeps new ones
/// waiting.
pub fn need_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        run_lock::share();
        return true;
    }
    if std::env::var("LOXILB_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test}: needs root (BPF, network namespaces) and LOXILB_REQUIRE_ROOT=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root (loads BPF programs, creates network namespaces); run the test command as root");
    false
}

/// Run the calling test alone among the root tests of this process: waits
/// for the running ones to end and keeps the others from starting until
/// the returned guard drops. Call it right after [`need_root`].
///
/// All integration tests are one binary (`tests/all`), so they run in
/// parallel threads. One test takes it:
/// `soak::soak_new_connections_a_long_one_and_reloads_every_second`, whose
/// bounds on the agent's RSS and session table over its run (and no failed
/// connection with 3 s timeouts) were set running alone, as it did in a
/// binary of its own.
///
/// Not the HA takeover tests (`e2e_ha::a_killed_agent_*`,
/// `e2e_ha::a_dead_node_*`): their assertions allow 10 s and held when they
/// shared the machine with the other e2e_ha tests, as they always did; the
/// takeover figures quoted in the README come from `scripts/bench.sh`,
/// which runs each of them alone by name.
///
/// Everything else only needs names of its own (network namespaces, pin
/// directories, temporary files: see `netns::Netns::new`).
pub fn exclusive(test: &str) -> run_lock::Exclusive {
    run_lock::exclusive(test)
}

pub mod run_lock {
    //! The process-wide lock behind [`crate::need_root`] and
    //! [`crate::exclusive`]: root tests share it, a test that must run
    //! alone takes it exclusively.

    use std::cell::RefCell;
    use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

    static RUN: RwLock<()> = RwLock::new(());

    enum Held {
        Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
        Exclusive,
    }

    thread_local! {
        /// What this thread holds; a shared hold goes with the thread.
        static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
    }

    /// Take a share for the calling thread (once; nothing if it holds the
    /// lock already, shared or exclusive).
    pub fn share() {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.is_none() {
                let g = RUN.read().unwrap_or_else(|e| e.into_inner());
                *h = Some(Held::Shared(g));
            }
        });
    }

    /// Held by a test that runs alone; dropping it lets the others run.
    pub struct Exclusive {
        _guard: RwLockWriteGuard<'static, ()>,
    }

    impl Drop for Exclusive {
        fn drop(&mut self) {
            HELD.with(|h| *h.borrow_mut() = None);
        }
    }

    pub(crate) fn exclusive(test: &str) -> Exclusive {
        // Give up this thread's own share first (with --test-threads=1 the
        // tests run one after another on one thread, which keeps it).
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            assert!(
                !matches!(*h, Some(Held::Exclusive)),
                "{test}: takes the exclusive run lock twice; take it once, at the start of the test"
            );
            *h = None;
        });
        let t0 = std::time::Instant::now();
        let guard = RUN.write().unwrap_or_else(|e| e.into_inner());
        let waited = t0.elapsed();
        if waited.as_secs() >= 1 {
            eprintln!(
                "{test}: runs alone; waited {:.1} s for the tests that were running",
                waited.as_secs_f64()
            );
        }
        HELD.with(|h| *h.borrow_mut() = Some(Held::Exclusive));
        Exclusive { _guard: guard }
    }
}

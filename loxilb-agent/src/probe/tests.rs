//! Spec validation, the up/down state machine, and the scheduler driven by
//! scripted probe outcomes on Tokio's paused (virtual) clock.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{runtime::Handle, sync::mpsc::UnboundedReceiver, time::Instant};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn spec(kind: ProbeKind) -> ProbeSpec {
    ProbeSpec::new(kind)
}

#[test]
fn probe_target_validation_names_the_target() {
    let t = Target::new(TargetKey::new("web", ip(1), 0), spec(ProbeKind::Tcp));
    assert_eq!(
        t.validate().unwrap_err().to_string(),
        "rule web endpoint 10.0.0.1:0: probe port 0: a tcp probe needs a port: the endpoint has none, set the probe port"
    );
    let mut s = spec(ProbeKind::Tcp);
    s.port = Some(8080);
    let t = Target::new(TargetKey::new("web", ip(1), 0), s);
    t.validate().unwrap();
    assert_eq!(t.probe_addr(), "10.0.0.1:8080".parse().unwrap());
    // ping needs no port.
    Target::new(TargetKey::new("web", ip(1), 0), spec(ProbeKind::Ping))
        .validate()
        .unwrap();
    let v6: IpAddr = "fd00::1".parse().unwrap();
    let t = Target::new(TargetKey::new("web", v6, 80), spec(ProbeKind::Sctp));
    assert_eq!(
        t.validate().unwrap_err().to_string(),
        "rule web endpoint [fd00::1]:80: probe address fd00::1: sctp probes of IPv6 endpoints are not implemented yet"
    );
    Target::new(TargetKey::new("web", v6, 80), spec(ProbeKind::Https))
        .validate()
        .unwrap();
    let mut s = spec(ProbeKind::Http);
    s.timeout = ms(1);
    assert_eq!(
        Target::new(TargetKey::new("api", ip(2), 80), s)
            .validate()
            .unwrap_err()
            .to_string(),
        "rule api endpoint 10.0.0.2:80: probe timeout 1ms: out of range (10ms..=3600s)"
    );
}

#[test]
fn probe_health_state_machine() {
    let mut s = spec(ProbeKind::Tcp);
    s.retries = 2;
    let mut h = Health::default();
    assert!(h.up && !h.probed);
    assert_eq!(h.record(true, &s), None, "up stays up");
    assert!(h.probed);
    assert_eq!(h.record(false, &s), None, "one failure of two");
    assert_eq!(h.consecutive_failures, 1);
    assert_eq!(h.record(false, &s), Some(false), "second failure: down");
    assert_eq!(h.record(false, &s), None, "down stays down");
    assert_eq!(h.consecutive_failures, 3);
    assert_eq!(h.record(true, &s), Some(true), "one success: up");
    assert_eq!(h.consecutive_failures, 0);
    // Failures must be consecutive.
    s.retries = 3;
    let mut h = Health::default();
    for ok in [false, false, true, false, false] {
        assert_eq!(h.record(ok, &s), None);
    }
    assert_eq!(h.record(false, &s), Some(false));
    // retries 0 behaves as 1.
    s.retries = 0;
    let mut h = Health::default();
    assert_eq!(h.record(false, &s), Some(false));
}

#[test]
fn probe_jitter() {
    let mut r = Rng(12345);
    for _ in 0..10_000 {
        let j = r.jittered(Duration::from_secs(10));
        assert!(
            j >= Duration::from_secs(9) && j < Duration::from_secs(11),
            "{j:?}"
        );
        assert!(r.below(ms(200)) < ms(200));
    }
}

// ---- the scheduler, with scripted outcomes on a virtual clock ----

#[derive(Clone, Copy, Debug)]
enum Behave {
    Ok,
    Fail,
    /// Never answers (the prober's timeout ends it).
    Hang,
    /// Answers Ok after this long.
    Slow(Duration),
}

#[derive(Default)]
struct Fake {
    behave: Mutex<HashMap<SocketAddr, Behave>>,
    calls: Mutex<Vec<(SocketAddr, Instant)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl Fake {
    fn set(&self, a: SocketAddr, b: Behave) {
        self.behave.lock().unwrap().insert(a, b);
    }
    fn calls_to(&self, a: SocketAddr) -> Vec<Instant> {
        let c = self.calls.lock().unwrap();
        c.iter().filter(|(x, _)| *x == a).map(|(_, t)| *t).collect()
    }
    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

struct Running<'a>(&'a AtomicUsize);
impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Check for Fake {
    fn check<'a>(&'a self, addr: SocketAddr, _spec: &'a ProbeSpec) -> ProbeFuture<'a> {
        Box::pin(async move {
            self.calls.lock().unwrap().push((addr, Instant::now()));
            let n = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(n, Ordering::SeqCst);
            let _g = Running(&self.running);
            let b = *self
                .behave
                .lock()
                .unwrap()
                .get(&addr)
                .unwrap_or(&Behave::Ok);
            match b {
                Behave::Ok => Ok("fake ok".into()),
                Behave::Fail => Err("fake failure".into()),
                Behave::Hang => std::future::pending().await,
                Behave::Slow(d) => {
                    tokio::time::sleep(d).await;
                    Ok("fake slow ok".into())
                }
            }
        })
    }
}

fn fake_prober(max: usize) -> (Arc<Fake>, Prober, UnboundedReceiver<Transition>) {
    let fake = Arc::new(Fake::default());
    let (p, rx) = Prober::with_check(Handle::current(), max, fake.clone());
    (fake, p, rx)
}

fn tspec(kind: ProbeKind, interval_ms: u64, timeout_ms: u64, retries: u32) -> ProbeSpec {
    ProbeSpec {
        interval: ms(interval_ms),
        timeout: ms(timeout_ms),
        retries,
        ..ProbeSpec::new(kind)
    }
}

async fn next(rx: &mut UnboundedReceiver<Transition>) -> Transition {
    tokio::time::timeout(Duration::from_secs(3600), rx.recv())
        .await
        .expect("a transition")
        .expect("channel open")
}

fn key(last: u8) -> TargetKey {
    TargetKey::new("web", ip(last), 80)
}

fn addr(last: u8) -> SocketAddr {
    SocketAddr::new(ip(last), 80)
}

#[tokio::test(start_paused = true)]
async fn probe_down_after_retries_up_after_one_success() {
    let (fake, p, mut rx) = fake_prober(8);
    fake.set(addr(1), Behave::Fail);
    let s = tspec(ProbeKind::Tcp, 1000, 200, 3);
    let r = p.set_targets([Target::new(key(1), s.clone())]).unwrap();
    assert_eq!(r.added, vec![key(1)]);
    let st = p.status(&key(1)).unwrap();
    assert_eq!(
        (st.up, st.probed, st.state()),
        (true, false, "up (not probed yet)")
    );

    let t = next(&mut rx).await;
    assert_eq!((t.key.clone(), t.up), (key(1), false));
    assert_eq!(t.reason, "fake failure (3 failed probes in a row)");
    let calls = fake.calls_to(addr(1));
    assert_eq!(calls.len(), 3, "down exactly at the 3rd failure");
    // Decided by the third probe, two jittered intervals after the first.
    let span = calls[2] - calls[0];
    assert!(span >= ms(1800) && span <= ms(2200), "{span:?}");
    let st = p.status(&key(1)).unwrap();
    assert_eq!(
        (st.up, st.consecutive_failures, st.last_ok, st.state()),
        (false, 3, Some(false), "down")
    );
    assert_eq!(st.last_result, "fake failure");
    assert_eq!(p.down(), vec![key(1)]);

    // The endpoint recovers: up again at the next probe, within one interval.
    let flipped = Instant::now();
    fake.set(addr(1), Behave::Ok);
    let t = next(&mut rx).await;
    assert!(t.up);
    assert_eq!(t.reason, "fake ok");
    assert!(
        Instant::now() - flipped <= ms(1100),
        "{:?}",
        Instant::now() - flipped
    );
    let st = p.status(&key(1)).unwrap();
    assert_eq!(
        (st.up, st.consecutive_failures, st.state()),
        (true, 0, "up")
    );
    assert_eq!(
        st.failures,
        st.probes - 1,
        "all failures but the last probe"
    );
    assert!(rx.try_recv().is_err(), "no other transition");

    // The state crosses to the CLI process serialized.
    let snap = p.snapshot();
    let text = serde_norway::to_string(&snap).unwrap();
    assert!(
        text.contains("kind: tcp") && text.contains("rule: web"),
        "{text}"
    );
    let back: Vec<TargetStatus> = serde_norway::from_str(&text).unwrap();
    assert_eq!(back, snap);
}

#[tokio::test(start_paused = true)]
async fn probe_schedule_first_within_interval_then_interval_with_jitter() {
    let (fake, p, _rx) = fake_prober(64);
    let start = Instant::now();
    let targets: Vec<Target> = (1..=50)
        .map(|i| Target::new(key(i), tspec(ProbeKind::Tcp, 1000, 100, 2)))
        .collect();
    p.set_targets(targets).unwrap();
    tokio::time::sleep(ms(10_500)).await;
    let mut firsts = vec![];
    for i in 1..=50 {
        let c = fake.calls_to(addr(i));
        assert!(c.len() >= 9, "{i}: {} probes in 10.5 s", c.len());
        assert!(
            c[0] - start <= ms(1000), // the timer rounds up to the millisecond
            "first probe within the first interval"
        );
        firsts.push(c[0] - start);
        for w in c.windows(2) {
            let d = w[1] - w[0];
            assert!(d >= ms(900) && d <= ms(1100), "spacing {d:?}");
        }
    }
    firsts.sort();
    firsts.dedup();
    assert!(
        firsts.len() > 40,
        "first probes are spread over the interval"
    );
}

#[tokio::test(start_paused = true)]
async fn probe_timeout_is_a_failure_with_its_latency() {
    let (fake, p, mut rx) = fake_prober(8);
    fake.set(addr(1), Behave::Hang);
    p.set_targets([Target::new(key(1), tspec(ProbeKind::Http, 500, 200, 2))])
        .unwrap();
    let t = next(&mut rx).await;
    assert!(!t.up);
    assert_eq!(
        t.reason,
        "no answer within 200ms (2 failed probes in a row)"
    );
    let st = p.status(&key(1)).unwrap();
    assert_eq!(st.last_latency, Some(ms(200)));
    assert_eq!(
        fake.running.load(Ordering::SeqCst),
        0,
        "timed-out probes are dropped"
    );
    // A slow but timely answer is a success with its latency.
    fake.set(addr(1), Behave::Slow(ms(150)));
    let t = next(&mut rx).await;
    assert!(t.up);
    assert_eq!(p.status(&key(1)).unwrap().last_latency, Some(ms(150)));
}

#[tokio::test(start_paused = true)]
async fn probe_in_flight_is_bounded_for_4096_endpoints() {
    let (fake, p, _rx) = fake_prober(64);
    let mut targets = vec![];
    for i in 0..4096u32 {
        let a = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        fake.set(SocketAddr::new(a, 80), Behave::Slow(ms(400)));
        targets.push(Target::new(
            TargetKey::new("big", a, 80),
            tspec(ProbeKind::Tcp, 10_000, 1000, 2),
        ));
    }
    let r = p.set_targets(targets).unwrap();
    assert_eq!(r.added.len(), 4096);
    let mut seen_max = 0;
    // 4,096 first probes spread over 10 s ask for ~160 at once; 64 slots
    // of 400 ms probes serve 160/s, so all are probed within ~26 s.
    for _ in 0..300 {
        tokio::time::sleep(ms(100)).await;
        seen_max = seen_max.max(p.in_flight());
        assert!(p.in_flight() <= 64);
    }
    assert_eq!(
        fake.max_running.load(Ordering::SeqCst),
        64,
        "the bound is reached, never passed"
    );
    assert!(seen_max <= 64);
    let snap = p.snapshot();
    assert_eq!(snap.len(), 4096);
    assert!(
        snap.iter().all(|s| s.probed && s.up),
        "every endpoint probed within 30 s"
    );
    assert!(fake.total_calls() >= 4096);
}

#[tokio::test(start_paused = true)]
async fn probe_set_targets_is_a_diff_that_keeps_state() {
    let (fake, p, mut rx) = fake_prober(8);
    fake.set(addr(2), Behave::Fail);
    let a = Target::new(key(1), tspec(ProbeKind::Tcp, 1000, 200, 1));
    let b = Target::new(key(2), tspec(ProbeKind::Tcp, 1000, 200, 1));
    p.set_targets([a.clone(), b.clone()]).unwrap();
    let t = next(&mut rx).await;
    assert_eq!((t.key.clone(), t.up), (key(2), false));

    // The same set again: nothing restarts, B stays down, its counters go on.
    let before = p.status(&key(2)).unwrap();
    let r = p.set_targets([b.clone(), a.clone()]).unwrap();
    assert_eq!(
        r,
        SetReport {
            unchanged: 2,
            ..Default::default()
        }
    );
    tokio::time::sleep(ms(2500)).await;
    let after = p.status(&key(2)).unwrap();
    assert!(!after.up);
    assert!(after.probes >= before.probes + 2, "{before:?} -> {after:?}");
    assert!(after.consecutive_failures > before.consecutive_failures);
    assert!(rx.try_recv().is_err());

    // B's spec changes: probing restarts, down is kept, the count restarts.
    let mut b2 = b.clone();
    b2.spec.timeout = ms(300);
    let r = p.set_targets([a.clone(), b2.clone()]).unwrap();
    assert_eq!(r.changed, vec![key(2)]);
    assert_eq!(r.unchanged, 1);
    let st = p.status(&key(2)).unwrap();
    assert_eq!((st.up, st.consecutive_failures), (false, 0));
    tokio::time::sleep(ms(2500)).await;
    assert!(rx.try_recv().is_err(), "still failing: no transition");

    // A goes away: its probes stop, no transition.
    let r = p.set_targets([b2.clone()]).unwrap();
    assert_eq!(r.removed, vec![key(1)]);
    assert!(p.status(&key(1)).is_none());
    let n = fake.calls_to(addr(1)).len();
    tokio::time::sleep(ms(5000)).await;
    assert_eq!(fake.calls_to(addr(1)).len(), n);
    assert!(rx.try_recv().is_err());

    // Probing turned off (type none) while down: up, said once.
    let mut b3 = b2.clone();
    b3.spec = ProbeSpec::new(ProbeKind::None);
    p.set_targets([b3]).unwrap();
    let t = rx.try_recv().unwrap();
    assert_eq!((t.key.clone(), t.up), (key(2), true));
    assert_eq!(t.reason, "probing turned off (probe type none)");
    let n = fake.calls_to(addr(2)).len();
    tokio::time::sleep(ms(5000)).await;
    assert_eq!(fake.calls_to(addr(2)).len(), n, "type none is not probed");
    assert_eq!(p.status(&key(2)).unwrap().state(), "up (not probed)");
}

#[tokio::test(start_paused = true)]
async fn probe_bad_target_set_changes_nothing() {
    let (_fake, p, _rx) = fake_prober(8);
    let a = Target::new(key(1), tspec(ProbeKind::Tcp, 1000, 200, 1));
    p.set_targets([a.clone()]).unwrap();
    let mut bad = a.clone();
    bad.key = key(2);
    bad.spec.retries = 1000;
    let e = p.set_targets([bad]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rule web endpoint 10.0.0.2:80: probe retries 1000: out of range (0..=100)"
    );
    assert_eq!(e.field, "retries");
    let e = p.set_targets([a.clone(), a.clone()]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rule web endpoint 10.0.0.1:80: probe target 10.0.0.1:80: listed twice"
    );
    let e = p.set_rule_targets("api", [a.clone()]).unwrap_err();
    assert!(
        e.to_string().ends_with("given in the targets of rule api"),
        "{e}"
    );
    let snap = p.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].key, key(1));
}

#[tokio::test(start_paused = true)]
async fn probe_rule_scoped_updates_and_drop_stops_probing() {
    let (fake, p, _rx) = fake_prober(8);
    let t = |rule: &str, last: u8| {
        Target::new(
            TargetKey::new(rule, ip(last), 80),
            tspec(ProbeKind::Tcp, 1000, 200, 1),
        )
    };
    p.set_rule_targets("web", [t("web", 1), t("web", 2)])
        .unwrap();
    p.set_rule_targets("api", [t("api", 3)]).unwrap();
    let r = p.set_rule_targets("web", [t("web", 2)]).unwrap();
    assert_eq!(r.removed, vec![TargetKey::new("web", ip(1), 80)]);
    assert_eq!(r.unchanged, 1);
    let keys: Vec<_> = p.snapshot().into_iter().map(|s| s.key).collect();
    assert_eq!(
        keys,
        vec![
            TargetKey::new("api", ip(3), 80),
            TargetKey::new("web", ip(2), 80)
        ]
    );
    let r = p.remove_rule("api");
    assert_eq!(r.removed, vec![TargetKey::new("api", ip(3), 80)]);
    tokio::time::sleep(ms(3000)).await;
    drop(p);
    let n = fake.total_calls();
    tokio::time::sleep(ms(5000)).await;
    assert_eq!(
        fake.total_calls(),
        n,
        "dropping the prober stops every probe"
    );
}

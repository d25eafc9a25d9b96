//! The demo: a topology of network namespaces (client, load-balancer node,
//! three backends with real TCP and UDP servers), the agent attached with
//! XDP in the LB namespace serving `manifest/standalone/demo-rules.yaml`,
//! real requests from the client to the VIP, which backend answered each,
//! and the live session table. Everything is removed at the end, on
//! failure and on Ctrl-C.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use loxilb_tests::netns::{udp_ask, Agent, Conn, PinDirGuard, Servers, Topology, VIP};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo needs root (it loads BPF programs and creates network namespaces)");
        std::process::exit(2);
    }
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let rules = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifest/standalone/demo-rules.yaml")
        });
    match run(&rules) {
        Ok(()) => println!("\ndemo done; namespaces, agent and pinned maps removed"),
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}\n(namespaces, agent and pinned maps removed)");
            std::process::exit(1);
        }
    }
}

fn run(rules: &std::path::Path) -> Result<()> {
    println!("== building the topology: client, lb, backends b1..b3 (network namespaces + veth)");
    let t = Topology::new("lxdemo", 3)?;
    let _pins = PinDirGuard(t.pin_dir());
    let _servers: Vec<Servers> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Servers::start(b, &format!("b{}", i + 1), 8080, 5353))
        .collect::<Result<_>>()?;
    println!(
        "   client {}  ->  VIP {VIP}  ->  backends {}, {}, {}",
        t.client_ip(),
        t.backend_ip(1),
        t.backend_ip(2),
        t.backend_ip(3)
    );
    check_stop()?;

    println!(
        "== starting loxilb-agent in the lb namespace with {}",
        rules.display()
    );
    let mut agent = Agent::start(&t, rules, &[]).context("starting the agent")?;
    for line in agent.log_text().lines() {
        if line.contains("attached") || line.contains("applied") {
            println!("   agent: {}", strip_ansi(line));
        }
    }
    check_stop()?;

    let vip80: SocketAddr = format!("{VIP}:80").parse()?;
    let vip53: SocketAddr = format!("{VIP}:53").parse()?;
    println!("\n== 6 TCP connections from the client to {vip80}");
    for i in 1..=6 {
        check_stop()?;
        let mut c = Conn::open(&t.client, vip80)?;
        let r = c.ask(&format!("hello-{i}"))?;
        println!(
            "   tcp request {i} from {} -> answered by {} (backend saw client {})",
            c.local_addr(),
            r.backend,
            r.client
        );
    }
    println!("\n== 6 UDP requests from the client to {vip53}");
    for i in 1..=6 {
        check_stop()?;
        let r = udp_ask(&t.client, vip53, &format!("query-{i}"))?;
        println!(
            "   udp request {i} -> answered by {} (backend saw client {})",
            r.backend, r.client
        );
    }

    println!("\n== two long-lived connections stay open; the live session table:");
    let mut keep = [Conn::open(&t.client, vip80)?, Conn::open(&t.client, vip80)?];
    for (i, c) in keep.iter_mut().enumerate() {
        c.ask(&format!("keepalive-{i}"))?;
    }
    print!("{}", indent(&agent.cli("sessions")?));
    println!("\n== rules (loxilb-agent rules):");
    print!("{}", indent(&agent.cli("rules")?));
    println!("\n== datapath counters (loxilb-agent stats):");
    print!("{}", indent(&agent.cli("stats")?));
    println!(
        "\n   (inspect the maps directly: bpftool map dump pinned {}/LB_CT)",
        t.pin_dir().display()
    );
    check_stop()?;
    std::thread::sleep(Duration::from_millis(100));
    agent.stop()?;
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("   {l}\n")).collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in s.chars() {
        if ch == '\x1b' {
            esc = true;
        } else if esc {
            if ch.is_ascii_alphabetic() {
                esc = false;
            }
        } else {
            out.push(ch);
        }
    }
    out
}

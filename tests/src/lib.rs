//! Shared test machinery: packet builders, network-namespace topologies
//! that clean up after themselves, real TCP/UDP servers and clients.

pub mod bgp_peer;
pub mod certs;
pub mod fib;
pub mod kube_api;
pub mod netns;
pub mod packet;
pub mod probe_peers;
pub mod sctp_packet;
pub mod sctp_peers;

/// Root tests call this first. Without root they skip with a clear
/// message, unless LOXILB_REQUIRE_ROOT=1 (CI), where a skip is a failure.
pub fn need_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("LOXILB_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test}: needs root (BPF, network namespaces) and LOXILB_REQUIRE_ROOT=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root (loads BPF programs, creates network namespaces); run the test command as root");
    false
}

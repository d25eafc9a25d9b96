//! Every integration test of the `tests` crate, in one binary (one link of
//! the agent library instead of one per area; one pool of test threads, so
//! the slow end-to-end tests of one area overlap with the rest).
//!
//! One module per area; `cargo test -p loxilb-tests --test all AREA::`
//! runs one area (e.g. `e2e_ha::`), a full path one test.
//!
//! Tests run in parallel threads of this one process, so nothing they
//! create may be shared by name: every network namespace, pin directory,
//! state directory and temporary file is named from a prefix unique to its
//! test (`loxilb_tests::netns::Netns::new` refuses a name another live
//! test of this process holds). A test that must not share the machine
//! takes `loxilb_tests::exclusive()` (see there for which and why); every
//! root test holds a share of the same lock through `need_root`.

mod benchmark;
mod bgp;
mod ctsync;
mod devices;
mod e2e;
mod e2e_agent;
mod e2e_api;
mod e2e_external;
mod e2e_ha;
mod e2e_ipv6;
mod e2e_kube;
mod e2e_metrics;
mod e2e_modes;
mod e2e_multus;
mod e2e_sctp;
mod e2e_selection;
mod e2e_topology;
mod flood;
mod fuzz;
mod icmp;
mod ipv6;
mod modes;
mod nexthop;
mod packets;
mod probes;
mod sctp;
mod sctp_stack;
mod selection;
mod soak;

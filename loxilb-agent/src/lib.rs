//! loxilb-agent: the per-node daemon. Loads and drives the eBPF datapath;
//! in standalone mode it takes its rules from a YAML file.

pub mod announce;
pub mod api;
pub mod bgp;
pub mod clock;
pub mod config;
pub mod ctsync;
pub mod datapath;
pub mod devices;
pub mod ep_index;
pub mod kube_rules;
pub mod kube_state;
pub mod lovips;
pub mod metrics;
pub mod netlink;
pub mod node;
pub mod owner;
pub mod probe;
pub mod remote;
pub mod roles;
pub mod routes;
pub mod rules;
pub mod sel_space;
pub mod selection;
pub mod show;

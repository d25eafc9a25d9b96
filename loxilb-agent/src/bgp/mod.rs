//! BGP: announce every active VIP (/32, /128) to external routers.
//!
//! # Approach: BIRD 2 beside the agent, driven through its control socket
//!
//! The agent does not implement BGP itself. It runs BIRD 2 (Debian
//! `bird2`) as a supervised child process with a configuration it
//! generates in a private directory, and drives it through BIRD's control
//! socket. Why this and not a speaker inside the agent:
//!
//! - **Correctness where it is hard.** A BGP speaker that real routers
//!   accept is more than OPEN/UPDATE encoding: the FSM with its timers and
//!   collision handling, capabilities (4-octet AS, multiprotocol,
//!   route refresh, graceful restart, extended next hop), error handling
//!   of RFC 7606, next-hop rules for iBGP/eBGP/multihop and per address
//!   family. BIRD has done this for two decades against every vendor; a
//!   new in-agent speaker would re-learn those interop bugs in production
//!   routers' logs.
//! - **Small, self-contained, well kept.** One C daemon (~1 MB) with no
//!   runtime; packaged by Debian (security updates come with the OS); it
//!   has no need of a gRPC stack (GoBGP, loxilb's choice, would need
//!   generated protobuf bindings and a 16 MB Go daemon) and its
//!   configuration language is documented and stable across 2.x.
//! - **Graceful reconfiguration is built in.** The agent writes the whole
//!   desired state as one file and says `configure`: BIRD diffs it itself,
//!   restarts only the sessions whose configuration changed and updates
//!   static routes one by one. So a VIP change never resets a session, and
//!   the file on disk is always the complete desired state — a crashed
//!   BIRD comes back with exactly it.
//! - **Testable from outside.** The integration tests peer it with a
//!   different implementation (GoBGP) in network namespaces, so interop is
//!   what is tested, not a speaker agreeing with itself.
//!
//! The cost is a second process to supervise, which [`BgpSpeaker`] does:
//! BIRD is spawned by a supervisor thread with a parent-death signal (it
//! never outlives the agent, even one killed by SIGKILL, so VIPs are never
//! announced for a datapath that is gone), in its own process group,
//! restarted with back-off if it dies, and stopped with `down` (peers get
//! a Cease and withdraw at once). A BIRD left over by an earlier agent
//! with the same directory is found by its pid file and stopped; a lock
//! on the directory keeps two live speakers from sharing it.
//!
//! The control socket is spoken directly ([`control`]), not through
//! `birdc`: no process per query, and replies come with BIRD's numeric
//! codes, so errors are told from data reliably. Replies are parsed into
//! typed records ([`show`]), defensively (unknown lines skipped).
//!
//! # What BIRD is told
//!
//! ([`config::render`]) VIPs are `blackhole` routes of `protocol static`
//! blocks (IPv4, IPv6; the VIPs this node is active for, and those it
//! serves as a backup, which each peer's export filter announces with a
//! worse path: [`config::BackupPath`]), exported only to BGP; there is no `protocol
//! kernel`, so nothing reaches the node's FIB; nothing is imported from
//! peers. One `protocol bgp` per peer: `local port <listen port> as <AS>`,
//! `neighbor <IP> port <P> as <AS>` (iBGP when the AS is ours), `multihop
//! <TTL>` when asked, both address families on every session (MP-BGP:
//! IPv6 VIPs also go over IPv4 sessions and vice versa) with `next hop
//! self`, hold/keepalive timers, connect retry, and error wait with
//! exponential back-off for reconnection after a peer restart. `export
//! table on` keeps the Adj-RIB-Out, which is what
//! [`BgpSpeaker::exported_routes`] reports.
//!
//! # Use
//!
//! ```no_run
//! use loxilb_agent::bgp::{BgpFlags, BgpSpeaker, SpeakerOptions};
//! # fn main() -> anyhow::Result<()> {
//! let flags = BgpFlags::parse(Some("65001"), Some("10.0.0.2:65002"), None, None)?;
//! if let Some(setup) = flags.setup()? {
//!     let mut bgp = BgpSpeaker::start(setup.config, SpeakerOptions::default(), setup.peers, [])?;
//!     bgp.set_vips(["20.0.0.100".parse()?])?; // on every rule change: all active VIPs
//!     for n in bgp.neighbors()? {
//!         println!("{} {} up {:?}", n.address, n.state, n.uptime);
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod config;
pub mod control;
pub mod flags;
pub mod show;
pub mod speaker;

pub use config::{BackupPath, BgpConfig, Peer, Timers};
pub use flags::{BgpFlags, BgpSetup, FlagError};
pub use show::{BgpState, Neighbor};
pub use speaker::{
    query_exported, query_neighbors, BgpSpeaker, PeerChange, PeerRoutes, SpeakerOptions, VipChange,
};

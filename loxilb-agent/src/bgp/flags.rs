//! kube-loxilb's BGP flags, parsed strictly.
//!
//! | flag | value | default |
//! |---|---|---|
//! | `--setBGP` | local AS, `0` = BGP off | `0` |
//! | `--extBGPPeers` | `IP:AS[:PORT]`, comma-separated; IPv6 in brackets: `[2001:db8::1]:65002:179` | none |
//! | `--listenBGPPort` | TCP port the speaker accepts sessions on | `179` |
//! | `--eBGPMultiHop` | eBGP peers may be several hops away (TTL 64) | `false` |
//!
//! Every parser is usable as a clap `value_parser`; errors name the flag,
//! the value and what is wrong. [`BgpFlags::setup`] checks the flags
//! together (peers without `--setBGP` is an error, not a silent no-op) and
//! gives the speaker's configuration and peer list.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use super::config::{BgpConfig, Peer, DEFAULT_BGP_PORT, DEFAULT_MULTIHOP_TTL};

pub const FLAG_SET_BGP: &str = "--setBGP";
pub const FLAG_EXT_PEERS: &str = "--extBGPPeers";
pub const FLAG_LISTEN_PORT: &str = "--listenBGPPort";
pub const FLAG_MULTIHOP: &str = "--eBGPMultiHop";

/// AS_TRANS (RFC 6793): a placeholder for 4-octet AS numbers on the wire,
/// never a real AS.
pub const AS_TRANS: u32 = 23456;

/// A flag value that is not acceptable: which flag, the value, and why.
///
/// Not kube-watch's `flags::FlagError`, although the fields are the same:
/// this one writes `--flag="value"` and leaves out an empty value, that
/// one writes `--flag "value"`. The message depends on whether there is a
/// value, which thiserror's `#[error(...)]` cannot say for a struct (its
/// `fmt = ...` form is for enums only), so `Display` is written out below;
/// `Error` is derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FlagError {
    pub flag: &'static str,
    pub value: String,
    pub message: String,
}

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.flag, self.message)
        } else {
            write!(f, "{}={:?}: {}", self.flag, self.value, self.message)
        }
    }
}

fn err(flag: &'static str, value: &str, message: impl Into<String>) -> FlagError {
    FlagError {
        flag,
        value: value.to_string(),
        message: message.into(),
    }
}

/// Decimal digits only: no sign, no spaces, no `0x`, not empty.
fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// An AS number: 1..=4294967295, not AS_TRANS. `what` says which one.
fn parse_asn(s: &str, what: &str) -> Result<u32, String> {
    if !digits(s) {
        return Err(format!(
            "{what} {s:?} is not an AS number (decimal 1..=4294967295)"
        ));
    }
    let n: u64 = match s.parse() {
        Ok(n) => n,
        Err(_) => return Err(format!("{what} {s} is larger than 4294967295")),
    };
    if n == 0 {
        return Err(format!(
            "{what} 0 is not a valid AS number (1..=4294967295)"
        ));
    }
    if n > u32::MAX as u64 {
        return Err(format!(
            "{what} {s} is larger than 4294967295 (AS numbers are 32 bits)"
        ));
    }
    if n == AS_TRANS as u64 {
        return Err(format!(
            "{what} 23456 is AS_TRANS (RFC 6793), a placeholder, not an AS"
        ));
    }
    Ok(n as u32)
}

fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    if !digits(s) {
        return Err(format!("{what} {s:?} is not a port (an integer 1..=65535)"));
    }
    match s.parse::<u32>() {
        Ok(0) => Err(format!("{what} 0 is not a port (an integer 1..=65535)")),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(format!("{what} {s} is not a port (an integer 1..=65535)")),
    }
}

/// `--setBGP`: the local AS; `0` turns BGP off (kube-loxilb's default).
pub fn parse_set_bgp(s: &str) -> Result<u32, FlagError> {
    if s == "0" {
        return Ok(0);
    }
    parse_asn(s, "local AS").map_err(|m| err(FLAG_SET_BGP, s, m))
}

/// `--listenBGPPort`: 1..=65535.
pub fn parse_listen_port(s: &str) -> Result<u16, FlagError> {
    parse_port(s, "port").map_err(|m| err(FLAG_LISTEN_PORT, s, m))
}

/// `--eBGPMultiHop=VALUE`: the boolean spellings Go's flag package accepts
/// (kube-loxilb's manifests use them): 1, 0, t, f, T, F, true, false,
/// TRUE, FALSE, True, False.
pub fn parse_go_bool(s: &str) -> Result<bool, FlagError> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(err(FLAG_MULTIHOP, s, "not a boolean (true or false)")),
    }
}

/// One `--extBGPPeers` entry before the flags are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSpec {
    pub address: IpAddr,
    pub remote_as: u32,
    /// The peer's BGP port (default 179).
    pub port: u16,
}

fn check_peer_ip(ip: IpAddr) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{ip} cannot be a BGP peer: {why}"));
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                return bad("unspecified address");
            }
            if v4.is_multicast() {
                return bad("multicast address");
            }
            if v4.is_broadcast() {
                return bad("broadcast address");
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                return bad("unspecified address");
            }
            if v6.is_multicast() {
                return bad("multicast address");
            }
            if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                return bad("link-local addresses need an interface and are not supported; use a global or ULA address");
            }
            if v6.to_ipv4_mapped().is_some() {
                return bad("IPv4-mapped address; write the IPv4 address");
            }
        }
    }
    Ok(())
}

/// One entry: `IPv4:AS[:PORT]` or `[IPv6]:AS[:PORT]`.
pub fn parse_peer(entry: &str) -> Result<PeerSpec, String> {
    let (ip, rest): (IpAddr, &str) = if let Some(r) = entry.strip_prefix('[') {
        let (ip, rest) = r
            .split_once(']')
            .ok_or_else(|| format!("{entry:?}: missing ']' after the IPv6 address"))?;
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{entry:?}: {ip:?} is not an IPv6 address"))?;
        let rest = rest.strip_prefix(':').ok_or_else(|| {
            format!("{entry:?}: expected ':AS' after the address (form [IPv6]:AS[:PORT])")
        })?;
        (IpAddr::V6(ip), rest)
    } else {
        let (ip, rest) = entry
            .split_once(':')
            .ok_or_else(|| format!("{entry:?}: expected IP:AS[:PORT]"))?;
        if rest.contains(':') && rest.split(':').count() > 2 {
            return Err(format!(
                "{entry:?}: too many ':' (an IPv6 peer is written in brackets: [2001:db8::1]:65002[:179])"
            ));
        }
        let ip: IpAddr = ip.parse().map_err(|_| {
            format!("{entry:?}: {ip:?} is not an IP address (IPv4, or IPv6 in brackets)")
        })?;
        (ip, rest)
    };
    check_peer_ip(ip).map_err(|m| format!("{entry:?}: {m}"))?;
    let mut parts = rest.split(':');
    let asn = parts.next().unwrap_or("");
    let remote_as = parse_asn(asn, "AS").map_err(|m| format!("{entry:?}: {m}"))?;
    let port = match parts.next() {
        None => DEFAULT_BGP_PORT,
        Some(p) => parse_port(p, "port").map_err(|m| format!("{entry:?}: {m}"))?,
    };
    if parts.next().is_some() {
        return Err(format!("{entry:?}: expected IP:AS[:PORT]"));
    }
    Ok(PeerSpec {
        address: ip,
        remote_as,
        port,
    })
}

/// `--extBGPPeers`: comma-separated entries; an empty value means no
/// peers. Empty entries, bad entries and a peer address given twice are
/// errors.
pub fn parse_ext_bgp_peers(s: &str) -> Result<Vec<PeerSpec>, FlagError> {
    if s.trim().is_empty() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    let mut seen = HashSet::new();
    for (i, e) in s.split(',').enumerate() {
        let e = e.trim();
        if e.is_empty() {
            return Err(err(
                FLAG_EXT_PEERS,
                s,
                format!(
                    "entry {} is empty (entries are separated by single commas)",
                    i + 1
                ),
            ));
        }
        let p = parse_peer(e).map_err(|m| err(FLAG_EXT_PEERS, s, m))?;
        if !seen.insert(p.address) {
            return Err(err(
                FLAG_EXT_PEERS,
                s,
                format!("peer {} is given twice", p.address),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// The four flags, each already parsed by its value parser. `None` means
/// the flag was not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpFlags {
    /// `--setBGP` (0 or absent: BGP off).
    pub set_bgp: Option<u32>,
    pub ext_bgp_peers: Option<Vec<PeerSpec>>,
    pub listen_bgp_port: Option<u16>,
    pub ebgp_multihop: Option<bool>,
}

/// What the flags ask for: the speaker's configuration and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpSetup {
    pub config: BgpConfig,
    pub peers: Vec<Peer>,
}

impl BgpFlags {
    /// Parse the four flags from their raw values (`None` = not given).
    pub fn parse(
        set_bgp: Option<&str>,
        ext_bgp_peers: Option<&str>,
        listen_bgp_port: Option<&str>,
        ebgp_multihop: Option<&str>,
    ) -> Result<Self, FlagError> {
        Ok(BgpFlags {
            set_bgp: set_bgp.map(parse_set_bgp).transpose()?,
            ext_bgp_peers: ext_bgp_peers.map(parse_ext_bgp_peers).transpose()?,
            listen_bgp_port: listen_bgp_port.map(parse_listen_port).transpose()?,
            ebgp_multihop: ebgp_multihop.map(parse_go_bool).transpose()?,
        })
    }

    /// `Ok(None)`: BGP is off (`--setBGP` absent or 0) and no other BGP
    /// flag is given. BGP flags without `--setBGP` are an error (they
    /// would otherwise be silently ignored). The eBGP multihop flag applies
    /// to every eBGP peer (iBGP sessions are multihop anyway).
    pub fn setup(&self) -> Result<Option<BgpSetup>, FlagError> {
        let local_as = self.set_bgp.unwrap_or(0);
        if local_as == 0 {
            let stray = [
                (
                    FLAG_EXT_PEERS,
                    self.ext_bgp_peers.as_ref().is_some_and(|p| !p.is_empty()),
                ),
                (FLAG_LISTEN_PORT, self.listen_bgp_port.is_some()),
                (FLAG_MULTIHOP, self.ebgp_multihop == Some(true)),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
                return Err(err(
                    flag,
                    "",
                    format!("BGP is off: give {FLAG_SET_BGP}=<local AS> to use it"),
                ));
            }
            return Ok(None);
        }
        let mut config = BgpConfig::new(local_as);
        if let Some(p) = self.listen_bgp_port {
            config.listen_port = p;
        }
        let multihop = self.ebgp_multihop.unwrap_or(false);
        let peers = self
            .ext_bgp_peers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|s| Peer {
                address: s.address,
                remote_as: s.remote_as,
                port: s.port,
                multihop_ttl: (multihop && s.remote_as != local_as).then_some(DEFAULT_MULTIHOP_TTL),
            })
            .collect();
        Ok(Some(BgpSetup { config, peers }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_as() {
        assert_eq!(parse_set_bgp("0").unwrap(), 0);
        assert_eq!(parse_set_bgp("65001").unwrap(), 65001);
        assert_eq!(parse_set_bgp("4294967295").unwrap(), u32::MAX);
        for bad in [
            "",
            "-1",
            "+5",
            " 5",
            "5 ",
            "0x10",
            "abc",
            "4294967296",
            "99999999999999999999999",
            "23456",
            "00",
        ] {
            let e = parse_set_bgp(bad).unwrap_err();
            assert_eq!(e.flag, "--setBGP", "{bad:?}");
            assert_eq!(e.value, bad);
        }
        let e = parse_set_bgp("4294967296").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--setBGP=\"4294967296\": local AS 4294967296 is larger than 4294967295 (AS numbers are 32 bits)"
        );
        assert!(parse_set_bgp("23456")
            .unwrap_err()
            .message
            .contains("AS_TRANS"));
    }

    #[test]
    fn ports() {
        assert_eq!(parse_listen_port("179").unwrap(), 179);
        assert_eq!(parse_listen_port("65535").unwrap(), 65535);
        for bad in ["0", "65536", "", "-1", "1e3", "179 "] {
            let e = parse_listen_port(bad).unwrap_err();
            assert_eq!(e.flag, "--listenBGPPort");
        }
        assert_eq!(
            parse_listen_port("0").unwrap_err().to_string(),
            "--listenBGPPort=\"0\": port 0 is not a port (an integer 1..=65535)"
        );
    }

    #[test]
    fn go_bools() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert!(parse_go_bool(t).unwrap());
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert!(!parse_go_bool(f).unwrap());
        }
        for bad in ["yes", "", "tRue", "2"] {
            assert_eq!(parse_go_bool(bad).unwrap_err().flag, "--eBGPMultiHop");
        }
    }

    #[test]
    fn peers_good() {
        let p = parse_ext_bgp_peers(
            "10.0.0.2:65002,10.0.1.2:65003:1179, [fd00::2]:65004:179,[2001:db8::9]:4294967295",
        )
        .unwrap();
        assert_eq!(
            p,
            vec![
                PeerSpec {
                    address: ip("10.0.0.2"),
                    remote_as: 65002,
                    port: 179
                },
                PeerSpec {
                    address: ip("10.0.1.2"),
                    remote_as: 65003,
                    port: 1179
                },
                PeerSpec {
                    address: ip("fd00::2"),
                    remote_as: 65004,
                    port: 179
                },
                PeerSpec {
                    address: ip("2001:db8::9"),
                    remote_as: u32::MAX,
                    port: 179
                },
            ]
        );
        assert!(parse_ext_bgp_peers("").unwrap().is_empty());
        assert!(parse_ext_bgp_peers("  ").unwrap().is_empty());
    }

    #[test]
    fn peers_bad() {
        let cases = [
            ("10.0.0.300:65002", "is not an IP address"),
            ("10.0.0.2", "expected IP:AS[:PORT]"),
            ("10.0.0.2:0", "0 is not a valid AS number"),
            ("10.0.0.2:4294967296", "larger than 4294967295"),
            ("10.0.0.2:-5", "is not an AS number"),
            ("10.0.0.2:65002:0", "port 0 is not a port"),
            ("10.0.0.2:65002:70000", "not a port"),
            ("10.0.0.2:65002:179:1", "too many ':'"),
            ("fd00::2:65002", "brackets"),
            ("[fd00::2:65002", "missing ']'"),
            ("[fd00::2]65002", "expected ':AS'"),
            ("[10.0.0.2]:65002", "not an IPv6 address"),
            ("[fe80::1]:65002", "link-local"),
            ("[::ffff:10.0.0.2]:65002", "IPv4-mapped"),
            ("0.0.0.0:65002", "unspecified"),
            ("224.0.0.5:65002", "multicast"),
            ("255.255.255.255:65002", "broadcast"),
            ("[::]:65002", "unspecified"),
            ("10.0.0.2:65002,,10.0.0.3:65003", "entry 2 is empty"),
            ("10.0.0.2:65002,", "entry 2 is empty"),
            ("10.0.0.2:65002,10.0.0.2:65003", "given twice"),
            ("10.0.0.2:23456", "AS_TRANS"),
        ];
        for (v, want) in cases {
            let e = parse_ext_bgp_peers(v).unwrap_err();
            assert_eq!(e.flag, "--extBGPPeers", "{v}");
            assert_eq!(e.value, v);
            assert!(
                e.to_string().contains(want),
                "{v}: {e} does not contain {want:?}"
            );
        }
    }

    #[test]
    fn combined() {
        // off: nothing, or --setBGP=0
        assert_eq!(BgpFlags::default().setup().unwrap(), None);
        let f = BgpFlags::parse(Some("0"), Some(""), None, Some("false")).unwrap();
        assert_eq!(f.setup().unwrap(), None);
        // peers, port or multihop without --setBGP: error naming the flag
        for (f, flag) in [
            (
                BgpFlags::parse(None, Some("10.0.0.2:65002"), None, None),
                "--extBGPPeers",
            ),
            (
                BgpFlags::parse(Some("0"), None, Some("1790"), None),
                "--listenBGPPort",
            ),
            (
                BgpFlags::parse(None, None, None, Some("true")),
                "--eBGPMultiHop",
            ),
        ] {
            let e = f.unwrap().setup().unwrap_err();
            assert_eq!(e.flag, flag);
            assert!(e.to_string().contains("--setBGP=<local AS>"), "{e}");
        }
        // a parse error surfaces from parse()
        assert_eq!(
            BgpFlags::parse(Some("x"), None, None, None)
                .unwrap_err()
                .flag,
            "--setBGP"
        );

        let s = BgpFlags::parse(
            Some("65001"),
            Some("10.0.0.2:65002,10.0.0.3:65001:1179"),
            Some("1790"),
            Some("true"),
        )
        .unwrap()
        .setup()
        .unwrap()
        .unwrap();
        assert_eq!(s.config.local_as, 65001);
        assert_eq!(s.config.listen_port, 1790);
        assert_eq!(
            s.peers,
            vec![
                Peer {
                    address: ip("10.0.0.2"),
                    remote_as: 65002,
                    port: 179,
                    multihop_ttl: Some(DEFAULT_MULTIHOP_TTL)
                },
                // iBGP: multihop is BIRD's default already, nothing to set
                Peer {
                    address: ip("10.0.0.3"),
                    remote_as: 65001,
                    port: 1179,
                    multihop_ttl: None
                },
            ]
        );
        let s = BgpFlags::parse(Some("65001"), None, None, None)
            .unwrap()
            .setup()
            .unwrap()
            .unwrap();
        assert_eq!(s.config.listen_port, 179);
        assert!(s.peers.is_empty());
    }
}

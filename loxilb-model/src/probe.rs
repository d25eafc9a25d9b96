//! How a rule's endpoints are health-probed: the probe's settings and
//! their checks. The probing itself (sockets, schedule, up/down state) is
//! the agent's (`loxilb-agent`'s `probe` module).

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// Per-probe deadline without `probetimeout` (kube-loxilb's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive failures that make an endpoint down, without `proberetries`.
pub const DEFAULT_RETRIES: u32 = 2;
/// Time between the starts of two probes of one target (loxilb checks its
/// endpoints every 10 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest timeout / interval accepted.
pub const MIN_DURATION: Duration = Duration::from_millis(10);
/// Longest timeout accepted (the bound of `loxilb.io/probetimeout`).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest interval accepted.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Largest `retries` accepted (the bound of `loxilb.io/proberetries`).
pub const MAX_RETRIES: u32 = 100;
/// Longest `request` / `response` accepted, bytes.
pub const MAX_TEXT: usize = 1024;

/// What a probe does (`loxilb.io/probetype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// Not probed: always up.
    None,
    Ping,
    Tcp,
    Udp,
    Http,
    Https,
    Sctp,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 7] = [
        ProbeKind::None,
        ProbeKind::Ping,
        ProbeKind::Tcp,
        ProbeKind::Udp,
        ProbeKind::Http,
        ProbeKind::Https,
        ProbeKind::Sctp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::None => "none",
            ProbeKind::Ping => "ping",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Udp => "udp",
            ProbeKind::Http => "http",
            ProbeKind::Https => "https",
            ProbeKind::Sctp => "sctp",
        }
    }

    /// Whether the probe goes to a port (all but `none` and `ping`).
    pub fn uses_port(self) -> bool {
        !matches!(self, ProbeKind::None | ProbeKind::Ping)
    }

    /// Whether `request` / `response` mean anything.
    pub fn uses_text(self) -> bool {
        matches!(self, ProbeKind::Udp | ProbeKind::Http | ProbeKind::Https)
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProbeKind {
    type Err = ProbeError;
    fn from_str(s: &str) -> Result<Self, ProbeError> {
        ProbeKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ProbeError {
                target: None,
                field: "type",
                value: s.to_string(),
                message: "unknown probe type; allowed: none, ping, tcp, udp, http, https, sctp"
                    .into(),
            })
    }
}

/// How one endpoint is probed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    /// Port to probe; `None`: the endpoint's own port. Not for `none`/`ping`.
    pub port: Option<u16>,
    /// `udp`: the datagram sent (else an empty one); `http(s)`: the path
    /// (`GET /<request>`). Not for `tcp`, `sctp`, `ping`, `none`.
    pub request: Option<String>,
    /// `udp`: the reply must contain it; `http(s)`: the body must contain
    /// it. Not for `tcp`, `sctp`, `ping`, `none`.
    pub response: Option<String>,
    /// Deadline of one probe.
    pub timeout: Duration,
    /// Consecutive failures that make the endpoint down (0 behaves as 1).
    pub retries: u32,
    /// Time between the starts of two probes (±[`JITTER_PERCENT`]).
    pub interval: Duration,
}

impl ProbeSpec {
    /// A spec of `kind` with the defaults (timeout 60 s, retries 2,
    /// interval 10 s, the endpoint's port, no request/response).
    pub fn new(kind: ProbeKind) -> Self {
        ProbeSpec {
            kind,
            port: None,
            request: None,
            response: None,
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Check every setting; the error names the field, the value and what
    /// is allowed.
    pub fn validate(&self) -> Result<(), ProbeError> {
        let err = |field: &'static str, value: String, message: String| {
            Err(ProbeError {
                target: None,
                field,
                value,
                message,
            })
        };
        let k = self.kind;
        if let Some(p) = self.port {
            if !k.uses_port() {
                return err(
                    "port",
                    p.to_string(),
                    format!(
                        "a {k} probe has no port (only tcp, udp, http, https and sctp probes do)"
                    ),
                );
            }
            if p == 0 {
                return err("port", "0".into(), "not a port (1..=65535)".into());
            }
        }
        for (field, v) in [("request", &self.request), ("response", &self.response)] {
            let Some(v) = v else { continue };
            if !k.uses_text() {
                return err(
                    field,
                    quote(v),
                    format!(
                        "a {k} probe sends no request and reads no response (only udp, http and https probes do)"
                    ),
                );
            }
            if v.is_empty() {
                return err(field, "\"\"".into(), "empty; omit it for none".into());
            }
            if v.len() > MAX_TEXT {
                return err(
                    field,
                    format!("{} bytes", v.len()),
                    format!("longer than {MAX_TEXT} bytes"),
                );
            }
        }
        if let (ProbeKind::Http | ProbeKind::Https, Some(r)) = (k, &self.request) {
            if let Some(c) = r.chars().find(|c| !c.is_ascii_graphic()) {
                return err(
                    "request",
                    quote(r),
                    format!(
                        "{c:?} cannot be in an HTTP path (allowed: visible ASCII, no spaces; percent-encode the rest)"
                    ),
                );
            }
        }
        for (field, v, max) in [
            ("timeout", self.timeout, MAX_TIMEOUT),
            ("interval", self.interval, MAX_INTERVAL),
        ] {
            if v < MIN_DURATION || v > max {
                return err(
                    field,
                    fmt_dur(v),
                    format!(
                        "out of range ({}..={})",
                        fmt_dur(MIN_DURATION),
                        fmt_dur(max)
                    ),
                );
            }
        }
        if self.retries > MAX_RETRIES {
            return err(
                "retries",
                self.retries.to_string(),
                format!("out of range (0..={MAX_RETRIES})"),
            );
        }
        Ok(())
    }

    /// Failures in a row that make a target down.
    pub fn failures_to_down(&self) -> u32 {
        self.retries.max(1)
    }
}

/// A bad probe setting: names the target (when known), the field and the
/// value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeError {
    /// `rule <rule> endpoint <addr>:<port>`, when the error is about one target.
    pub target: Option<String>,
    /// `type`, `port`, `request`, `response`, `timeout`, `retries`,
    /// `interval`, `address` or `target`.
    pub field: &'static str,
    pub value: String,
    pub message: String,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = &self.target {
            write!(f, "{t}: ")?;
        }
        write!(f, "probe {} {}: {}", self.field, self.value, self.message)
    }
}

impl std::error::Error for ProbeError {}

/// Readable duration: `200ms`, `60s`, `1.5s`.
pub fn fmt_dur(d: Duration) -> String {
    if d.as_millis() < 1000 || !d.subsec_millis().is_multiple_of(100) {
        if d.subsec_nanos().is_multiple_of(1_000_000) {
            format!("{}ms", d.as_millis())
        } else {
            format!("{:?}", d)
        }
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// `s` quoted for a message, cut after 64 bytes.
pub fn quote(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        format!("{s:?}")
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}...", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn spec(kind: ProbeKind) -> ProbeSpec {
        ProbeSpec::new(kind)
    }

    fn err_text(s: &ProbeSpec) -> String {
        s.validate().unwrap_err().to_string()
    }

    #[test]
    fn probe_spec_defaults() {
        let s = ProbeSpec::new(ProbeKind::Tcp);
        assert_eq!(s.timeout, Duration::from_secs(60));
        assert_eq!(s.retries, 2);
        assert_eq!(s.interval, Duration::from_secs(10));
        assert_eq!(
            (s.port, s.request.as_deref(), s.response.as_deref()),
            (None, None, None)
        );
        for k in ProbeKind::ALL {
            ProbeSpec::new(k).validate().unwrap();
            assert_eq!(k.as_str().parse::<ProbeKind>().unwrap(), k);
        }
    }

    #[test]
    fn probe_spec_validation_errors_are_clear() {
        assert_eq!(
            "icmp".parse::<ProbeKind>().unwrap_err().to_string(),
            "probe type icmp: unknown probe type; allowed: none, ping, tcp, udp, http, https, sctp"
        );
        let mut s = spec(ProbeKind::Ping);
        s.port = Some(80);
        assert_eq!(
            err_text(&s),
            "probe port 80: a ping probe has no port (only tcp, udp, http, https and sctp probes do)"
        );
        let mut s = spec(ProbeKind::Tcp);
        s.port = Some(0);
        assert_eq!(err_text(&s), "probe port 0: not a port (1..=65535)");
        let mut s = spec(ProbeKind::Tcp);
        s.request = Some("hello".into());
        assert_eq!(
            err_text(&s),
            "probe request \"hello\": a tcp probe sends no request and reads no response (only udp, http and https probes do)"
        );
        let mut s = spec(ProbeKind::Sctp);
        s.response = Some("x".into());
        assert!(err_text(&s).starts_with("probe response \"x\": a sctp probe"));
        let mut s = spec(ProbeKind::Udp);
        s.response = Some(String::new());
        assert_eq!(err_text(&s), "probe response \"\": empty; omit it for none");
        let mut s = spec(ProbeKind::Http);
        s.response = Some("x".repeat(1025));
        assert_eq!(
            err_text(&s),
            "probe response 1025 bytes: longer than 1024 bytes"
        );
        let mut s = spec(ProbeKind::Http);
        s.request = Some("health check".into());
        assert_eq!(
            err_text(&s),
            "probe request \"health check\": ' ' cannot be in an HTTP path (allowed: visible ASCII, no spaces; percent-encode the rest)"
        );
        let mut s = spec(ProbeKind::Https);
        s.request = Some("a\r\nX-Evil: 1".into());
        assert!(err_text(&s).contains("'\\r' cannot be in an HTTP path"));
        // udp requests are datagrams: any bytes go.
        let mut s = spec(ProbeKind::Udp);
        s.request = Some("ping me\n".into());
        s.validate().unwrap();
        let mut s = spec(ProbeKind::Tcp);
        s.timeout = Duration::ZERO;
        assert_eq!(
            err_text(&s),
            "probe timeout 0ms: out of range (10ms..=3600s)"
        );
        s.timeout = Duration::from_secs(3601);
        assert_eq!(
            err_text(&s),
            "probe timeout 3601s: out of range (10ms..=3600s)"
        );
        let mut s = spec(ProbeKind::Tcp);
        s.interval = ms(5);
        assert_eq!(
            err_text(&s),
            "probe interval 5ms: out of range (10ms..=86400s)"
        );
        let mut s = spec(ProbeKind::Tcp);
        s.retries = 101;
        assert_eq!(err_text(&s), "probe retries 101: out of range (0..=100)");
        s.retries = 0;
        s.validate().unwrap();
        assert_eq!(s.failures_to_down(), 1);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_dur(ms(200)), "200ms");
        assert_eq!(fmt_dur(Duration::from_secs(60)), "60s");
        assert_eq!(fmt_dur(ms(1500)), "1.5s");
        assert_eq!(fmt_dur(ms(1234)), "1234ms");
    }
}

//! BIRD's control socket, spoken directly (what `birdc` does, without a
//! process per query).
//!
//! A reply is a sequence of lines: `DDDD-text` (a line of reply code
//! DDDD, more follow), ` text` (another line of the previous code), and
//! `DDDD text` (the last line). Codes 0xxx are completions, 1xxx table
//! rows, 2xxx table headings, 8xxx run-time errors, 9xxx parse errors.
//! Lines starting with `+` are asynchronous notices and are skipped.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

/// One line of a reply, with the code it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub code: u16,
    pub text: String,
}

/// A complete reply: every line, the last one's code is [`Reply::code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<Line>,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.code >= 8000
    }

    /// The last line's text (the completion or error message).
    pub fn message(&self) -> &str {
        self.lines.last().map(|l| l.text.as_str()).unwrap_or("")
    }

    /// Lines of one code.
    pub fn with_code(&self, code: u16) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(move |l| l.code == code)
            .map(|l| l.text.as_str())
    }
}

/// The I/O error is part of the message (no `source()`), so a `{:#}`
/// chain does not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Cannot connect, read or write (daemon not running, timeout).
    #[error("BIRD control socket {path}: {1}", path = .0.display())]
    Io(PathBuf, std::io::Error),
    /// Something that is not BIRD's reply protocol.
    #[error("BIRD control protocol: {0}")]
    Protocol(String),
    /// BIRD answered with an error code.
    #[error("BIRD refused `{command}` ({code}): {message}")]
    Bird {
        command: String,
        code: u16,
        message: String,
    },
}

/// What one raw line is.
#[derive(Debug, PartialEq, Eq)]
enum Raw<'a> {
    More(u16, &'a str),
    Last(u16, &'a str),
    Continuation(&'a str),
    Async,
}

fn classify(line: &str) -> Result<Raw<'_>, String> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.starts_with('+') {
        return Ok(Raw::Async);
    }
    if let Some(rest) = line.strip_prefix(' ') {
        return Ok(Raw::Continuation(rest));
    }
    let b = line.as_bytes();
    if b.len() >= 4 && b[..4].iter().all(|c| c.is_ascii_digit()) {
        let code: u16 = line[..4]
            .parse()
            .map_err(|_| format!("bad code in {line:?}"))?;
        return match b.get(4) {
            None => Ok(Raw::Last(code, "")),
            Some(b' ') => Ok(Raw::Last(code, &line[5..])),
            Some(b'-') => Ok(Raw::More(code, &line[5..])),
            _ => Err(format!("unexpected line {line:?}")),
        };
    }
    Err(format!("unexpected line {line:?}"))
}

/// Read one reply from a line source.
pub fn read_reply(r: &mut impl BufRead) -> Result<Reply, ControlError> {
    let mut lines = vec![];
    let mut code: Option<u16> = None;
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = r
            .read_line(&mut buf)
            .map_err(|e| ControlError::Io(PathBuf::new(), e))?;
        if n == 0 {
            return Err(ControlError::Protocol(
                "connection closed in the middle of a reply".into(),
            ));
        }
        match classify(&buf).map_err(ControlError::Protocol)? {
            Raw::Async => {}
            Raw::More(c, t) => {
                code = Some(c);
                lines.push(Line {
                    code: c,
                    text: t.to_string(),
                });
            }
            Raw::Continuation(t) => {
                let c = code.ok_or_else(|| {
                    ControlError::Protocol(format!("continuation line first: {t:?}"))
                })?;
                lines.push(Line {
                    code: c,
                    text: t.to_string(),
                });
            }
            Raw::Last(c, t) => {
                lines.push(Line {
                    code: c,
                    text: t.to_string(),
                });
                return Ok(Reply { code: c, lines });
            }
        }
    }
}

/// Decode a captured reply (tests, fixtures).
pub fn decode(raw: &str) -> Result<Reply, ControlError> {
    read_reply(&mut raw.as_bytes())
}

/// A client of one BIRD control socket. Every command uses a fresh
/// connection (BIRD serves many; nothing is left open between calls).
#[derive(Debug, Clone)]
pub struct Control {
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl Control {
    pub fn new(socket: &Path) -> Self {
        Control {
            socket: socket.to_path_buf(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Send one command; an 8xxx/9xxx reply is an error.
    pub fn command(&self, cmd: &str) -> Result<Reply, ControlError> {
        if cmd.contains('\n') {
            return Err(ControlError::Protocol(format!(
                "command with a newline: {cmd:?}"
            )));
        }
        let io = |e| ControlError::Io(self.socket.clone(), e);
        let s = UnixStream::connect(&self.socket).map_err(io)?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut r = BufReader::new(s.try_clone().map_err(io)?);
        let hello = read_reply(&mut r).map_err(|e| self.with_path(e))?;
        if hello.code != 1 {
            return Err(ControlError::Protocol(format!(
                "unexpected greeting {:?}",
                hello.message()
            )));
        }
        (&s).write_all(format!("{cmd}\n").as_bytes()).map_err(io)?;
        let reply = read_reply(&mut r).map_err(|e| self.with_path(e))?;
        if reply.is_error() {
            return Err(ControlError::Bird {
                command: cmd.to_string(),
                code: reply.code,
                message: reply.message().to_string(),
            });
        }
        Ok(reply)
    }

    fn with_path(&self, e: ControlError) -> ControlError {
        match e {
            ControlError::Io(_, e) => ControlError::Io(self.socket.clone(), e),
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_codes_continuations_and_last_line() {
        let raw = "2002-Name       Proto      Table      State  Since         Info\n\
                   1002-device1    Device     ---        up     1795781986    \n \
                   vips4      Static     master4    up     1795781986    \n\
                   +async notice\n\
                   1006-\n\
                   0000 \n";
        let r = decode(raw).unwrap();
        assert_eq!(r.code, 0);
        assert!(!r.is_error());
        assert_eq!(r.lines.len(), 5);
        assert_eq!(r.lines[0].code, 2002);
        assert_eq!(r.lines[2].code, 1002, "continuation keeps the code");
        assert!(r.lines[2].text.starts_with("vips4 "));
        assert_eq!(
            r.lines[3],
            Line {
                code: 1006,
                text: String::new()
            }
        );
        assert_eq!(r.with_code(1002).count(), 2);
    }

    #[test]
    fn errors_and_bare_codes() {
        let r = decode("9001 syntax error, unexpected CF_SYM_UNDEFINED\n").unwrap();
        assert!(r.is_error());
        assert_eq!(r.code, 9001);
        assert_eq!(r.message(), "syntax error, unexpected CF_SYM_UNDEFINED");
        let r = decode("0002-Reading configuration from /x\n8002 /x: No such file or directory\n")
            .unwrap();
        assert_eq!(r.code, 8002);
        assert_eq!(r.message(), "/x: No such file or directory");
        assert_eq!(decode("0000\n").unwrap().code, 0);
        assert_eq!(decode("0000\r\n").unwrap().code, 0);
    }

    #[test]
    fn malformed() {
        for raw in [
            "",
            "1002-x\n",
            " orphan\n0000\n",
            "12ab nope\n",
            "hello\n",
            "0000xyz\n",
        ] {
            assert!(decode(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn no_daemon_is_an_io_error() {
        let c = Control::new(Path::new("/nonexistent/loxilb-bird.ctl"));
        match c.command("show status") {
            Err(ControlError::Io(p, _)) => assert_eq!(p, Path::new("/nonexistent/loxilb-bird.ctl")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.command("a\nb"), Err(ControlError::Protocol(_))));
    }
}

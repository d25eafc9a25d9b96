//! `loxilb-agent kube --config <path>`: the same settings as the flags, in
//! a YAML file. Keys are the flag names without `--` (`cidrPools`,
//! `setLBMode`, `iface`, ...), plus kube-loxilb's own YAML spellings
//! (`setExclIPAM` for `setUniqueIP`, `loxilbLoadBalancerClass` for
//! `loadBalancerClass`), so a kube-loxilb config file mostly carries over.
//!
//! ```yaml
//! iface: [eth0]
//! cidrPools: defaultPool=192.0.2.0/24     # or a list: [defaultPool=..., pool2=...]
//! setLBMode: 2
//! setUniqueIP: false
//! setLBHostnameStatus: true
//! ```
//!
//! A flag given on the command line overrides the file's value. The file is
//! checked strictly when the agent starts: an unknown key, a value of the
//! wrong type, a setting given twice (under both of its names) and the
//! values of the Kubernetes settings (pools, mode, booleans, class, zone)
//! are errors naming the file, the key and the value, with what to do. The
//! file's settings then become flags ([`expand_args`]), so everything the
//! command line checks (contradictions such as `setRoles` against
//! `fullnat-source`, or `setLBHostnameStatus` against `noZoneName`) is
//! checked for them too.

use std::{ffi::OsString, fmt, path::Path};

use serde_norway::Value;

use crate::flags;

/// How a setting's value is written as a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `--name=<value>`: a string or a number.
    Value,
    /// `--name=true|false` (kube-loxilb's booleans, which take a value).
    Bool,
    /// `--name` when true, nothing when false (a switch without a value).
    Switch,
    /// `--name=a,b,c`: a string, or a list joined with commas.
    List,
    /// `--name=a --name=b`: one flag per item (a string or a list).
    Repeated,
}

/// One setting of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The flag name without `--`, the file's key.
    pub name: &'static str,
    /// Other keys for it (kube-loxilb's YAML names).
    pub aliases: &'static [&'static str],
    /// A short flag, when it has one (`-i` for `iface`).
    pub short: Option<char>,
    pub kind: Kind,
}

const fn s(name: &'static str, kind: Kind) -> Setting {
    Setting {
        name,
        aliases: &[],
        short: None,
        kind,
    }
}

/// Every setting of `loxilb-agent kube`, as its flags are named.
pub const SETTINGS: &[Setting] = &[
    // The datapath (every serving mode).
    Setting {
        name: "iface",
        aliases: &[],
        short: Some('i'),
        kind: Kind::Repeated,
    },
    s("xdp-mode", Kind::Value),
    s("keep", Kind::Switch),
    s("forward", Kind::Value),
    s("forward-via-stack", Kind::Switch),
    s("fullnat-source", Kind::Value),
    s("fullnat-source6", Kind::Value),
    s("snat-ports", Kind::Value),
    s("max-new-flows", Kind::Value),
    s("new-flow-burst", Kind::Value),
    s("pin-dir", Kind::Value),
    s("health-listen", Kind::Value),
    s("ctsync-listen", Kind::Value),
    s("ctsync-peers", Kind::Value),
    s("ctsync-tls", Kind::Value),
    // BGP.
    s("setBGP", Kind::Value),
    s("extBGPPeers", Kind::List),
    s("listenBGPPort", Kind::Value),
    s("eBGPMultiHop", Kind::Bool),
    s("bgp-backup-path", Kind::Value),
    s("enableBGPCRDs", Kind::Bool),
    // Kubernetes.
    s("cidrPools", Kind::List),
    s("cidr6Pools", Kind::List),
    s("externalSecondaryCIDRs", Kind::List),
    s("setLBMode", Kind::Value),
    Setting {
        name: "setUniqueIP",
        aliases: &["setExclIPAM"],
        short: None,
        kind: Kind::Bool,
    },
    Setting {
        name: "loadBalancerClass",
        aliases: &["loxilbLoadBalancerClass"],
        short: None,
        kind: Kind::Value,
    },
    s("usePodNetwork", Kind::Bool),
    s("monitor", Kind::Bool),
    s("setRoles", Kind::Value),
    s("vipOwners", Kind::Value),
    s("loxiURL", Kind::List),
    s("loxiCA", Kind::Value),
    s("loxiTokenFile", Kind::Value),
    s("setLBHostnameStatus", Kind::Bool),
    s("zone", Kind::Value),
    s("noZoneName", Kind::Bool),
    s("leaseDuration", Kind::Value),
    s("leaseRenewDeadline", Kind::Value),
    s("leaseRetryPeriod", Kind::Value),
];

/// The flag that names the file.
pub const CONFIG_FLAG: &str = "--config";

/// A config file that cannot be used. Says which file, which key, which
/// value, and what to do.
///
/// The message depends on whether there is a key, which thiserror's
/// `#[error(...)]` cannot say for a struct (its `fmt = ...` form is for
/// enums only), so `Display` is written out below; `Error` is derived.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigFileError {
    pub file: String,
    /// The key (empty: the file as a whole).
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// The settings of a file, in [`SETTINGS`] order, as flag values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFile {
    /// (setting, values): one value, or one per item for [`Kind::Repeated`];
    /// a [`Kind::Switch`] that is false is left out.
    pub values: Vec<(&'static Setting, Vec<String>)>,
}

impl ConfigFile {
    /// Read and check `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError {
            file: file.clone(),
            key: String::new(),
            message: format!(
                "cannot read it ({e}); give the path of a readable YAML file to {CONFIG_FLAG}"
            ),
        })?;
        Self::parse(&file, &text)
    }

    /// Check the text of a file named `file` (for messages).
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigFileError> {
        let fail = |key: &str, message: String| ConfigFileError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        let doc: Value = serde_norway::from_str(text)
            .map_err(|e| fail("", format!("not valid YAML ({e}); fix the syntax")))?;
        let map = match doc {
            Value::Mapping(m) => m,
            Value::Null => {
                return Err(fail(
                    "",
                    "is empty; write the settings as `key: value` lines (the flag names without --), or do not give --config".into(),
                ))
            }
            _ => {
                return Err(fail(
                    "",
                    "is not a mapping; write the settings as `key: value` lines (the flag names without --)".into(),
                ))
            }
        };
        let mut found: Vec<(&'static Setting, &str, Vec<String>)> = Vec::new();
        for (k, v) in &map {
            let Some(key) = k.as_str() else {
                return Err(fail(
                    &scalar_text(k),
                    "a key must be a setting name (a string)".into(),
                ));
            };
            let Some(setting) = SETTINGS
                .iter()
                .find(|s| s.name == key || s.aliases.contains(&key))
            else {
                return Err(fail(key, unknown_key(key)));
            };
            if let Some((_, other, _)) = found.iter().find(|(s, _, _)| s.name == setting.name) {
                return Err(fail(
                    key,
                    format!(
                        "the same setting as `{other}` (both set {}); keep one of the two",
                        flag(setting.name)
                    ),
                ));
            }
            let values = value_of(setting, v).map_err(|m| fail(key, m))?;
            if let Some(first) = values.first() {
                check(setting, first).map_err(|m| fail(key, m))?;
            }
            found.push((setting, key, values));
        }
        let mut values = Vec::new();
        for setting in SETTINGS {
            if let Some((_, _, v)) = found.iter().find(|(s, _, _)| s.name == setting.name) {
                if !(setting.kind == Kind::Switch && v.is_empty()) {
                    values.push((setting, v.clone()));
                }
            }
        }
        Ok(ConfigFile { values })
    }

    /// The settings as flags, leaving out those `given` on the command line
    /// (flags override the file).
    pub fn args(&self, given: impl Fn(&Setting) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for (setting, values) in &self.values {
            if given(setting) {
                continue;
            }
            match setting.kind {
                Kind::Switch => out.push(flag(setting.name)),
                _ => out.extend(values.iter().map(|v| format!("{}={v}", flag(setting.name)))),
            }
        }
        out
    }
}

fn flag(name: &str) -> String {
    format!("--{name}")
}

fn unknown_key(key: &str) -> String {
    let lower = key.to_ascii_lowercase();
    let near = SETTINGS
        .iter()
        .flat_map(|s| std::iter::once(s.name).chain(s.aliases.iter().copied()))
        .find(|n| n.to_ascii_lowercase() == lower);
    let names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
    match near {
        Some(n) => {
            format!("unknown setting; did you mean `{n}`? (keys are the flag names, case matters)")
        }
        None => format!(
            "unknown setting; the keys are the flag names without --: {}",
            names.join(", ")
        ),
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => "null".into(),
        _ => serde_norway::to_string(v)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// The flag value(s) of `v` for `setting`.
fn value_of(setting: &Setting, v: &Value) -> Result<Vec<String>, String> {
    let scalar = |v: &Value| -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            Value::Null => Err("has no value; give one or remove the key".into()),
            _ => Err(format!(
                "`{}` is not a single value; write a string or a number",
                scalar_text(v)
            )),
        }
    };
    match setting.kind {
        Kind::Value => Ok(vec![scalar(v)?]),
        Kind::Bool | Kind::Switch => {
            let b = match v {
                Value::Bool(b) => *b,
                Value::String(s) => flags::parse_bool("", s)
                    .map_err(|_| format!("`{s}` is not a boolean; allowed values: true, false"))?,
                Value::Null => return Err("has no value; write true or false".into()),
                other => {
                    return Err(format!(
                        "`{}` is not a boolean; allowed values: true, false",
                        scalar_text(other)
                    ))
                }
            };
            Ok(match (setting.kind, b) {
                (Kind::Switch, true) => vec!["true".into()],
                (Kind::Switch, false) => vec![],
                _ => vec![b.to_string()],
            })
        }
        Kind::List | Kind::Repeated => {
            let items: Vec<String> = match v {
                Value::Sequence(seq) => {
                    if seq.is_empty() {
                        return Err(
                            "is an empty list; give at least one item or remove the key".into()
                        );
                    }
                    seq.iter()
                        .map(|x| {
                            let s = scalar(x)?;
                            if setting.kind == Kind::List && s.contains(',') {
                                return Err(format!(
                                    "list item `{s}` holds a comma; write one item per list entry"
                                ));
                            }
                            Ok(s)
                        })
                        .collect::<Result<_, String>>()?
                }
                other => vec![scalar(other)?],
            };
            Ok(if setting.kind == Kind::List {
                vec![items.join(",")]
            } else {
                items
            })
        }
    }
}

/// The values kube-watch knows how to check, checked as their flags are.
fn check(setting: &Setting, value: &str) -> Result<(), String> {
    let r = match setting.name {
        "cidrPools" => flags::parse_cidr_pools(value).map(drop),
        "cidr6Pools" => flags::parse_cidr6_pools(value).map(drop),
        "externalSecondaryCIDRs" => flags::parse_secondary_cidrs(value).map(drop),
        "setLBMode" => flags::parse_lb_mode(value).map(drop),
        "loadBalancerClass" => flags::parse_load_balancer_class(value).map(drop),
        "zone" => flags::parse_zone(value).map(drop),
        _ => Ok(()),
    };
    r.map_err(|e| format!("{value:?}: {}", e.message))
}

/// Whether `args` (the command line after the subcommand) set `setting`.
fn given_in(args: &[OsString], setting: &Setting) -> bool {
    let long = flag(setting.name);
    let short = setting.short.map(|c| format!("-{c}"));
    args.iter().filter_map(|a| a.to_str()).any(|a| {
        a == long
            || a.strip_prefix(long.as_str())
                .is_some_and(|rest| rest.starts_with('='))
            || short
                .as_deref()
                .is_some_and(|s| a == s || (a.starts_with(s) && !a.starts_with("--")))
    })
}

/// The command line with `kube --config <path>` replaced by the file's
/// settings as flags, placed right after `kube` (before the command line's
/// own flags, which override them). Any other command line is returned as
/// it is (`run --config` is the rule file).
pub fn expand_args(args: Vec<OsString>) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(sub) = args.iter().position(|a| a == "kube") else {
        return Ok(args);
    };
    let mut rest: Vec<OsString> = Vec::new();
    let mut path: Option<OsString> = None;
    let mut it = args[sub + 1..].iter();
    let twice = |p: &OsString| ConfigFileError {
        file: p.to_string_lossy().into_owned(),
        key: String::new(),
        message: format!("{CONFIG_FLAG} is given twice; give one config file"),
    };
    while let Some(a) = it.next() {
        let text = a.to_str().unwrap_or("");
        let value = if text == CONFIG_FLAG {
            Some(it.next().cloned().ok_or_else(|| ConfigFileError {
                file: String::new(),
                key: String::new(),
                message: format!("{CONFIG_FLAG} needs a value: the path of a YAML file"),
            })?)
        } else {
            text.strip_prefix("--config=").map(OsString::from)
        };
        match value {
            Some(p) if path.is_some() => return Err(twice(&p)),
            Some(p) => path = Some(p),
            None => rest.push(a.clone()),
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let file = ConfigFile::load(Path::new(&path))?;
    let mut out: Vec<OsString> = args[..=sub].to_vec();
    out.extend(
        file.args(|s| given_in(&rest, s))
            .into_iter()
            .map(OsString::from),
    );
    out.extend(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<String>, String> {
        ConfigFile::parse("kube.yaml", text)
            .map(|c| c.args(|_| false))
            .map_err(|e| e.to_string())
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn settings_become_flags() {
        let args = parse(
            "iface: [eth0, eth1]\n\
             keep: true\n\
             forward-via-stack: false\n\
             cidrPools: [defaultPool=192.0.2.0/24, pool2=198.51.100.0/24]\n\
             setLBMode: 2\n\
             setExclIPAM: true\n\
             loxilbLoadBalancerClass: example.com/lb\n\
             setLBHostnameStatus: 'true'\n\
             zone: llb\n\
             setBGP: 65001\n",
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--iface=eth0",
                "--iface=eth1",
                "--keep",
                "--setBGP=65001",
                "--cidrPools=defaultPool=192.0.2.0/24,pool2=198.51.100.0/24",
                "--setLBMode=2",
                "--setUniqueIP=true",
                "--loadBalancerClass=example.com/lb",
                "--setLBHostnameStatus=true",
                "--zone=llb",
            ]
        );
        assert_eq!(parse("iface: eth0\n").unwrap(), ["--iface=eth0"]);
    }

    /// Each bad file: the message names the file and key and says what to
    /// do.
    #[test]
    fn bad_files_table() {
        for (text, want) in [
            ("", "kube.yaml: is empty; write the settings as `key: value`"),
            ("- a\n", "kube.yaml: is not a mapping"),
            ("a: [\n", "kube.yaml: not valid YAML"),
            ("cidrpools: x\n", "kube.yaml: cidrpools: unknown setting; did you mean `cidrPools`?"),
            ("frobnicate: 1\n", "kube.yaml: frobnicate: unknown setting; the keys are the flag names without --: iface, xdp-mode"),
            ("1: x\n", "kube.yaml: 1: a key must be a setting name"),
            (
                "setUniqueIP: true\nsetExclIPAM: false\n",
                "kube.yaml: setExclIPAM: the same setting as `setUniqueIP` (both set --setUniqueIP); keep one of the two",
            ),
            ("setUniqueIP: yes please\n", "kube.yaml: setUniqueIP: `yes please` is not a boolean; allowed values: true, false"),
            ("monitor: 1\n", "kube.yaml: monitor: `1` is not a boolean"),
            ("keep:\n", "kube.yaml: keep: has no value; write true or false"),
            ("setLBMode:\n", "kube.yaml: setLBMode: has no value; give one or remove the key"),
            ("setLBMode: [1]\n", "kube.yaml: setLBMode: `- 1` is not a single value"),
            ("setLBMode: 4\n", "kube.yaml: setLBMode: \"4\": 4 (fullproxy) is not supported"),
            ("cidrPools: [a=10.0.0.0/33]\n", "kube.yaml: cidrPools: \"a=10.0.0.0/33\": pool `a`: `10.0.0.0/33` is not a CIDR"),
            ("cidrPools: [\"a=10.0.0.0/24,b=10.0.1.0/24\"]\n", "holds a comma; write one item per list entry"),
            ("iface: []\n", "kube.yaml: iface: is an empty list"),
            ("zone: LLB\n", "kube.yaml: zone: \"LLB\": not a zone name"),
            ("loadBalancerClass: a/b/c\n", "kube.yaml: loadBalancerClass: \"a/b/c\": not a label-style key"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(want) || e.contains(want), "{text:?}: {e}");
        }
        let e = ConfigFile::load(Path::new("/nonexistent/kube.yaml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/kube.yaml: cannot read it"),
            "{e}"
        );
    }

    #[test]
    fn command_line_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("kube-watch-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kube.yaml");
        std::fs::write(
            &path,
            "iface: [eth9]\nsetLBMode: 1\nmonitor: true\ncidrPools: defaultPool=192.0.2.0/24\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let out = expand_args(os(&[
            "loxilb-agent",
            "kube",
            "-i",
            "eth0",
            &format!("--config={p}"),
            "--setLBMode=2",
            "--monitor",
        ]))
        .unwrap();
        assert_eq!(
            out,
            os(&[
                "loxilb-agent",
                "kube",
                "--cidrPools=defaultPool=192.0.2.0/24",
                "-i",
                "eth0",
                "--setLBMode=2",
                "--monitor",
            ])
        );
        let out = expand_args(os(&["loxilb-agent", "kube", "--config", p])).unwrap();
        assert_eq!(
            out,
            os(&[
                "loxilb-agent",
                "kube",
                "--iface=eth9",
                "--cidrPools=defaultPool=192.0.2.0/24",
                "--setLBMode=1",
                "--monitor=true",
            ])
        );
        // `run --config` is the rule file: untouched.
        let run = os(&["loxilb-agent", "run", "--config", p, "-i", "eth0"]);
        assert_eq!(expand_args(run.clone()).unwrap(), run);
        let e =
            expand_args(os(&["loxilb-agent", "kube", "--config", p, "--config", p])).unwrap_err();
        assert!(e.to_string().contains("--config is given twice"), "{e}");
        let e = expand_args(os(&["loxilb-agent", "kube", "--config"])).unwrap_err();
        assert!(e.to_string().contains("--config needs a value"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The Kubernetes manifests under `manifest/`: every one validated against
//! the Kubernetes API schemas with `kubernetes-validate` (PyPI; installed by
//! `scripts/setup.sh`), and the in-cluster DaemonSet checked against what
//! the code expects of it (its arguments parse with the core's flag parsers,
//! the environment the controller reads, the bpffs mount).
//!
//! Without the validator the schema tests print `SKIPPED ...`; with
//! `LOXILB_REQUIRE_TOOLS=1` (CI) they fail instead.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{PolicyRule, Role},
};
use kube_watch::{
    flags::{self, KubeConfig, VipOwners},
    groups,
    leader::DEFAULT_LEASE_NAME,
};
use serde::Deserialize;

/// The version `scripts/setup.sh` installs.
const VALIDATOR_VERSION: &str = "1.37.0";
/// The Kubernetes version validated against: the one the workspace's
/// `k8s-openapi` feature (`v1_37`) targets.
/// Schemas validated against: the oldest Kubernetes release we support
/// (1.33) and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];
/// Where `scripts/setup.sh` puts its wrapper.
const SETUP_BIN: &str = "/opt/loxilb-rs/bin/kubernetes-validate";
/// Files under `manifest/` that are not Kubernetes objects.
const NOT_KUBERNETES: &[&str] = &["standalone"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("kube-watch lives in the workspace")
        .to_path_buf()
}

fn require_tools() -> bool {
    std::env::var("LOXILB_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// The validator command (program and leading arguments), or why none is
/// usable.
fn validator() -> Result<Vec<String>, String> {
    let mut candidates: Vec<Vec<String>> = Vec::new();
    if let Ok(p) = std::env::var("KUBERNETES_VALIDATE") {
        candidates.push(vec![p]);
    }
    candidates.push(vec![SETUP_BIN.into()]);
    candidates.push(vec!["kubernetes-validate".into()]);
    candidates.push(vec![
        "python3".into(),
        "-m".into(),
        "kubernetes_validate".into(),
    ]);
    let mut tried = Vec::new();
    for c in candidates {
        let out = Command::new(&c[0]).args(&c[1..]).arg("--version").output();
        match out {
            Ok(o) if o.status.success() => {
                let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
                if v != VALIDATOR_VERSION {
                    eprintln!(
                        "note: {} is kubernetes-validate {v}; scripts/setup.sh pins {VALIDATOR_VERSION}",
                        c.join(" ")
                    );
                }
                return Ok(c);
            }
            Ok(o) => tried.push(format!("{} (exit {})", c.join(" "), o.status)),
            Err(e) => tried.push(format!("{} ({e})", c.join(" "))),
        }
    }
    Err(format!(
        "kubernetes-validate not found (tried: {}); scripts/setup.sh installs it",
        tried.join("; ")
    ))
}

/// The validator, or `None` after printing why the test is skipped (panics
/// under `LOXILB_REQUIRE_TOOLS=1`).
fn validator_or_skip(test: &str) -> Option<Vec<String>> {
    match validator() {
        Ok(v) => Some(v),
        Err(e) if require_tools() => panic!("{test}: {e} (LOXILB_REQUIRE_TOOLS=1)"),
        Err(e) => {
            println!("SKIPPED {test}: {e}; LOXILB_REQUIRE_TOOLS=1 makes this a failure");
            None
        }
    }
}

/// Every `*.yaml` / `*.yml` under `manifest/` except the directories of
/// [`NOT_KUBERNETES`], sorted.
fn kubernetes_manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    let root = repo_root().join("manifest");
    let mut out = Vec::new();
    for entry in fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() && !NOT_KUBERNETES.contains(&name.as_str()) {
            walk(&path, &mut out);
        } else if path.is_file()
            && matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The YAML documents of a file (empty documents dropped).
fn documents(path: &Path) -> Vec<serde_norway::Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            serde_norway::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Run the validator on `files`: `Ok(output)` when every document passed
/// (exit 0, no ERROR or WARN line: a kind without a schema is a WARN and
/// means nothing was checked), else `Err(output)`.
fn validate(tool: &[String], files: &[PathBuf]) -> Result<String, String> {
    let mut all = String::new();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&tool[0])
            .args(&tool[1..])
            .args(["--strict", "-k", version])
            .args(files)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", tool.join(" ")));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bad_line = text
            .lines()
            .any(|l| l.starts_with("ERROR") || l.starts_with("WARN"));
        if !out.status.success() || bad_line {
            return Err(format!(
                "Kubernetes {version}: exit {}:\n{text}",
                out.status
            ));
        }
        all += &text;
    }
    Ok(all)
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files = kubernetes_manifests();
    let in_cluster = repo_root().join("manifest/in-cluster/loxilb.yaml");
    assert!(files.contains(&in_cluster), "{files:?}");
    let mut docs = 0;
    for f in &files {
        for (i, d) in documents(f).iter().enumerate() {
            assert!(
                d.get("apiVersion").is_some() && d.get("kind").is_some(),
                "{} document {i}: not a Kubernetes object (no apiVersion/kind); \
                 files that are not Kubernetes manifests belong under manifest/standalone/",
                f.display()
            );
            docs += 1;
        }
    }
    let Some(tool) = validator_or_skip("manifests_validate_against_the_kubernetes_schemas") else {
        return;
    };
    let out = validate(&tool, &files).unwrap_or_else(|e| {
        panic!("manifests do not validate against Kubernetes {KUBERNETES_VERSIONS:?}: {e}")
    });
    let passed = out.lines().filter(|l| l.contains(" passed for ")).count();
    assert_eq!(
        passed,
        docs * KUBERNETES_VERSIONS.len(),
        "every document must be reported as passed, for every version:\n{out}"
    );
}

#[test]
fn validator_rejects_broken_manifests() {
    let Some(tool) = validator_or_skip("validator_rejects_broken_manifests") else {
        return;
    };
    let good = fs::read_to_string(repo_root().join("manifest/in-cluster/loxilb.yaml")).unwrap();
    let dir = std::env::temp_dir().join(format!("kube-watch-manifests-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    for (name, from, to, want) in [
        (
            "type.yaml",
            "hostNetwork: true",
            "hostNetwork: \"yes\"",
            "hostNetwork",
        ),
        (
            "unknown-field.yaml",
            "dnsPolicy:",
            "dnsPolicyy:",
            "dnsPolicyy",
        ),
        (
            "missing-field.yaml",
            "  kind: ClusterRole\n  name: loxilb-agent\n",
            "  name: loxilb-agent\n",
            "kind",
        ),
    ] {
        assert!(good.contains(from), "{name}: {from:?} not in the manifest");
        let path = dir.join(name);
        fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let e = validate(&tool, &[path]).expect_err(name);
        assert!(e.contains(want), "{name}: {e}");
    }
    fs::remove_dir_all(&dir).unwrap();
}

fn daemonset() -> DaemonSet {
    let path = repo_root().join("manifest/in-cluster/loxilb.yaml");
    let doc = documents(&path)
        .into_iter()
        .find(|d| d.get("kind").and_then(|k| k.as_str()) == Some("DaemonSet"))
        .expect("a DaemonSet");
    serde_norway::from_value(doc).expect("a DaemonSet k8s-openapi reads")
}

/// Parse `--name=value` arguments with the core's flag parsers.
fn kube_config(args: &[String]) -> Result<KubeConfig, String> {
    let mut c = KubeConfig::default();
    for a in args {
        // The agent's own node switches (checked by the agent's CLI test).
        if a == "--keep" || a == "--forward-via-stack" {
            continue;
        }
        let (name, value) = a
            .split_once('=')
            .ok_or_else(|| format!("{a}: write --flag=value"))?;
        let e = |e: flags::FlagError| e.to_string();
        match name {
            "--cidrPools" => c.cidr_pools = flags::parse_cidr_pools(value).map_err(e)?,
            "--cidr6Pools" => c.cidr6_pools = flags::parse_cidr6_pools(value).map_err(e)?,
            "--externalSecondaryCIDRs" => {
                c.secondary_pools = flags::parse_secondary_cidrs(value).map_err(e)?
            }
            flags::FLAG_LB_MODE => c.lb_mode = flags::parse_lb_mode(value).map_err(e)?,
            flags::FLAG_UNIQUE_IP => {
                c.unique_ip = flags::parse_bool(flags::FLAG_UNIQUE_IP, value).map_err(e)?
            }
            flags::FLAG_LB_CLASS => {
                c.load_balancer_class = flags::parse_load_balancer_class(value).map_err(e)?
            }
            flags::FLAG_POD_NETWORK => {
                c.use_pod_network = flags::parse_bool(flags::FLAG_POD_NETWORK, value).map_err(e)?
            }
            flags::FLAG_MONITOR => {
                c.monitor = flags::parse_bool(flags::FLAG_MONITOR, value).map_err(e)?
            }
            flags::FLAG_VIP_OWNERS => c.vip_owners = flags::parse_vip_owners(value).map_err(e)?,
            // The agent's own node flags (checked by the agent's CLI test).
            "--iface" | "--xdp-mode" | "--setBGP" | "--extBGPPeers" | "--listenBGPPort"
            | "--eBGPMultiHop" | "--fullnat-source" | "--snat-ports" | "--health-listen"
            | "--max-new-flows" | "--new-flow-burst" | "--enableBGPCRDs" | "--setRoles"
            | "--forward" => {}
            other => return Err(format!("{other}: not a kube flag")),
        }
    }
    c.ipam().map_err(|e| e.to_string())?;
    Ok(c)
}

#[test]
fn daemonset_runs_the_kube_subcommand_with_flags_the_core_parses() {
    let ds = daemonset();
    let pod = ds.spec.template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/loxilb-rs/loxilb-agent:latest")
    );
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "kube", "the agent's Kubernetes subcommand");
    let config = kube_config(&args[1..]).unwrap();
    assert_eq!(config.load_balancer_class, "loxilb.io/loxilb");
    assert_eq!(config.cidr_pools.len(), 1);
    assert_eq!(config.cidr_pools[0].name, "defaultPool");
    // The parser used here does fail on a bad value.
    assert!(kube_config(&["--setLBMode=4".into()]).is_err());
    assert!(kube_config(&["--cidrPools=defaultPool=10.0.0.5".into()]).is_err());
    assert!(kube_config(&["--frobnicate=1".into()]).is_err());
}

#[test]
fn daemonset_has_what_the_agent_needs() {
    let ds = daemonset();
    let meta = &ds.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("kube-system"));
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap().add.unwrap();
    for cap in ["NET_ADMIN", "SYS_ADMIN", "BPF"] {
        assert!(caps.iter().any(|c| c == cap), "{cap} missing: {caps:?}");
    }
    // The bpffs of the host, where the datapath pins its maps.
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("a /sys/fs/bpf mount");
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    // The environment the controller reads (kube_watch::controller::RunConfig::from_env).
    let env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let f = e.value_from.as_ref()?.field_ref.as_ref()?;
            Some((e.name.clone(), f.field_path.clone()))
        })
        .collect();
    for (name, path) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert!(
            env.contains(&(name.to_string(), path.to_string())),
            "{name} from {path}: {env:?}"
        );
    }
    // The ServiceAccount it runs as exists in the same file and namespace.
    let sa_doc = documents(&repo_root().join("manifest/in-cluster/loxilb.yaml"))
        .into_iter()
        .find(|d| d.get("kind").and_then(|k| k.as_str()) == Some("ServiceAccount"))
        .unwrap();
    let sa: ServiceAccount = serde_norway::from_value(sa_doc).unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));
}

/// The rules of the manifest's Roles in `namespace`.
fn role_rules(namespace: &str) -> Vec<PolicyRule> {
    documents(&repo_root().join("manifest/in-cluster/loxilb.yaml"))
        .into_iter()
        .filter(|d| d.get("kind").and_then(|k| k.as_str()) == Some("Role"))
        .map(|d| serde_norway::from_value::<Role>(d).expect("a Role k8s-openapi reads"))
        .filter(|r| r.metadata.namespace.as_deref() == Some(namespace))
        .flat_map(|r| r.rules.unwrap_or_default())
        .collect()
}

/// Whether `rules` grant `verb` on the Lease `name` (`None`: a verb on no
/// particular name, like create).
fn grants_lease(rules: &[PolicyRule], verb: &str, name: Option<&str>) -> bool {
    rules.iter().any(|r| {
        r.api_groups
            .iter()
            .flatten()
            .any(|g| g == "coordination.k8s.io")
            && r.resources.iter().flatten().any(|x| x == "leases")
            && r.verbs.iter().any(|v| v == verb)
            && match (&r.resource_names, name) {
                (None, _) => true,
                (Some(names), Some(n)) => names.iter().any(|x| x == n),
                (Some(_), None) => false,
            }
    })
}

/// The Leases the agents elect with (in the DaemonSet's namespace, where
/// `POD_NAMESPACE` points the Lease): the leader's, and with
/// `--vipOwners=pool` (as the manifest runs or with the flag added) the
/// members Lease and one per pool of the manifest's `--cidrPools` /
/// `--cidr6Pools`, named as the agent names them (`kube_watch::groups`).
/// The Role grants create on Leases (it cannot name them) and get and
/// update on each of those names.
#[test]
fn the_role_grants_every_lease_the_agent_elects_with() {
    let ds = daemonset();
    let namespace = ds.metadata.namespace.clone().unwrap();
    let args = ds.spec.template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let mut config = kube_config(&args[1..]).unwrap();
    let as_run = config.vip_owners;
    // The pool-mode names, whether or not the manifest turns it on.
    config.vip_owners = VipOwners::Pool;
    let pools = config.pool_names();
    assert!(!pools.is_empty(), "the manifest has pools");
    let mut names = vec![DEFAULT_LEASE_NAME.to_string()];
    names.push(groups::members_lease_name(DEFAULT_LEASE_NAME));
    names.extend(groups::lease_names(DEFAULT_LEASE_NAME, &pools).unwrap());
    assert!(
        names.contains(&"loxilb-agent-pool-defaultpool".to_string()),
        "{names:?}"
    );
    let rules = role_rules(&namespace);
    assert!(
        grants_lease(&rules, "create", None),
        "create on leases in {namespace} (new Leases have no name to grant yet)"
    );
    for n in &names {
        for verb in ["get", "update"] {
            assert!(
                grants_lease(&rules, verb, Some(n)),
                "the Role in {namespace} does not grant {verb} on the Lease {n:?} \
                 (the agent runs as {as_run:?}; pool mode needs {names:?})"
            );
        }
    }
    // The check does fail: a pool the manifest does not have, another
    // namespace, a verb the agent does not need.
    let other = groups::lease_name(DEFAULT_LEASE_NAME, "pool2");
    assert!(!grants_lease(&rules, "get", Some(&other)));
    assert!(!grants_lease(
        &role_rules("default"),
        "get",
        Some(DEFAULT_LEASE_NAME)
    ));
    assert!(!grants_lease(&rules, "delete", Some(DEFAULT_LEASE_NAME)));
}

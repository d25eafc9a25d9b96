//! Each reconcile of a Service runs in a `reconcile` span that names it:
//! the lines the controller logs while it plans a Service and carries out
//! the plan (its steps, its Events) say `reconcile{service=<ns>/<name>}`,
//! and never another Service's name. Through the whole controller and the
//! in-memory API server (`fake_api`), with the log captured.

mod fake_api;

use std::{
    io::Write,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_api::{until, FakeApi, Running};
use kube_watch::{
    controller::{run, Applied, RuleSink, RunConfig},
    flags::{parse_cidr_pools, KubeConfig},
    leader::LeaseConfig,
    translate::ServiceRule,
};
use serde_json::{json, Value};
use tracing::instrument::WithSubscriber;

#[derive(Clone, Default)]
struct Sink;

impl RuleSink for Sink {
    fn apply(&mut self, _: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        Ok(Applied::all())
    }
    fn own_vips(&mut self, _: Vec<IpAddr>) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The formatted log, shared with the subscriber.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;
    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

impl Log {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }
}

fn service(name: &str, port: u16) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name, "generation": 1},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "loxilb.io/loxilb",
                 "ports": [{"name": "p", "port": port, "targetPort": 8080,
                            "nodePort": 30000 + port, "protocol": "TCP"}]},
    })
}

fn ingress(api: &FakeApi, name: &str) -> Vec<String> {
    api.with(|s| s.get("services", "default", name))
        .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i["ip"].as_str().map(String::from))
        .collect()
}

/// The Service named by the line's `reconcile{service=...}` span, if any.
fn span_service(line: &str) -> Option<&str> {
    let rest = line.split("reconcile{service=").nth(1)?;
    rest.split('}').next()
}

/// The line's own `service=` field (after the span), if any.
fn field_service(line: &str) -> Option<&str> {
    let after_span = line.split_once("}: ").map_or(line, |(_, r)| r);
    let rest = after_span.split(" service=").nth(1)?;
    rest.split(' ').next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_reconcile_names_its_service() {
    let api = FakeApi::new();
    api.with(|s| {
        s.put(
            "nodes",
            json!({
                "metadata": {"name": "n1"},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }),
        );
        s.put("services", service("web", 80));
        s.put("services", service("db", 81));
    });

    let log = Log::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_env_filter("kube_watch=debug")
        .with_ansi(false)
        .without_time()
        .finish();
    let kube = KubeConfig {
        cidr_pools: parse_cidr_pools("defaultPool=192.0.2.0/30").unwrap(),
        ..KubeConfig::default()
    };
    let mut lease = LeaseConfig::new("kube-system", "agent-a");
    lease.retry_period = Duration::from_millis(200);
    let client = api.client("agent-a");
    let agent = Running::spawn(move |shutdown| {
        run(client, RunConfig::new(kube, lease), Sink, shutdown).with_subscriber(subscriber)
    });
    until("both Services get an address", || {
        !ingress(&api, "web").is_empty() && !ingress(&api, "db").is_empty()
    })
    .await;
    agent.stop("the controller").await;

    let lines = log.lines();
    let all = lines.join("\n");
    for name in ["default/web", "default/db"] {
        let of = |what: &str| {
            lines
                .iter()
                .any(|l| span_service(l) == Some(name) && l.contains(what))
        };
        assert!(
            of("carrying out plan"),
            "{name}: no plan line in its span:\n{all}"
        );
        assert!(
            of("Allocated: "),
            "{name}: no Event line in its span:\n{all}"
        );
    }
    for l in &lines {
        if l.contains("carrying out plan") {
            assert!(span_service(l).is_some(), "outside a reconcile span: {l}");
        }
        if let (Some(span), Some(field)) = (span_service(l), field_service(l)) {
            assert_eq!(
                span, field,
                "a line of one Service's reconcile names another: {l}"
            );
        }
    }
}

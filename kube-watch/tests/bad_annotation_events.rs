//! A bad `loxilb.io/*` annotation value on a live Service, property-based
//! (proptest) through the whole controller and the in-memory API server
//! (`fake_api`): each generated bad value yields a Warning Event
//! `InvalidAnnotation` naming the annotation and the value, the Service's
//! `Configured` condition says so, and its rule stays as it was (same VIP,
//! mode, endpoints); with the value removed, it is configured again.
//!
//! `PROPTEST_CASES` sets the case count (default 500).

mod fake_api;
#[allow(dead_code)] // tally: the other property tests'
mod prop_support;

use std::time::{Duration, Instant};

use fake_api::{FakeApi, Running};
use kube_watch::{
    controller::{run, Applied, RuleSink, RunConfig},
    flags::{parse_cidr_pools, KubeConfig},
    leader::LeaseConfig,
    translate::ServiceRule,
};
use prop_support::{cases, quoted};
use proptest::{
    prelude::*,
    test_runner::{TestCaseError, TestRunner},
};
use serde_json::json;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Sink {
    rules: Arc<Mutex<Vec<ServiceRule>>>,
}

impl RuleSink for Sink {
    fn apply(&mut self, rules: Vec<ServiceRule>) -> anyhow::Result<Applied> {
        *self.rules.lock().unwrap() = rules;
        Ok(Applied::all())
    }
    fn own_vips(&mut self, _: Vec<std::net::IpAddr>) -> anyhow::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn web(&self) -> Option<ServiceRule> {
        self.rules
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.service.name == "web")
            .cloned()
    }
}

/// A bad value for an annotation of a Service that has good ones.
fn bad_annotation() -> impl Strategy<Value = (&'static str, String)> {
    let junk = || {
        prop_oneof![
            Just(String::new()),
            Just(" ".to_string()),
            Just("-1".to_string()),
            Just("1.5".to_string()),
            Just("\u{201c}yes\u{201d}".to_string()),
            Just("ＹＥＳ".to_string()),
            "[a-z]{1,10}_[a-z]{1,4}",
            "\\PC{1,12}_",
            (100usize..3000).prop_map(|n| "x".repeat(n)),
        ]
    };
    prop_oneof![
        (
            Just("loxilb.io/lbmode"),
            prop_oneof![Just("fullproxy".to_string()), junk()]
        ),
        (
            Just("loxilb.io/timeout"),
            prop_oneof![
                Just("0".into()),
                (604_801u64..u64::MAX).prop_map(|n| n.to_string()),
                junk()
            ]
        ),
        (
            Just("loxilb.io/epselect"),
            prop_oneof![Just("n3".to_string()), junk()]
        ),
        (
            Just("loxilb.io/probetype"),
            prop_oneof![Just("icmp".to_string()), junk()]
        ),
        (
            Just("loxilb.io/probeport"),
            prop_oneof![Just("0".into()), Just("65536".into()), junk()]
        ),
        (
            Just("loxilb.io/staticIP"),
            prop_oneof![
                Just("192.0.2.300".to_string()),
                Just("192.0.2.0/24".to_string()),
                junk()
            ]
        ),
        (
            Just("loxilb.io/ipam"),
            prop_oneof![Just("ipv5".to_string()), junk()]
        ),
        (
            Just("loxilb.io/liveness"),
            prop_oneof![Just("true".to_string()), junk()]
        ),
        (
            Just("loxilb.io/secondaryIPs"),
            prop_oneof![
                Just("1.1.1.1,,".to_string()),
                Just("1.1.1.1,1.1.1.1".to_string())
            ]
        ),
        (
            Just("loxilb.io/egress"),
            prop_oneof![Just("yes".to_string()), Just("enabled".to_string())]
        ),
    ]
}

fn notes(api: &FakeApi, reason: &str) -> Vec<String> {
    api.with(|s| s.all("events"))
        .into_iter()
        .filter(|e| e["regarding"]["name"] == "web" && e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap_or("").to_string())
        .collect()
}

fn configured(api: &FakeApi) -> Option<(String, String)> {
    let svc = api.with(|s| s.get("services", "default", "web"))?;
    svc["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "loxilb.io/Configured")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
}

async fn wait(what: &str, mut f: impl FnMut() -> bool) -> Result<(), TestCaseError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        if Instant::now() > deadline {
            return Err(TestCaseError::fail(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[test]
fn a_bad_annotation_yields_an_event_and_keeps_the_rule() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = FakeApi::new();
    let sink = Sink::default();
    api.with(|s| {
        s.put(
            "services",
            json!({
                "metadata": {"namespace": "default", "name": "web", "generation": 1,
                             "annotations": {"loxilb.io/usepodnetwork": "yes",
                                             "loxilb.io/lbmode": "fullnat"}},
                "spec": {"type": "LoadBalancer", "loadBalancerClass": "loxilb.io/loxilb",
                         "ports": [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
            }),
        );
        s.put(
            "endpointslices",
            json!({
                "metadata": {"namespace": "default", "name": "web-1",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.0.5"]}, {"addresses": ["10.244.0.6"]}],
            }),
        );
    });
    let agent = rt.block_on(async {
        let kube = KubeConfig {
            cidr_pools: parse_cidr_pools("defaultPool=192.0.2.0/29").unwrap(),
            ..KubeConfig::default()
        };
        let mut lease = LeaseConfig::new("kube-system", "agent-a");
        lease.lease_duration = Duration::from_secs(3);
        lease.renew_deadline = Duration::from_secs(2);
        lease.retry_period = Duration::from_millis(200);
        let mut config = RunConfig::new(kube, lease);
        config.retry_min = Duration::from_millis(20);
        config.retry_max = Duration::from_millis(200);
        let client = api.client("agent-a");
        let s = sink.clone();
        let agent = Running::spawn(move |shutdown| run(client, config, s, shutdown));
        fake_api::until("web configured", || {
            sink.web().is_some()
                && configured(&api) == Some(("True".into(), "RulesComputed".into()))
        })
        .await;
        agent
    });
    let good = sink.web().unwrap();
    assert_eq!(good.rule.endpoints.len(), 2);

    let mut runner = TestRunner::new(cases(500));
    let result = runner.run(&bad_annotation(), |(key, value)| {
        rt.block_on(async {
            let before = notes(&api, "InvalidAnnotation").len();
            api.with(|s| {
                s.edit("services", "default", "web", |o| {
                    o["metadata"]["annotations"][key] = json!(value);
                })
            });
            let want = format!("{key}: {}: ", quoted(&value));
            wait("the InvalidAnnotation Event", || {
                notes(&api, "InvalidAnnotation")[before..]
                    .iter()
                    .any(|n| n.starts_with(&want))
            })
            .await?;
            wait("Configured=False", || {
                configured(&api) == Some(("False".into(), "InvalidAnnotation".into()))
            })
            .await?;
            let now = sink.web();
            prop_assert_eq!(now.as_ref(), Some(&good), "the last good rule stays");
            // Fixed (the good value back, or none): configured again, the
            // same rule.
            api.with(|s| {
                s.edit("services", "default", "web", |o| {
                    let a = o["metadata"]["annotations"].as_object_mut().unwrap();
                    if key == "loxilb.io/lbmode" {
                        a.insert(key.into(), json!("fullnat"));
                    } else {
                        a.remove(key);
                    }
                })
            });
            wait("Configured=True", || {
                configured(&api) == Some(("True".into(), "RulesComputed".into()))
            })
            .await?;
            let after = sink.web();
            prop_assert_eq!(after.as_ref(), Some(&good));
            Ok(())
        })
    });
    rt.block_on(agent.stop("the controller"));
    result.unwrap();
    let refusals = notes(&api, "InvalidAnnotation").len();
    println!("bad annotations through the controller: {refusals} InvalidAnnotation Events, the rule kept each time");
}

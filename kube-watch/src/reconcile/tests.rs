use super::*;
use crate::{
    ipam::{PoolRange, PoolSpec, DEFAULT_POOL},
    IpFamily,
};
use k8s_openapi::jiff::SignedDuration;
use loxilb_model::{Mode, Protocol, Rule};
use serde_json::json;

fn t0() -> Timestamp {
    "2026-05-01T10:00:00Z".parse().unwrap()
}

fn at(secs: i64) -> Timestamp {
    t0().checked_add(SignedDuration::from_secs(secs)).unwrap()
}

fn config(pool: &str) -> KubeConfig {
    KubeConfig {
        cidr_pools: vec![PoolSpec {
            name: DEFAULT_POOL.into(),
            range: PoolRange::Cidr(pool.parse().unwrap()),
        }],
        ..KubeConfig::default()
    }
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A managed Service `default/<name>` with port 80/TCP (nodePort 30080),
/// created `age` seconds after t0.
fn svc_aged(name: &str, annotations: Value, age: i64) -> Service {
    serde_json::from_value(json!({
        "metadata": {
            "namespace": "default", "name": name, "uid": format!("uid-{name}"),
            "resourceVersion": "1", "generation": 1,
            "creationTimestamp": at(age).to_string(),
            "annotations": annotations,
        },
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "loxilb.io/loxilb",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
        },
    }))
    .unwrap()
}

fn svc(name: &str, annotations: Value) -> Service {
    svc_aged(name, annotations, 0)
}

fn node(name: &str, addr: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {
            "addresses": [{"type": "InternalIP", "address": addr}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }))
    .unwrap()
}

fn nodes() -> Vec<Node> {
    vec![node("n1", "10.0.0.1"), node("n2", "10.0.0.2")]
}

fn leader(pool: &str) -> Reconciler {
    let mut r = Reconciler::new(config(pool)).unwrap();
    let t = r.become_leader([]);
    assert_eq!(t, Takeover::default());
    r
}

fn bump(rv: &Option<String>) -> Option<String> {
    Some((rv.as_deref().unwrap_or("0").parse::<u64>().unwrap() + 1).to_string())
}

/// What the API server makes of a plan's writes (and the datapath of its
/// rules): the Service as the watcher then delivers it.
fn carry_out(r: &mut Reconciler, key: &ServiceKey, svc: &Service, plan: &Plan) -> Service {
    carry_out_requeue(r, key, svc, plan).0
}

fn carry_out_requeue(
    r: &mut Reconciler,
    key: &ServiceKey,
    svc: &Service,
    plan: &Plan,
) -> (Service, Vec<ServiceKey>) {
    let mut requeue = plan.requeue.clone();
    let mut s = svc.clone();
    for step in &plan.steps {
        match step {
            Step::PatchMetadata(p) => {
                assert_eq!(
                    Some(&p.resource_version),
                    s.metadata.resource_version.as_ref(),
                    "the patch is conditional on the version read"
                );
                if let Some(f) = &p.finalizers {
                    s.metadata.finalizers = Some(f.clone());
                }
                match &p.record {
                    Some(Some(v)) => {
                        s.metadata
                            .annotations
                            .get_or_insert_default()
                            .insert(RECORD_ANNOTATION.into(), v.clone());
                    }
                    Some(None) => {
                        s.metadata
                            .annotations
                            .get_or_insert_default()
                            .remove(RECORD_ANNOTATION);
                    }
                    None => {}
                }
                s.metadata.resource_version = bump(&s.metadata.resource_version);
            }
            Step::SetRules(rules) => {
                r.commit(key, rules.clone());
            }
            Step::PatchStatus(u) => {
                let st = s.status.get_or_insert_default();
                let mut conds: Vec<Condition> = st
                    .conditions
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| !CONDITIONS.contains(&c.type_.as_str()))
                    .collect();
                match u {
                    StatusUpdate::Apply {
                        load_balancer,
                        conditions,
                    } => {
                        st.load_balancer = Some(load_balancer.clone().unwrap_or_default());
                        conds.extend(conditions.iter().cloned());
                    }
                    StatusUpdate::Clear => st.load_balancer = Some(Default::default()),
                }
                st.conditions = Some(conds);
                s.metadata.resource_version = bump(&s.metadata.resource_version);
            }
            Step::Release => requeue.extend(r.release(key)),
        }
    }
    (s, requeue)
}

/// Plan and carry out until nothing is left to do; returns the first plan
/// and the converged Service.
fn converge(r: &mut Reconciler, svc: &Service, nodes: &[Node], now: Timestamp) -> (Plan, Service) {
    let k = service_key(svc).unwrap();
    let first = r.plan(&k, Some(svc), &[], nodes, now);
    let mut s = carry_out(r, &k, svc, &first);
    let again = r.plan(&k, Some(&s), &[], nodes, now);
    assert!(
        again.steps.is_empty() && again.events.is_empty(),
        "second plan must be empty: {again:#?}"
    );
    s = carry_out(r, &k, &s, &again);
    (first, s)
}

fn ingress(s: &Service) -> Vec<String> {
    s.status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .map(|i| i.iter().filter_map(|e| e.ip.clone()).collect())
        .unwrap_or_default()
}

fn cond<'a>(s: &'a Service, type_: &str) -> &'a Condition {
    observed_conditions(s)
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

fn events_of(p: &Plan, reason: &str) -> Vec<String> {
    p.events
        .iter()
        .filter(|e| e.reason == reason)
        .map(|e| e.note.clone())
        .collect()
}

#[test]
fn leader_records_then_programs_then_writes_status() {
    let mut r = leader("192.0.2.0/29");
    let s = svc("web", json!({}));
    let (plan, done) = converge(&mut r, &s, &nodes(), t0());
    assert_eq!(plan.steps.len(), 3, "{plan:#?}");
    assert_eq!(
        plan.steps[0],
        Step::PatchMetadata(MetadataPatch {
            resource_version: "1".into(),
            finalizers: Some(vec![FINALIZER.into()]),
            record: Some(Some("ips=192.0.2.1;ports=80/tcp".into())),
        }),
        "the allocation is recorded first"
    );
    let Step::SetRules(rules) = &plan.steps[1] else {
        panic!("{:?}", plan.steps[1])
    };
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].rule.vip, ip("192.0.2.1"));
    assert_eq!(rules[0].rule.name, "default/web:80/tcp@192.0.2.1");
    let eps: Vec<String> = rules[0]
        .rule
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.ip, e.port))
        .collect();
    assert_eq!(eps, ["10.0.0.1:30080", "10.0.0.2:30080"]);
    assert!(matches!(
        plan.steps[2],
        Step::PatchStatus(StatusUpdate::Apply { .. })
    ));
    assert_eq!(
        plan.events,
        vec![EventSpec::normal(
            reasons::ALLOCATED,
            actions::ALLOCATE,
            "192.0.2.1 (pool defaultPool) for 80/tcp"
        )]
    );
    assert_eq!(ingress(&done), ["192.0.2.1"]);
    let a = cond(&done, CONDITION_ALLOCATED);
    assert_eq!(
        (a.status.as_str(), a.reason.as_str(), a.message.as_str()),
        ("True", "Allocated", "192.0.2.1")
    );
    assert_eq!(a.observed_generation, Some(1));
    assert_eq!(a.last_transition_time, Time(t0()));
    let c = cond(&done, CONDITION_CONFIGURED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "RulesComputed")
    );
    assert_eq!(r.rules().len(), 1);
    assert_eq!(r.owned_vips(), vec![ip("192.0.2.1")]);
}

#[test]
fn patch_and_apply_bodies() {
    let p = MetadataPatch {
        resource_version: "41".into(),
        finalizers: Some(vec!["other/x".into(), FINALIZER.into()]),
        record: Some(Some("ips=192.0.2.1;ports=80/tcp".into())),
    };
    assert_eq!(
        p.to_json(),
        json!({"metadata": {
            "resourceVersion": "41",
            "finalizers": ["other/x", "loxilb.io/loadbalancer"],
            "annotations": {"loxilb.io/allocated": "ips=192.0.2.1;ports=80/tcp"},
        }})
    );
    let p = MetadataPatch {
        resource_version: "42".into(),
        finalizers: None,
        record: Some(None),
    };
    assert_eq!(
        p.to_json(),
        json!({"metadata": {"resourceVersion": "42", "annotations": {"loxilb.io/allocated": null}}})
    );

    let mut r = leader("192.0.2.0/29");
    let plan = r.plan(
        &key("web"),
        Some(&svc("web", json!({}))),
        &[],
        &nodes(),
        t0(),
    );
    let Step::PatchStatus(u) = &plan.steps[2] else {
        panic!()
    };
    assert_eq!(
        u.to_apply_body(&key("web")),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "status": {
                "loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "VIP",
                    "ports": [{"port": 80, "protocol": "TCP"}]}]},
                "conditions": [
                    {"type": "loxilb.io/Allocated", "status": "True", "reason": "Allocated",
                     "message": "192.0.2.1", "observedGeneration": 1,
                     "lastTransitionTime": "2026-05-01T10:00:00Z"},
                    {"type": "loxilb.io/Configured", "status": "True", "reason": "RulesComputed",
                     "message": "1 rule(s)", "observedGeneration": 1,
                     "lastTransitionTime": "2026-05-01T10:00:00Z"},
                ],
            },
        })
    );
    assert_eq!(
        StatusUpdate::Clear.to_apply_body(&key("web")),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "default"}, "status": {}})
    );
}

#[test]
fn follower_writes_nothing_and_uses_the_record() {
    let mut lead = leader("192.0.2.0/29");
    let (_, recorded) = converge(&mut lead, &svc("web", json!({})), &nodes(), t0());

    let mut f = Reconciler::new(config("192.0.2.0/29")).unwrap();
    assert!(!f.is_leader());
    // Before the leader recorded anything: no rules, no writes.
    let p = f.plan(
        &key("web"),
        Some(&svc("web", json!({}))),
        &[],
        &nodes(),
        t0(),
    );
    assert_eq!(p, Plan::default());
    // With the record: the leader's rules, nothing written.
    let p = f.plan(&key("web"), Some(&recorded), &[], &nodes(), t0());
    assert_eq!(p.steps, vec![Step::SetRules(lead.rules())]);
    assert!(p.events.is_empty());
    f.commit(&key("web"), lead.rules());
    assert!(f.owned_vips().is_empty(), "followers own no VIP");
    // A node leaves: the follower follows.
    let p = f.plan(&key("web"), Some(&recorded), &[], &nodes()[..1], t0());
    let Step::SetRules(rules) = &p.steps[0] else {
        panic!()
    };
    assert_eq!(rules[0].rule.endpoints.len(), 1);
    assert_eq!(rules[0].rule.vip, ip("192.0.2.1"));
}

#[test]
fn pool_exhausted_stays_pending_warns_once_and_gets_a_released_address() {
    // 192.0.2.0/30 hands out .1 and .2.
    let mut r = leader("192.0.2.0/30");
    let (_, a) = converge(&mut r, &svc("a", json!({})), &nodes(), t0());
    let (_, _b) = converge(&mut r, &svc("b", json!({})), &nodes(), t0());
    let c = svc("c", json!({}));
    let p = r.plan(&key("c"), Some(&c), &[], &nodes(), t0());
    let warn = events_of(&p, reasons::POOL_EXHAUSTED);
    assert_eq!(
        warn,
        [
            "pool `defaultPool` (192.0.2.0/30) is exhausted: no address where 80/tcp is free; \
             free an address of the pool (delete a Service that uses it) or enlarge the pool \
             (--cidrPools); the Service stays pending"
        ]
    );
    assert_eq!(p.events[0].type_, crate::events::EventType::Warning);
    assert_eq!(p.steps.len(), 1, "status only: {p:#?}");
    let c = carry_out(&mut r, &key("c"), &c, &p);
    assert!(ingress(&c).is_empty());
    let cond_a = cond(&c, CONDITION_ALLOCATED);
    assert_eq!(
        (cond_a.status.as_str(), cond_a.reason.as_str()),
        ("False", "PoolExhausted")
    );
    assert!(r.service_rules(&key("c")).is_empty());
    // Planned again (an EndpointSlice changed): no second Warning, no write.
    let p = r.plan(&key("c"), Some(&c), &[], &nodes(), at(5));
    assert_eq!(p, Plan::default());

    // `a` is deleted: its finalizer holds it until its rules are gone and
    // its address is released; the pending Service is planned again.
    let mut deleting = a.clone();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(10)));
    let p = r.plan(&key("a"), Some(&deleting), &[], &nodes(), at(10));
    assert_eq!(
        p.steps,
        vec![
            Step::SetRules(vec![]),
            Step::Release,
            Step::PatchMetadata(MetadataPatch {
                resource_version: deleting.metadata.resource_version.clone().unwrap(),
                finalizers: Some(vec![]),
                record: None,
            }),
        ],
        "rules removed, then the address released, then the finalizer"
    );
    assert!(
        r.ipam().allocation(&key("a")).is_some(),
        "not released before the rules are gone"
    );
    let (_, requeue) = carry_out_requeue(&mut r, &key("a"), &deleting, &p);
    assert_eq!(requeue, vec![key("c")]);
    assert!(r.ipam().allocation(&key("a")).is_none());
    // The object disappears: nothing more to do.
    assert_eq!(
        r.plan(&key("a"), None, &[], &nodes(), at(11)),
        Plan::default()
    );

    let (p, c) = converge(&mut r, &c, &nodes(), at(12));
    assert_eq!(ingress(&c), ["192.0.2.1"], "the released address");
    assert_eq!(events_of(&p, reasons::ALLOCATED).len(), 1);
    let ca = cond(&c, CONDITION_ALLOCATED);
    assert_eq!(ca.status, "True");
    assert_eq!(ca.last_transition_time, Time(at(12)), "status flipped");
}

/// Found by the churn test: a Service made ClusterIP released its address,
/// but the patch removing its record lost a race (409) with the user
/// making it a LoadBalancer again; the pool was full by then. The stale
/// record must go: followers program rules from it, and a new leader
/// would adopt it (an address held by another Service by then).
#[test]
fn a_record_without_an_allocation_is_removed() {
    let mut r = leader("192.0.2.0/30");
    let (_, a) = converge(&mut r, &svc("a", json!({})), &nodes(), t0());
    assert_eq!(ingress(&a), ["192.0.2.1"]);
    // a is no longer ours: released (its record patch is then refused).
    let mut cluster_ip = a.clone();
    cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let p = r.plan(&key("a"), Some(&cluster_ip), &[], &nodes(), at(1));
    assert!(p.steps.contains(&Step::Release), "{p:#?}");
    r.release(&key("a"));
    // The pool fills up meanwhile.
    converge(&mut r, &svc("b", json!({})), &nodes(), at(2));
    converge(&mut r, &svc("c", json!({})), &nodes(), at(2));
    // a, a LoadBalancer again, still carries its old record.
    let p = r.plan(&key("a"), Some(&a), &[], &nodes(), at(3));
    assert_eq!(events_of(&p, reasons::POOL_EXHAUSTED).len(), 1, "{p:#?}");
    assert!(r.ipam().allocation(&key("a")).is_none());
    let Some(Step::PatchMetadata(m)) = p.steps.first() else {
        panic!("no metadata patch: {p:#?}")
    };
    assert_eq!(m.record, Some(None), "the stale record is removed");
    let a = carry_out(&mut r, &key("a"), &a, &p);
    assert!(record_text(&a).is_none() && ingress(&a).is_empty());
    // Nothing more once it is gone.
    let p = r.plan(&key("a"), Some(&a), &[], &nodes(), at(4));
    assert!(
        !p.steps.iter().any(|s| matches!(s, Step::PatchMetadata(_))),
        "{p:#?}"
    );
}

/// Found by the churn test: a port change is allocated when planned, but
/// the plan's writes fail (409: the user edited again), so the rules for
/// the old port stay committed. The old port is free again on that
/// address and another Service gets it; the user's next edit cannot be
/// allocated (kept). The rules of the old port must go: two Services
/// would otherwise be programmed on one address, port and protocol.
#[test]
fn rules_for_ports_no_longer_allocated_are_removed() {
    let with_ports = |name: &str, ports: &[u16]| {
        let mut s = svc(name, json!({}));
        s.spec.as_mut().unwrap().ports = Some(
            ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    serde_json::from_value(json!({"name": format!("p{i}"), "port": p,
                        "targetPort": 8080, "nodePort": 30000 + i, "protocol": "TCP"}))
                    .unwrap()
                })
                .collect(),
        );
        s
    };
    let mut r = leader("192.0.2.0/30");
    let (_, a) = converge(&mut r, &with_ports("a", &[80]), &nodes(), t0());
    assert_eq!(ingress(&a), ["192.0.2.1"]);
    // 80 -> 443: allocated, but none of the plan's writes happen.
    let mut a443 = a.clone();
    a443.spec = with_ports("a", &[443]).spec;
    let p = r.plan(&key("a"), Some(&a443), &[], &nodes(), at(1));
    assert!(
        matches!(p.steps.first(), Some(Step::PatchMetadata(_))),
        "{p:#?}"
    );
    assert_eq!(
        r.service_rules(&key("a"))[0].rule.port,
        80,
        "not carried out"
    );
    // b gets 192.0.2.1 for 80, free there now.
    let (_, b) = converge(&mut r, &with_ports("b", &[80]), &nodes(), at(2));
    assert_eq!(ingress(&b), ["192.0.2.1"]);
    // a asks for 443 and 80: 80 is b's on a's address; a keeps 443 only.
    let mut both = a.clone();
    both.spec = with_ports("a", &[443, 80]).spec;
    let p = r.plan(&key("a"), Some(&both), &[], &nodes(), at(3));
    assert_eq!(events_of(&p, reasons::ADDRESS_IN_USE).len(), 1, "{p:#?}");
    assert!(p.steps.contains(&Step::SetRules(vec![])), "{p:#?}");
    carry_out(&mut r, &key("a"), &both, &p);
    let on_80: Vec<String> = r
        .rules()
        .iter()
        .filter(|x| x.rule.port == 80)
        .map(|x| x.rule.name.clone())
        .collect();
    assert_eq!(on_80, ["default/b:80/tcp@192.0.2.1"]);
}

#[test]
fn invalid_annotation_warns_and_keeps_the_last_good_configuration() {
    let mut r = leader("192.0.2.0/29");
    let (_, s) = converge(
        &mut r,
        &svc("web", json!({"loxilb.io/lbmode": "fullnat"})),
        &nodes(),
        t0(),
    );
    let good = r.rules();
    assert_eq!(good[0].rule.mode, Mode::FullNat);

    let mut bad = s.clone();
    bad.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("loxilb.io/lbmode".into(), "nat".into());
    let p = r.plan(&key("web"), Some(&bad), &[], &nodes(), at(1));
    assert_eq!(
        events_of(&p, reasons::INVALID_ANNOTATION),
        [
            "loxilb.io/lbmode: \"nat\": allowed values: default, onearm, fullnat, dsr; \
          the Service keeps its last good loxilb.io annotation values until this is fixed"
        ]
    );
    assert!(
        !p.steps.iter().any(|s| matches!(s, Step::SetRules(_))),
        "rules untouched: {p:#?}"
    );
    let bad = carry_out(&mut r, &key("web"), &bad, &p);
    let c = cond(&bad, CONDITION_CONFIGURED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InvalidAnnotation")
    );
    assert!(
        c.message.contains("loxilb.io/lbmode: \"nat\""),
        "{}",
        c.message
    );
    assert_eq!(ingress(&bad), ["192.0.2.1"], "address kept");
    assert_eq!(r.rules(), good);

    // Endpoints still follow the cluster with the last good values.
    let p = r.plan(&key("web"), Some(&bad), &[], &nodes()[1..], at(2));
    assert!(p.events.is_empty(), "no second Warning: {:?}", p.events);
    let Step::SetRules(rules) = &p.steps[0] else {
        panic!("{p:#?}")
    };
    assert_eq!(rules[0].rule.mode, Mode::FullNat);
    assert_eq!(rules[0].rule.endpoints.len(), 1);
}

#[test]
fn invalid_annotation_on_a_new_service_gives_no_rules() {
    let mut r = leader("192.0.2.0/29");
    let s = svc("web", json!({"loxilb.io/epselect": "random"}));
    let p = r.plan(&key("web"), Some(&s), &[], &nodes(), t0());
    let w = events_of(&p, reasons::INVALID_ANNOTATION);
    assert_eq!(w.len(), 1);
    assert!(
        w[0].starts_with("loxilb.io/epselect: \"random\": allowed values")
            && w[0].ends_with("the Service gets no rules until this is fixed"),
        "{}",
        w[0]
    );
    assert!(r.ipam().allocation(&key("web")).is_none());
    assert!(matches!(
        p.steps.as_slice(),
        [Step::PatchStatus(StatusUpdate::Apply {
            load_balancer: None,
            ..
        })]
    ));
}

#[test]
fn unknown_annotation_warns_and_rules_are_made() {
    let mut r = leader("192.0.2.0/29");
    let s = svc("web", json!({"loxilb.io/frobnicate": "yes"}));
    let (p, _) = converge(&mut r, &s, &nodes(), t0());
    let w = events_of(&p, reasons::ANNOTATION_WARNING);
    assert_eq!(w.len(), 1);
    assert!(
        w[0].starts_with("loxilb.io/frobnicate: \"yes\": unknown loxilb.io annotation"),
        "{}",
        w[0]
    );
    assert_eq!(r.rules().len(), 1);
}

#[test]
fn editing_an_annotation_updates_the_rule_in_place() {
    let mut r = leader("192.0.2.0/29");
    let (_, s) = converge(&mut r, &svc("web", json!({})), &nodes(), t0());
    let before = r.rules();
    assert_eq!(before[0].rule.mode, Mode::Default);
    let mut edited = s.clone();
    let ann = edited.metadata.annotations.as_mut().unwrap();
    ann.insert("loxilb.io/lbmode".into(), "fullnat".into());
    ann.insert("loxilb.io/timeout".into(), "60".into());
    let p = r.plan(&key("web"), Some(&edited), &[], &nodes(), at(1));
    assert!(p.events.is_empty(), "{:?}", p.events);
    assert_eq!(p.steps.len(), 1, "no metadata or status write: {p:#?}");
    let Step::SetRules(rules) = &p.steps[0] else {
        panic!()
    };
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].rule.name, before[0].rule.name, "same rule");
    assert_eq!(rules[0].rule.vip, before[0].rule.vip, "same address");
    assert_eq!(rules[0].rule.mode, Mode::FullNat);
    assert_eq!(rules[0].rule.timeout_s, 60);
}

#[test]
fn port_change_that_collides_keeps_the_old_address_and_rules() {
    let mut r = leader("192.0.2.0/30");
    let (_, _a) = converge(&mut r, &svc("a", json!({})), &nodes(), t0());
    // b: 443 on .1 (shared with a, whose 80 differs).
    let mut b = svc("b", json!({}));
    b.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 443;
    let (_, b) = converge(&mut r, &b, &nodes(), t0());
    assert_eq!(ingress(&b), ["192.0.2.1"]);
    let rules_b = r.service_rules(&key("b")).to_vec();
    // b asks for a static .1 and port 80, which a holds there.
    let mut b2 = b.clone();
    b2.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("loxilb.io/staticIP".into(), "192.0.2.1".into());
    b2.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 80;
    b2.metadata.generation = Some(2);
    let p = r.plan(&key("b"), Some(&b2), &[], &nodes(), at(1));
    let w = events_of(&p, reasons::ADDRESS_IN_USE);
    assert_eq!(w.len(), 1, "{p:#?}");
    assert!(
        w[0].contains("192.0.2.1 is already used by default/a for 80/tcp")
            && w[0].ends_with("the Service keeps 192.0.2.1"),
        "{}",
        w[0]
    );
    assert!(!p
        .steps
        .iter()
        .any(|s| matches!(s, Step::SetRules(_) | Step::PatchMetadata(_))));
    assert_eq!(r.service_rules(&key("b")), rules_b.as_slice());
    assert_eq!(
        r.ipam().allocation(&key("b")).unwrap().vip(IpFamily::V4),
        Some(ip("192.0.2.1"))
    );
}

#[test]
fn service_no_longer_ours_loses_rules_status_record_and_finalizer() {
    let mut r = leader("192.0.2.0/29");
    let (_, s) = converge(&mut r, &svc("web", json!({})), &nodes(), t0());
    let mut cluster_ip = s.clone();
    let spec = cluster_ip.spec.as_mut().unwrap();
    spec.type_ = Some("ClusterIP".into());
    spec.load_balancer_class = None;
    let p = r.plan(&key("web"), Some(&cluster_ip), &[], &nodes(), at(1));
    assert_eq!(
        p.steps,
        vec![
            Step::SetRules(vec![]),
            Step::Release,
            Step::PatchMetadata(MetadataPatch {
                resource_version: s.metadata.resource_version.clone().unwrap(),
                finalizers: Some(vec![]),
                record: Some(None),
            }),
            Step::PatchStatus(StatusUpdate::Clear),
        ]
    );
    let done = carry_out(&mut r, &key("web"), &cluster_ip, &p);
    assert!(r.rules().is_empty() && r.ipam().allocation(&key("web")).is_none());
    assert_eq!(
        r.plan(&key("web"), Some(&done), &[], &nodes(), at(2)),
        Plan::default()
    );
}

#[test]
fn other_classes_are_never_touched() {
    let mut r = leader("192.0.2.0/29");
    let mut s = svc("web", json!({}));
    s.spec.as_mut().unwrap().load_balancer_class = Some("other.io/lb".into());
    assert_eq!(
        r.plan(&key("web"), Some(&s), &[], &nodes(), t0()),
        Plan::default()
    );
    s.spec.as_mut().unwrap().load_balancer_class = None;
    assert_eq!(
        r.plan(&key("web"), Some(&s), &[], &nodes(), t0()),
        Plan::default()
    );
}

#[test]
fn new_leader_rebuilds_without_leaks_or_doubles() {
    let mut old = leader("192.0.2.0/29");
    let (_, a) = converge(&mut old, &svc_aged("a", json!({}), 0), &nodes(), t0());
    let (_, b) = converge(&mut old, &svc_aged("b", json!({}), 1), &nodes(), t0());
    assert_eq!(
        (ingress(&a), ingress(&b)),
        (vec!["192.0.2.1".to_string()], vec!["192.0.2.2".to_string()])
    );

    // Another agent becomes leader and sees the Services as recorded.
    let mut new = Reconciler::new(config("192.0.2.0/29")).unwrap();
    let t = new.become_leader([&a, &b]);
    assert_eq!(t.adopted, 2);
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    for s in [&a, &b] {
        let k = service_key(s).unwrap();
        let p = new.plan(&k, Some(s), &[], &nodes(), at(5));
        assert_eq!(
            p.steps,
            vec![Step::SetRules(old.service_rules(&k).to_vec())],
            "same rules, nothing rewritten"
        );
        assert!(p.events.is_empty());
        new.commit(&k, old.service_rules(&k).to_vec());
    }
    let (_, c) = converge(&mut new, &svc_aged("c", json!({}), 2), &nodes(), at(6));
    assert_eq!(ingress(&c), ["192.0.2.3"], "no address given twice");
    assert_eq!(
        new.ipam().allocations().count(),
        3,
        "exactly the three Services hold addresses"
    );
}

#[test]
fn conflicting_records_older_service_wins() {
    let mut r = leader("192.0.2.0/29");
    let (_, a) = converge(&mut r, &svc_aged("a", json!({}), 0), &nodes(), t0());
    // A younger Service carries a copy of a's record (restored from a backup, say).
    let mut copy = svc_aged("copy", json!({}), 9);
    copy.metadata.annotations = a.metadata.annotations.clone();
    let mut new = Reconciler::new(config("192.0.2.0/29")).unwrap();
    let t = new.become_leader([&copy, &a]);
    assert_eq!(t.adopted, 1);
    assert_eq!(t.notes.len(), 1);
    assert!(
        t.notes[0].starts_with("default/copy: recorded allocation not adopted"),
        "{:?}",
        t.notes
    );
    let p = new.plan(&key("copy"), Some(&copy), &[], &nodes(), at(1));
    let w = events_of(&p, reasons::RECORD_NOT_ADOPTED);
    assert_eq!(w.len(), 1);
    let Step::PatchMetadata(m) = &p.steps[0] else {
        panic!("{p:#?}")
    };
    assert_eq!(
        m.record,
        Some(Some("ips=192.0.2.2;ports=80/tcp".into())),
        "allocated again, not doubled"
    );
}

#[test]
fn step_down_stops_writing_and_owning() {
    let mut r = leader("192.0.2.0/29");
    let (_, s) = converge(&mut r, &svc("web", json!({})), &nodes(), t0());
    assert_eq!(r.owned_vips().len(), 1);
    r.step_down();
    assert!(!r.is_leader());
    assert!(r.owned_vips().is_empty());
    assert_eq!(r.rules().len(), 1, "the datapath keeps serving");
    let mut gone_node = s.clone();
    gone_node.metadata.resource_version = Some("99".into());
    let p = r.plan(&key("web"), Some(&gone_node), &[], &nodes()[..1], at(1));
    assert!(
        p.steps.iter().all(|s| matches!(s, Step::SetRules(_))) && p.events.is_empty(),
        "{p:#?}"
    );
}

#[test]
fn service_gone_without_finalizer_is_forgotten() {
    let mut r = leader("192.0.2.0/29");
    converge(&mut r, &svc("web", json!({})), &nodes(), t0());
    let p = r.plan(&key("web"), None, &[], &nodes(), at(1));
    assert_eq!(p.steps, vec![Step::SetRules(vec![]), Step::Release]);
    carry_out(&mut r, &key("web"), &svc("web", json!({})), &p);
    assert!(r.ipam().allocation(&key("web")).is_none(), "released");
    assert!(r.known_services().is_empty());
}

#[test]
fn condition_time_kept_while_status_unchanged() {
    let mut r = leader("192.0.2.0/29");
    let (_, s) = converge(&mut r, &svc("web", json!({})), &nodes(), t0());
    let mut s2 = s.clone();
    s2.metadata.generation = Some(2);
    let p = r.plan(&key("web"), Some(&s2), &[], &nodes(), at(30));
    let Some(Step::PatchStatus(StatusUpdate::Apply { conditions, .. })) = p.steps.last() else {
        panic!("{p:#?}")
    };
    assert_eq!(conditions[0].observed_generation, Some(2));
    assert_eq!(
        conditions[0].last_transition_time,
        Time(t0()),
        "no transition"
    );
}

#[test]
fn record_on_an_unreadable_service_is_reallocated() {
    let mut r = Reconciler::new(config("192.0.2.0/29")).unwrap();
    let s = svc(
        "web",
        json!({RECORD_ANNOTATION: "ips=nonsense;ports=80/tcp"}),
    );
    let t = r.become_leader([&s]);
    assert_eq!(t.adopted, 0);
    assert!(
        t.notes[0].contains("recorded allocation unreadable"),
        "{:?}",
        t.notes
    );
    let p = r.plan(&key("web"), Some(&s), &[], &nodes(), t0());
    let Step::PatchMetadata(m) = &p.steps[0] else {
        panic!()
    };
    assert_eq!(m.record, Some(Some("ips=192.0.2.1;ports=80/tcp".into())));
}

/// The status each form writes (table), that a Service converges under the
/// hostname form, that switching forms rewrites the status once, and that
/// the hostname form reads back as an allocation (a new leader without the
/// record annotation, or a migration from kube-loxilb).
#[test]
fn status_hostname_form() {
    use crate::{
        flags::StatusForm,
        translate::{load_balancer_status_as, status_hostname},
    };
    let host = |z: &str| StatusForm::Hostname { zone: z.into() };
    let lb = |form: &StatusForm, vips: &[&str], ports: &[u16]| {
        let a = Allocation {
            service: key("web"),
            vips: vips
                .iter()
                .map(|v| crate::ipam::AllocatedIp {
                    ip: ip(v),
                    pool: None,
                })
                .collect(),
            secondary: vec![crate::ipam::AllocatedIp {
                ip: ip("198.51.100.9"),
                pool: None,
            }],
            ports: ports
                .iter()
                .map(|p| crate::ipam::PortKey::new(*p, Protocol::Tcp))
                .collect(),
        };
        serde_json::to_value(load_balancer_status_as(&a, form)).unwrap()
    };
    let table: &[(StatusForm, &[&str], &[u16], Value)] = &[
        (
            StatusForm::Ip,
            &["192.0.2.1"],
            &[80],
            json!({"ingress": [{"ip": "192.0.2.1", "ipMode": "VIP",
                "ports": [{"port": 80, "protocol": "TCP"}]}]}),
        ),
        (
            host("llb"),
            &["192.168.80.20"],
            &[80, 443],
            json!({"ingress": [{"hostname": "llb-192.168.80.20", "ports": [
                {"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}]}]}),
        ),
        (
            host("zone1"),
            &["192.0.2.1", "2001:db8::5"],
            &[],
            json!({"ingress": [{"hostname": "zone1-192.0.2.1"},
                               {"hostname": "zone1-2001-db8--5"}]}),
        ),
        (
            host("llb"),
            &["2001:db8::"],
            &[],
            json!({"ingress": [{"hostname": "llb-2001-db8-0-0-0-0-0-0"}]}),
        ),
        (
            host("llb"),
            &["::7"],
            &[],
            json!({"ingress": [{"hostname": "llb---7"}]}),
        ),
    ];
    for (form, vips, ports, want) in table {
        assert_eq!(lb(form, vips, ports), *want, "{form:?} {vips:?}");
    }
    assert_eq!(status_hostname("llb", ip("10.0.0.1")), "llb-10.0.0.1");

    // Through the reconciler: the leader writes hostnames, converges, and
    // the status reads back as the allocation.
    let mut r = leader("192.0.2.0/29");
    r.set_status_form(host("llb"));
    let (_, s) = converge(&mut r, &svc("web", json!({})), &nodes(), t0());
    let hostnames: Vec<String> = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .map(|i| i.iter().filter_map(|e| e.hostname.clone()).collect())
        .unwrap();
    assert_eq!(hostnames, ["llb-192.0.2.1"]);
    assert!(ingress(&s).is_empty(), "no ip in the hostname form");
    let mut no_record = s.clone();
    no_record
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove(RECORD_ANNOTATION);
    let (rec, source) = recorded_allocation(&no_record).unwrap().unwrap();
    assert_eq!(source, RecordSource::Status);
    assert_eq!(rec.vips, [ip("192.0.2.1")]);

    // Back to plain IPs: one status write, nothing else.
    r.set_status_form(StatusForm::Ip);
    let p = r.plan(&key("web"), Some(&s), &[], &nodes(), t0());
    assert!(
        matches!(
            &p.steps[..],
            [Step::PatchStatus(StatusUpdate::Apply { .. })]
        ),
        "{p:#?}"
    );
    let s = carry_out(&mut r, &key("web"), &s, &p);
    assert_eq!(ingress(&s), ["192.0.2.1"]);
    assert!(r
        .plan(&key("web"), Some(&s), &[], &nodes(), t0())
        .steps
        .is_empty());
}

/// The owned addresses are counted per rule: a VIP (or SCTP secondary
/// address) shared by rules of several Services stays owned until the last
/// of them goes, and a changed rule list moves exactly its addresses.
#[test]
fn owned_vips_follow_commits_of_shared_addresses() {
    let mut r = leader("192.0.2.0/29");
    let rule = |svc: &str, vip: &str, port: u16, secondary: &[&str]| {
        let mut rule = Rule::new(ip(vip), port, Protocol::Tcp);
        rule.name = format!("default/{svc}:{port}/tcp@{vip}");
        rule.secondary_vips = secondary.iter().map(|s| ip(s)).collect();
        rule.timeout_s = 60;
        ServiceRule {
            service: key(svc),
            rule,
        }
    };
    let owned = |r: &Reconciler| r.owned_vips();
    assert!(r.commit(
        &key("a"),
        vec![
            rule("a", "192.0.2.1", 80, &[]),
            rule("a", "192.0.2.1", 443, &["192.0.2.5"])
        ]
    ));
    assert!(r.commit(&key("b"), vec![rule("b", "192.0.2.1", 81, &[])]));
    assert!(!r.commit(&key("b"), vec![rule("b", "192.0.2.1", 81, &[])]));
    assert!(!r.commit(&key("c"), vec![]), "no rules before, none now");
    assert_eq!(owned(&r), vec![ip("192.0.2.1"), ip("192.0.2.5")]);
    r.commit(&key("a"), vec![rule("a", "192.0.2.2", 80, &[])]);
    assert_eq!(owned(&r), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    r.commit(&key("b"), vec![]);
    assert_eq!(owned(&r), vec![ip("192.0.2.2")]);
    r.commit(&key("a"), vec![]);
    assert!(owned(&r).is_empty());
    assert!(r.rules().is_empty());
}

#[test]
fn multus_pod_problems_are_warned_once_per_change() {
    use std::collections::BTreeMap;
    let mut r = leader("192.0.2.0/29");
    let k = key("web");
    let s = svc("web", json!({"loxilb.io/multus-nets": "macvlan1"}));
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.0.1"], "targetRef": {"kind": "Pod", "name": "a", "namespace": "default"}},
            {"addresses": ["10.244.0.2"], "targetRef": {"kind": "Pod", "name": "b", "namespace": "default"}},
        ],
    }))
    .unwrap();
    let slices = [slice];
    let good = |ip: &str| Some(json!([{"name": "default/macvlan1", "ips": [ip]}]).to_string());
    let mut pods: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
    pods.insert(("default".into(), "a".into()), good("192.168.50.1"));
    pods.insert(("default".into(), "b".into()), Some("{oops".into()));
    let eps = |r: &Reconciler| -> Vec<String> {
        r.service_rules(&k)[0]
            .rule
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.ip, e.port))
            .collect()
    };

    let p = r.plan_with_pods(&k, Some(&s), &slices, &nodes(), &pods, t0());
    let warned = events_of(&p, reasons::MULTUS_ENDPOINT_SKIPPED);
    assert_eq!(warned.len(), 1, "{p:#?}");
    assert!(
        warned[0].starts_with("pod default/b is not an endpoint of default/web: its k8s.v1.cni.cncf.io/network-status annotation is malformed: not JSON"),
        "{}",
        warned[0]
    );
    let s = carry_out(&mut r, &k, &s, &p);
    assert_eq!(eps(&r), ["192.168.50.1:8080"]);
    // A resync: nothing to write, nothing to tell.
    let p = r.plan_with_pods(&k, Some(&s), &slices, &nodes(), &pods, t0());
    assert!(p.steps.is_empty() && p.events.is_empty(), "{p:#?}");
    // b fixed: its address joins, no Event.
    pods.insert(("default".into(), "b".into()), good("192.168.50.2"));
    let p = r.plan_with_pods(&k, Some(&s), &slices, &nodes(), &pods, t0());
    assert!(p.events.is_empty(), "{p:#?}");
    let s = carry_out(&mut r, &k, &s, &p);
    assert_eq!(eps(&r), ["192.168.50.1:8080", "192.168.50.2:8080"]);
    // a's annotation changes address; b loses its annotation: told again.
    pods.insert(("default".into(), "a".into()), good("192.168.50.11"));
    pods.insert(("default".into(), "b".into()), None);
    let p = r.plan_with_pods(&k, Some(&s), &slices, &nodes(), &pods, t0());
    let warned = events_of(&p, reasons::MULTUS_ENDPOINT_SKIPPED);
    assert_eq!(warned.len(), 1);
    assert!(
        warned[0].contains("pod default/b")
            && warned[0].contains("has no k8s.v1.cni.cncf.io/network-status annotation")
    );
    carry_out(&mut r, &k, &s, &p);
    assert_eq!(eps(&r), ["192.168.50.11:8080"]);
}

/// `--vipOwners=pool`: a node owns the VIPs of the pools whose Lease it
/// holds, and while leader those outside every pool; without a pool's
/// Lease, none of its VIPs.
#[test]
fn owner_groups_own_the_vips_of_their_pools() {
    let mut c = config("192.0.2.0/29");
    c.cidr_pools.push(PoolSpec {
        name: "b".into(),
        range: PoolRange::Cidr("198.51.100.0/29".parse().unwrap()),
    });
    c.vip_owners = crate::flags::VipOwners::Pool;
    let mut r = Reconciler::new(c).unwrap();
    r.become_leader([]);
    assert_eq!(r.owner_groups(), ["b", DEFAULT_POOL], "sorted");
    converge(&mut r, &svc("a", json!({})), &nodes(), t0());
    converge(
        &mut r,
        &svc("b", json!({"loxilb.io/poolSelect": "b"})),
        &nodes(),
        t0(),
    );
    converge(
        &mut r,
        &svc("s", json!({"loxilb.io/staticIP": "203.0.113.5"})),
        &nodes(),
        t0(),
    );
    let (va, vb, vs) = (ip("192.0.2.1"), ip("198.51.100.1"), ip("203.0.113.5"));
    assert_eq!(r.rules().len(), 3);
    assert_eq!(
        r.owned_vips(),
        [vs],
        "no pool held: the leader's static one"
    );
    r.set_owner_groups(["b".to_string()].into());
    assert_eq!(r.owned_vips(), [vb, vs]);
    r.set_owner_groups([DEFAULT_POOL.to_string(), "b".to_string()].into());
    assert_eq!(r.owned_vips(), [va, vb, vs]);
    r.step_down();
    assert_eq!(r.owned_vips(), [va, vb], "a follower keeps its pools");
    r.set_owner_groups(BTreeSet::new());
    assert!(r.owned_vips().is_empty());
    // Without owner groups the set is ignored: the leader owns all.
    let mut l = leader("192.0.2.0/29");
    converge(&mut l, &svc("a", json!({})), &nodes(), t0());
    l.set_owner_groups(BTreeSet::new());
    assert_eq!(l.owned_vips(), [va]);
    assert!(l.owner_groups().is_empty());
}

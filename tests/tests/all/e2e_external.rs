//! External mode end to end: `loxilb-agent kube --loxiURL=...` (the
//! in-memory Kubernetes API double, no datapath of its own) programs a
//! `loxilb-agent run --api-listen` agent through its REST API. Both run in
//! the load balancer's namespace; the remote's datapath carries real TCP
//! traffic from the client to the backends. A restart of the remote,
//! without its API state and with it, is followed by a re-sync; deleting
//! the Service removes the rule; the remote's rule-file rule is never
//! touched.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use loxilb_tests::{
    kube_api::{endpoint_slice, node, service, wait_until, ApiServer, KubeAgent, KubeAgentSpec},
    need_root,
    netns::{Agent, Netns, Scene, StateDir},
};
use serde_json::Value;

const API: &str = "127.0.0.1:11111";
const POOLS: &str = "defaultPool=20.0.0.100-20.0.0.103";

/// `GET path` on the remote's API, from `ns`: status and JSON body.
fn get(ns: &Netns, path: &str) -> Option<(u16, Value)> {
    let (ns, path) = (ns.name.clone(), path.to_string());
    std::thread::spawn(move || {
        loxilb_tests::netns::enter(&format!("/var/run/netns/{ns}")).ok()?;
        let mut s =
            TcpStream::connect_timeout(&API.parse().unwrap(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = vec![];
        s.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, serde_json::from_str(body).ok()?))
    })
    .join()
    .unwrap()
}

/// The remote's rules: (VIP:port, name, managed).
fn remote_rules(ns: &Netns) -> Option<Vec<(String, String, bool)>> {
    let (st, v) = get(ns, "/netlox/v1/config/loadbalancer/all")?;
    if st != 200 {
        return None;
    }
    Some(
        v["lbAttr"]
            .as_array()?
            .iter()
            .map(|r| {
                let s = &r["serviceArguments"];
                (
                    format!("{}:{}", s["externalIP"].as_str().unwrap_or(""), s["port"]),
                    s["name"].as_str().unwrap_or("").to_string(),
                    s["managed"] == true,
                )
            })
            .collect(),
    )
}

#[test]
fn a_kube_agent_programs_a_remote_agent_over_its_rest_api() {
    if !need_root("a_kube_agent_programs_a_remote_agent_over_its_rest_api") {
        return;
    }
    let s = Scene::new(
        "lxex1",
        2,
        (8080, 5353),
        |_, _| {},
        |t| {
            format!(
                "rules:\n  - name: file-rule\n    vip: 20.0.0.99\n    port: 81\n    protocol: tcp\n    \
                 endpoints: [{{ ip: {}, port: 8080 }}]\n",
                t.backend_ip(1)
            )
        },
    );
    s.t.route_from_client("20.0.0.0/24")
        .expect("route to the pool");
    let state = StateDir::of(&s.t);
    state.clear();
    let remote_args = ["--api-listen", API, "--insecure-api"];
    let mut remote = Agent::start(&s.t, &s.cfg, &remote_args).expect("remote agent");
    remote
        .wait_for_log("REST API on http://127.0.0.1:11111", Duration::from_secs(5))
        .unwrap();

    let api = ApiServer::new();
    api.api.with(|st| {
        st.put("nodes", node("node-a", "10.10.0.2"));
        st.put("services", service("web", 80));
        st.put(
            "endpointslices",
            endpoint_slice("web", &[s.t.backend_ip(1), s.t.backend_ip(2)]),
        );
    });
    // No datapath of its own: no --iface, its pin directory stays unused.
    let kube_pin = std::env::temp_dir().join("lxex1-kube-pins");
    let spec =
        KubeAgentSpec::new("node-a", "node-a", POOLS).arg(&format!("--loxiURL=http://{API}"));
    let kube = KubeAgent::start_in(&s.t.lb, &[], kube_pin.clone(), "lxex1", &api, &spec)
        .expect("kube agent");
    let logs = |remote: &Agent| {
        format!(
            "kube agent:\n{}\nremote:\n{}",
            kube.log_text(),
            remote.log_text()
        )
    };

    // The VIP is allocated and written to the status, as in local mode.
    let mut vip = None;
    wait_until("web's status names a VIP", Duration::from_secs(20), || {
        vip = api.ingress("web").into_iter().next();
        vip.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));
    let vip = vip.unwrap();
    let ours = format!("{vip}:80");
    let has_ours = |l: &Option<Vec<(String, String, bool)>>| {
        l.as_ref().is_some_and(|l| {
            l.iter()
                .any(|(k, n, m)| *k == ours && n == "default_web" && *m)
        })
    };
    wait_until("the rule on the remote", Duration::from_secs(20), || {
        has_ours(&remote_rules(&s.t.lb))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));
    // The remote's rule file is left alone; nothing of ours on this
    // node's lo.
    let listed = remote_rules(&s.t.lb).unwrap();
    assert!(
        listed.contains(&("20.0.0.99:81".into(), "file-rule".into(), false)),
        "{listed:?}"
    );
    assert!(
        !loxilb_tests::kube_api::lo_addrs(&s.t.lb).contains(&vip),
        "the VIP on lo in external mode"
    );
    // Real traffic through the remote's datapath reaches both backends.
    let vip_addr: SocketAddr = format!("{vip}:80").parse().unwrap();
    wait_until(
        "both backends through the VIP",
        Duration::from_secs(10),
        || s.backends_reached(vip_addr, 6).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));

    // The remote restarts without its API state: re-synced.
    remote.stop().unwrap();
    state.clear();
    let mut remote = Agent::start(&s.t, &s.cfg, &remote_args).expect("remote agent again");
    wait_until(
        "the rule back on the restarted remote (no state)",
        Duration::from_secs(45),
        || has_ours(&remote_rules(&s.t.lb)),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));
    wait_until("traffic after the re-sync", Duration::from_secs(10), || {
        s.backends_reached(vip_addr, 6).len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));
    assert!(
        kube.log_text().contains("re-sync"),
        "no re-sync logged:\n{}",
        kube.log_text()
    );

    // With its state: the rule is there at once, and stays.
    remote.stop().unwrap();
    let remote = Agent::start(&s.t, &s.cfg, &remote_args).expect("remote agent, third start");
    assert!(has_ours(&remote_rules(&s.t.lb)), "{}", logs(&remote));
    wait_until(
        "traffic after the restart with state",
        Duration::from_secs(10),
        || s.backends_reached(vip_addr, 6).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));

    // The Service goes: so does its rule, the rule file's stays.
    api.api.with(|st| st.delete("services", "default", "web"));
    wait_until(
        "the rule deleted on the remote",
        Duration::from_secs(20),
        || remote_rules(&s.t.lb).is_some_and(|l| !l.iter().any(|(k, _, _)| *k == ours)),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));
    assert!(remote_rules(&s.t.lb).unwrap().contains(&(
        "20.0.0.99:81".into(),
        "file-rule".into(),
        false
    )));
    wait_until("the VIP stops answering", Duration::from_secs(10), || {
        s.backends_reached(vip_addr, 2).is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&remote)));
    drop(kube);
    let _ = std::fs::remove_dir_all(&kube_pin);
}

//! The CRDs under `manifest/crds/` are exactly what `kube-watch/src/crds.rs`
//! generates (`cargo run -p xtask -- gen-crds` writes them), and they are
//! CRDs an API server accepts: structural schemas, printer columns that
//! point at fields of the schema, names that match group and plural.
//! `tests/manifests.rs` validates them (with every other file under
//! `manifest/`) against the Kubernetes schemas.

use std::{collections::BTreeSet, fs, path::PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use kube_watch::crds::{all_crds, render_crds, GENERATED_HEADER};

const FIX: &str = "run `cargo run -p xtask -- gen-crds` and commit manifest/crds/";

fn crd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifest/crds")
}

#[test]
fn committed_crds_are_the_generated_ones() {
    let generated = render_crds();
    assert_eq!(generated, render_crds(), "generation is deterministic");
    let on_disk: BTreeSet<String> = fs::read_dir(crd_dir())
        .unwrap_or_else(|e| panic!("manifest/crds/: {e}; {FIX}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    let names: BTreeSet<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        on_disk, names,
        "manifest/crds/ holds other files than the generated ones; {FIX}"
    );
    for (name, text) in &generated {
        let disk = fs::read_to_string(crd_dir().join(name)).unwrap();
        assert!(
            disk == *text,
            "manifest/crds/{name} differs from what kube-watch/src/crds.rs generates; {FIX}"
        );
        assert!(text.starts_with(GENERATED_HEADER));
    }
}

#[test]
fn the_crds_users_know() {
    let crds = all_crds();
    let names: Vec<(String, String, String)> = crds
        .iter()
        .map(|c| {
            (
                c.metadata.name.clone().unwrap(),
                c.spec.names.kind.clone(),
                c.spec.scope.clone(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            (
                "bgppeerservices.bgppeer.loxilb.io",
                "BGPPeerService",
                "Cluster"
            ),
            (
                "bgppolicyapplyservices.bgppolicyapply.loxilb.io",
                "BGPPolicyApplyService",
                "Cluster"
            ),
            (
                "bgppolicydefinedsetsservices.bgppolicydefinedsets.loxilb.io",
                "BGPPolicyDefinedSetsService",
                "Cluster"
            ),
            (
                "bgppolicydefinitionservices.bgppolicydefinition.loxilb.io",
                "BGPPolicyDefinitionService",
                "Cluster"
            ),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    let peer = &crds[0];
    let v = &peer.spec.versions[0];
    assert_eq!((v.name.as_str(), v.served, v.storage), ("v1", true, true));
    let cols: Vec<(String, String, String)> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.json_path.clone(), c.type_.clone()))
        .collect();
    assert_eq!(
        cols,
        [
            ("Peer", ".spec.ipAddress", "string"),
            ("AS", ".spec.remoteAs", "integer"),
            ("State", ".status.state", "string"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    assert!(
        v.subresources.as_ref().unwrap().status.is_some(),
        "the status subresource (the agents patch status only)"
    );
    let spec = &schema(peer).properties.as_ref().unwrap()["spec"];
    let props = spec.properties.as_ref().unwrap();
    assert_eq!(
        props.keys().collect::<Vec<_>>(),
        ["ipAddress", "remoteAs", "remotePort", "setMultiHop"]
    );
    assert_eq!(
        spec.required.as_deref(),
        Some(&["ipAddress".to_string(), "remoteAs".to_string()][..])
    );
    assert_eq!(props["remoteAs"].minimum, Some(1.0));
    assert_eq!(props["remoteAs"].maximum, Some(4294967295.0));
    assert_eq!(props["remotePort"].maximum, Some(65535.0));
    let status = &schema(peer).properties.as_ref().unwrap()["status"];
    let nodes = &status.properties.as_ref().unwrap()["nodes"];
    assert_eq!(nodes.x_kubernetes_list_type.as_deref(), Some("map"));
    let entry = match nodes.items.as_ref().unwrap() {
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        entry
            .properties
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["lastError", "node", "prefixesSent", "since", "state"]
    );
}

fn schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
    crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap()
}

/// The rules the API server applies to a CRD that a schema validator does
/// not: a structural schema (every node typed; no `$ref`, `oneOf` or
/// `definitions`), list-map keys required scalars, printer columns on
/// fields the schema has, the name `<plural>.<group>`.
#[test]
fn crds_are_structural_and_consistent() {
    fn walk(path: &str, s: &serde_json::Value, errors: &mut Vec<String>) {
        let o = s.as_object().unwrap();
        let preserve = o.get("x-kubernetes-preserve-unknown-fields") == Some(&true.into())
            || o.get("x-kubernetes-int-or-string") == Some(&true.into());
        if !o.contains_key("type") && !preserve {
            errors.push(format!("{path}: no type"));
        }
        for k in [
            "$ref",
            "oneOf",
            "anyOf",
            "allOf",
            "definitions",
            "$defs",
            "const",
        ] {
            if o.contains_key(k) {
                errors.push(format!("{path}: {k}"));
            }
        }
        if let Some(keys) = o.get("x-kubernetes-list-map-keys") {
            let item = &o["items"];
            let req: Vec<&str> = item["required"]
                .as_array()
                .map(|r| r.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            for k in keys.as_array().unwrap() {
                let k = k.as_str().unwrap();
                if !req.contains(&k) {
                    errors.push(format!("{path}: list-map key {k} not required"));
                }
                let t = &item["properties"][k];
                if t.get("nullable") == Some(&true.into())
                    || !matches!(t["type"].as_str(), Some("string" | "integer"))
                {
                    errors.push(format!("{path}: list-map key {k} not a plain scalar"));
                }
            }
        }
        if let Some(p) = o.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in p {
                walk(&format!("{path}.{k}"), v, errors);
            }
        }
        if let Some(i) = o.get("items") {
            walk(&format!("{path}[]"), i, errors);
        }
    }
    for crd in all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        assert_eq!(
            name,
            format!("{}.{}", crd.spec.names.plural, crd.spec.group)
        );
        let v = &crd.spec.versions[0];
        let s = serde_json::to_value(schema(&crd)).unwrap();
        let mut errors = vec![];
        walk("", &s, &mut errors);
        assert!(errors.is_empty(), "{name}: {errors:?}");
        for c in v.additional_printer_columns.iter().flatten() {
            let mut node = &s;
            for part in c.json_path.trim_start_matches('.').split('.') {
                node = &node["properties"][part];
            }
            assert!(
                node.is_object(),
                "{name}: column {} points at {}, not in the schema",
                c.name,
                c.json_path
            );
        }
    }
}

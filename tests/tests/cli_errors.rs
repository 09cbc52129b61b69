//! Bad input to the CLI and the operator API: a clear error naming what is
//! wrong, a non-zero exit, and nothing created.

use corral_proto::pb;
use corral_proto::pki::{self, CertKey, COORDINATOR_DNS};
use corral_tests::Lab;
use serde_json::Value;
use std::time::Duration;

/// Everything a refused request could have touched.
fn state(lab: &Lab) -> (Value, Value, Vec<(Value, Value, Value)>) {
    let clusters = lab.ctl_json(&["cluster", "list"]).unwrap()["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            serde_json::json!([
                c["name"],
                c["engine"],
                c["state"],
                c["nodes"].as_array().unwrap().len()
            ])
        })
        .collect();
    let ops = lab.ctl_json(&["operation", "list"]).unwrap()["operations"].clone();
    let nodes = lab.ctl_json(&["node", "list"]).unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].clone(), n["cluster"].clone(), n["role"].clone()))
        .collect();
    (clusters, ops, nodes)
}

fn refused(lab: &Lab, args: &[&str], expected: &str) {
    let out = lab.ctl(args).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "corralctl {} succeeded",
        args.join(" ")
    );
    assert!(
        stderr.contains(expected),
        "corralctl {}: stderr {stderr:?} lacks {expected:?}",
        args.join(" ")
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "a refused command printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn create<'a>(name: &'a str, engine: &'a str, node: &'a str) -> Vec<&'a str> {
    vec![
        "cluster", "create", "--name", name, "--engine", engine, "--node", node,
    ]
}

#[test]
fn bad_cli_input_is_refused_and_creates_nothing() {
    let lab = Lab::start(2).unwrap();
    lab.ctl_ok(&create("taken", "postgres", "vm1")).unwrap();
    let before = state(&lab);

    refused(
        &lab,
        &create("fresh", "oracle", "vm2"),
        "unknown engine \"oracle\": supported engines are postgres",
    );
    refused(
        &lab,
        &create("taken", "postgres", "vm2"),
        "a cluster named \"taken\" already exists",
    );
    refused(
        &lab,
        &create("fresh", "postgres", "vm9"),
        "unknown node \"vm9\"",
    );
    refused(
        &lab,
        &create("fresh", "postgres", "vm1"),
        "node vm1 already belongs to cluster taken",
    );
    refused(
        &lab,
        &create("Bad_Name", "postgres", "vm2"),
        "invalid cluster name \"Bad_Name\"",
    );
    refused(
        &lab,
        &create("1abc", "postgres", "vm2"),
        "invalid cluster name \"1abc\"",
    );
    refused(
        &lab,
        &create("fresh", "postgres", "VM2"),
        "invalid node name \"VM2\"",
    );
    refused(
        &lab,
        &create("fresh", "postgres", "vm2,vm1"),
        "exactly one node",
    );
    let mut twice = create("fresh", "postgres", "vm2,vm2");
    twice.extend(["--mode", "primary-replica"]);
    refused(&lab, &twice, "node vm2 is listed twice");
    let mut lonely_sync = create("fresh", "postgres", "vm2");
    lonely_sync.extend(["--mode", "primary-replica", "--sync"]);
    refused(&lab, &lonely_sync, "--sync needs at least one replica");
    let mut multi = create("fresh", "postgres", "vm2");
    multi.extend(["--mode", "multi-master"]);
    refused(&lab, &multi, "unsupported mode \"multi-master\"");
    refused(
        &lab,
        &[
            "cluster", "create", "--name", "fresh", "--engine", "postgres",
        ],
        "--node",
    );
    refused(
        &lab,
        &["cluster", "show", "nope"],
        "no cluster named \"nope\"",
    );
    refused(
        &lab,
        &["cluster", "credentials", "nope"],
        "no cluster named \"nope\"",
    );
    refused(&lab, &["cluster", "show", "../etc"], "invalid cluster name");
    refused(
        &lab,
        &["operation", "show", "op-nope"],
        "no operation \"op-nope\"",
    );
    refused(
        &lab,
        &["token", "create", "--ttl", "5x"],
        "invalid duration \"5x\"",
    );
    refused(&lab, &["token", "create", "--ttl", "30d"], "too long");
    refused(&lab, &["frobnicate"], "unrecognized subcommand");

    assert_eq!(state(&lab), before, "a refused command changed the store");
    // `corralctl ... | head` stops quietly when the reader goes: no panic.
    for args in [
        &["cluster", "show", "taken"][..],
        &["node", "list"],
        &["audit", "list", "-o", "json"],
    ] {
        let (status, stderr) = lab.ctl_into_closed_pipe(args).unwrap();
        assert!(
            status.success(),
            "corralctl {} into a closed pipe: {status}\n{stderr}",
            args.join(" ")
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // The refusals are on the record, with their reasons.
    let audit = lab.ctl_json(&["audit", "list"]).unwrap();
    let refusals = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["action"] == "cluster.create" && e["result"].as_str().unwrap().starts_with("refused")
        })
        .count();
    assert!(refusals >= 5, "{audit}");
}

#[test]
fn bad_api_input_is_refused_and_creates_nothing() {
    let lab = Lab::start(1).unwrap();
    let before = state(&lab);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let ca = pki::read(&lab.pki_dir().join("ca.crt")).unwrap();
    let admin = CertKey {
        cert_pem: pki::read(&lab.pki_dir().join("admin.crt")).unwrap(),
        key_pem: pki::read(&lab.pki_dir().join("admin.key")).unwrap(),
    };
    let tls = corral_proto::tls::client_config(&ca, Some(&admin), COORDINATOR_DNS);
    let channel =
        corral_proto::tls::channel(&lab.ctl_addr(), tls, Duration::from_secs(10)).unwrap();
    let mut api = pb::operator_client::OperatorClient::new(channel);
    let req = |name: &str, engine: &str, nodes: &[&str]| pb::CreateClusterRequest {
        name: name.into(),
        engine: engine.into(),
        mode: String::new(),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        sync: false,
        require_tls: false,
    };
    // The CLI checks names too; the API must not rely on it.
    let cases = [
        (
            req("", "postgres", &["vm1"]),
            tonic::Code::InvalidArgument,
            "invalid cluster name",
        ),
        (
            req("a/b", "postgres", &["vm1"]),
            tonic::Code::InvalidArgument,
            "invalid cluster name",
        ),
        (
            req("ok", "", &["vm1"]),
            tonic::Code::InvalidArgument,
            "unknown engine",
        ),
        (
            req("ok", "postgres", &[]),
            tonic::Code::InvalidArgument,
            "exactly one node",
        ),
        (
            req("ok", "postgres", &["../vm1"]),
            tonic::Code::InvalidArgument,
            "invalid node name",
        ),
        (
            req("ok", "postgres", &["ghost"]),
            tonic::Code::NotFound,
            "unknown node \"ghost\"",
        ),
    ];
    for (request, code, expected) in cases {
        let e = rt
            .block_on(api.create_cluster(request.clone()))
            .unwrap_err();
        assert_eq!(e.code(), code, "{request:?}: {e}");
        assert!(
            e.message().contains(expected),
            "{request:?}: {} lacks {expected:?}",
            e.message()
        );
    }
    let e = rt
        .block_on(api.create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: u32::MAX,
        }))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert_eq!(state(&lab), before);
}

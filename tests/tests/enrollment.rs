//! Enrollment and certificate checks: every refusal is clear, logged, and
//! changes nothing.

use corral_proto::pb;
use corral_proto::pki::{self, CertKey, COORDINATOR_DNS};
use corral_tests::{bin, field_pairs, sh, Lab};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn cert(dir: &Path, name: &str) -> CertKey {
    CertKey {
        cert_pem: pki::read(&dir.join(format!("{name}.crt"))).unwrap(),
        key_pem: pki::read(&dir.join(format!("{name}.key"))).unwrap(),
    }
}

fn channel(lab: &Lab, addr: &str, domain: &str, me: Option<&CertKey>) -> tonic::transport::Channel {
    let ca = pki::read(&lab.pki_dir().join("ca.crt")).unwrap();
    let tls = corral_proto::tls::client_config(&ca, me, domain);
    corral_proto::tls::channel(addr, tls, Duration::from_secs(10)).unwrap()
}

fn upcalls(
    lab: &Lab,
    me: Option<&CertKey>,
) -> pb::agent_upcalls_client::AgentUpcallsClient<tonic::transport::Channel> {
    pb::agent_upcalls_client::AgentUpcallsClient::new(channel(
        lab,
        &lab.ctl_addr(),
        COORDINATOR_DNS,
        me,
    ))
}

fn operator(
    lab: &Lab,
    me: Option<&CertKey>,
) -> pb::operator_client::OperatorClient<tonic::transport::Channel> {
    pb::operator_client::OperatorClient::new(channel(lab, &lab.ctl_addr(), COORDINATOR_DNS, me))
}

fn heartbeat() -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        agent_address: "10.231.0.99:7401".into(),
        interval_ms: 1000,
        ..Default::default()
    }
}

/// Enrolled node ids, sorted, with their addresses.
fn nodes(lab: &Lab) -> Vec<(String, String)> {
    let v = lab.ctl_json(&["node", "list"]).unwrap();
    let mut out = field_pairs(&v["nodes"], "id", "address");
    out.sort();
    out
}

fn audit(lab: &Lab) -> Vec<Value> {
    lab.ctl_json(&["audit", "list"]).unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone()
}

fn assert_refused_enrollment_audited(lab: &Lab, node: &str, reason: &str) {
    let rows = audit(lab);
    assert!(
        rows.iter().any(|e| e["action"] == "node.enroll"
            && e["target"] == format!("node {node}")
            && e["result"].as_str().unwrap().starts_with("refused:")
            && e["result"].as_str().unwrap().contains(reason)),
        "no refused node.enroll row for {node} mentioning {reason:?}: {rows:?}"
    );
}

/// The agent left no credentials behind.
fn assert_no_credentials(dir: &Path) {
    for f in ["node.json", "node.key", "node.crt", "ca.crt"] {
        assert!(
            !dir.join(f).exists(),
            "{} was written by a refused enrollment",
            dir.join(f).display()
        );
    }
}

fn coordinator_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir().join("coordinator.log")).unwrap()
}

#[test]
fn reused_and_expired_tokens_are_refused() {
    let mut lab = Lab::unenrolled(2).unwrap();
    let token = lab.token().unwrap();
    lab.start_agent(1, Some(&token)).unwrap();
    lab.wait_node_state("vm1", "up", Duration::from_secs(30))
        .unwrap();
    let before = nodes(&lab);

    // The same token again, for another node.
    let dir = lab.state_dir(2);
    let (code, stderr) = lab
        .run_agent_to_exit(2, &["--join", &token, "--node-id", "vm2"], &dir)
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("already used by node vm1"), "{stderr}");
    assert!(
        stderr.contains("corralctl token create"),
        "says what to do: {stderr}"
    );
    assert_no_credentials(&dir);
    assert_eq!(nodes(&lab), before);
    assert_refused_enrollment_audited(&lab, "vm2", "already used");

    // A token past its lifetime.
    let short = lab
        .ctl_ok(&["token", "create", "--ttl", "1s"])
        .unwrap()
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(1500));
    let (code, stderr) = lab
        .run_agent_to_exit(2, &["--join", &short, "--node-id", "vm2"], &dir)
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
    assert_no_credentials(&dir);
    assert_eq!(nodes(&lab), before);
    assert_refused_enrollment_audited(&lab, "vm2", "expired");
    assert!(coordinator_log(&lab).contains("enrollment refused"));
}

#[test]
fn a_token_for_another_ca_is_refused_and_not_consumed() {
    let mut lab = Lab::unenrolled(1).unwrap();
    let other = lab.dir().join("other-pki");
    let out = sh(
        &bin("corralctl").to_string_lossy(),
        &["pki", "init", "--dir", &other.to_string_lossy()],
    )
    .unwrap();
    let other_fp = out
        .split("fingerprint ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .to_string();
    let token = lab.token().unwrap();
    let (secret, _our_fp) = token.rsplit_once('.').unwrap();
    let forged = format!("{secret}.{other_fp}");

    // The agent checks the pin itself before it sends anything.
    let dir = lab.state_dir(1);
    let (code, stderr) = lab
        .run_agent_to_exit(1, &["--join", &forged, "--node-id", "vm1"], &dir)
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("does not present the CA pinned by the join token"),
        "{stderr}"
    );
    assert_no_credentials(&dir);

    // And the coordinator refuses such a token outright.
    let (csr_pem, _key) = pki::new_csr("vm1").unwrap();
    let rt = rt();
    let _in_runtime = rt.enter();
    let refused = rt
        .block_on(upcalls(&lab, None).enroll(pb::EnrollRequest {
            token: forged,
            node_id: "vm1".into(),
            csr_pem: csr_pem.clone(),
        }))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("made by another coordinator"),
        "{}",
        refused.message()
    );
    assert!(nodes(&lab).is_empty());
    assert_refused_enrollment_audited(&lab, "vm1", "another coordinator");

    // Nothing was consumed: the genuine token still enrolls the node.
    lab.start_agent(1, Some(&token)).unwrap();
    lab.wait_node_state("vm1", "up", Duration::from_secs(30))
        .unwrap();
}

#[test]
fn a_node_cannot_claim_another_nodes_id() {
    let lab = Lab::start(2).unwrap();
    let before = nodes(&lab);
    let token = lab.token().unwrap();
    let impostor = lab.dir().join("impostor");
    let (code, stderr) = lab
        .run_agent_to_exit(2, &["--join", &token, "--node-id", "vm1"], &impostor)
        .unwrap();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("\"vm1\" is already enrolled"), "{stderr}");
    assert_no_credentials(&impostor);
    assert_eq!(nodes(&lab), before, "vm1 keeps its address");
    assert_eq!(lab.node("vm1").unwrap().unwrap()["state"], "up");
    assert_refused_enrollment_audited(&lab, "vm1", "already enrolled");

    // The token was not spent by the refusal.
    let (csr_pem, _key) = pki::new_csr("spare").unwrap();
    let rt = rt();
    let _in_runtime = rt.enter();
    let ok = rt
        .block_on(upcalls(&lab, None).enroll(pb::EnrollRequest {
            token,
            node_id: "spare".into(),
            csr_pem,
        }))
        .unwrap()
        .into_inner();
    assert!(ok.certificate_pem.contains("BEGIN CERTIFICATE"));
}

#[test]
fn every_api_checks_whose_certificate_it_is() {
    let lab = Lab::start(1).unwrap();
    let other = lab.dir().join("other-pki");
    sh(
        &bin("corralctl").to_string_lossy(),
        &["pki", "init", "--dir", &other.to_string_lossy()],
    )
    .unwrap();
    let admin = cert(&lab.pki_dir(), "admin");
    let node = cert(&lab.state_dir(1), "node");
    let foreign = cert(&other, "admin");
    let before_nodes = nodes(&lab);
    let rt = rt();
    let _in_runtime = rt.enter();

    // No client certificate: the operator API and heartbeats refuse.
    let e = rt
        .block_on(operator(&lab, None).list_clusters(pb::ListClustersRequest {}))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().contains("no client certificate"), "{e}");
    let e = rt
        .block_on(operator(&lab, None).create_join_token(pb::CreateJoinTokenRequest::default()))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let e = rt
        .block_on(upcalls(&lab, None).heartbeat(heartbeat()))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");

    // A certificate from another CA fails the handshake, through the CLI too.
    let e = rt
        .block_on(operator(&lab, Some(&foreign)).list_clusters(pb::ListClustersRequest {}))
        .unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    let out = lab
        .ctl_env(
            &[
                "cluster", "create", "--name", "sneaky", "--engine", "postgres", "--node", "vm1",
            ],
            &[
                ("CORRAL_CERT", &other.join("admin.crt").to_string_lossy()),
                ("CORRAL_KEY", &other.join("admin.key").to_string_lossy()),
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the coordinator"), "{stderr}");
    assert!(stderr.contains("certificate and key"), "{stderr}");
    let e = rt
        .block_on(upcalls(&lab, Some(&foreign)).heartbeat(heartbeat()))
        .unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);

    // An agent's certificate on the operator API.
    let out = lab
        .ctl_env(
            &[
                "cluster", "create", "--name", "sneaky", "--engine", "postgres", "--node", "vm1",
            ],
            &[
                (
                    "CORRAL_CERT",
                    &lab.state_dir(1).join("node.crt").to_string_lossy(),
                ),
                (
                    "CORRAL_KEY",
                    &lab.state_dir(1).join("node.key").to_string_lossy(),
                ),
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("certificate node/vm1 is not one"),
        "{stderr}"
    );

    // An operator's certificate used as an agent: heartbeats, and the
    // agent's own API (which accepts only the coordinator).
    let e = rt
        .block_on(upcalls(&lab, Some(&admin)).heartbeat(heartbeat()))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("not a node certificate"), "{e}");
    let agent = |me: Option<&CertKey>| {
        pb::agent_client::AgentClient::new(channel(
            &lab,
            &lab.vm_addr(1),
            &pki::node_dns("vm1"),
            me,
        ))
    };
    let e = rt
        .block_on(agent(Some(&admin)).get_status(pb::GetStatusRequest {}))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("only the coordinator"), "{e}");
    // Nor another node, nor anyone without a certificate.
    let e = rt
        .block_on(agent(Some(&node)).get_status(pb::GetStatusRequest {}))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(rt
        .block_on(agent(None).get_status(pb::GetStatusRequest {}))
        .is_err());

    // Nothing changed; the refusals are in the coordinator's log and audit.
    assert!(lab.ctl_json(&["cluster", "list"]).unwrap()["clusters"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(nodes(&lab), before_nodes);
    assert_eq!(lab.node("vm1").unwrap().unwrap()["state"], "up");
    let log = coordinator_log(&lab);
    for needle in [
        "no client certificate",
        "is not a node certificate",
        "certificate node/vm1 is not one",
        "TLS handshake refused: invalid peer certificate",
    ] {
        assert!(log.contains(needle), "coordinator log lacks {needle:?}");
    }
    let agent_log = std::fs::read_to_string(lab.dir().join("vm1-agent.log")).unwrap();
    assert!(
        agent_log.contains("not the coordinator"),
        "agent log lacks the refusal"
    );
    assert!(
        agent_log.contains("TLS handshake refused"),
        "agent log lacks the certificate-less client"
    );
}

#[test]
fn roles_limit_what_an_operator_may_do() {
    let lab = Lab::unenrolled(1).unwrap();
    let prefix = lab.issue_operator("val", "viewer").unwrap();
    let env = [
        ("CORRAL_CERT", format!("{}.crt", prefix.display())),
        ("CORRAL_KEY", format!("{}.key", prefix.display())),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = lab.ctl_env(&["token", "create"], &env).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has role viewer; this needs role admin"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    // A viewer may look.
    assert!(lab
        .ctl_env(&["cluster", "list"], &env)
        .unwrap()
        .status
        .success());
    let rows = audit(&lab);
    assert!(
        rows.iter().any(|e| e["who"] == "val"
            && e["action"] == "token.create"
            && e["result"].as_str().unwrap().starts_with("refused")),
        "{rows:?}"
    );
}

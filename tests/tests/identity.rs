//! Identities that can be taken back: revoked node and operator
//! certificates are refused on their next call (over an open connection
//! too), a revoked node cannot confirm its primary, a forgotten node cannot
//! heartbeat and may enroll again, and renewal keeps a node enrolled.

use corral_proto::pb;
use corral_proto::pki::{self, CertKey, COORDINATOR_DNS};
use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The certificate files node `i` uses now (node.json names them after a
/// renewal), and their contents.
fn node_cert(lab: &Lab, i: usize) -> (CertKey, PathBuf, PathBuf) {
    let dir = lab.state_dir(i);
    let info: Value = serde_json::from_str(&pki::read(&dir.join("node.json")).unwrap()).unwrap();
    let file = |field: &str, default: &str| dir.join(info[field].as_str().unwrap_or(default));
    let (crt, key) = (file("cert_file", "node.crt"), file("key_file", "node.key"));
    let cert = CertKey {
        cert_pem: pki::read(&crt).unwrap(),
        key_pem: pki::read(&key).unwrap(),
    };
    (cert, crt, key)
}

fn channel(lab: &Lab, addr: &str, domain: &str, me: &CertKey) -> tonic::transport::Channel {
    let ca = pki::read(&lab.pki_dir().join("ca.crt")).unwrap();
    let tls = corral_proto::tls::client_config(&ca, Some(me), domain);
    corral_proto::tls::channel(addr, tls, Duration::from_secs(10)).unwrap()
}

/// A heartbeat as node `me`, straight to the coordinator.
fn heartbeat(lab: &Lab, rt: &tokio::runtime::Runtime, me: &CertKey, i: usize) -> tonic::Status {
    let ch = channel(lab, &lab.ctl_addr(), COORDINATOR_DNS, me);
    let req = pb::HeartbeatRequest {
        agent_address: lab.vm_addr(i),
        interval_ms: 1000,
        ..Default::default()
    };
    match rt.block_on(pb::agent_upcalls_client::AgentUpcallsClient::new(ch).heartbeat(req)) {
        Ok(_) => tonic::Status::ok(""),
        Err(s) => s,
    }
}

fn audit_has(lab: &Lab, action: &str, result_prefix: &str) -> bool {
    lab.ctl_json(&["audit", "list"]).unwrap()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == action && e["result"].as_str().unwrap().starts_with(result_prefix))
}

fn agent_log(lab: &Lab, i: usize) -> String {
    std::fs::read_to_string(lab.dir().join(format!("vm{i}-agent.log"))).unwrap_or_default()
}

fn ctl_fails(lab: &Lab, args: &[&str]) -> String {
    let out = lab.ctl(args).unwrap();
    assert!(!out.status.success(), "corralctl {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_revoked_node_is_refused_and_cannot_confirm_its_primary() {
    let lab = Lab::start(3).unwrap();
    lab.create_replicated("shop", "vm1,vm2,vm3", &[]).unwrap();
    for n in ["vm2", "vm3"] {
        lab.wait_streaming("shop", n).unwrap();
    }
    let (primary, primary_crt, _) = node_cert(&lab, 1);
    let rt = rt();
    let _in_runtime = rt.enter();
    // The primary's confirmation request, as its agent makes it, to vm2.
    let confirm = || {
        let ch = channel(&lab, &lab.vm_addr(2), &pki::node_dns("vm2"), &primary);
        let req = pb::ConfirmPrimaryRequest {
            cluster: "shop".into(),
            term: 1,
            lease_ms: 2000,
        };
        rt.block_on(pb::peer_client::PeerClient::new(ch).confirm_primary(req))
    };
    assert!(confirm().is_ok(), "a member may ask before revocation");

    let out = lab
        .ctl_ok(&[
            "pki",
            "revoke",
            "--cert",
            &primary_crt.to_string_lossy(),
            "--reason",
            "disk image leaked",
        ])
        .unwrap();
    assert!(out.contains("(node/vm1): disk image leaked"), "{out}");
    assert!(audit_has(&lab, "certificate.revoke", "ok"));

    // The coordinator refuses it at once, naming why.
    let s = heartbeat(&lab, &rt, &primary, 1);
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("revoked"), "{}", s.message());
    assert!(s.message().contains("disk image leaked"), "{}", s.message());

    // The replicas hear of it with their next heartbeat.
    wait_until(Duration::from_secs(10), "vm2 to refuse vm1", || {
        Ok(
            matches!(confirm(), Err(s) if s.code() == tonic::Code::PermissionDenied
            && s.message().contains("not one the coordinator names for node vm1")),
        )
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "vm1's agent to say so", || {
        Ok(agent_log(&lab, 1).contains("the coordinator refuses this node"))
    })
    .unwrap();
    // Holding no lease from anyone, the old primary is replaced.
    wait_until(Duration::from_secs(60), "a replica to take over", || {
        let p = lab.wait_until_primary("shop", Duration::from_secs(5))?;
        Ok(p != "vm1")
    })
    .unwrap();
}

#[test]
fn a_revoked_operator_is_refused_on_its_next_call_even_on_an_open_connection() {
    let lab = Lab::unenrolled(1).unwrap();
    let issue = |name: &str, role: &str| lab.issue_operator(name, role).unwrap();
    let read = |prefix: &Path| CertKey {
        cert_pem: pki::read(&prefix.with_extension("crt")).unwrap(),
        key_pem: pki::read(&prefix.with_extension("key")).unwrap(),
    };
    let bob = read(&issue("bob", "viewer"));
    let rt = rt();
    let _in_runtime = rt.enter();
    let mut api = pb::operator_client::OperatorClient::new(channel(
        &lab,
        &lab.ctl_addr(),
        COORDINATOR_DNS,
        &bob,
    ));
    let who = rt
        .block_on(api.who_am_i(pb::WhoAmIRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(who.name, "bob");

    // The coordinator saw bob's certificate, so it can be revoked by name.
    let out = lab
        .ctl_ok(&[
            "pki",
            "revoke",
            "--operator",
            "bob",
            "--reason",
            "left the team",
        ])
        .unwrap();
    assert!(out.contains("operator/viewer/bob"), "{out}");
    let e = rt.block_on(api.who_am_i(pb::WhoAmIRequest {})).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("left the team"), "{}", e.message());
    let again = lab
        .ctl_env(
            &["whoami"],
            &[
                ("CORRAL_CERT", &lab.dir().join("bob.crt").to_string_lossy()),
                ("CORRAL_KEY", &lab.dir().join("bob.key").to_string_lossy()),
            ],
        )
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("revoked"));
    let stderr = ctl_fails(&lab, &["pki", "revoke", "--operator", "bob"]);
    assert!(stderr.contains("no unrevoked certificate"), "{stderr}");
    // An admin cannot lock themselves out by mistake.
    let admin = lab.pki_dir().join("admin.crt");
    let stderr = ctl_fails(&lab, &["pki", "revoke", "--cert", &admin.to_string_lossy()]);
    assert!(stderr.contains("this request is made with"), "{stderr}");

    // Renewal: carol's new certificate works, her old one is refused.
    let carol = issue("carol", "operator");
    let env = [
        ("CORRAL_CERT", carol.with_extension("crt")),
        ("CORRAL_KEY", carol.with_extension("key")),
    ];
    let env: Vec<(&str, String)> = env
        .iter()
        .map(|(k, v)| (*k, v.to_string_lossy().into_owned()))
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let old = read(&carol);
    let out = lab.ctl_env(&["pki", "renew"], &env).unwrap();
    corral_tests::assert_success(&out);
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("renewed: operator carol (operator)"), "{out}");
    assert_ne!(read(&carol).cert_pem, old.cert_pem);
    assert!(lab.ctl_env(&["whoami"], &env).unwrap().status.success());
    let mut api = pb::operator_client::OperatorClient::new(channel(
        &lab,
        &lab.ctl_addr(),
        COORDINATOR_DNS,
        &old,
    ));
    let e = rt.block_on(api.who_am_i(pb::WhoAmIRequest {})).unwrap_err();
    assert!(
        e.message().contains("replaced by a renewed certificate"),
        "{e:?}"
    );
    assert!(audit_has(&lab, "certificate.renew", "ok"));
}

#[test]
fn a_forgotten_node_cannot_heartbeat_and_can_enroll_again() {
    let mut lab = Lab::start(2).unwrap();
    lab.ctl_ok(&[
        "cluster", "create", "--name", "solo", "--engine", "postgres", "--nodes", "vm1",
    ])
    .unwrap();
    let stderr = ctl_fails(&lab, &["node", "forget", "vm1", "--confirm", "vm1"]);
    assert!(stderr.contains("serves cluster solo"), "{stderr}");
    assert!(stderr.contains("corralctl node remove"), "{stderr}");
    assert!(lab.node("vm1").unwrap().is_some());
    let stderr = ctl_fails(&lab, &["node", "forget", "vm2"]);
    assert!(stderr.contains("--confirm vm2"), "{stderr}");
    assert!(audit_has(&lab, "node.forget", "refused"));

    let (vm2, _, _) = node_cert(&lab, 2);
    lab.ctl_ok(&["node", "forget", "vm2", "--confirm", "vm2"])
        .unwrap();
    assert!(lab.node("vm2").unwrap().is_none());
    assert!(audit_has(&lab, "node.forget", "ok"));
    let rt = rt();
    let _in_runtime = rt.enter();
    let s = heartbeat(&lab, &rt, &vm2, 2);
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("node forgotten"), "{}", s.message());
    // Its agent says so and keeps running; it does not come back.
    wait_until(Duration::from_secs(10), "vm2's agent to say so", || {
        Ok(agent_log(&lab, 2).contains("the coordinator refuses this node"))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!lab.pids_in_vm(2, "corral-agent").is_empty());
    assert!(lab.node("vm2").unwrap().is_none());

    // The same id enrolls again with a new token.
    lab.stop_agent(2).unwrap();
    std::fs::remove_file(lab.state_dir(2).join("node.json")).unwrap();
    let token = lab.token().unwrap();
    lab.start_agent(2, Some(&token)).unwrap();
    lab.wait_node_state("vm2", "up", Duration::from_secs(30))
        .unwrap();
    assert_ne!(node_cert(&lab, 2).0.cert_pem, vm2.cert_pem);
}

/// Node vm1's current certificate, as the coordinator lists it.
fn listed_current(lab: &Lab, node: &str) -> String {
    let v = lab.ctl_json(&["pki", "list"]).unwrap();
    v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["subject"] == format!("node/{node}") && c["state"] == "current")
        .and_then(|c| c["fingerprint"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Three VMs enrolled with certificates of `lifetime`, serving a
/// PostgreSQL cluster `shop` (vm1 its primary); its credentials.
fn short_lived(lifetime: &str) -> (Lab, Value) {
    let mut lab = Lab::unenrolled(3).unwrap();
    lab.stop_coordinator().unwrap();
    lab.start_coordinator_env(&[("CORRAL_NODE_CERT_LIFETIME", lifetime)])
        .unwrap();
    for i in 1..=3 {
        let token = lab.token().unwrap();
        lab.start_agent(i, Some(&token)).unwrap();
    }
    for i in 1..=3 {
        lab.wait_node_state(&format!("vm{i}"), "up", Duration::from_secs(30))
            .unwrap();
    }
    let creds = lab.create_replicated("shop", "vm1,vm2,vm3", &[]).unwrap();
    (lab, creds)
}

#[test]
fn renewal_keeps_a_node_enrolled() {
    let (lab, creds) = short_lived("20s");
    let term = lab.ctl_json(&["cluster", "show", "shop"]).unwrap()["term"].clone();

    // The first renewal of the primary: its old certificate, still within
    // its lifetime, is refused once the coordinator has seen the new one.
    let (first, _, _) = node_cert(&lab, 1);
    let first_fp = pki::fingerprint_pem(&first.cert_pem).unwrap();
    wait_until(
        Duration::from_secs(30),
        "vm1 to switch certificates",
        || {
            let now = listed_current(&lab, "vm1");
            Ok(!now.is_empty() && now != first_fp)
        },
    )
    .unwrap();
    let rt = rt();
    let _in_runtime = rt.enter();
    let s = heartbeat(&lab, &rt, &first, 1);
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("replaced by a renewed certificate"),
        "{}",
        s.message()
    );

    // Three lifetimes on: every node renewed several times, and stayed up,
    // in its role, serving the cluster.
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(60) {
        for i in 1..=3 {
            let n = lab.node(&format!("vm{i}")).unwrap().unwrap();
            assert_eq!(n["state"], "up", "vm{i} went {}", n["state"]);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for i in 1..=3 {
        let renewals = agent_log(&lab, i)
            .matches("node certificate renewed")
            .count();
        assert!(renewals >= 3, "vm{i} renewed {renewals} times");
    }
    let c = lab.ctl_json(&["cluster", "show", "shop"]).unwrap();
    assert_eq!(c["term"], term, "no failover happened");
    assert_eq!(
        lab.wait_until_primary("shop", Duration::from_secs(5))
            .unwrap(),
        "vm1"
    );
    lab.psql(&lab.node_uri(&creds, 1), "CREATE TABLE renewed (x int)")
        .unwrap();
    // The agents' servers present their renewed certificates (the first
    // ones expired long ago): the coordinator still reaches them, and the
    // replicas still confirm the primary over mutual TLS.
    lab.ctl_ok(&["logs", "shop", "vm2", "--tail", "3"]).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the replicas to confirm vm1",
        || {
            Ok(["vm2", "vm3"].iter().all(|n| {
                lab.node(n).ok().flatten().is_some_and(|v| {
                    v["engine"]["lease"]["confirmed_primary"] == "vm1"
                        && v["engine"]["lease"]["confirmation_remaining_ms"].as_u64() > Some(0)
                })
            }))
        },
    )
    .unwrap();
    assert!(audit_has(&lab, "node.renew", "ok"));
}

/// Waits until node `i`'s certificate on disk differs from `than`.
fn wait_renewed(lab: &Lab, i: usize, than: &str, timeout: Duration) -> String {
    let mut now = String::new();
    wait_until(timeout, &format!("vm{i} to renew"), || {
        now = pki::fingerprint_pem(&node_cert(lab, i).0.cert_pem)?;
        Ok(now != than)
    })
    .unwrap();
    now
}

#[test]
fn a_renewal_just_before_a_coordinator_outage_keeps_the_primary_writable() {
    // 30 s certificates: renewed at 19 s of age, 11 s before they expire.
    let (lab, creds) = short_lived("30s");
    let first = pki::fingerprint_pem(&node_cert(&lab, 1).0.cert_pem).unwrap();
    let renewed = wait_renewed(&lab, 1, &first, Duration::from_secs(40));
    let at = Instant::now();

    // The replicas stop hearing from the coordinator shortly before the
    // primary's next renewal, so they never learn its new certificate; then
    // the primary loses the coordinator too, right after renewing.
    std::thread::sleep(Duration::from_secs(15).saturating_sub(at.elapsed()));
    for vm in ["vm2", "vm3"] {
        lab.cut("ctl", vm).unwrap();
    }
    wait_renewed(&lab, 1, &renewed, Duration::from_secs(10));
    lab.cut("ctl", "vm1").unwrap();

    // Its replicas still know the certificate it used before, so they keep
    // confirming it: writes go on through the outage.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        lab.health(1, "/primary").unwrap(),
        200,
        "vm1 lost its lease"
    );
    lab.psql(
        &lab.node_uri(&creds, 1),
        "CREATE TABLE during_outage (x int)",
    )
    .unwrap();
    for vm in ["vm1", "vm2", "vm3"] {
        lab.heal("ctl", vm).unwrap();
    }
}

#[test]
fn join_tokens_stay_off_the_command_line() {
    let lab = Lab::unenrolled(1).unwrap();
    let dir = lab.state_dir(1);
    let run = |args: &[&str]| {
        let (code, stderr) = lab.run_agent_to_exit(1, args, &dir).unwrap();
        assert_ne!(code, Some(0), "{stderr}");
        stderr
    };
    // Still accepted, with a warning.
    let stderr = run(&["--join", "corral1.not-a-token", "--node-id", "vm1"]);
    assert!(stderr.contains("visible to every user"), "{stderr}");
    assert!(stderr.contains("the join token"), "{stderr}");
    // From a file: read only when needed, named when missing.
    let stderr = run(&["--join-file", "/nonexistent/token", "--node-id", "vm1"]);
    assert!(
        stderr.contains("--join-file /nonexistent/token"),
        "{stderr}"
    );
    assert!(!stderr.contains("visible to every user"), "{stderr}");
    // From standard input (empty here): read, not taken for the token "-".
    let stderr = run(&["--join", "-", "--node-id", "vm1"]);
    assert!(!stderr.contains("visible to every user"), "{stderr}");
    assert!(stderr.contains("the join token"), "{stderr}");
    let token = lab.token().unwrap();
    let file = lab.dir().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let mut agent = lab
        .spawn_agent(
            1,
            &[
                "--join-file".into(),
                file.to_string_lossy().into_owned(),
                "--node-id".into(),
                "vm1".into(),
            ],
        )
        .unwrap();
    let up = lab.wait_node_state("vm1", "up", Duration::from_secs(30));
    let _ = agent.kill();
    let _ = agent.wait();
    up.unwrap();
}

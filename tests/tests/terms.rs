//! Terms come from the coordinator only: another node cannot move a node's
//! term with a confirmation request (a term far in the future would make
//! it refuse every real command from then on).

use corral_proto::pb;
use corral_proto::pki::{self, CertKey};
use corral_tests::{wait_until, Lab};
use std::time::Duration;

#[test]
fn a_peer_cannot_push_a_newer_term() {
    let lab = Lab::start(3).unwrap();
    lab.create_replicated("terms", "vm1,vm2,vm3", &[]).unwrap();
    lab.wait_streaming("terms", "vm2").unwrap();

    // vm1, the primary, asks vm2 to confirm it in a term of its own making.
    let dir = lab.state_dir(1);
    let me = CertKey {
        cert_pem: pki::read(&dir.join("node.crt")).unwrap(),
        key_pem: pki::read(&dir.join("node.key")).unwrap(),
    };
    let ca = pki::read(&dir.join("ca.crt")).unwrap();
    let tls = corral_proto::tls::client_config(&ca, Some(&me), &corral_proto::pki::node_dns("vm2"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = rt.block_on(async {
        let ch = corral_proto::tls::channel(&lab.vm_addr(2), tls, Duration::from_secs(10)).unwrap();
        pb::peer_client::PeerClient::new(ch)
            .confirm_primary(pb::ConfirmPrimaryRequest {
                cluster: "terms".into(),
                term: 1_000_000,
                lease_ms: 2000,
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert!(!answer.confirmed, "{answer:?}");
    assert_eq!(answer.term, 1, "{answer:?}");
    assert!(
        answer.reason.contains("from the coordinator only"),
        "{answer:?}"
    );

    // vm2 still takes the coordinator's commands of term 1.
    lab.ctl_ok(&["node", "reboot", "terms", "vm2"]).unwrap();
    wait_until(Duration::from_secs(30), "vm2 streaming again", || {
        Ok(lab.wait_streaming("terms", "vm2").is_ok())
    })
    .unwrap();
    let c = lab.ctl_json(&["cluster", "show", "terms"]).unwrap();
    assert_eq!(c["term"], 1, "{c}");
}

//! An enrollment flood from a caller without a certificate, shared by
//! tests/bounds.rs and benches/enroll_flood.rs.

use corral_proto::pb;
use corral_proto::pki::{self, CertKey, COORDINATOR_DNS};
use corral_tests::Lab;
use std::time::Duration;

pub fn channel(lab: &Lab, me: Option<&CertKey>) -> tonic::transport::Channel {
    let ca = pki::read(&lab.pki_dir().join("ca.crt")).unwrap();
    let tls = corral_proto::tls::client_config(&ca, me, COORDINATOR_DNS);
    corral_proto::tls::channel(&lab.ctl_addr(), tls, Duration::from_secs(10)).unwrap()
}

/// `count` enrollments without a certificate, each with a 1 MiB node id
/// (every other one 200 KiB, under the message cap), from `workers` tasks
/// at once: (how many were refused, the codes seen).
pub fn flood(lab: &Lab, count: usize, workers: usize) -> (usize, Vec<tonic::Code>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..workers {
            let mut client = pb::agent_upcalls_client::AgentUpcallsClient::new(channel(lab, None))
                .max_encoding_message_size(usize::MAX);
            let n = count / workers + usize::from(w < count % workers);
            tasks.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                for i in 0..n {
                    let size = if i % 2 == 0 { 1 << 20 } else { 200 << 10 };
                    let req = pb::EnrollRequest {
                        token: "corral1.not-a-token".into(),
                        node_id: "x".repeat(size),
                        csr_pem: String::new(),
                    };
                    if let Err(s) = client.enroll(req).await {
                        codes.push(s.code());
                    }
                }
                codes
            }));
        }
        let mut codes = Vec::new();
        for t in tasks {
            codes.extend(t.await.unwrap());
        }
        (codes.len(), codes)
    })
}

/// How many bad enrollments: `CORRAL_FLOOD_COUNT`, or `default`.
pub fn flood_count(default: usize) -> usize {
    corral_tests::env_num("CORRAL_FLOOD_COUNT", default)
}

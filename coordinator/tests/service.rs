//! The service layer on its own: a real coordinator state (store, CA,
//! secrets) driven through `corral_coordinator::service` with no gRPC in
//! between. What the operator API refuses, and what it records, is decided
//! here; the gRPC adapter only carries it (docs/ARCHITECTURE.md).

use corral_coordinator::service::{Caller, Code, Service};
use corral_coordinator::{Config, Coordinator};
use corral_proto::identity::{Identity, Role};
use corral_proto::pb;
use corral_proto::pki::CertAuthority;

fn service() -> (Service, std::path::PathBuf) {
    let dir = corral_proto::unique_temp_dir("corral-service-test").unwrap();
    let pki_dir = dir.join("pki");
    CertAuthority::init_dir(&pki_dir, "admin", &[]).unwrap();
    let config = Config {
        state_dir: dir.join("state"),
        pki_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: None,
        file: Default::default(),
        lifetimes: Default::default(),
    };
    (Service(Coordinator::open(&config).unwrap()), dir)
}

async fn audit(svc: &Service) -> Vec<(String, String, String)> {
    let admin = Caller::operator("root", Role::Admin);
    let rows = svc
        .list_audit(&admin, pb::ListAuditRequest::default())
        .await
        .unwrap();
    rows.entries
        .into_iter()
        .map(|e| (e.who, e.action, e.result))
        .collect()
}

fn create(name: &str, engine: &str, nodes: &[&str]) -> pb::CreateClusterRequest {
    pb::CreateClusterRequest {
        name: name.into(),
        engine: engine.into(),
        mode: if nodes.len() > 1 {
            "primary-replica".into()
        } else {
            String::new()
        },
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        sync: false,
        require_tls: false,
    }
}

#[tokio::test]
async fn roles_are_checked_and_refusals_are_audited() {
    let (svc, dir) = service();
    let viewer = Caller::operator("vera", Role::Viewer);
    let e = svc
        .create_cluster(&viewer, create("demo", "postgres", &["n1"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("needs role operator"), "{e}");
    // A node certificate is not an operator's, whatever it asks.
    let node = Caller::new(Ok(Identity::Node("n1".into())), None, None);
    let e = svc
        .list_clusters(&node, pb::ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // Reading is open to viewers.
    let listed = svc
        .list_clusters(&viewer, pb::ListClustersRequest {})
        .await
        .unwrap();
    assert!(listed.clusters.is_empty());
    let rows = audit(&svc).await;
    assert!(
        rows.iter().any(|(who, action, result)| who == "vera"
            && action == "cluster.create"
            && result.starts_with("refused: operator vera has role viewer")),
        "{rows:?}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn bad_requests_are_refused_with_what_to_do_and_change_nothing() {
    let (svc, dir) = service();
    let op = Caller::operator("otto", Role::Operator);
    let e = svc
        .create_cluster(&op, create("demo", "oracle", &["n1"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("supported engines are"), "{e}");
    let e = svc
        .create_cluster(&op, create("demo", "postgres", &["n1", "n1"]))
        .await
        .unwrap_err();
    assert!(e.message().contains("listed twice"), "{e}");
    // A node that never enrolled: the store is checked in the transaction.
    let e = svc
        .create_cluster(&op, create("demo", "postgres", &["ghost"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("corralctl node list"), "{e}");
    let clusters = svc
        .list_clusters(&op, pb::ListClustersRequest {})
        .await
        .unwrap();
    assert!(
        clusters.clusters.is_empty(),
        "a refusal left a cluster behind"
    );
    let e = svc
        .get_cluster(
            &op,
            pb::GetClusterRequest {
                name: "demo".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let results: Vec<String> = audit(&svc).await.into_iter().map(|r| r.2).collect();
    assert_eq!(
        results
            .iter()
            .filter(|r| r.starts_with("refused: "))
            .count(),
        3,
        "{results:?}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn join_tokens_are_for_admins_and_bounded() {
    let (svc, dir) = service();
    let e = svc
        .create_join_token(
            &Caller::operator("otto", Role::Operator),
            pb::CreateJoinTokenRequest { ttl_seconds: 60 },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let admin = Caller::operator("root", Role::Admin);
    let e = svc
        .create_join_token(
            &admin,
            pb::CreateJoinTokenRequest {
                ttl_seconds: 30 * 24 * 3600,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most"), "{e}");
    let token = svc
        .create_join_token(&admin, pb::CreateJoinTokenRequest { ttl_seconds: 0 })
        .await
        .unwrap();
    assert!(token.token.len() > 20);
    std::fs::remove_dir_all(dir).ok();
}

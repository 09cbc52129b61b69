//! Checks of target descriptions and names (no I/O beyond a temporary
//! directory).

use super::s3::xml_field;
use super::*;

fn s3_desc() -> pb::BackupTarget {
    pb::BackupTarget {
        name: "offsite".into(),
        kind: "s3".into(),
        path: "/corral/prod/".into(),
        endpoint: "http://10.0.0.1:9000/".into(),
        bucket: "backups".into(),
        region: String::new(),
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "sekrit-do-not-print".into(),
        allow_http: true,
        scope: String::new(),
    }
}

#[test]
fn names_are_checked() {
    for ok in ["a", "a/b.c", "pg/2024-01-01T00:00:00Z.corral", "x-y_z/1"] {
        check_name(ok, "name").unwrap();
    }
    for bad in [
        "",
        "/a",
        "a/",
        "a//b",
        "../a",
        "a/../b",
        "./a",
        "a/.",
        "a\\b",
        "a\nb",
        "a/.b.corral-partial-1-2",
    ] {
        assert!(check_name(bad, "name").is_err(), "{bad:?} accepted");
    }
    check_prefix("").unwrap();
    check_prefix("pg/").unwrap();
    check_prefix("pg/2024").unwrap();
    assert!(check_prefix("/").is_err());
    assert!(check_prefix("../").is_err());
}

#[test]
fn describe_and_debug_hide_credentials() {
    let t = Target::open(&s3_desc(), Path::new("/unused")).unwrap();
    assert_eq!(
        t.describe(),
        "offsite (s3 http://10.0.0.1:9000 bucket backups prefix corral/prod)"
    );
    let debug = format!("{t:?}");
    assert!(!debug.contains("sekrit"), "{debug}");
    assert!(!debug.contains("AKIDEXAMPLE"), "{debug}");
    assert_eq!(t.name(), "offsite");
}

#[test]
fn bad_descriptions_are_explained() {
    type Change = fn(&mut pb::BackupTarget);
    let cases: Vec<(Change, &str)> = vec![
        (|t| t.kind = "ftp".into(), "unknown kind"),
        (|t| t.bucket.clear(), "needs a bucket"),
        (|t| t.allow_http = false, "allow_http"),
        (|t| t.secret_access_key.clear(), "secret_access_key"),
        (
            |t| t.endpoint = "10.0.0.1:9000".into(),
            "http:// or https://",
        ),
        (
            |t| t.endpoint = "http://u:sekrit@h:1".into(),
            "must not hold credentials",
        ),
        (|t| t.path = "a/../b".into(), "\"..\""),
        (|t| t.name.clear(), "no name"),
    ];
    for (change, expect) in cases {
        let mut d = s3_desc();
        change(&mut d);
        let e = format!("{:#}", Target::open(&d, Path::new("/x")).unwrap_err());
        assert!(e.contains(expect), "{e:?} lacks {expect:?}");
        assert!(!e.contains("sekrit"), "{e}");
    }
    let local = pb::BackupTarget {
        name: "here".into(),
        kind: "local".into(),
        path: "relative/dir".into(),
        ..Default::default()
    };
    let e = Target::open(&local, Path::new("/x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not absolute"), "{e}");
    let local = pb::BackupTarget {
        path: String::new(),
        ..local
    };
    let t = Target::open(&local, Path::new("/var/lib/corral/backups")).unwrap();
    assert_eq!(t.describe(), "here (local /var/lib/corral/backups)");
}

#[test]
fn xml_fields() {
    let body =
        "<Error><Code>NoSuchBucket</Code><Message>The bucket does not exist</Message></Error>";
    assert_eq!(xml_field(body, "Code").as_deref(), Some("NoSuchBucket"));
    assert_eq!(
        xml_field(body, "Message").as_deref(),
        Some("The bucket does not exist")
    );
    assert_eq!(xml_field(body, "Key"), None);
}

#[tokio::test]
async fn empty_prefix_delete_is_refused() {
    let t = Target::open(
        &pb::BackupTarget {
            name: "here".into(),
            kind: "local".into(),
            path: "/nonexistent-corral-test".into(),
            ..Default::default()
        },
        Path::new("/x"),
    )
    .unwrap();
    let e = t.delete_prefix("").await.unwrap_err().to_string();
    assert!(e.contains("empty prefix"), "{e}");
    assert!(t.list("").await.unwrap().is_empty());
    let e = format!("{:#}", t.put_stream("../x", |_| Ok(())).await.unwrap_err());
    assert!(e.contains("\"..\""), "{e}");
}

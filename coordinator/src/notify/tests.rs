//! Tests of the configuration, the payloads and the notifier's queues.

use super::config::*;
use super::format::*;
use super::*;
use std::collections::BTreeMap;
use std::time::Duration;

fn alert() -> Alert {
    Alert {
        name: "disk_usage_critical".into(),
        fingerprint: "disk_usage_critical/c1/vm2".into(),
        status: Status::Firing,
        severity: Severity::Critical,
        labels: BTreeMap::from([
            ("cluster".to_string(), "c1".to_string()),
            ("node".to_string(), "vm2".to_string()),
            ("engine".to_string(), "postgres".to_string()),
        ]),
        summary: "disk 96% full".into(),
        description: "/var/lib/postgresql is 96% full (threshold 95%).".into(),
        starts_at_ms: 1_714_564_800_250,
        ends_at_ms: None,
        repeat: 0,
    }
}

fn parse(toml_text: &str) -> NotifyConfig {
    toml::from_str(toml_text).expect("test config parses")
}

/// Runs `start` inside a runtime and returns its error.
fn start_err(toml_text: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    match Notifier::start(&parse(toml_text)) {
        Ok(_) => panic!("config was accepted:\n{toml_text}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn config_errors_name_the_channel_and_the_fix() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"[[alertmanager]]
               name = "am"
               url = "127.0.0.1:9093""#,
            &[
                "[[notify.alertmanager]] \"am\"",
                "url",
                "http://127.0.0.1:9093",
            ],
        ),
        (
            r#"[[alertmanager]]
               name = "am"
               url = "ftp://x""#,
            &["\"am\"", "http://"],
        ),
        (
            r#"[[alertmanager]]
               name = "am"
               url = "http://x"
               timeout = "10 parsecs""#,
            &["\"am\"", "timeout", "\"10s\""],
        ),
        (
            r#"[[webhook]]
               name = "hook"
               url = "https://example.net/h""#,
            &["[[notify.webhook]] \"hook\"", "no secret", "secret_env ="],
        ),
        (
            r#"[[webhook]]
               name = "hook"
               url = "https://example.net/h"
               secret_env = "CORRAL_TEST_SURELY_UNSET_VARIABLE""#,
            &[
                "\"hook\"",
                "CORRAL_TEST_SURELY_UNSET_VARIABLE",
                "not set",
                "environment",
            ],
        ),
        (
            r#"[[webhook]]
               name = "hook"
               url = "https://example.net/h"
               secret = "a"
               secret_env = "PATH""#,
            &["\"hook\"", "either `secret` or `secret_env`"],
        ),
        (
            r#"[[email]]
               name = "mail"
               smtp_host = "smtp.example.net"
               from = "corral@example.net""#,
            &["[[notify.email]] \"mail\"", "`to` is empty", "to = ["],
        ),
        (
            r#"[[email]]
               name = "mail"
               smtp_host = "smtp.example.net"
               from = "not an address"
               to = ["a@example.net"]"#,
            &["\"mail\"", "`from", "from = "],
        ),
        (
            r#"[[email]]
               name = "mail"
               smtp_host = "smtp.example.net"
               starttls = false
               from = "corral@example.net"
               to = ["a@example.net"]"#,
            &["\"mail\"", "clear text", "insecure_plaintext = true"],
        ),
        (
            r#"[[email]]
               name = "mail"
               smtp_host = "smtp.example.net"
               username = "corral"
               from = "corral@example.net"
               to = ["a@example.net"]"#,
            &["\"mail\"", "without a password", "password_env"],
        ),
        (
            r#"[[email]]
               name = "mail"
               smtp_host = "smtp.example.net"
               from = "corral@example.net"
               to = ["a@example.net"]
               ca_file = "/nonexistent/ca.pem""#,
            &["\"mail\"", "ca_file", "/nonexistent/ca.pem"],
        ),
        (
            r#"[[alertmanager]]
               name = "x"
               url = "http://127.0.0.1:9093"
               [[webhook]]
               name = "x"
               url = "http://127.0.0.1:8080"
               secret = "s""#,
            &["\"x\"", "same name", "unique `name`"],
        ),
    ];
    for (config, wanted) in cases {
        let err = start_err(config);
        for w in *wanted {
            assert!(
                err.contains(w),
                "error for\n{config}\nis {err:?}; lacks {w:?}"
            );
        }
    }
}

#[test]
fn unknown_keys_are_refused() {
    let err = toml::from_str::<NotifyConfig>(
        "[[webhook]]\nname = \"h\"\nurl = \"http://x\"\nsecret = \"s\"\nsecrte = \"t\"\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("secrte"), "{err}");
}

#[test]
fn secret_env_is_read_and_a_good_config_starts() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    // PATH is set in any test environment; its value is the key.
    let cfg = parse(
        r#"[[alertmanager]]
           name = "am"
           url = "http://127.0.0.1:9093/"
           timeout = "3s"
           [[webhook]]
           name = "hook"
           url = "https://example.net/h?token=abc"
           secret_env = "PATH"
           [[email]]
           name = "mail"
           smtp_host = "smtp.example.net"
           username = "corral"
           password = "pw"
           from = "Corral <corral@example.net>"
           to = ["oncall@example.net", "dba@example.net"]"#,
    );
    let n = Notifier::start(&cfg).expect("config is valid");
    let kinds: Vec<_> = n.stats().iter().map(|s| (s.name.clone(), s.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("am".to_string(), "alertmanager"),
            ("hook".to_string(), "webhook"),
            ("mail".to_string(), "email")
        ]
    );
}

#[test]
fn debug_output_hides_secrets() {
    let cfg = parse(
        r#"[[alertmanager]]
           name = "am"
           url = "http://admin:hunter2am@127.0.0.1:9093"
           [[webhook]]
           name = "hook"
           url = "https://example.net/h?token=tok3n"
           secret = "s3cr3t-webhook"
           [[email]]
           name = "mail"
           smtp_host = "smtp.example.net"
           username = "corral"
           password = "p4ssw0rd-mail"
           from = "corral@example.net"
           to = ["a@example.net"]"#,
    );
    let shown = format!("{cfg:?} {cfg:#?}");
    for secret in ["hunter2am", "tok3n", "s3cr3t-webhook", "p4ssw0rd-mail"] {
        assert!(!shown.contains(secret), "{secret} shows in {shown}");
    }
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(shown.contains("smtp.example.net"), "{shown}");
    assert_eq!(format!("{:?}", Secret("x".into())), "<redacted>");
}

#[test]
fn alertmanager_payload() {
    let firing = Arc::new(alert());
    let mut resolved = alert();
    resolved.status = Status::Resolved;
    resolved.ends_at_ms = Some(1_714_565_100_000);
    let body = alertmanager_body(&[firing, Arc::new(resolved)]);
    assert_eq!(
        body,
        serde_json::json!([
            {
                "labels": {"alertname": "disk_usage_critical", "severity": "critical",
                           "cluster": "c1", "node": "vm2", "engine": "postgres"},
                "annotations": {"summary": "disk 96% full",
                                "description": "/var/lib/postgresql is 96% full (threshold 95%)."},
                "startsAt": "2024-05-01T12:00:00.25Z"
            },
            {
                "labels": {"alertname": "disk_usage_critical", "severity": "critical",
                           "cluster": "c1", "node": "vm2", "engine": "postgres"},
                "annotations": {"summary": "disk 96% full",
                                "description": "/var/lib/postgresql is 96% full (threshold 95%)."},
                "startsAt": "2024-05-01T12:00:00.25Z",
                "endsAt": "2024-05-01T12:05:00Z"
            }
        ])
    );
}

#[test]
fn webhook_payload_and_signature() {
    let mut a = alert();
    a.repeat = 2;
    let body = webhook_body(&a, 1_714_564_860_000);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "version": "1",
            "status": "firing",
            "alert": {
                "name": "disk_usage_critical",
                "fingerprint": "disk_usage_critical/c1/vm2",
                "severity": "critical",
                "labels": {"cluster": "c1", "node": "vm2", "engine": "postgres"},
                "summary": "disk 96% full",
                "description": "/var/lib/postgresql is 96% full (threshold 95%).",
                "starts_at": "2024-05-01T12:00:00.25Z",
                "ends_at": null,
                "repeat": 2
            },
            "sent_at": "2024-05-01T12:01:00Z"
        })
    );
    // Known answer: printf '%s' '1700000000.{}' | openssl dgst -sha256 -hmac key
    assert_eq!(
        webhook_signature("key", 1_700_000_000, b"{}"),
        "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
    );
}

#[test]
fn email_subject_and_body() {
    let mut a = alert();
    assert_eq!(
        email_subject(&a),
        "[FIRING critical] disk_usage_critical: cluster c1 node vm2 — disk 96% full"
    );
    a.status = Status::Resolved;
    a.ends_at_ms = Some(1_714_565_100_000);
    assert_eq!(
        email_subject(&a),
        "[RESOLVED] disk_usage_critical: cluster c1 node vm2 — disk 96% full"
    );
    let body = email_body(&a, "mail");
    for want in [
        "RESOLVED (critical): disk_usage_critical",
        "disk 96% full",
        "/var/lib/postgresql is 96% full",
        "Started:  2024-05-01T12:00:00.25Z",
        "Ended:    2024-05-01T12:05:00Z",
        "  cluster = c1\n",
        "  node = vm2\n",
        "Fingerprint: disk_usage_critical/c1/vm2",
    ] {
        assert!(body.contains(want), "{want:?} not in\n{body}");
    }
    let notice = Alert {
        name: "failover_completed".into(),
        status: Status::Firing,
        severity: Severity::Info,
        labels: BTreeMap::from([("cluster".to_string(), "c1".to_string())]),
        summary: "vm3 is the new primary".into(),
        ends_at_ms: Some(1_714_565_100_000),
        ..alert()
    };
    assert_eq!(
        email_subject(&notice),
        "[NOTICE info] failover_completed: cluster c1 — vm3 is the new primary"
    );
}

#[test]
fn timeouts_parse() {
    assert_eq!(parse_timeout("10s"), Some(Duration::from_secs(10)));
    assert_eq!(parse_timeout("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_timeout("2m"), Some(Duration::from_secs(120)));
    for bad in ["", "10", "s", "0s", "1h", "-1s", "1.5s"] {
        assert_eq!(parse_timeout(bad), None, "{bad}");
    }
}

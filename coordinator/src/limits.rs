//! Size limits on what callers send, checked before anything is stored.
//!
//! Enrollment is open to callers without a certificate, so everything in
//! an `EnrollRequest` is untrusted and bounded here; so are the events an
//! agent sends with its heartbeats. A refused value never reaches the
//! store, a log line or an error message whole: [`shown`] gives a short,
//! escaped prefix of it.

use corral_proto::pb;
use serde::Deserialize;

/// The largest message the agent-facing service decodes (enrollments and
/// heartbeats; a heartbeat with its full batch of events is far smaller).
pub const MAX_UPCALL_MESSAGE: usize = 512 * 1024;

/// Field limits of an enrollment, in bytes.
pub const MAX_NODE_ID: usize = 63;
pub const MAX_TOKEN: usize = 256;
pub const MAX_CSR: usize = 16 * 1024;

/// Events stored from one heartbeat; the agent keeps the rest for the next
/// ones (only those stored are acknowledged).
pub const MAX_EVENTS_PER_HEARTBEAT: usize = 200;
/// An event's kind and message are cut to these many bytes.
pub const MAX_EVENT_KIND: usize = 64;
pub const MAX_EVENT_MESSAGE: usize = 4096;

/// How much of a refused value is shown (in an error, a log line or an
/// audit row).
const SHOWN: usize = 64;

/// At most [`SHOWN`] bytes of `value`, escaped (control characters and
/// quotes cannot forge a log line), with its full length when cut.
pub fn shown(value: &str) -> String {
    if value.len() <= SHOWN {
        return format!("{value:?}");
    }
    format!("{:?}... ({} bytes)", cut(value, SHOWN), value.len())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Refuses an enrollment with a field over its limit, naming the field,
/// its size and the limit.
pub fn check_enroll(req: &pb::EnrollRequest) -> Result<(), String> {
    for (field, value, max) in [
        ("node id", &req.node_id, MAX_NODE_ID),
        ("join token", &req.token, MAX_TOKEN),
        ("certificate request (CSR)", &req.csr_pem, MAX_CSR),
    ] {
        if value.len() > max {
            return Err(format!(
                "the {field} is {} bytes, more than the {max} allowed: {}",
                value.len(),
                if field == "node id" {
                    format!(
                        "node ids are 1 to 63 lowercase letters, digits and '-' (got {})",
                        shown(value)
                    )
                } else {
                    "send the one `corralctl token create` printed and the CSR the agent \
                     made"
                        .to_string()
                }
            ));
        }
    }
    Ok(())
}

/// The events of one heartbeat that are stored: the oldest
/// [`MAX_EVENTS_PER_HEARTBEAT`] by sequence number, kinds and messages cut
/// to their limits.
pub fn bounded_events(events: &[pb::AgentEvent]) -> Vec<pb::AgentEvent> {
    let mut out: Vec<pb::AgentEvent> = events.to_vec();
    out.sort_by_key(|e| e.seq);
    out.truncate(MAX_EVENTS_PER_HEARTBEAT);
    for e in &mut out {
        if e.kind.len() > MAX_EVENT_KIND {
            e.kind = cut(&e.kind, MAX_EVENT_KIND).to_string();
        }
        if e.message.len() > MAX_EVENT_MESSAGE {
            let full = e.message.len();
            let mut m = cut(&e.message, MAX_EVENT_MESSAGE).to_string();
            m.push_str(&format!("... (cut from {full} bytes)"));
            e.message = m;
        }
    }
    out
}

/// `[limits]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Enrollment attempts a source address without a certificate may make
    /// in a burst, and how many more a minute after that.
    pub anonymous_burst: u32,
    pub anonymous_per_minute: u32,
    /// Refused enrollments recorded in the audit log per source address and
    /// minute; more are counted in one summary row.
    pub audited_refusals_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            anonymous_burst: 20,
            anonymous_per_minute: 60,
            audited_refusals_per_minute: 10,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.anonymous_burst == 0 || self.anonymous_per_minute == 0 {
            anyhow::bail!(
                "[limits] anonymous_burst and anonymous_per_minute must be at least 1 (new \
                 agents could not enroll)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversize_field_is_refused_naming_it_and_showing_only_a_prefix() {
        let big = "x".repeat(1 << 20);
        let req = pb::EnrollRequest {
            node_id: big.clone(),
            ..Default::default()
        };
        let e = check_enroll(&req).unwrap_err();
        assert!(e.contains("node id is 1048576 bytes"), "{e}");
        assert!(
            e.len() < 400,
            "the error carries the raw value: {} bytes",
            e.len()
        );
        let req = pb::EnrollRequest {
            node_id: "vm1".into(),
            csr_pem: big,
            ..Default::default()
        };
        let e = check_enroll(&req).unwrap_err();
        assert!(e.contains("certificate request (CSR)"), "{e}");
        let ok = pb::EnrollRequest {
            node_id: "vm1".into(),
            token: "t".repeat(100),
            csr_pem: "c".repeat(1000),
        };
        assert!(check_enroll(&ok).is_ok());
    }

    #[test]
    fn shown_values_are_short_and_escaped() {
        assert_eq!(shown("vm1"), "\"vm1\"");
        let s = shown(&format!("a\nb{}", "é".repeat(100)));
        assert!(s.starts_with("\"a\\nb"), "{s}");
        assert!(s.ends_with("(203 bytes)"), "{s}");
        assert!(!s.contains('\n'));
    }

    #[test]
    fn a_heartbeat_stores_at_most_the_cap_of_events_oldest_first_each_cut() {
        let events: Vec<_> = (0..500u64)
            .rev()
            .map(|seq| pb::AgentEvent {
                seq,
                at_ms: 0,
                kind: "k".repeat(100),
                message: "m".repeat(10_000),
            })
            .collect();
        let kept = bounded_events(&events);
        assert_eq!(kept.len(), MAX_EVENTS_PER_HEARTBEAT);
        assert_eq!(kept[0].seq, 0);
        assert_eq!(
            kept.last().unwrap().seq,
            MAX_EVENTS_PER_HEARTBEAT as u64 - 1
        );
        assert_eq!(kept[0].kind.len(), MAX_EVENT_KIND);
        assert!(kept[0].message.len() < MAX_EVENT_MESSAGE + 40);
        assert!(kept[0].message.ends_with("(cut from 10000 bytes)"));
    }
}

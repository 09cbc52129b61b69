//! Events waiting for the coordinator.
//!
//! Each event rides on every heartbeat until the coordinator acknowledges
//! its sequence number (it stores them durably first), so a lost heartbeat
//! or a restarting coordinator loses nothing. Sequence numbers start from
//! the clock (microseconds) at agent start, so they keep increasing across
//! agent restarts without a file to persist them.

use corral_proto::pb::AgentEvent;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Beyond this many unacknowledged events (a coordinator away for a long
/// time), the oldest are dropped and a `events_dropped` event says so.
const CAPACITY: usize = 1000;

/// A heartbeat carries at most this many events, and at most this many
/// bytes of them; the rest ride on the next ones (the coordinator stores
/// at most 200 a heartbeat and cuts a message at 4 KiB).
const PER_HEARTBEAT: usize = 100;
const BYTES_PER_HEARTBEAT: usize = 64 * 1024;
/// A longer message is cut to this many bytes when it is recorded.
const MAX_MESSAGE: usize = 4000;

pub struct Events {
    inner: Mutex<Inner>,
}

struct Inner {
    next_seq: u64,
    queue: VecDeque<AgentEvent>,
    dropped: u64,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        Events {
            inner: Mutex::new(Inner {
                next_seq: (corral_proto::now_ms().max(0) as u64) * 1000,
                queue: VecDeque::new(),
                dropped: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event, and logs it.
    pub fn push(&self, kind: &str, message: impl Into<String>) {
        let mut message = message.into();
        tracing::info!(event = kind, "{message}");
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("... (cut)");
        }
        let mut inner = self.lock();
        if inner.queue.len() >= CAPACITY {
            inner.queue.pop_front();
            inner.dropped += 1;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.queue.push_back(AgentEvent {
            seq,
            at_ms: corral_proto::now_ms(),
            kind: kind.into(),
            message,
        });
    }

    /// The oldest unacknowledged events, at most [`PER_HEARTBEAT`] of them
    /// and [`BYTES_PER_HEARTBEAT`] (a note about dropped events comes after
    /// the ones still held).
    pub fn pending(&self) -> Vec<AgentEvent> {
        let mut inner = self.lock();
        if inner.dropped > 0 {
            let dropped = std::mem::take(&mut inner.dropped);
            let note = AgentEvent {
                seq: inner.next_seq,
                at_ms: corral_proto::now_ms(),
                kind: "events_dropped".into(),
                message: format!(
                    "{dropped} older events were dropped while the coordinator was unreachable"
                ),
            };
            inner.next_seq += 1;
            inner.queue.push_back(note);
        }
        let mut bytes = 0;
        inner
            .queue
            .iter()
            .take(PER_HEARTBEAT)
            .take_while(|e| {
                bytes += e.kind.len() + e.message.len();
                bytes <= BYTES_PER_HEARTBEAT
            })
            .cloned()
            .collect()
    }

    /// Drops every event with `seq <= acked`.
    pub fn ack(&self, acked: u64) {
        self.lock().queue.retain(|e| e.seq > acked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_stay_until_acknowledged() {
        let ev = Events::new();
        ev.push("a", "first");
        ev.push("b", "second");
        let pending = ev.pending();
        assert_eq!(pending.len(), 2);
        assert!(pending[0].seq < pending[1].seq);
        ev.ack(pending[0].seq);
        let left = ev.pending();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].kind, "b");
        ev.ack(0);
        assert_eq!(ev.pending().len(), 1, "an old ack drops nothing new");
    }

    #[test]
    fn overflow_drops_oldest_and_says_so() {
        let ev = Events::new();
        for i in 0..CAPACITY + 5 {
            ev.push("x", format!("{i}"));
        }
        let pending = ev.pending();
        assert_eq!(pending.first().unwrap().message, "5");
        assert_eq!(pending.len(), PER_HEARTBEAT);
        // The note is sent once the events before it are acknowledged.
        let mut last = pending.last().unwrap().clone();
        while last.kind != "events_dropped" {
            ev.ack(last.seq);
            last = ev.pending().last().unwrap().clone();
        }
        let last = &last;
        assert_eq!(last.kind, "events_dropped");
        assert!(
            last.message.starts_with("5 older events"),
            "{}",
            last.message
        );
    }

    #[test]
    fn a_heartbeat_carries_a_bounded_batch_and_long_messages_are_cut() {
        let ev = Events::new();
        for _ in 0..50 {
            ev.push("x", "m".repeat(10_000));
        }
        let batch = ev.pending();
        assert!(batch.iter().all(|e| e.message.len() < MAX_MESSAGE + 20));
        let bytes: usize = batch.iter().map(|e| e.kind.len() + e.message.len()).sum();
        assert!(bytes <= BYTES_PER_HEARTBEAT, "{bytes}");
        assert_eq!(batch.len(), BYTES_PER_HEARTBEAT / (MAX_MESSAGE + 10));
        ev.ack(batch.last().unwrap().seq);
        assert_eq!(ev.pending().len(), batch.len(), "the rest follow");
    }

    #[test]
    fn sequence_numbers_grow_across_restarts() {
        let a = Events::new();
        a.push("x", "");
        let first = a.pending()[0].seq;
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = Events::new();
        b.push("x", "");
        assert!(b.pending()[0].seq > first);
    }
}

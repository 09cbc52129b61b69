//! The lease gate: a dead man's switch kept by the kernel.
//!
//! A primary that serves replicas may take writes only while it holds a
//! lease. The agent's guardian fences the engine when the lease ends, but
//! only while the agent runs: an agent stopped (SIGTERM, an upgrade gone
//! wrong), killed (SIGKILL, the OOM killer), or hung (SIGSTOP, a stuck
//! disk) would leave its engine writable while the coordinator, having
//! waited out the lease, promotes a replica. So the agent's table lets
//! packets reach (and leave) the engine port only while a set element
//! lives: the port in the `lease` set, added with a timeout that ends
//! where the fence would go up ([`corral_proto::lease::fence_ahead`]
//! before the lease ends). Each renewal of the lease renews the element;
//! when renewals stop, for whatever reason, the kernel drops the element
//! and with it every client packet and every replica's acknowledgement.
//! Nothing in user space has to stay alive for the fence to happen.
//!
//! Renewals come at every heartbeat (twice a second by default), so they
//! go straight to the kernel over netlink: one small batch, a few
//! microseconds of work, where running `nft` would cost a process and
//! about 5 ms of CPU each time. The batch is one transaction of three
//! messages, "add the element, delete it, add it with the new timeout":
//! the first makes sure the delete finds an element (adding one that
//! exists is a no-op), and the kernel applies all three or none, so there
//! is never a moment without the element. (Kernels before 6.10 cannot
//! change an element's timeout in place.)
//!
//! The batch is only sent while the previous element surely still lives;
//! a gate that may have closed is opened again by rewriting the whole
//! table, which creates the set afresh (see [`super::Firewall::apply_gated`]).

use anyhow::{bail, Context, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// The set that holds the engine port while the lease lives.
pub const LEASE_SET: &str = "lease";

// From linux/netlink.h, linux/netfilter/nfnetlink.h and nf_tables.h.
const NETLINK_NETFILTER: libc::c_int = 12;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

/// The kernel counts timeouts in jiffies (4 ms at HZ=250) and rounds up:
/// ask for this much less, so the element never outlives what we meant.
const JIFFY_SLACK: Duration = Duration::from_millis(10);

/// Where the gate's netlink socket is opened: this process's network
/// namespace, or a named one (tests, and an agent whose engine lives in a
/// namespace of its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Netns(pub Option<PathBuf>);

/// Renews the element of `port` in `table`'s lease set so it ends `ttl`
/// from now. Fails if the set does not exist (the table was not applied)
/// or the kernel refuses; then nothing changed.
pub fn renew(netns: &Netns, table: &str, port: u16, ttl: Duration) -> Result<()> {
    let ttl = ttl.saturating_sub(JIFFY_SLACK);
    if ttl.is_zero() {
        bail!("the lease gate would end at once; not renewing it");
    }
    let socket = open(netns)?;
    let batch = batch(table, port, ttl);
    send(&socket, &batch)?;
    receive_acks(&socket, &[2, 3, 4])
        .with_context(|| format!("renewing the lease gate of port {port} in table inet {table}"))
}

/// The batch: begin, add (timeout), delete, add (timeout), end. Sequence
/// numbers 1..=5; the three element messages ask for an acknowledgement.
fn batch(table: &str, port: u16, ttl: Duration) -> Vec<u8> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut out = Vec::with_capacity(256);
    message(&mut out, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0, |_| {});
    let setelem = |out: &mut Vec<u8>, kind: u16, seq: u32, timeout: Option<u64>| {
        let flags = NLM_F_REQUEST
            | NLM_F_ACK
            | if kind == NFT_MSG_NEWSETELEM {
                NLM_F_CREATE
            } else {
                0
            };
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
        message(out, kind, flags, seq, NFPROTO_INET, |m| {
            attr(m, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
            attr(m, NFTA_SET_ELEM_LIST_SET, &cstr(LEASE_SET));
            nested(m, NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
                nested(m, NFTA_LIST_ELEM, |m| {
                    nested(m, NFTA_SET_ELEM_KEY, |m| {
                        attr(m, NFTA_DATA_VALUE, &port.to_be_bytes());
                    });
                    if let Some(ms) = timeout {
                        attr(m, NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                    }
                });
            });
        });
    };
    setelem(&mut out, NFT_MSG_NEWSETELEM, 2, Some(ms));
    setelem(&mut out, NFT_MSG_DELSETELEM, 3, None);
    setelem(&mut out, NFT_MSG_NEWSETELEM, 4, Some(ms));
    message(&mut out, NFNL_MSG_BATCH_END, NLM_F_REQUEST, 5, 0, |_| {});
    out
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Appends one netlink message: header, `nfgenmsg`, then what `body`
/// writes. Batch begin/end carry the subsystem in `res_id`.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in below
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    let res_id = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
        NFNL_SUBSYS_NFTABLES
    } else {
        0
    };
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id.to_be_bytes());
    body(out);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    pad(out);
}

/// One attribute: length (header and value, without padding), type, value,
/// padding to 4 bytes.
fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = (4 + value.len()) as u16;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    pad(out);
}

fn nested(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    body(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A netlink socket for nf_tables, in `netns`. A socket belongs to the
/// namespace it was created in, wherever it is used afterwards, so a
/// socket for another namespace is created on a short-lived thread that
/// entered it (entering one changes only the calling thread).
fn open(netns: &Netns) -> Result<OwnedFd> {
    let Some(path) = &netns.0 else {
        return socket();
    };
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {}", path.display()))?;
            socket()
        })
        .join()
        .unwrap_or_else(|_| bail!("the thread opening the netlink socket panicked"))
    })
}

fn socket() -> Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls on values we own; the descriptor is wrapped at
    // once so it is closed on every path.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a netlink socket for nf_tables");
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Never wait long for the kernel's answer: a renewal that cannot be
    // confirmed is retried at the next pass.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("setting SO_RCVTIMEO");
    }
    Ok(fd)
}

fn send(socket: &OwnedFd, batch: &[u8]) -> Result<()> {
    // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            batch.as_ptr().cast(),
            batch.len(),
            0,
            std::ptr::addr_of!(to).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error()).context("sending to nf_tables");
    }
    if sent as usize != batch.len() {
        bail!("nf_tables took {sent} of {} bytes", batch.len());
    }
    Ok(())
}

/// Reads answers until every sequence number in `want` is acknowledged;
/// the first error the kernel reports (it then applied nothing) fails.
fn receive_acks(socket: &OwnedFd, want: &[u32]) -> Result<()> {
    let mut pending: Vec<u32> = want.to_vec();
    let mut buf = vec![0u8; 8192];
    while !pending.is_empty() {
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error())
                .context("waiting for nf_tables to acknowledge");
        }
        for (seq, errno) in errors(&buf[..n as usize]) {
            if errno != 0 {
                return Err(std::io::Error::from_raw_os_error(errno))
                    .with_context(|| describe(seq));
            }
            pending.retain(|s| *s != seq);
        }
    }
    Ok(())
}

/// (sequence number, errno) of each NLMSG_ERROR message in `buf` (errno 0
/// is an acknowledgement).
fn errors(mut buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        if len < 16 || len > buf.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= 20 {
            let code = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
            out.push((seq, -code));
        }
        let step = (len + 3) & !3;
        buf = &buf[step.min(buf.len())..];
    }
    out
}

fn describe(seq: u32) -> String {
    match seq {
        2 | 4 => "the kernel refused to add the lease element (is the table applied?)".into(),
        3 => "the kernel refused to replace the lease element".into(),
        _ => format!("the kernel refused message {seq} of the lease batch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the messages of a batch: (type, flags, seq, body).
    fn messages(mut buf: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0, "messages are padded to 4 bytes");
            let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
            let flags = u16::from_ne_bytes(buf[6..8].try_into().unwrap());
            let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
            out.push((kind, flags, seq, buf[16..len].to_vec()));
            buf = &buf[len..];
        }
        out
    }

    #[test]
    fn batch_adds_deletes_and_adds_the_element_in_one_transaction() {
        let b = batch("corral", 5432, Duration::from_millis(1740));
        let m = messages(&b);
        let kinds: Vec<u16> = m.iter().map(|x| x.0).collect();
        let setelem = |k: u16| (NFNL_SUBSYS_NFTABLES << 8) | k;
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                setelem(NFT_MSG_NEWSETELEM),
                setelem(NFT_MSG_DELSETELEM),
                setelem(NFT_MSG_NEWSETELEM),
                NFNL_MSG_BATCH_END
            ]
        );
        assert_eq!(m.iter().map(|x| x.2).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        // Begin names the subsystem (big-endian res_id).
        assert_eq!(m[0].3, [0, 0, 0, 10]);
        assert_eq!(m[1].1, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(m[2].1, NLM_F_REQUEST | NLM_F_ACK);
        // nfgenmsg: inet; then the table and set names, NUL-terminated.
        let body = &m[1].3;
        assert_eq!(body[0], NFPROTO_INET);
        let text = String::from_utf8_lossy(body);
        assert!(text.contains("corral\0") && text.contains("lease\0"));
        // The port, big-endian, and the timeout in ms, big-endian.
        assert!(body.windows(2).any(|w| w == 5432u16.to_be_bytes()));
        assert!(body.windows(8).any(|w| w == 1740u64.to_be_bytes()));
        assert!(!m[2].3.windows(8).any(|w| w == 1740u64.to_be_bytes()));
    }

    #[test]
    fn errors_reads_acks_and_refusals() {
        let mut buf = Vec::new();
        for (seq, code) in [(2u32, 0i32), (3, -2)] {
            message(&mut buf, NLMSG_ERROR, 0, seq, 0, |_| {});
            // `message` wrote an nfgenmsg; an error carries the code there.
            let at = buf.len() - 4;
            buf[at..].copy_from_slice(&code.to_ne_bytes());
        }
        assert_eq!(errors(&buf), [(2, 0), (3, 2)]);
        assert!(errors(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn a_gate_that_would_end_at_once_is_not_renewed() {
        let e = renew(&Netns::default(), "corral", 5432, Duration::from_millis(5)).unwrap_err();
        assert!(format!("{e}").contains("would end at once"), "{e}");
    }
}

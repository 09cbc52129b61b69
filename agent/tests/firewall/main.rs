//! The firewall against real nftables, in network namespaces of our own.
//!
//! Each test creates namespaces named `crlfw-<pid>-<n>` and deletes them when
//! it ends, panic or not; a run that was killed leaves namespaces whose pid is
//! gone, and the next run sweeps them. All traffic stays on the loopback of
//! those namespaces, or on a veth pair between two of them (192.0.2.0/24
//! and 2001:db8::/64, address blocks reserved for documentation). Needs root.

mod allowlist;
mod fence;
mod support;

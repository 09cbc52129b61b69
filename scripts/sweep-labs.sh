#!/usr/bin/env bash
# Removes test labs whose owning test process is gone (a run killed before
# it could clean up): namespaces crlK-*, veths crlKh*, bridge crlbK.
# Labs whose owner still runs are left alone (run it when no test is
# starting: a lab being created has no pid file for a moment). `--all`
# removes every lab.
set -euo pipefail
all=${1:-}
for br in $(ip -o link show type bridge | awk -F': ' '{print $2}' | grep -E '^crlb[0-9]+$' || true); do
    k=${br#crlb}
    pidfile=/tmp/corral-tests/labs/$k.pid
    if [[ $all != --all && -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        continue
    fi
    echo "sweeping lab $k"
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^crl$k-" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    for veth in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^crl${k}h" || true); do
        ip link del "$veth" 2>/dev/null || true
    done
    # Filesystems a test mounted for a VM's data (small disks).
    for m in $(awk -v d="/tmp/corral-tests/lab-$k/" 'index($2, d) == 1 {print $2}' /proc/mounts); do
        umount -l "$m" 2>/dev/null || true
    done
    ip link del "$br" 2>/dev/null || true
    rm -f "$pidfile"
done
# Namespaces of the agent's firewall tests: crlfw-<pid>-<n>.
for ns in $(ip netns list | awk '{print $1}' | grep -E '^crlfw-[0-9]+-' || true); do
    pid=${ns#crlfw-}; pid=${pid%%-*}
    if [[ $all == --all ]] || ! kill -0 "$pid" 2>/dev/null; then
        echo "sweeping $ns"
        ip netns del "$ns" 2>/dev/null || true
    fi
done

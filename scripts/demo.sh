#!/usr/bin/env bash
# `make demo`: a coordinator and three agent "VMs" (network namespaces on a
# bridge), a three-node PostgreSQL primary/replica cluster (vm1 primary,
# vm2 and vm3 streaming replicas, zero-loss sync mode), and what to try next.
#
#   scripts/demo.sh         (re)start the demo; replaces a previous demo
#   scripts/demo.sh stop    stop it and remove its namespaces and state
#
# Addresses: 10.231.251.0/24 and fd31::fb:0/112 (the test labs use
# 10.231.1-250.0/24, so a running demo never collides with `make test`).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CORRAL_BIN_DIR:-$ROOT/target/debug}
DIR=/tmp/corral-demo
NET=10.231.251
BR=cdemo-br
NSES=(cdemo-ctl cdemo-vm1 cdemo-vm2 cdemo-vm3 cdemo-cli)
HOSTS=(1 11 12 13 100)

stop() {
    for ns in "${NSES[@]}"; do
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    for i in "${!NSES[@]}"; do ip link del "cdemo-h$i" 2>/dev/null || true; done
    ip link del "$BR" 2>/dev/null || true
    rm -rf "$DIR"
}

if [[ ${1:-} == stop ]]; then
    stop
    echo "demo stopped and removed"
    exit 0
fi

[[ $(id -u) == 0 ]] || { echo "error: the demo creates network namespaces: run it as root" >&2; exit 1; }
for b in corral-coordinator corral-agent corralctl; do
    [[ -x $BIN/$b ]] || { echo "error: $BIN/$b missing: run 'cargo build --workspace' (or 'make demo')" >&2; exit 1; }
done

if [[ -d $DIR ]] || ip link show "$BR" >/dev/null 2>&1; then
    echo "replacing the previous demo"
fi
stop
mkdir -p "$DIR"
chmod 755 "$DIR"

echo "==> network: bridge $BR ($NET.254), namespaces ${NSES[*]}"
ip link add "$BR" type bridge
ip addr add "$NET.254/24" dev "$BR"
ip addr add "fd31::fb:254/112" dev "$BR" nodad
ip link set "$BR" up
for i in "${!NSES[@]}"; do
    ns=${NSES[$i]}; host=${HOSTS[$i]}
    ip netns add "$ns"
    ip link add "cdemo-h$i" type veth peer name eth0 netns "$ns"
    ip link set "cdemo-h$i" master "$BR" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$NET.$host/24" dev eth0
    ip -n "$ns" addr add "fd31::fb:$host/112" dev eth0 nodad
    ip -n "$ns" link set eth0 up
done

echo "==> PKI: CA, coordinator certificate and an admin certificate in $DIR/pki"
"$BIN/corralctl" pki init --dir "$DIR/pki" --coordinator "$NET.1:7400" >/dev/null
export CORRAL_CONFIG=$DIR/pki/corralctl.toml
ctl() { "$BIN/corralctl" "$@"; }

ALERTMANAGER=/usr/bin/prometheus-alertmanager
if [[ -x $ALERTMANAGER ]]; then
    echo "==> Alertmanager in cdemo-ctl on $NET.1:9093: the coordinator sends its alerts there"
    mkdir -p "$DIR/alertmanager"
    printf 'route:\n  receiver: on-call\nreceivers:\n  - name: on-call\n' >"$DIR/alertmanager/alertmanager.yml"
    ip netns exec cdemo-ctl setsid "$ALERTMANAGER" --config.file="$DIR/alertmanager/alertmanager.yml" \
        --storage.path="$DIR/alertmanager" --web.listen-address="$NET.1:9093" --cluster.listen-address= \
        >"$DIR/alertmanager.log" 2>&1 < /dev/null &
    cat >"$DIR/coordinator.toml" <<TOML
# Alert rules (defaults shown in docs/monitoring.md, "Alerts") and where alerts go.
[alerts]
repeat_interval = "1h"
[[notify.alertmanager]]
name = "alertmanager"
url = "http://$NET.1:9093"
TOML
else
    : >"$DIR/coordinator.toml"
fi

S3S=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
if [[ -x $S3S ]]; then
    echo "==> S3-compatible storage (s3s-fs) in cdemo-ctl on $NET.1:9000, bucket corral-backups in $DIR/s3"
    mkdir -p "$DIR/s3/corral-backups"
    ip netns exec cdemo-ctl setsid "$S3S" --host "$NET.1" --port 9000 --access-key demo-key \
        --secret-key demo-secret-0123456789 "$DIR/s3" >"$DIR/s3s-fs.log" 2>&1 < /dev/null &
    cat >>"$DIR/coordinator.toml" <<TOML

# Backups: the key is the coordinator's (state directory/backup.key).
[backup.targets.s3]
kind = "s3"
endpoint = "http://$NET.1:9000"
allow_http = true
bucket = "corral-backups"
prefix = "demo"
access_key_id = "demo-key"
secret_access_key = "demo-secret-0123456789"
TOML
fi

echo "==> coordinator in cdemo-ctl on $NET.1:7400, metrics on $NET.1:7403 (log: $DIR/coordinator.log)"
ip netns exec cdemo-ctl setsid "$BIN/corral-coordinator" --state-dir "$DIR/coordinator" \
    --pki-dir "$DIR/pki" --listen "$NET.1:7400" --http-listen "$NET.1:7403" \
    --config "$DIR/coordinator.toml" >"$DIR/coordinator.log" 2>&1 < /dev/null &
for _ in $(seq 100); do ctl whoami >/dev/null 2>&1 && break; sleep 0.2; done
ctl whoami >/dev/null

for i in 1 2 3; do
    echo "==> agent vm$i in cdemo-vm$i on $NET.1$i:7401, enrolled with a single-use join token"
    # The token goes in a file, not on the command line (where ps shows it).
    (umask 077; ctl token create --ttl 5m > "$DIR/vm$i.join")
    ip netns exec "cdemo-vm$i" setsid "$BIN/corral-agent" --state-dir "$DIR/vm$i" \
        --coordinator "$NET.1:7400" --listen "$NET.1$i:7401" --join-file "$DIR/vm$i.join" --node-id "vm$i" \
        >"$DIR/vm$i-agent.log" 2>&1 < /dev/null &
done
for _ in $(seq 150); do
    [[ $(ctl node list --output json 2>/dev/null | grep -Eo '"state": ?"up"' | wc -l) -ge 3 ]] && break
    sleep 0.2
done
ctl node list

echo "==> PostgreSQL cluster 'demo': primary vm1, replicas vm2 and vm3 (sync: commits wait for one replica)"
ctl cluster create --name demo --engine postgres --mode primary-replica --nodes vm1,vm2,vm3 --sync
uri=$(ctl cluster credentials demo)
psql -X -q "$uri" -c "CREATE TABLE IF NOT EXISTS hello (id serial PRIMARY KEY, said text);
                     INSERT INTO hello (said) VALUES ('hello from make demo');" >/dev/null
ctl cluster show demo

echo "==> HAProxy in cdemo-cli on $NET.100:5000 (primary) and :5001 (replicas), routing by the agents' health endpoints"
sed -e "s|10.0.0.1\([1-3]\)|$NET.1\1|; s|db-\([1-3]\)|vm\1|; s|bind \*:|bind $NET.100:|" \
    -e "s|/run/haproxy/admin.sock|$DIR/haproxy.sock|" "$ROOT/docs/haproxy.cfg" >"$DIR/haproxy.cfg"
ip netns exec cdemo-cli setsid haproxy -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 < /dev/null &
through=$(echo "$uri" | sed -E "s|@[^/]*/|@$NET.100:5000/|; s|\?.*||")
for _ in $(seq 50); do psql -X -q "$through" -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done

echo "==> IP allowlist: only this host ($NET.254) and HAProxy's namespace ($NET.100) reach PostgreSQL"
ctl cluster allowlist set demo "$NET.254" "$NET.100"

if [[ -x $S3S ]]; then
    echo "==> backups: hourly to S3 keeping 24 (WAL archived there for point-in-time restores), and a first one now"
    ctl backup schedule demo --cron "0 * * * *" --retain 24 --target s3
    # The schedule first tells every node where to archive WAL.
    for _ in $(seq 60); do ctl backup now demo 2>/dev/null && break; sleep 1; done
    ctl backup list demo
fi

cat <<MSG

The demo is running. Try:

  export CORRAL_CONFIG=$DIR/pki/corralctl.toml
  corralctl() { $BIN/corralctl "\$@"; }

  corralctl node list                 # three VMs: metrics, roles, replication, lag
  corralctl cluster show demo
  psql "\$(corralctl cluster credentials demo)" -c 'SELECT * FROM hello'

  # one address for applications, whichever node is primary (HAProxy):
  psql "$through" -c 'SELECT inet_server_addr()'
  curl -s $NET.11:7402/primary; echo     # the agents' health endpoints

  # auto-failover: kill the primary's VM (every process in it) and watch
  # another node take over in about 3 s; writes through HAProxy resume:
  kill -9 \$(ip netns pids cdemo-vm1); sleep 4; corralctl cluster show demo
  psql "$through" -c "INSERT INTO hello (said) VALUES ('after the failover')"
  # bring the VM back: it rejoins as a replica (pg_rewind), never writable:
  ip netns exec cdemo-vm1 setsid $BIN/corral-agent --state-dir $DIR/vm1 \\
      --coordinator $NET.1:7400 --listen $NET.11:7401 >>$DIR/vm1-agent.log 2>&1 &
  sleep 5; corralctl cluster show demo; corralctl event list --cluster demo

  # planned switchover (writes pause for about 0.1 s), and back:
  corralctl node promote demo vm2 --confirm vm2
  corralctl node promote demo vm1 --confirm vm1

  # erase a replica and clone it again, with progress:
  corralctl cluster resync demo --node vm3 --confirm demo

  corralctl node reboot demo vm2
  corralctl cluster set demo termination-protection=on
  corralctl cluster delete demo --confirm demo   # refused while protection is on

  # the agent restarts a crashed PostgreSQL and the coordinator records it:
  ip netns exec cdemo-vm1 pkill -9 -o -x postgres; sleep 3; corralctl event list

  # a replica's VM that vanishes is reported down within three heartbeats:
  kill -9 \$(ip netns pids cdemo-vm3); sleep 4; corralctl node list

  corralctl cluster set demo auto-failover=off   # then the coordinator only alerts
  corralctl cluster set demo lease=3s heartbeat=500ms

  # the IP allowlist: every node enforces it in its nftables table
  corralctl cluster allowlist show demo
  ip netns exec cdemo-vm1 nft list table inet corral
  corralctl cluster allowlist remove demo $NET.254   # refused: it would lock you out
  corralctl cluster allowlist add demo 203.0.113.0/24 2001:db8::/48
  corralctl cluster allowlist history demo
  corralctl cluster allowlist set demo              # empty: open to every address

  corralctl operation list; corralctl audit list

  # monitoring: each node's history (every heartbeat for an hour, 7 days
  # downsampled), Prometheus metrics of the coordinator and of each agent,
  # and the logs of an engine or an agent, streamed from its VM:
  corralctl node metrics demo vm1 --since 10m
  curl -s $NET.1:7403/metrics | grep -E '^corral_(node_up|engine_up|alerts_firing)'
  curl -s $NET.11:7402/metrics | grep corral_node_cpu
  corralctl logs demo vm1 --since 10m
  corralctl logs demo vm2 --agent --follow      # Ctrl-C to stop

  # alerts: stop vm2's PostgreSQL from answering for a few seconds, watch
  # engine_down fire and resolve (Alertmanager's UI: http://$NET.1:9093):
  pids=\$(ip netns pids cdemo-vm2 | xargs -r ps -o pid= -o comm= -p | awk '\$2=="postgres"{print \$1}')
  kill -STOP \$pids; sleep 15; corralctl alerts list; kill -CONT \$pids
  sleep 5; corralctl alerts history

  # backups (S3 in $DIR/s3): taken from a replica, encrypted, verified
  corralctl backup list demo
  corralctl backup now demo
  id=\$(corralctl --output json backup list demo | grep -o '"bk-[^"]*"' | tail -1 | tr -d '"')
  corralctl backup verify demo \$id
  corralctl backup download demo \$id /tmp/demo.tar && tar -tf /tmp/demo.tar | head
  psql "\$(corralctl cluster credentials demo)" -c "INSERT INTO hello (said) VALUES ('first')"
  t=\$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ); sleep 1
  psql "\$(corralctl cluster credentials demo)" -c "INSERT INTO hello (said) VALUES ('second')"
  corralctl node remove demo vm3 --confirm vm3    # frees vm3 for the restored cluster
  corralctl backup restore demo \$id --to-time \$t --into-new-cluster pitr --nodes vm3
  psql "\$(corralctl cluster credentials pitr)" -c 'SELECT * FROM hello'   # 'first', not 'second'

Logs: $DIR/*.log.  Stop and remove everything: make demo-stop
MSG

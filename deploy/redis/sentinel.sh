#!/bin/sh
# A Redis Sentinel container's entrypoint (compose's sentinel profile): write sentinel.conf into a
# tmpfs (Sentinel rewrites it as it learns the topology), then run redis-server --sentinel as the
# redis user through the image's entrypoint.
#   SENTINEL_PASSWORD         the sentinels' own password (the default user): the other
#                             sentinels log in with it; every Sentinel command, FAILOVER included
#   SENTINEL_CLIENT_PASSWORD  the password of the sentinels' user "client", the one workers,
#                             producers and the gateway log in as (CHATQUEUE_REDIS_SENTINEL_USERNAME
#                             =client, _PASSWORD): it may only ask for the primary, the replicas
#                             and the sentinels (README "Security"); only its sha256 digest is written
#   REDIS_SENTINEL_PASSWORD   the sentinels' login to Redis (acl.sh's "sentinel" user)
#   SENTINEL_MASTER (chatqueue), SENTINEL_PRIMARY_HOST (redis), SENTINEL_PRIMARY_PORT (6379),
#   SENTINEL_PORT (26379), SENTINEL_QUORUM (2), SENTINEL_DOWN_AFTER_MS (5000),
#   SENTINEL_FAILOVER_TIMEOUT_MS (60000), SENTINEL_DIR (/run/sentinel)
#   SENTINEL_TLS_CERT_FILE, SENTINEL_TLS_KEY_FILE, SENTINEL_TLS_CA_FILE: all three set, the
#                             sentinel serves TLS only, on SENTINEL_PORT, and reaches the Redis
#                             nodes and the other sentinels over TLS, verified against the CA
#                             (tls-replication yes: the nodes must serve TLS too); clients then
#                             need a rediss:// URL or CHATQUEUE_REDIS_SENTINEL_TLS=true
set -eu
dir="${SENTINEL_DIR:-/run/sentinel}"
mkdir -p "$dir"
umask 077
master="${SENTINEL_MASTER:-chatqueue}"
port="${SENTINEL_PORT:-26379}"
client_password="${SENTINEL_CLIENT_PASSWORD:?SENTINEL_CLIENT_PASSWORD is not set}"
client_digest="$(printf '%s' "$client_password" | sha256sum | cut -d' ' -f1)"
# What redis-py's Sentinel (ours, kombu's, Celery's) sends: HELLO / AUTH, CLIENT SETNAME and
# SETINFO (7.2+; older servers know no such subcommand and redis-py ignores the refusal),
# PING, SENTINEL MASTERS (discover_master), SLAVES (discover_slaves), SENTINELS.
setinfo=" +client|setinfo"
case "$(redis-server --version)" in
  *" v=6."* | *" v=7.0."* | *" v=7.1."*) setinfo="" ;;
esac
client_rules="+ping +auth +hello +client|setname${setinfo} +sentinel|masters +sentinel|master"
client_rules="$client_rules +sentinel|get-master-addr-by-name +sentinel|slaves +sentinel|replicas"
client_rules="$client_rules +sentinel|sentinels"

tls_cert="${SENTINEL_TLS_CERT_FILE:-}"; tls_key="${SENTINEL_TLS_KEY_FILE:-}"
tls_ca="${SENTINEL_TLS_CA_FILE:-}"
if [ -n "$tls_cert$tls_key$tls_ca" ]; then
  if [ -z "$tls_cert" ] || [ -z "$tls_key" ] || [ -z "$tls_ca" ]; then
    echo "sentinel.sh: TLS needs SENTINEL_TLS_CERT_FILE, _KEY_FILE and _CA_FILE together" >&2
    exit 1
  fi
  listen="port 0
tls-port $port
tls-cert-file $tls_cert
tls-key-file $tls_key
tls-ca-cert-file $tls_ca
tls-auth-clients no
tls-replication yes"
else
  listen="port $port"
fi

cat > "$dir/sentinel.conf" <<CONF
$listen
dir $dir
sentinel resolve-hostnames yes
requirepass "${SENTINEL_PASSWORD:?SENTINEL_PASSWORD is not set}"
sentinel sentinel-pass "${SENTINEL_PASSWORD}"
user client on #$client_digest resetchannels -@all $client_rules
sentinel monitor $master ${SENTINEL_PRIMARY_HOST:-redis} ${SENTINEL_PRIMARY_PORT:-6379} ${SENTINEL_QUORUM:-2}
sentinel auth-user $master sentinel
sentinel auth-pass $master "${REDIS_SENTINEL_PASSWORD:?REDIS_SENTINEL_PASSWORD is not set}"
sentinel down-after-milliseconds $master ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout $master ${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}
sentinel parallel-syncs $master 1
CONF
chown -R redis:redis "$dir" 2>/dev/null || true
exec docker-entrypoint.sh redis-server "$dir/sentinel.conf" --sentinel

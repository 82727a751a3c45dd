#!/bin/sh
# A Redis Sentinel container's entrypoint (compose's sentinel profile): write sentinel.conf into a
# tmpfs (Sentinel rewrites it as it learns the topology), then run redis-server --sentinel as the
# redis user through the image's entrypoint.
#   SENTINEL_PASSWORD        the sentinels' own password: clients (CHATQUEUE_REDIS_SENTINEL_PASSWORD)
#                            and the other sentinels log in with it
#   REDIS_SENTINEL_PASSWORD  the sentinels' login to Redis (acl.sh's "sentinel" user)
#   SENTINEL_MASTER (chatqueue), SENTINEL_PRIMARY_HOST (redis), SENTINEL_PRIMARY_PORT (6379),
#   SENTINEL_PORT (26379), SENTINEL_QUORUM (2), SENTINEL_DOWN_AFTER_MS (5000),
#   SENTINEL_FAILOVER_TIMEOUT_MS (60000), SENTINEL_DIR (/run/sentinel)
set -eu
dir="${SENTINEL_DIR:-/run/sentinel}"
mkdir -p "$dir"
umask 077
master="${SENTINEL_MASTER:-chatqueue}"
cat > "$dir/sentinel.conf" <<CONF
port ${SENTINEL_PORT:-26379}
dir $dir
sentinel resolve-hostnames yes
requirepass "${SENTINEL_PASSWORD:?SENTINEL_PASSWORD is not set}"
sentinel sentinel-pass "${SENTINEL_PASSWORD}"
sentinel monitor $master ${SENTINEL_PRIMARY_HOST:-redis} ${SENTINEL_PRIMARY_PORT:-6379} ${SENTINEL_QUORUM:-2}
sentinel auth-user $master sentinel
sentinel auth-pass $master "${REDIS_SENTINEL_PASSWORD:?REDIS_SENTINEL_PASSWORD is not set}"
sentinel down-after-milliseconds $master ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout $master ${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}
sentinel parallel-syncs $master 1
CONF
chown -R redis:redis "$dir" 2>/dev/null || true
exec docker-entrypoint.sh redis-server "$dir/sentinel.conf" --sentinel

#!/bin/sh
# The Redis container's entrypoint: write the ACL file from the role passwords (acl.sh), then
# hand over to the image's own entrypoint, which drops to the redis user and starts Redis on it.
set -eu
acl_dir="${CHATQUEUE_ACL_DIR:-/run/redis-acl}"
mkdir -p "$acl_dir"
umask 077
sh "$(dirname "$0")/acl.sh" > "$acl_dir/users.acl"
chown -R redis:redis "$acl_dir" 2>/dev/null || true
# With a replication password (compose's sentinel profile) every node can replicate: a primary
# that a failover demoted follows the new one with this login (acl.sh's "replica" user).
if [ -n "${REDIS_REPLICA_PASSWORD:-}" ]; then
  printf 'masteruser replica\nmasterauth "%s"\n' "$REDIS_REPLICA_PASSWORD" > "$acl_dir/replication.conf"
  chown redis:redis "$acl_dir/replication.conf" 2>/dev/null || true
  set -- "$@" --include "$acl_dir/replication.conf"
fi
exec docker-entrypoint.sh "$@" --aclfile "$acl_dir/users.acl"

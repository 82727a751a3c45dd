#!/bin/sh
# The Redis container's entrypoint: write the ACL file from the role passwords (acl.sh), then
# hand over to the image's own entrypoint, which drops to the redis user and starts Redis on it.
set -eu
acl_dir="${CHATQUEUE_ACL_DIR:-/run/redis-acl}"
mkdir -p "$acl_dir"
umask 077
sh "$(dirname "$0")/acl.sh" > "$acl_dir/users.acl"
chown -R redis:redis "$acl_dir" 2>/dev/null || true
exec docker-entrypoint.sh "$@" --aclfile "$acl_dir/users.acl"

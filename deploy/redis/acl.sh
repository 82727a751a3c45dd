#!/bin/sh
# Prints Redis's ACL file (users.acl) for chatqueue's roles, from their passwords:
#   REDIS_ADMIN_PASSWORD, REDIS_PRODUCER_PASSWORD, REDIS_WORKER_PASSWORD, REDIS_FLOWER_PASSWORD
# (or <NAME>_FILE, a file holding it). Only sha256 digests reach the file. POSIX sh: it runs in
# the redis:alpine image (entrypoint.sh) and in the tests, which start a real redis-server on
# its output. Each rule is there because a real worker, producer, Flower and `celery control`
# were seen to need it (README "Security"); everything else is refused (NOPERM).
#
# Keys: queues are `chatqueue.<model>` lists (kombu adds "\x06\x16<priority>" suffixes); our
# own keys are `chatqueue:<kind>:<job id>`; results are `celery-task-meta-<id>`; kombu keeps
# `_kombu.binding*`, `unacked*` and `<name>.celery.pidbox` / `<uuid>.reply.celery.pidbox`.
# Channels: `chatqueue:cancel`, `celery-task-meta-<id>`, and kombu's fanout exchanges
# `/<db>.celery.pidbox` (Celery's remote control) and `/<db>.celeryev/<event>` (events).
# A channel rule cannot tell PUBLISH from SUBSCRIBE, so a role that may only listen to a
# channel gets it beside +subscribe, and PUBLISH lives in a selector "( ... )" with the
# channels it may publish to.
set -eu

db="${CHATQUEUE_REDIS_DB:-0}"   # kombu prefixes fanout channels with the database number

secret() {
  name="$1"
  eval "value=\${$name:-}"
  eval "file=\${${name}_FILE:-}"
  if [ -z "$value" ] && [ -n "$file" ]; then
    value="$(cat "$file")"
  fi
  if [ -z "$value" ]; then
    echo "acl.sh: $name (or ${name}_FILE) is not set: refusing to write an ACL without it" >&2
    exit 1
  fi
  printf '%s' "$value" | sha256sum | cut -d' ' -f1
}

admin="$(secret REDIS_ADMIN_PASSWORD)"
producer="$(secret REDIS_PRODUCER_PASSWORD)"
worker="$(secret REDIS_WORKER_PASSWORD)"
flower="$(secret REDIS_FLOWER_PASSWORD)"
# High availability (compose's sentinel profile): written only when their passwords are given.
replica=""; sentinel=""
if [ -n "${REDIS_REPLICA_PASSWORD:-}${REDIS_REPLICA_PASSWORD_FILE:-}" ]; then
  replica="$(secret REDIS_REPLICA_PASSWORD)"
fi
if [ -n "${REDIS_SENTINEL_PASSWORD:-}${REDIS_SENTINEL_PASSWORD_FILE:-}" ]; then
  sentinel="$(secret REDIS_SENTINEL_PASSWORD)"
fi

# What every role's client does on connecting (redis-py: HELLO; PING health checks).
session="+ping +hello +client|setname +client|id +select"
scripts="+evalsha +script|load +script|exists"

# No login without a name: the default user is off.
echo "user default off resetpass resetkeys resetchannels -@all"

# The operator: everything, Celery's remote control included (celery control / inspect,
# revoke = our cancel, shutdown, add/cancel_consumer).
echo "user admin on #$admin ~* &* +@all"

# Producers: queue jobs, read their records, results and streams, cancel. Nothing else: no
# reading a lease, a worker's unacked messages, another's queue internals; no control channel.
# A new key or command the producer uses (batch records, Sentinel's ROLE, ...) needs its rule
# here and a line in tests/integration/test_security.py, or it is refused with NOPERM. Batches:
# their records, lines and counts (chatqueue:batch:*, the chatqueue:batches index; tested in
# tests/integration/test_batches.py); the worker counts a line's end in them (HINCRBY).
# The gateway is a producer that also reads its queues' lengths (LLEN: 429) and the live
# workers (ZRANGEBYSCORE chatqueue:workers: GET /v1/models, 503; tests/integration/test_gateway.py).
echo "user producer on #$producer resetkeys resetchannels -@all $session $scripts" \
  "+set +get +exists +mget +xread +subscribe +unsubscribe +wait" \
  "%RW~chatqueue:accepted:* ~chatqueue:cancelled:* %R~chatqueue:stream:*" \
  "%R~celery-task-meta-* &celery-task-meta-*" \
  "(+lpush %W~chatqueue.*)" \
  "(+llen %R~chatqueue.*)" \
  "(+zrangebyscore %R~chatqueue:workers)" \
  "(+publish &chatqueue:cancel)" \
  "(+hset +hsetnx +hget +hmget +hgetall +hincrby +expire +zadd +zrevrange +evalsha +set" \
  "~chatqueue:batch:* ~chatqueue:batches)"

# Workers: consume their queue (a Lua script that pops and records in the unacked hash, BLMOVE
# of a list onto itself to wait, BRPOP if those are refused: worker/delivery.py; the unacked index,
# restoring dead workers' jobs), store results, write streams and leases, listen for cancels
# and for Celery's remote control; they answer control requests (LPUSH to the reply queue) but
# cannot send any: mingle (a broadcast at start) is off for chatqueue workers.
echo "user worker on #$worker resetkeys resetchannels -@all $session $scripts" \
  "+brpop +blmove +rpop +lpush +rpush +llen +del +pexpire +expire +multi +exec +discard +watch" \
  "+unwatch" \
  "+sadd +srem +smembers +zadd +zrem +zrange +zrangebyscore +hset +hget +hdel" \
  "+set +setex +get +mget +exists +xadd +time +hincrby +hmget +hsetnx" \
  "+subscribe +unsubscribe +psubscribe +punsubscribe" \
  "~chatqueue.* ~chatqueue:* ~celery-task-meta-* ~unacked ~unacked_index ~unacked_mutex" \
  "~_kombu.binding.* ~_kombu.binding_permanent.* ~_kombu.binding_deadlines ~*.celery.pidbox*" \
  "&chatqueue:cancel &/$db.celery.pidbox" \
  "(+publish &chatqueue:cancel &celery-task-meta-* &/$db.celeryev/*)"

# Flower, read-only: it follows the workers' events and reads queue lengths. It cannot queue a
# job, read a result or publish on the control channel, so its shutdown / revoke / rate-limit /
# consumer buttons and send-task API fail whatever its web login.
echo "user flower on #$flower resetkeys resetchannels -@all $session $scripts" \
  "+psubscribe +punsubscribe +subscribe +unsubscribe +sadd +srem +smembers +del +llen" \
  "+multi +exec +zadd +zrem +zrangebyscore +time" \
  "~_kombu.binding.celeryev ~_kombu.binding_permanent.celeryev ~_kombu.binding_deadlines" \
  "~celeryev.* %R~chatqueue.* &/$db.celeryev/*"

# A replica's login to its primary (masteruser / masterauth): the replication stream only.
if [ -n "$replica" ]; then
  echo "user replica on #$replica resetkeys resetchannels -@all +psync +replconf +ping"
fi

# Redis Sentinel's login (sentinel auth-user): watch the nodes, announce itself on
# __sentinel__:hello, and in a failover turn a replica into the primary and the others into its
# replicas (Redis's documented minimum for a Sentinel user).
if [ -n "$sentinel" ]; then
  echo "user sentinel on #$sentinel resetkeys resetchannels -@all &__sentinel__:hello" \
    "+multi +exec +slaveof +ping +subscribe +publish +info +role +config|rewrite" \
    "+client|setname +client|kill +script|kill"
fi

"""How the worker's Celery keeps its delivery promise: every accepted job ends with exactly one
stored result, and no message, however malformed, takes the worker down.

Celery and kombu give at-least-once delivery (acks_late: a job is acknowledged once its result
is stored). What they leave open, and this module and worker/result_store.py close:

- A job can run twice: its worker died after storing the result but before the ack, Redis
  went away in between, or the producer's publish was retried. The write-once result backend
  (worker/result_store.py) makes a job's final state final. The task itself skips a job that
  already has one.
- Celery treats any exception in its consumer as unrecoverable and stops the worker; a queue
  entry that is not a kombu message, or a task message whose body is not (args, kwargs, embed),
  raised such exceptions (measured with kombu/Celery 5.7). `TolerantChannel` and
  `CheckedRequest` turn them into a logged, dropped message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

import redis
from celery import current_app
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from producer.celery_app import PRIORITY_STEPS
from producer.errors import JobFailed
from producer.schemas import JOB_ID_PATTERN, JobError
from producer.settings import TASK_NAME
from worker.redact import REDACTED, redact_event, show_content
from worker.settings import WorkerSettings

_JOB_ID = re.compile(JOB_ID_PATTERN)

log = logging.getLogger(__name__)


# KEYS: the queue's lists in the order kombu pops them, then the unacked hash and its index;
# ARGV: now (the index's score, as kombu's QoS.append writes it), the largest entry to record
# (0: any). Pops the first entry, as BRPOP would, and records it in the unacked hash in the same
# step: there is no moment when a job is neither in a queue nor where a dead worker's jobs are
# restored from. Returns {list, entry, delivery tag}, the tag "" for an entry not recorded (too
# large to decode here, or not a kombu envelope: the worker refuses and drops those), or nil.
CLAIM = r"""
local lists = #KEYS - 2
for i = 1, lists do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local limit = tonumber(ARGV[2])
    if limit > 0 and #item > limit then return {KEYS[i], item, ''} end
    -- The envelope without its body (base64: no quote inside), so a large job is not parsed.
    local envelope
    local _, open = string.find(item, '"body": "', 1, true)
    if open then
      local close = string.find(item, '"', open + 1, true)
      if close and string.sub(item, close - 1, close - 1) ~= '\\' then
        local head = string.sub(item, 1, open) .. string.sub(item, close)
        local ok, decoded = pcall(cjson.decode, head)
        if ok then envelope = decoded end
      end
    end
    if envelope == nil then
      local ok, decoded = pcall(cjson.decode, item)
      if ok then envelope = decoded end
    end
    local properties = type(envelope) == 'table' and envelope['properties']
    local tag = type(properties) == 'table' and properties['delivery_tag']
    if type(tag) ~= 'string' or tag == '' then return {KEYS[i], item, ''} end
    local info = properties['delivery_info']
    local exchange, routing_key = '', ''
    if type(info) == 'table' then
      exchange, routing_key = info['exchange'] or '', info['routing_key'] or ''
    end
    redis.call('ZADD', KEYS[lists + 2], ARGV[1], tag)
    redis.call('HSET', KEYS[lists + 1], tag, '[' .. item .. ', ' .. cjson.encode(exchange) ..
               ', ' .. cjson.encode(routing_key) .. ']')
    return {KEYS[i], item, tag}
  end
end
return nil
"""
CLAIM_SHA = hashlib.sha1(CLAIM.encode()).hexdigest()

# An idle worker waits this long (at most) for a job in its queue's first list before it looks
# at all its lists again: jobs there (interactive priority) wake it at once, lower-priority ones
# (batch lines) after this plus Redis's timer granularity (hz 10: 100 ms). Measured on an idle
# tiny-model worker, 16 jobs each: interactive queue wait 7-10 ms median either way; priority 0
# 10 ms with BRPOP, 142 ms median / 191 max with 0.1 s, 253 / 359 with 0.25 s. An idle worker
# sends a few claims and waits a second.
IDLE_WAIT_S = 0.1


class ClaimingQoS(kombu_redis.QoS):
    """kombu's QoS, except that a message CLAIM already recorded is not written again."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag is not None and delivery_tag == self.channel._claimed_tag:
            virtual.QoS.append(self, message, delivery_tag)  # this worker's own bookkeeping
            return
        super().append(message, delivery_tag)


class TolerantChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that one bad queue entry costs that entry, not the worker.

    kombu parses each entry it pops (BRPOP) inside Celery's event loop; an entry that is not
    JSON, or not a kombu envelope, raised there and Celery stopped the worker ("Unrecoverable
    error"). The entry is already off the queue when that happens; here it is logged and the
    loop goes on. Connection errors still go to Celery, which reconnects.

    An entry over `max_message_bytes` (a transport option) is never decoded: kombu would turn
    it into a string, a dict, base64-decoded bytes and JSON objects before Celery or our size
    check saw it (a 51 MB request took a worker from 72 to 390 MB). Its task id is read from
    the envelope with the body cut out, its job fails with limit_exceeded (`refuse_oversized`),
    and it is dropped: off the queue, never in the unacked hash, so never delivered again.

    And a job taken off the queue is in the unacked hash from that moment (`CLAIM`). kombu pops
    with BRPOP and records the message in the unacked hash only once its reply has been read:
    a worker killed in between (SIGKILL, the OOM killer, a lost node) took the job with it, and
    no visibility timeout ever brought it back (tests/integration/test_batches.py kills a worker
    there). Here one Lua script pops and records; an idle worker waits on its queue's first
    list without taking anything (BLMOVE of a list onto itself), then claims again. A Redis
    that refuses the script or BLMOVE (an ACL without them) gets kombu's BRPOP, with a warning.
    """

    QoS = ClaimingQoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "max_message_bytes")
    max_message_bytes: int | None = None
    _claimed_tag: str | None = None  # the message being delivered, if CLAIM recorded it
    _claiming = True  # False once Redis refused CLAIM or BLMOVE: kombu's BRPOP from then on
    _idle = False  # the last CLAIM found nothing: wait before the next
    _sent: str | None = None  # the command whose reply the connection awaits

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._claiming:
            self._sent = "BRPOP"
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        prefix = self.global_keyprefix or ""
        lists = [prefix + self._q_for_pri(queue, pri) for pri in self.priority_steps
                 for queue in queues]
        if self._idle:
            wait = min(IDLE_WAIT_S, timeout or self.brpop_timeout or IDLE_WAIT_S)
            command: list[Any] = ["BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT", wait]
            self._sent = "BLMOVE"
        else:
            command = ["EVALSHA", CLAIM_SHA, len(lists) + 2, *lists,
                       prefix + self.unacked_key, prefix + self.unacked_index_key,
                       repr(time.time()), self.max_message_bytes or 0]
            self._sent = "EVALSHA"
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(*command)
        return None

    def _brpop_read(self, **options: Any) -> Any:
        try:
            sent, self._sent = self._sent, None
            if sent in ("EVALSHA", "BLMOVE"):
                return self._claim_read(sent, **options)
            return self._checked_brpop_read(**options)
        except (kombu_redis.Empty, *self.connection_errors):
            raise
        except Exception:
            log.exception("dropped a queue entry that is not a valid message")
            return True

    def _checked_brpop_read(self, **options: Any) -> Any:
        """kombu 5.7's Channel._brpop_read, with the size check before the entry is decoded."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP",
                                                        **options)
            except self.connection_errors:
                # As kombu: disconnect, so the next iteration reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            if self._fits(item, dest):
                self.connection._deliver(loads(bytes_to_str(item)), dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _claim_read(self, sent: str, **options: Any) -> Any:
        """The reply to CLAIM (a job, already in the unacked hash, or nothing) or to the idle
        wait (whatever it says, claim next)."""
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except redis.ResponseError as exc:
                self._refused(sent, exc)
                raise kombu_redis.Empty() from None
            if sent == "BLMOVE" or not reply:
                self._idle = sent == "EVALSHA"
                raise kombu_redis.Empty()
            self._idle = False
            dest, item, tag = reply
            dest = bytes_to_str(dest)[len(self.global_keyprefix or ""):].rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            tag = bytes_to_str(tag) or None
            message = None
            try:
                if self._fits(item, dest):
                    message = loads(bytes_to_str(item))
            finally:
                if message is None and tag is not None:  # refused here: never to be restored
                    self.qos._remove_from_indices(tag).execute()
            if message is None:
                return True
            # In the unacked hash as long as kombu's own bookkeeping has it, as with BRPOP:
            # from there Celery acks it, rejects it, or it is restored once its worker died.
            self._claimed_tag = tag
            try:
                self.connection._deliver(message, dest)
            except Exception:
                if tag is not None and tag not in self.qos._delivered:
                    self.qos._remove_from_indices(tag).execute()
                raise
            finally:
                self._claimed_tag = None
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _refused(self, sent: str, exc: redis.ResponseError) -> None:
        if sent == "EVALSHA" and isinstance(exc, redis.exceptions.NoScriptError):
            # First use on this Redis (or it restarted): load it, claim on the next turn.
            try:
                self.client.execute_command("SCRIPT", "LOAD", CLAIM)
                return
            except redis.ResponseError as refused:  # an ACL without SCRIPT LOAD
                exc = refused
        self._claiming = False
        log.warning("Redis refused %s (%s): this worker takes jobs with BRPOP, and one it is "
                    "killed while taking is lost; allow EVALSHA, SCRIPT LOAD and BLMOVE on the "
                    "queues (deploy/redis/acl.sh)", sent, exc)

    def _get(self, queue: str) -> Any:
        """kombu's polling read (used without Celery's event loop), with the same check."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item and self._fits(item, queue):
                    self._maybe_update_queues_expire(client, queue)
                    return loads(bytes_to_str(item))
            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()

    def _fits(self, item: bytes | str, queue: str) -> bool:
        limit = self.max_message_bytes
        if limit is None or len(item) <= limit:
            return True
        refuse_oversized(item, queue, limit)
        return False


_BODY_START = re.compile(rb'"body"\s*:\s*"')


def envelope_headers(item: bytes | str) -> dict[str, Any]:
    """A kombu envelope's headers and properties, read without decoding its body: the body (a
    JSON string, base64 in kombu's Redis transport) is cut out and the small rest parsed. {}
    for an entry that is not such an envelope."""
    raw = item.encode("utf-8", "surrogatepass") if isinstance(item, str) else item
    found = _BODY_START.search(raw)
    if found is None:
        return {}
    end = found.end()
    while True:  # the closing quote: one not escaped by an odd run of backslashes
        end = raw.find(b'"', end)
        if end < 0:
            return {}
        start = end
        while start > found.end() and raw[start - 1] == 0x5C:  # a backslash
            start -= 1
        if (end - start) % 2 == 0:
            break
        end += 1
    try:
        envelope = json.loads(raw[:found.end()] + raw[end:])
    except ValueError:
        return {}
    if not isinstance(envelope, dict):
        return {}
    headers = envelope.get("headers")
    properties = envelope.get("properties")
    return {**(properties if isinstance(properties, dict) else {}),
            **(headers if isinstance(headers, dict) else {})}


def refuse_oversized(item: bytes | str, queue: str, limit: int) -> None:
    """Fail the job of a queue entry too large to decode, with the contract's error: code
    limit_exceeded, field "request", the limit and the entry's size. Nothing of its content is
    logged; an entry with no valid chatqueue job id is only logged."""
    size = len(item)
    headers = envelope_headers(item)
    job_id, task = headers.get("id") or headers.get("correlation_id"), headers.get("task")
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id) or task != TASK_NAME:
        log.warning("dropped a %d-byte queue entry on %s without decoding it: over this "
                    "worker's limit of %d bytes for a message (not a chatqueue job)",
                    size, queue, limit)
        return
    log.warning("job %s refused without decoding it: its message is %d bytes, over this "
                "worker's limit of %d", job_id, size, limit)
    error = JobError(
        code="limit_exceeded", field="request", limit=limit, value=size,
        message=f"request: the job's message is {size} bytes, over this worker's limit of "
                f"{limit} bytes for a message (refused before decoding; max_request_bytes "
                "bounds the request itself)")
    try:
        current_app.backend.mark_as_failure(job_id, JobFailed(error))
    except Exception:
        log.exception("job %s: the refusal of its oversized message was not stored", job_id)


class TolerantRedisTransport(kombu_redis.Transport):
    Channel = TolerantChannel


class TolerantSentinelChannel(TolerantChannel, kombu_redis.SentinelChannel):
    """The tolerant channel on the primary Redis Sentinel names.

    After the primary died, a channel that closed (restoring its unacknowledged messages) or
    acked a finished job found its transport detached from the connection (`client` None: kombu
    treats the sentinel URLs as failover alternates, and `Connection.switch` closes the
    transport) and raised AttributeError, which Celery calls an unrecoverable error: the
    worker exited in the middle of the failover (seen in tests/integration/test_sentinel.py).
    It is a lost connection: the messages stay in the unacked hash and come back after the
    visibility timeout, as after any lost ack.
    """

    # TolerantChannel's list (plain Redis + max_message_bytes) comes first in the MRO: without
    # this, master_name and sentinel_kwargs never reached the channel.
    from_transport_options = (
        *kombu_redis.SentinelChannel.from_transport_options, "max_message_bytes")

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed (Sentinel failover)")
        return super()._connparams(asynchronous)


class TolerantSentinelTransport(kombu_redis.SentinelTransport):
    Channel = TolerantSentinelChannel


class QuickReconnectConsumer(Consumer):
    """Celery's consumer, retrying a lost broker after 0.5 s, then every 0.5 s more up to every
    2 s. Celery's own waits 2 s, then 4, 6, ... up to 30 s between tries: after a Sentinel
    failover its first retry still met no primary and the next came 4 s later, so jobs flowed
    again about 4 s after the new primary was named (tests/integration/test_sentinel.py)."""

    def ensure_connected(self, conn: Any) -> Any:
        ensure = conn.ensure_connection

        def quickly(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("interval_start", 0.5)
            kwargs.setdefault("interval_step", 0.5)
            kwargs.setdefault("interval_max", 2.0)
            return ensure(*args, **kwargs)

        conn.ensure_connection = quickly
        return super().ensure_connected(conn)


TRANSPORT = f"{__name__}:TolerantRedisTransport"
SENTINEL_TRANSPORT = f"{__name__}:TolerantSentinelTransport"


class CheckedRequest(Request):
    """Celery's task request, refusing a malformed message as invalid instead of crashing.

    A task message whose body is valid JSON but not (args, kwargs, embed) -- a bare string, say
    -- made Request() raise in the consumer, which stopped the worker; and kombu, restoring the
    unacknowledged message at shutdown, handed it to the next worker. InvalidTaskError is what
    Celery already logs, acknowledges and drops.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (InvalidTaskError, ContentDisallowed, DecodeError):
            raise
        except Exception as exc:
            raise InvalidTaskError(f"malformed task message: {exc!r}") from exc
        # The job id goes into log lines, Redis keys and metrics: one the contract would refuse
        # (a "\n" in it forged a log line) is refused here too, before anything logs it.
        if not isinstance(self.id, str) or not _JOB_ID.fullmatch(self.id):
            raise InvalidTaskError(
                f"job id {str(self.id)[:140]!r} is not a valid job id ({JOB_ID_PATTERN})")
        if not show_content():
            # What the task-received event (Flower) and the logs show of the request.
            self._argsrepr = self._kwargsrepr = REDACTED

    def send_event(self, type: str, **fields: Any) -> None:
        """Task events without content: Flower shows what they carry."""
        super().send_event(type, **redact_event(type, fields))

    def info(self, safe: bool = False) -> Any:
        """`inspect active/reserved`: the request's redacted repr unless content may be shown."""
        return super().info(safe=safe or not show_content())


def broker_options(settings: WorkerSettings) -> dict[str, Any]:
    """The broker side of delivery: when a dead worker's job comes back, and the transport."""
    options: dict[str, Any] = {
        "broker_transport": SENTINEL_TRANSPORT if settings.uses_sentinel else TRANSPORT,
        # Celery gives up on a lost broker after 100 tries (about 50 min) and exits; a worker
        # has nothing better to do than wait for Redis to come back.
        "broker_connection_max_retries": None,
        "worker_consumer": f"{__name__}:QuickReconnectConsumer",
        "broker_transport_options": {
            # A job delivered to a worker that dies stays in Redis's unacked set; any live
            # worker puts it back in the queue once it is older than the visibility timeout.
            # kombu looks for such jobs only every interval x throttle (10 s x 10 by default):
            # check every redelivery_check_s instead.
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.redelivery_check_s,
            "unacked_restore_throttle": 1,
            # The lock a worker holds while it restores (so that two do not scan at once) is
            # kombu's for 300 s: a worker killed while holding it stopped every worker from
            # restoring anything for five minutes. Each restore is its own transaction
            # (WATCH), so two at once still put a job back once: hold it one check at most.
            "unacked_mutex_expire": max(settings.redelivery_check_s, 1.0),
            "priority_steps": list(PRIORITY_STEPS),  # higher-priority jobs are popped first
            # Refused before kombu decodes it (TolerantChannel).
            "max_message_bytes": settings.message_byte_limit,
            **settings.sentinel_transport_options(),
        },
    }
    # rediss://: TLS comes from celery_config (broker_use_ssl, redis_backend_use_ssl), as on
    # the producer; kombu turns it on for our transport only because that asks for it.
    return options

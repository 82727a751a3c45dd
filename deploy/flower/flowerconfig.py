# Flower's configuration file (Flower executes it: FLOWER_CONF, or ./flowerconfig.py).
#
# Flower on chatqueue is a read-only view: its Redis user (deploy/redis/acl.sh) may not publish on
# Celery's control channel. But Flower's event capture starts by broadcasting "heartbeat" to every
# worker on that channel (EventReceiver.capture(wakeup=True), hard-coded in Flower 2.2), and a
# refused publish made it retry forever and show nothing. Workers send a heartbeat every 2 s on
# their own, so the wake-up is dropped here; nothing else of Flower changes.
from celery.events.receiver import EventReceiver


def _no_wakeup(self, channel=None):
    """No control broadcast: workers announce themselves with their own heartbeats."""


EventReceiver.wakeup_workers = _no_wakeup

"""qserve's own queue client (no dependency on the official ``eas_prediction``): `QueueClient`
(async, trio), `BlockingQueueClient` (the same client on a background trio loop, for scripts),
`Entry` and the errors they raise. Each lives in its own module; this package is what callers import.
"""

from qserve.client.blocking import BlockingQueueClient, BlockingWatcher
from qserve.client.http import ConnectError, QueueError, QueueTimeout
from qserve.client.queue_client import Entry, QueueClient
from qserve.client.watch import Watcher

__all__ = ["QueueClient", "BlockingQueueClient", "BlockingWatcher", "Watcher", "Entry", "QueueError",
           "ConnectError", "QueueTimeout"]

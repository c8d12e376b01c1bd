"""Queue backends: what stores a queue's entries and dispatches them to consumer groups.

`base` is the seam the server speaks (`Backend`, `QueueBackend`); `local` (the segment log on this
machine, the default) and `redis` (queues in Redis, shared by any number of nodes) implement it.
"""

"""Queue backends: what stores a queue's entries and dispatches them to consumer groups.

`base` is the seam the server speaks (`Backend`, `QueueBackend`); `local` is the first implementation.
"""

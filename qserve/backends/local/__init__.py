"""The local backend: a queue is a segment log on this machine's disk (`qserve.storage`) plus an
in-memory dispatcher, fenced when its directory is damaged or held by another process.
"""

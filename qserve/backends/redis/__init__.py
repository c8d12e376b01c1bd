"""The Redis backend: queues in Redis Streams and hashes, changed by Lua scripts, so that any number
of stateless qserve nodes serve the same queues (`manager.RedisBackend`)."""

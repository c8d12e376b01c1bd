"""The sans-I/O core: queue and consumer-group state machines, routing, the tag index and the
domain errors. Nothing here does I/O or imports trio; the server drives it.
"""

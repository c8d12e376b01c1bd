"""The names the PAI-EAS queue wire shares between server, client and CLI: one definition each.

Header names are given as the attributes advertise them (``X-EAS-QueueService-Uid``); HTTP
compares them case-insensitively, and the server looks them up lower-cased (`lower`), as h11
hands them over.
"""

from __future__ import annotations

__all__ = ["PROTOBUF", "MOUNT", "DEFAULT_GROUP", "USER_HEADER", "GROUP_HEADER", "PRIORITY_HEADER",
           "REQUEST_ID_HEADER", "USER_HEADERS", "GROUP_HEADERS", "HEADER_ATTRIBUTES", "lower"]

PROTOBUF = "application/vnd.google.protobuf"   # the media type of frames, frame lists and attributes
MOUNT = "/api/predict/"                        # a service's queues: MOUNT + SERVICE (input), + "/sink"
DEFAULT_GROUP = "default_group"                # the consumer group of a client that names none

USER_HEADER = "X-EAS-QueueService-Uid"
GROUP_HEADER = "X-EAS-QueueService-Gid"
PRIORITY_HEADER = "X-EAS-QueueService-Priority"
REQUEST_ID_HEADER = "X-Eas-Queueservice-Request-Id"   # a put's answer: the entry's request id

# Identity headers a server accepts: the ones the attributes advertise (Go) and the ones the
# Python and Java SDKs hard-code.
USER_HEADERS = (USER_HEADER, "X-EAS-QueueService-Redis-Uid")
GROUP_HEADERS = (GROUP_HEADER, "X-EAS-QueueService-Redis-Gid")

# The queue attributes that tell a client which headers carry its identity and a put's priority.
HEADER_ATTRIBUTES = {
    "meta.header.user": USER_HEADER,
    "meta.header.group": GROUP_HEADER,
    "meta.header.priority": PRIORITY_HEADER,
    "meta.header.userIdentifyHeader": USER_HEADER,
    "meta.header.groupIdentifyHeader": GROUP_HEADER,
}


def lower(*names: str) -> tuple[str, ...]:
    """The names as h11 delivers them (lower-case), for lookups in a request's headers."""
    return tuple(name.lower() for name in names)

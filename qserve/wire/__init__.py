"""The wire format of the PAI-EAS queue service: protobuf frames, query parameters, Go durations and
the names (media types, mounts, headers) shared by server, client and CLI.
"""

"""`qserve stream`: the commands of `eascmd stream` against a queue, built on `qserve.client`."""

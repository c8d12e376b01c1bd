"""`qserve chaos`: kill -9 crash-recovery testing of a real server under load.

``cli`` is the command and the workload (loaded by ``qserve.cli`` by module name), ``server`` the
server child that is killed and restarted, ``history`` the record of every call and the checker.
"""

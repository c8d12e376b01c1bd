"""`qserve chaos`: kill -9 crash-recovery testing of real servers under load.

``cli`` is the command (loaded by ``qserve.cli`` by module name); ``workload`` the producers,
consumers and admin task, with the run's settings; ``local`` the run on the local segment log (one
server, its log verified after every kill), ``nodes`` the run on Redis (several nodes, and with
``--kill-redis`` the Redis primary, killed); ``server`` the qserve child that is killed and
restarted, ``redisd`` the redis-server and Sentinel children; ``history`` the record of every call
and the checker; ``report`` the progress lines and the summary.
"""

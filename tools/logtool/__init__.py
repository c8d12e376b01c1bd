"""`qserve log`: inspect, verify and repair queue logs on disk.

``cli`` is the command (loaded by ``qserve.cli`` by module name), ``scan`` reads queue directories
through storage's lenient decoder and checks them, ``render`` turns what it read into text or JSON.
"""

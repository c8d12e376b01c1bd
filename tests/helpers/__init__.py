"""What the tests share: servers (in-process over memory streams, real child processes), clients and
peers, fake sources, queue files, the stream-CLI runner, storage damage helpers and the README harness.
Test modules import from here, never from one another (tests/test_test_layout.py checks it)."""

"""Child process of test_crash: append forever, print each index once it is durable."""

import sys

from qserve.storage import LogConfig, QueueLog


def payload(i: int) -> bytes:
    return (b"%d:" % i) * (1 + i % 13)


def main() -> None:
    path, seg_bytes = sys.argv[1], int(sys.argv[2])
    log = QueueLog.open(path, LogConfig(segment_bytes=seg_bytes))
    print("open", log.next_index, flush=True)
    pending = []
    n = 0
    while True:
        e = log.append(payload(log.next_index), {"requestId": f"r{log.next_index}"}, priority=n % 3)
        pending.append(e.index)
        n += 1
        if n % 7 == 0:
            t = log.sync_begin()
            t.run()
            log.sync_end(t)
            print(" ".join(map(str, pending)), flush=True)
            pending = []


if __name__ == "__main__":
    main()

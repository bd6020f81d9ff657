"""Keep N CPU cores busy for T seconds, to run the suite on a loaded machine.

Why: tests that pass on an idle machine can hang or fail when the CPU is shared
(issue 9: the stuck-replica test hung while another build ran). This is the load
for those runs, with no dependency beyond Python: N processes each spin in a
pure-Python loop and stop by themselves after T seconds, even if this parent is
SIGKILLed (each child checks its own deadline). Ctrl-C or SIGTERM to this
process stops them at once.

    python bench/busy.py --processes 2 --seconds 240
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time

MAX_SECONDS = 1800.0
"""A cap, so that a typo cannot load a shared machine for hours."""


def spin(deadline: float) -> None:
    """Burn one core until the monotonic clock reaches `deadline`."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    count = 0
    while time.monotonic() < deadline:
        for _ in range(10_000):  # check the clock only now and then: the load stays near 100 %
            count += 1


def stop(signum: int, frame: object) -> None:
    """SIGTERM: leave through main's `finally`, which stops the children."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="busy processes (default: cores)")
    parser.add_argument("--seconds", type=float, default=60.0, help=f"how long (default 60, at most {MAX_SECONDS:g})")
    args = parser.parse_args()
    if args.processes < 1 or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"need --processes >= 1 and 0 < --seconds <= {MAX_SECONDS:g}")
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + args.seconds
    workers = [multiprocessing.Process(target=spin, args=(deadline,), daemon=True) for _ in range(args.processes)]
    for worker in workers:
        worker.start()
    print(f"busy: {args.processes} process(es) for {args.seconds:g} s (pids {[w.pid for w in workers]})", flush=True)
    try:
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    except KeyboardInterrupt:
        pass
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
    print("busy: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One OpenMP thread team per process on a CPU server: build the model on a thread that ends.

PyTorch's CPU kernels (ATen's parallel loops, oneDNN, Inductor's generated C++) run on GNU
OpenMP (libgomp). libgomp keeps one pool of worker threads for every thread that has started a
parallel region, for as long as that thread lives, and when the threads it manages outnumber the
CPUs it stops spinning between regions: a worker then sleeps after about 100 spins and every
region pays a futex wake-up. A decode step is hundreds of short regions, so this costs a lot.

The server decodes on its scheduler thread. If the main thread has also run parallel work (loading
the weights, packing them, building the engine) its pool outlives that work, and a 2-core machine
then manages 2 + 2 threads for 2 CPUs: throttled. Measured through the scheduler with the compiled
step, one request of 64 tokens, the decode ran at about half the speed of the same loop on the
main thread (benchmarks/results/serve_threads.json). Building on a thread that then ends frees its
pool (libgomp's thread destructor), so the scheduler's team is the only one left.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def on_passing_thread(fn: Callable[[], T], name: str = "loramux-build") -> T:
    """Run `fn` on a new thread, wait for it to end, and return its result (or raise its
    exception): whatever OpenMP pool its torch work created has ended when this returns.

    A daemon thread joined here rather than an executor: Ctrl-C during a long build (training in
    `loramux demo`) interrupts the join and ends the process, where an executor's shutdown would
    wait for the build to finish first."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller, raised there
            box["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]

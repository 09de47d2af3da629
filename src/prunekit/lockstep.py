"""The lockstep: run every calibration chunk through a block in its own thread, one thread at a time.

Why threads: true-sequential pruning wants each group of linears (q/k/v, then o, then gate/up,
then down) pruned as soon as every chunk has reached it, so that later groups observe the outputs
of the already-pruned earlier ones. Done naively that takes one forward pass per group. Here each
chunk's forward runs in its own thread and is suspended at the group's forward pre-hook
(`meet`) until all chunks have arrived; the last one prunes the group and every thread continues
with the pruned weights. One forward pass per block in all, no re-implementation of the block's
forward, and the same order every time (thread 0, 1, ..., n-1 at every meeting point), so the
results are deterministic. Exactly one thread runs at any moment, so the threads never compete
for cores; the price is memory, since every suspended chunk holds its activations.

Only the thread that arrives last at a meeting point runs the action (pruning, and under
distributed calibration the collectives that sum statistics), so each process issues each
collective exactly once.
"""
from __future__ import annotations

import threading


class Lockstep:
    """Run fn(i) for i in range(n), each in its own thread, strictly one thread at a time.

    A thread that calls `meet(point, action)` hands over to the next thread; the last thread to
    arrive runs `action()` (prune the group whose input everybody has now seen) and hands back to
    thread 0, so all threads continue past the point with the pruned weights. The order is fixed
    (0, 1, ..., n-1 at every point), so results are deterministic.
    """

    def __init__(self, n: int):
        self.n = n
        self.turn = 0
        self.cond = threading.Condition()
        self.failure: BaseException | None = None
        self.points: list = []         # meeting points in the order thread 0 reached them
        self.local = threading.local()

    def run(self, fn) -> None:
        threads = [threading.Thread(target=self._worker, args=(i, fn), daemon=True) for i in range(self.n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.failure is not None:
            raise self.failure

    def meet(self, point, action) -> None:
        i, k = self.local.index, self.local.count
        self.local.count += 1
        if i == 0:
            self.points.append(point)
        elif k >= len(self.points) or self.points[k] is not point:
            raise RuntimeError("calibration chunks took different paths through the block "
                               "(data-dependent routing?); use sequential='block'")
        if i == self.n - 1:
            action()
        self._hand_over(i)
        self._wait(i)

    def _worker(self, i: int, fn) -> None:
        self.local.index, self.local.count = i, 0
        try:
            self._wait(i)
            fn(i)
            if self.local.count != len(self.points):
                raise RuntimeError("calibration chunks took different paths through the block; use sequential='block'")
        except Aborted:
            return
        except BaseException as err:
            with self.cond:
                self.failure = self.failure or err
                self.cond.notify_all()
            return
        self._hand_over(i)

    def _wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i or self.failure is not None)
            if self.failure is not None:
                raise Aborted

    def _hand_over(self, i: int) -> None:
        with self.cond:
            self.turn = (i + 1) % self.n
            self.cond.notify_all()


class Aborted(Exception):
    """Another lockstep thread failed; this one stops quietly."""

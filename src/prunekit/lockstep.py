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

Interruption: Ctrl-C (KeyboardInterrupt) and SIGTERM arrive in the main thread, which sits in
`run` while the workers compute. `run` then sets the abort flag, wakes every waiting worker (each
stops with `Aborted` at its meeting point; the one computing stops at its next one, without
running the pruning action) and joins them all before re-raising: no worker outlives the
interrupt, so the process never exits with threads still inside torch (which ended it with
"terminate called without an active exception", SIGABRT).
"""
from __future__ import annotations

import threading
import time

PATIENCE = 5.0      # seconds after an interrupt during which a further one still waits for the workers


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
        self.aborted = False           # set by `abort` (an interrupt in the main thread): every worker stops
        self.entered = 0               # workers that started running, and that left `_worker`
        self.exited = 0
        self.points: list = []         # meeting points in the order thread 0 reached them
        self.local = threading.local()

    def run(self, fn) -> None:
        threads: list[threading.Thread] = []
        try:
            for i in range(self.n):
                threads.append(threading.Thread(target=self._worker, args=(i, fn), daemon=True,
                                                name=f"lockstep-{i}"))
                threads[-1].start()
            with self.cond:
                self.cond.wait_for(lambda: self.exited == self.n)
            for thread in threads:
                thread.join()          # they have left `_worker`; this only reaps them
        except BaseException:          # KeyboardInterrupt, or SIGTERM's exception, in the main thread
            self.abort()
            self._wait_for_workers(len(threads))
            raise
        if self.failure is not None:
            raise self.failure

    def abort(self) -> None:
        """Stop every worker at its next meeting point (those waiting at one: now)."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    def meet(self, point, action) -> None:
        if self.aborted:
            raise Aborted
        i, k = self.local.index, self.local.count
        self.local.count += 1
        if i == 0:
            self.points.append(point)
        elif k >= len(self.points) or self.points[k] is not point:
            raise RuntimeError("calibration chunks took different paths through the block "
                               "(data-dependent routing?); use sequential='block'")
        if i == self.n - 1:
            action()
            if self.aborted:           # interrupted while pruning: the others are leaving already
                raise Aborted
        self._hand_over(i)
        self._wait(i)

    def _worker(self, i: int, fn) -> None:
        self.local.index, self.local.count = i, 0
        with self.cond:
            self.entered += 1
        try:
            self._wait(i)
            fn(i)
            if self.local.count != len(self.points):
                raise RuntimeError("calibration chunks took different paths through the block; use sequential='block'")
            self._hand_over(i)
        except Aborted:
            pass
        except BaseException as err:
            with self.cond:
                self.failure = self.failure or err
        finally:
            with self.cond:
                self.exited += 1
                self.cond.notify_all()

    def _wait_for_workers(self, started: int) -> None:
        """After `abort`: wait until every worker has left `_worker` (the one computing stops at its next
        meeting point, never more than one group away). Counted by the workers themselves, not with
        Thread.join: a join cut short by Ctrl-C marks a thread that is still running as stopped
        (CPython's bpo-45274 fix), after which joining it returns at once. A further Ctrl-C or SIGTERM
        in the first seconds does not cut this short; a later one does (a worker stuck in a collective
        whose peer is gone would otherwise hold the process until the distributed timeout). A worker
        whose start() the interrupt cut short may never run: it is given a second (it would stop at
        once anyway, as the flag is set)."""
        aborted_at = time.monotonic()
        while True:
            try:
                with self.cond:
                    if self.exited >= started or (self.exited == self.entered
                                                  and time.monotonic() > aborted_at + 1.0):
                        return
                    self.cond.wait(0.05)
            except BaseException:      # another interrupt
                if time.monotonic() > aborted_at + PATIENCE:
                    return

    def _wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i or self.failure is not None or self.aborted)
            if self.failure is not None or self.aborted:
                raise Aborted

    def _hand_over(self, i: int) -> None:
        with self.cond:
            self.turn = (i + 1) % self.n
            self.cond.notify_all()


class Aborted(Exception):
    """Another lockstep thread failed, or the main thread was interrupted; this one stops quietly."""

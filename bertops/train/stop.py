"""Graceful stop: SIGTERM or SIGINT ends a training run after the current optimizer step, with a checkpoint.

Schedulers (SLURM, Kubernetes, spot and preemptible machines) send SIGTERM and wait a grace period
before SIGKILL; Ctrl-C sends SIGINT. Dying mid-step would lose every step since the last scheduled
checkpoint (hours, for a long save interval on a CPU), so the first signal only raises a flag. After
each optimizer step the ranks agree on it -- one MAX all-reduce of an int, because saving is
collective and every rank must save the same step -- and when it is up the loop saves and raises
:class:`Interrupted`, which the CLI prints as one line with exit status 128 + the signal number.
``--resume auto`` then goes on from that checkpoint. The same signal a second time acts at once, as
it would without this (for a user who will not wait for the step to end); another one is ignored,
since Ctrl-C under the ``deepspeed`` launcher reaches every rank as SIGINT and then, from the
launcher, as SIGTERM (it waits 30 s before SIGKILL).

Handlers can only be installed from the main thread; elsewhere (a training call in a worker
thread) signals keep their usual effect. Python runs handlers between bytecodes, so a rank blocked in
a C call (a collective whose peer is gone) only notices a second signal when the call returns; under
the launcher such a rank is killed 30 s later (launch.py, and bertops.train.dist.watch_launcher).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Self

from bertops.errors import BertopsError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BertopsError):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is the shell's 128 + signal."""

    label = "stopped"

    def __init__(self, signum: int, step: int, tag: str):
        super().__init__(f"{signal.Signals(signum).name} after step {step}, checkpoint {tag} saved: rerun the same "
                         'command with --resume auto (Python: resume="auto") to go on from it')
        self.signum, self.step, self.tag, self.exit_code = signum, step, tag, 128 + signum

    def __reduce__(self):
        return Interrupted, (self.signum, self.step, self.tag)


class StopFlag:
    """``with StopFlag() as stop:`` ... ``if stop.agreed(device):`` save and stop.

    ``signum``: the first signal this process received (0: none).
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                previous = signal.signal(s, self._handle)
                self._previous[s] = signal.SIG_DFL if previous is None else previous  # None: set from C
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum
            return
        if signum != self.signum:  # Ctrl-C reaches the launcher too, which then sends its ranks SIGTERM: stopping
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()  # the second signal: what it would have done without us, now
        if callable(previous):
            previous(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)  # SIG_DFL again: the process ends

    def agreed(self, device) -> int:
        """The signal any rank received (0: none); every rank returns the same value."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

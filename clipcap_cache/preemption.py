"""Stopping long jobs cleanly when a cluster asks: SIGTERM and SIGUSR1.

Slurm, Kubernetes and spot-instance reclaims end a job with SIGTERM and a grace period (Slurm's
`--signal=USR1@90` sends SIGUSR1 ahead of time, for a job that wants to requeue itself). While
`train` or `extract-features` runs, `StopSignals` catches both: training finishes its optimizer
step, every rank agrees at the next sync point, `checkpoints/last` is saved with the exact
position and the run stops with `Preempted`; extraction finishes the shard it is writing. The
command line then prints one line and exits with `EXIT_CODES[signal]`: 143 for SIGTERM (128 + 15,
the usual status of a terminated job) and 138 for SIGUSR1 (128 + 10), which a job script can
take as "requeue me". `--resume` (train) or the same command (extract-features) continues.
"""

import logging
import signal
import threading

import torch

from clipcap_cache import distributed

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGUSR1: 138}


class Preempted(Exception):
    """A job stopped on a signal after saving where it was; `str(e)` says how to continue."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 143)


class StopSignals:
    """Catch SIGTERM and SIGUSR1 while the block runs, and remember the first one.

    Handlers can only be installed from the main thread; elsewhere (a library caller's thread)
    the signals keep their own handlers and `received` stays 0. The previous handlers are put
    back when the block ends.
    """

    def __init__(self):
        self.received = 0  # the signal number, once one arrived
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _catch(self, signum, frame) -> None:
        if not self.received:
            self.received = signum
            log.warning("received %s: stopping at the next safe point", signal.Signals(signum).name)

    def agreed(self, device: torch.device, world: distributed.World) -> int:
        """The signal that stops every rank, 0 if none: the largest any rank received.

        Under torchrun every rank must call this at the same point (it is a collective).
        """
        if world.size == 1:
            return self.received
        flag = torch.tensor([self.received], device=device)
        return int(distributed.all_reduce_max(flag).item())


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: decoding workers ignore SIGTERM and SIGUSR1.

    A cluster signals every process of a job. The workers keep decoding, so that the main process
    can finish the shard it is encoding, and they end with it.
    """
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

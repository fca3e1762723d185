"""Preemption: SIGUSR1 / SIGTERM ask the run to finish its step, checkpoint and exit with EXIT_REQUEUE, which a
SLURM script turns into `scontrol requeue`; SIGUSR2 asks for a checkpoint now and training goes on."""

from __future__ import annotations

import signal

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later": the job saved its state and wants to be requeued


class SignalFlags:
    def __init__(self):
        self.stop = False
        self.save = False
        self.received: list[str] = []
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGUSR2, self._on_save)

    def _on_stop(self, signum, frame):
        self.stop = True
        self.received.append(signal.Signals(signum).name)

    def _on_save(self, signum, frame):
        self.save = True
        self.received.append(signal.Signals(signum).name)

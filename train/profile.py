"""A window of training steps recorded by torch.profiler (`logging.profile: [first, last]`), for the question a
slow step raises first: is the host or the device the bound? Writes, beside the metrics, `profile.txt` (the step's
wall time, the device's busy time within it, the top ops by host and by device time) and a Chrome trace
(`profile.json`, for chrome://tracing or Perfetto). One rank records (rank 0); the others run unprofiled."""

from __future__ import annotations

import time
from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, window: list[int], run_dir: Path, device: torch.device, rank: int):
        self.window, self.dir, self.device = list(window), Path(run_dir), device
        self.on = bool(window) and rank == 0
        self.prof = None
        self.t0 = 0.0

    def before(self, step: int) -> None:
        """Call before `step` runs: starts recording at the window's first step."""
        if self.on and step == self.window[0] and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize(self.device)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=False)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        """Call after `step` ran: at the window's last step, stops and writes the report."""
        if self.prof is None or step + 1 < self.window[1]:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        steps = self.window[1] - self.window[0]
        events = self.prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0)
        lines = [
            f"steps {self.window[0]}-{self.window[1] - 1}: {1000 * wall / steps:.2f} ms a step (wall, host to host); "
            f"device busy {device_us / 1000 / steps:.2f} ms a step ({device_us / 1e6 / wall:.0%})",
            "",
            events.table(sort_by="self_cpu_time_total", row_limit=25),
        ]
        if self.device.type == "cuda":
            lines += ["", events.table(sort_by="self_cuda_time_total", row_limit=25)]
        (self.dir / "profile.txt").write_text("\n".join(lines) + "\n")
        self.prof.export_chrome_trace(str(self.dir / "profile.json"))
        print(lines[0], f"(written to {self.dir / 'profile.txt'})", flush=True)
        self.prof, self.on = None, False

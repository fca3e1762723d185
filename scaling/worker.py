"""A warm worker: one process that trains a sweep's cells one after another, so that a slot pays for the interpreter
and the imports (torch, dynamo, inductor, the model and data code) once instead of once a cell. On an H200 they were
6.6-9.1 s of a study cell's 10-14 s start-up (docs/study/STUDY.md).

The driver (`scaling.local`, `launcher.warm_workers`) writes one JSON line a cell to the worker's stdin, {"config":
the cell's resolved config file, "log": its log, "env": what the driver sets for it (launch time, port)}, and reads
one line back per cell, {"code": its exit status as train.py's would be}. Each cell starts as a fresh process would
meet it: its own seed, its own process state reset (dynamo's caches, so a cell never runs on another's guards or
falls back to eager at dynamo's recompile limit; inductor's on-disk cache still serves a compiled shape), SIGTERM
and SIGUSR1 back to their defaults until the trainer installs its handlers. A cell that does not finish (a failure,
a stop) ends the worker after its answer, so nothing a failed run left behind (CUDA state, a half-built engine)
reaches another cell: the driver starts a fresh worker for the next. The end of stdin ends the worker.

    python -m scaling.worker --log OUT/workers.log     (started by the driver)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import traceback


def _redirect(fd_to: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd_to, 1)
    os.dup2(fd_to, 2)


def run_cell(task: dict, own_log: int) -> int:
    """Train one cell with fds 1 and 2 on its log; its exit status (0 finished, 75 stopped and saved, 2 a config
    error, 1 otherwise)."""
    from train.config import ConfigError, load_config
    from train.trainer import train

    fd = os.open(task["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _redirect(fd)
    os.close(fd)
    os.environ.update(task.get("env", {}))
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):  # as in a new process, until the trainer's own
        signal.signal(sig, signal.SIG_DFL)
    try:
        cfg = load_config(task["config"])
    except (ConfigError, FileNotFoundError) as e:  # as train.py reports it
        print(f"config error: {e}", file=sys.stderr, flush=True)
        _redirect(own_log)
        return 2
    try:
        train(cfg)  # start-up counted from the driver's FUSION_LAUNCH_TIME, set above (train.trainer.launch_time)
        code = 0
    except SystemExit as e:  # the trainer's stop on a signal (EXIT_REQUEUE), or another exit
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _redirect(own_log)
    reset()
    return code


def reset() -> None:
    """What a cell leaves in the process that the next must not meet: compiled frames and their guards, the GPU
    memory its tensors held in torch's caching allocator."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True, help="where the worker's own output goes between cells")
    args = ap.parse_args(argv)
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # the pipe to the driver; fds 1 and 2 go to the logs
    own_log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _redirect(own_log)
    import train.trainer  # noqa: F401 - the imports a cold cell pays for, paid once here

    try:
        for done, line in enumerate(line for line in sys.stdin if line.strip()):
            os.environ["FUSION_WORKER_CELLS"] = str(done)  # cells this process trained before (summary `warm_start`)
            code = run_cell(json.loads(line), own_log)
            answers.write(json.dumps({"code": code}) + "\n")
            if code != 0:
                return code
        return 0
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # the cells' one process group, kept from cell to cell
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

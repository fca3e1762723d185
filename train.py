"""Train an early-fusion model: `torchrun --nproc_per_node=N train.py --config configs/NAME.yaml [key=value ...]`.

`--config` may be repeated: later files are merged over earlier ones (configs/deepspeed/zero3.yaml on top of a
model config, say); dotted overrides come last. `--check` validates the config and the run directory (created,
writable), prints the run directory and exits: job scripts run it first so that a bad config fails in seconds.

Exit status: 0 when the run finished, 75 (EXIT_REQUEUE) when a signal made it checkpoint and stop early, 2 for
a config error (reported before any work starts), 1 otherwise.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports: start-up is counted from the launcher's FUSION_LAUNCH_TIME, else here

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from train.config import ConfigError, load_config  # noqa: E402
from train.rundir import ensure_run_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, action="append", help="YAML under configs/; repeat to layer files")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    ap.add_argument("--check", action="store_true", help="validate the config and run_dir, print run_dir, exit")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            print(ensure_run_dir(cfg.run_dir))
            return 0
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # once, not once per process
            print(f"config error: {e}", file=sys.stderr, flush=True)
        else:  # torchrun stops every rank when the first one exits: give rank 0 the time to say why
            time.sleep(5)
        return 2
    from train.trainer import train  # heavy imports (DeepSpeed) only once the config is known to be good

    train(cfg, launched_at=STARTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())

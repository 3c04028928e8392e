"""Train an MDLM (or the AR baseline) with DeepSpeed.

    deepspeed --num_gpus 8 pipeline/train.py --config configs/train/small-owt.yaml [key=value ...]
    deepspeed --num_gpus 2 pipeline/train.py --config configs/train/demo.yaml data.path=... (CPU: gloo)

Overrides are dotted keys (`train.max_steps=100 model.preset=mdlm-small`); `--resume auto`
continues from the newest complete checkpoint under <run_dir>/checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_run_config  # noqa: E402
from pipeline.configtools import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an MDLM with DeepSpeed")
    parser.add_argument("--config", help="YAML run config (configs/train/*.yaml)")
    parser.add_argument("--resume", default=None, help="'auto', a checkpoint tag or a step directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    # overrides may sit on both sides of --resume (`... train.max_steps=9 --resume auto eval.seed=1`)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipeline.trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
    except ConfigError as err:  # raised before any training step: precision, shapes, batch sizes
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
    except BaseException as err:  # the MLflow run says so, instead of FINISHED or RUNNING forever
        trainer.end_tracking("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    if trainer.rank == 0:
        print("TRAIN_SUMMARY " + json.dumps(summary))
    stopped = bool(summary.get("stopped_by_signal"))
    trainer.close(status="KILLED" if stopped else None)
    code = cfg.train.exit_code_on_signal if stopped else 0
    if trainer.world > 1:
        # everything is written and the process groups are gone; the interpreter's teardown of
        # third-party C++ state has still, now and then, aborted a rank ("terminate called without
        # an active exception"), which the launcher reports as a failed job: leave without it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

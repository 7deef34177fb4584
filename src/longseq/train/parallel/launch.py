"""`longseq train --nproc N`: start N training processes on this machine through torchrun's own launcher.

The parent writes the fully resolved TrainConfig to a YAML file and runs torch.distributed.run in-process
(`--standalone`: a local rendezvous on a free port) with `python -m longseq train --config that.yaml` as each
worker, so every process trains exactly the configuration the parent validated. Workers see WORLD_SIZE and do not
launch again. Several machines: run torchrun yourself on each (README, "Many GPUs").
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from longseq.config import TrainConfig

LAUNCHED = "WORLD_SIZE"  # set by torchrun in every worker


def launched_by_torchrun() -> bool:
    return LAUNCHED in os.environ


def config_yaml(cfg: TrainConfig) -> str:
    import yaml

    values = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    return yaml.safe_dump(values, sort_keys=False)


def relaunch(cfg: TrainConfig) -> int:
    """Run `cfg` on cfg.nproc local processes; returns the exit code (the first failing worker's)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from longseq.train.checkpoint_files import resolve_checkpoint
    from longseq.train.data import resolve_files

    cfg.data_parallel(cfg.nproc)  # the layout must fit the processes
    resolve_files(cfg.data)  # bad input fails here, once, not in every worker
    if cfg.resume:
        resolve_checkpoint(cfg.resume, cfg.out_dir)
    # torchrun's agent logs each worker failure as a multi-line report; the worker's own one-line error is enough.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)  # its OMP_NUM_THREADS=1 banner
    with tempfile.TemporaryDirectory(prefix="longseq-launch-") as tmp:
        path = Path(tmp) / "train.yaml"
        path.write_text(config_yaml(cfg))
        args = get_args_parser().parse_args(
            ["--standalone", f"--nproc-per-node={cfg.nproc}", "-m", "longseq", "train", "--config", str(path)])
        try:
            run(args)
        except ChildFailedError as e:  # the worker has printed its own one-line error
            _, failure = e.get_first_failure()
            return failure.exitcode if failure.exitcode > 0 else 1
    return 0

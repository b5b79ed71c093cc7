"""The one entry point: `python launch/train.py +config=debug/tiny` or `torchrun ... launch/train.py ...`."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from treadle.train import preemption
from treadle.train.build import build_trainer, process_group, select_device, world_size_from_env
from treadle.train.config import CONFIG_DIR, TrainConfig, register_configs, validate
from treadle.train.config_keys import check_known_keys, check_overrides
from treadle.train.errors import USER_ERROR_EXIT_CODE, UserError
from treadle.train.run_dir import separate_multirun_job

register_configs()


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="train")
def main(raw: DictConfig) -> None:
    try:
        check_known_keys(raw)
        separate_multirun_job(raw)
        cfg: TrainConfig = OmegaConf.to_object(raw)
        dims = validate(cfg, world_size_from_env())
    except (ValueError, OmegaConfBaseException) as err:
        sys.exit(f"config error: {err}")
    try:
        device = select_device(cfg.run.device)
        with preemption.stop_on_signals(), process_group(device, cfg.parallel.backend):
            trainer = build_trainer(cfg, dims, device)
            if trainer.dims.mesh().get_rank() == 0:
                print(OmegaConf.to_yaml(raw, resolve=True), flush=True)
            trainer.fit()
    except preemption.Preempted as stopped:
        print(stopped, file=sys.stderr, flush=True)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)
    except UserError as err:  # a bad file, checkpoint or loss, named in the message (train/errors.py)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:], CONFIG_DIR)  # before Hydra, whose own message suggests `+key`
    except ValueError as err:
        sys.exit(f"config error: {err}")
    main()
    # The run is finished: checkpoints are on disk, loggers closed, the process group destroyed. Interpreter
    # teardown can still abort (std::terminate on a gloo thread that is destroyed while joinable; seen
    # occasionally on CPU runs), which would turn a finished run into exit code -6 and make torchrun or SLURM
    # restart it; so the process ends here, after flushing its streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

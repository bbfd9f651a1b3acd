"""`python -m pipelines.lens`: generate from prompts while recording logit-lens trajectories
of every layer, through a pipeline of stage actors; writes lens.zarr, heatmaps and a summary
(the run itself: pipelines/lens_run.py; Ray, the coordinator and errors: pipelines/session.py).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines import lens_run, session
from pipelines.config import register

register()


@hydra.main(version_base=None, config_path="../conf", config_name="lens")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from actors import storage_fs
    from pipelines.run_dir import run_location

    out_dir = Path(HydraConfig.get().runtime.output_dir)

    def interrupted() -> str:
        store = storage_fs.join(run_location(out_dir, cfg.storage.root), "lens.zarr")
        return (
            f"interrupted: {store} keeps every finished micro-batch and does not read as complete; "
            "run the same command with resume=true to continue"
        )

    with session.refusals(out_dir, cfg.storage.root, interrupted):
        summary = lens_run.run(cfg, out_dir)
        session.save_run_record(cfg, out_dir)
        return summary


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import LensConf, check_overrides

    check_overrides(LensConf, object_storage=True)
    head_watch.exit_on_loss()
    main()

"""`python -m pipelines.trace pairs=<file.jsonl>`: causal tracing on the pipeline stages. For each
clean/corrupted pair, every (site, layer, position) of the prompt has the clean run's activation
restored into the corrupted run, and the target's log-prob (and its logit difference to the foil)
is read at the last position. Every cell is a row of the same batched passes
(actors/tracing.py). Writes trace.zarr (pipelines/trace_store.py), a heatmap per pair and their
mean, trace.html (`distlens view <folder>` writes them again) and trace.json; resume=true
continues an interrupted trace."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines import session, trace_run
from pipelines.config import register

register()
CONF = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base=None, config_path=CONF, config_name="trace")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)

    def interrupted() -> str:
        return (
            f"interrupted: {out_dir / 'trace.zarr'} keeps every finished pair and does not read as complete; "
            f"run the same command with resume=true hydra.run.dir={out_dir} to continue"
        )

    with session.refusals(out_dir, None, interrupted):
        summary = trace_run.run(cfg, out_dir)
        session.save_run_record(cfg, out_dir)
        return summary


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import TraceConf, check_overrides

    check_overrides(TraceConf)
    head_watch.exit_on_loss()
    main()

"""`python -m pipelines.bench [overrides]`: the CPU suite, distlens against plain generation,
the paper's naive baseline and the peers, measured side by side in one invocation on one
machine (`conf/bench.yaml`); with `report_only=true`, table.md and the plots again from the
run's results.json, nothing measured."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines.config import ConfigError, register
from pipelines.errors import exit_with_error

register()


@hydra.main(version_base=None, config_path="../../conf", config_name="bench")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from pipelines.bench.report import report
    from pipelines.bench.suite import run

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.report_only:
        results = out_dir / "results.json"
        if not results.exists():
            exit_with_error(f"report_only=true: {results} does not exist; run the benchmark first")
        rows = json.loads(results.read_text())["rows"]
        report(rows, out_dir)
        print(f"report: {out_dir}/table.md")
        return rows
    try:
        return run(cfg, out_dir)
    except ConfigError as err:
        exit_with_error(str(err))


if __name__ == "__main__":
    from pipelines.config import BenchConf, check_overrides

    check_overrides(BenchConf)
    main()

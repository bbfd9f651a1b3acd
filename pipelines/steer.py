"""`python -m pipelines.steer dataset=<name>|[a,b,..]|all`: CAA steering studies over behaviour
datasets (A/B, yes/no, explicit choices). Per dataset: build label-position vectors on the
train split at candidate layers, pick the layer that steers best on train, sweep coefficients
on the test split; with `steering.transfer=true` also every dataset's vector on every other
dataset's test items. Every dataset's work of a phase is packed into one run (rows with their
own edits), so a study is three runs whatever the number of datasets (the study itself:
pipelines/study.py; Ray, the stage pool and the error wrapper: pipelines/session.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines import session
from pipelines.config import ConfigError, cluster_settings, model_checks, register
from pipelines.study import Study, Task, clear_previous_run, dataset_names, run_study, summary_table, train_test_items

register()


def run(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """The steer job: every check that needs no compute, then the study, its tables and results."""
    from actors.checkpoint import resolve_checkpoint
    from actors.run_spec import check_cluster, check_steering_site
    from pipelines.config import validate_steer
    from pipelines.datasets import dataset_root, resolve_dataset
    from pipelines.run_dir import run_location

    validate_steer(cfg)
    where = run_location(out_dir, cfg.storage.root)  # the stores and run.log; the rest is uploaded there
    root = dataset_root(cfg.data.root)
    names = dataset_names(cfg.dataset, root)
    if cfg.steering.transfer and len(names) < 2:
        raise ConfigError(
            f"steering.transfer=true needs at least 2 datasets (got {names}): use dataset=all or dataset=[a,b,...]"
        )
    paths = {name: resolve_dataset(name, root) for name in names}
    tasks = [Task(Path(name).stem, *train_test_items(paths[name], cfg.data)) for name in names]
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    model_checks(check_steering_site, hf_config, cfg.steering.site, keys={"site": "steering.site"})
    n = hf_config.num_hidden_layers
    bad = [layer for layer in cfg.steering.layers if not 0 <= layer < n]
    if bad:
        raise ConfigError(f"steering.layers contains {bad[0]}, out of range: valid is 0..{n - 1}")
    candidates = list(cfg.steering.layers)
    if cfg.layer is not None and cfg.layer not in candidates:
        fix = (
            f"add it, e.g. steering.layers=[{','.join(map(str, [*candidates, cfg.layer]))}], or choose one of them"
            if 0 <= cfg.layer < n
            else f"choose one of them (the model's layers are 0..{n - 1})"
        )
        raise ConfigError(
            f"layer={cfg.layer} is not among steering.layers={candidates} (vectors are built there only): {fix}"
        )
    model_checks(check_cluster, cluster_settings(cfg.cluster), hf_config)
    tokenizer = checkpoint.tokenizer()
    clear_previous_run(where, overwrite=cfg.overwrite, staging=out_dir if where != out_dir else None)
    session.save_run_record(cfg, out_dir)
    executor = session.executor_for(cfg)
    t0 = time.perf_counter()
    study = Study(cfg, checkpoint, tokenizer, hf_config, executor, out_dir, several=len(tasks) > 1, store_dir=where)
    results, transfer = run_study(study, tasks, cfg, session.cluster_identity(cfg))
    wall = round(time.perf_counter() - t0, 1)
    for result in results:
        result["study_wall_s"] = wall
        print(
            f"{result['dataset']}: layer {result['best_layer']}, mean of slopes {result['mean_of_slopes']:.3f} "
            f"{[round(x, 3) for x in result['mean_of_slopes_ci95']]}, slope of mean {result['slope_of_mean']:.3f}, "
            f"unsteered matching rate {result.get('unsteered_matching_rate', float('nan')):.2f}",
            flush=True,
        )
    table = summary_table(results)
    (out_dir / "summary.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    print(f"{len(results)} dataset(s) in {wall:.0f} s (3 packed runs{', with the transfer matrix' if transfer else ''}); "
          f"results in {where}")  # fmt: skip
    return results


@hydra.main(version_base=None, config_path="../conf", config_name="steer")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with session.refusals(out_dir, cfg.storage.root):
        return run(cfg, out_dir)


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import SteerConf, check_overrides

    check_overrides(SteerConf, object_storage=True)
    head_watch.exit_on_loss()
    main()

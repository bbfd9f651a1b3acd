"""`python -m pipelines.steer dataset=<name>|all`: CAA steering studies over A/B behaviour
datasets. Per dataset: build label-position vectors on the train split at candidate layers,
pick the layer that steers best on train, sweep coefficients on the test split (every
coefficient in the same forward pass), and write results, plots and a summary table."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipelines.config import ConfigError, cluster_settings, exit_with_error, model_checks, register, run_spec

register()
REPO = Path(__file__).resolve().parent.parent
_POOLS: dict = {}  # stage actors kept across datasets and multirun jobs: the model loads once
# What a steer run writes into its directory, or into each dataset's folder of it (dataset=all).
# The logs (run.log, steer.log) are appended to, as the lens driver's are.
RUN_OUTPUTS = (
    "*.zarr", "*.zarr.writes.jsonl", "*.zarr.replaced", "vector_layer*.safetensors", "sweep.csv", "summary.json",
    "propensity_vs_coefficient.png", "steerability_by_layer.png", "summary.md", "results.json",
)  # fmt: skip


def dataset_root(root: str | None) -> Path:
    """`root`, else $DISTLENS_MWE_DIR, else the shared datasets beside this checkout."""
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("DISTLENS_MWE_DIR", REPO.parent / "shared" / "datasets" / "mwe"))


def executor_for(cfg):
    """One executor per cluster shape, reused by every run of this process."""
    from actors.executor import LocalExecutor, RayExecutor

    c = cfg.cluster
    key = (c.executor, c.num_stages, c.cpus_per_stage, c.gpus_per_stage)
    if key not in _POOLS:
        if c.executor == "ray":
            from pipelines.lens import connect_ray

            connect_ray(c)
            _POOLS[key] = RayExecutor(
                c.cpus_per_stage, c.gpus_per_stage, c.placement_timeout_s, max_restarts=c.max_restarts, persistent=True
            )
        else:
            _POOLS[key] = LocalExecutor()  # in-process workers are rebuilt per run (cheap at this size)
    return _POOLS[key]


class Study:
    """Runs the phases of one dataset through one pool of stages."""

    def __init__(self, cfg, checkpoint, tokenizer, hf_config, executor, out_dir: Path):
        from actors.run_spec import CaptureSettings, GenerationSettings

        self.cfg, self.tokenizer, self.executor, self.out_dir = cfg, tokenizer, executor, out_dir
        self.model_name = cfg.model.name
        self.hidden = hf_config.hidden_size
        base = run_spec(
            cfg, str(checkpoint.path), "", "overwrite", capture=CaptureSettings(layers=()),
            generation=GenerationSettings(max_new_tokens=1),
        )  # fmt: skip
        self.base = replace(base, progress=False)

    def _run(self, name: str, prompts, **groups):
        """One run of this study; `groups`: the RunSpec groups that differ from the base."""
        from actors.coordinator import Coordinator
        from actors.store import LensStore

        storage = replace(self.base.storage, path=str(self.out_dir / f"{name}.zarr"))
        spec = replace(self.base, storage=storage, **groups)
        summary = Coordinator(spec, self.executor).run(prompts)
        return summary, LensStore.open(spec.storage.path)

    def activations(self, name: str, prompts, layers: list[int], site: str, reduce: str = "last") -> np.ndarray:
        """Each prompt's activations at (`layers`, `site`): at its last position (`reduce="last"`,
        the label position) or averaged over its positions (`"mean"`): [prompts, layers, d_model]."""
        from actors.run_spec import CaptureSettings

        capture = CaptureSettings(
            layers=tuple(layers), components=(site,), activations="float32", k=1,
            positions="last" if reduce == "last" else "all",
        )  # fmt: skip
        _, store = self._run(name, prompts, capture=capture)
        acts = store.group["activations"]  # [prompt, layer, component, position, d_model]
        if reduce == "last":
            return np.stack([acts[i, :, 0, len(p) - 1] for i, p in enumerate(prompts)])
        return np.stack([acts[i, :, 0, : len(p)].mean(axis=1) for i, p in enumerate(prompts)])

    def build_vectors(self, dataset: str, items, ab) -> dict:
        from pipelines.vectors import SteeringVector

        s = self.cfg.steering
        layers = list(s.layers)
        pos = [ab[i].with_answer(item.matching) for i, item in enumerate(items)]
        neg = [ab[i].with_answer(item.not_matching[0]) for i, item in enumerate(items)]
        acts = self.activations("label_activations", pos + neg, layers, s.site)
        vectors = {}
        for j, layer in enumerate(layers):
            vec = SteeringVector.build(
                acts[: len(items), j], acts[len(items) :, j], aggregator=s.aggregator, normalise=s.normalise,
                model=self.model_name, layer=layer, site=s.site, dataset=dataset,
            )  # fmt: skip
            vec.save(self.out_dir / f"vector_layer{layer}.safetensors")
            vectors[layer] = vec
        return vectors

    def sweep(self, name: str, items, ab, vector, coefficients) -> tuple[np.ndarray, np.ndarray]:
        """(propensity, matching probability), each [items, coefficients]."""
        from actors.run_spec import SteeringSettings
        from actors.stage import SteeringEdit

        letter_ids = {}  # every choice letter of these items -> its token id (the same in every prompt)
        for prompt in ab:
            letter_ids.update(prompt.letters)
        score_letters = sorted(letter_ids)
        edit = SteeringEdit(vector.layer, vector.site, vector.vector, self.cfg.steering.positions, 1.0)
        steering = SteeringSettings(
            edits=(edit,), coefficients=tuple(coefficients), score_ids=tuple(letter_ids[x] for x in score_letters)
        )
        _, store = self._run(name, [p.prefix for p in ab], steering=steering)
        scores = store["scores"][:, 0].reshape(len(items), len(coefficients), len(score_letters))
        col = {letter: i for i, letter in enumerate(score_letters)}
        propensity = np.empty((len(items), len(coefficients)))
        prob = np.empty_like(propensity)
        for i, item in enumerate(items):
            m, o = col[item.matching], col[item.not_matching[0]]
            propensity[i] = scores[i, :, m] - scores[i, :, o]
            choice = scores[i][:, [col[x] for x in item.choices]]
            choice = np.exp(choice - choice.max(axis=1, keepdims=True))
            prob[i] = choice[:, list(item.choices).index(item.matching)] / choice.sum(axis=1)
        return propensity, prob


def cluster_identity(cfg) -> dict | None:
    """Which Ray cluster this job's stages ran on (its GCS address), recorded per result so a
    multirun's report shows every job joined the same one; None in-process."""
    if cfg.cluster.executor != "ray":
        return None
    import ray

    return {"address": ray.get_runtime_context().gcs_address}


def train_test_items(path: Path, data) -> tuple[list, list]:
    """One dataset's items, split and cut to `data.max_train` / `data.max_test`."""
    from pipelines.datasets import load_items, split_items

    items = load_items(path, skip_malformed=data.skip_malformed)
    train, test = split_items(items, data.train_fraction, data.seed)
    return train[: data.max_train], test[: data.max_test]


def run_dataset(study: Study, dataset: str, train: list, test: list, cfg, cluster: dict | None = None) -> dict:
    from pipelines.plots import plot_layers, plot_propensity
    from pipelines.prompts import ab_prompt
    from pipelines.steerability import steerability

    d = cfg.data
    ab_train = [ab_prompt(study.tokenizer, item, cfg.chat_template) for item in train]
    ab_test = [ab_prompt(study.tokenizer, item, cfg.chat_template) for item in test]
    t0 = time.perf_counter()
    vectors = study.build_vectors(dataset, train, ab_train)
    s = cfg.steering
    by_layer = {}
    if cfg.layer is not None:  # among steering.layers: `run` checked
        best = int(cfg.layer)
    else:  # choose on train: the steepest mean per-example slope
        n_sel = min(len(train), s.select_items)
        for layer, vec in vectors.items():
            prop, _ = study.sweep(f"select_layer{layer}", train[:n_sel], ab_train[:n_sel], vec, s.select_coefficients)
            by_layer[layer] = steerability(s.select_coefficients, prop, n_boot=cfg.bootstrap, seed=d.seed)
        best = max(by_layer, key=lambda layer: by_layer[layer]["mean_of_slopes"])
    coefficients = list(s.coefficients)
    prop, prob = study.sweep("test_sweep", test, ab_test, vectors[best], coefficients)
    result = steerability(coefficients, prop, prob, n_boot=cfg.bootstrap, seed=d.seed)
    result.update(
        dataset=dataset, best_layer=best, site=s.site, positions=s.positions, train_items=len(train),
        vector_norm=vectors[best].norm, selection={str(k): v for k, v in by_layer.items()},
        layers=list(s.layers), cluster=cluster,
        wall_s=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    out = study.out_dir
    with open(out / "sweep.csv", "w") as f:
        f.write("item,where,coefficient,propensity,matching_prob\n")
        for i, item in enumerate(test):
            for j, c in enumerate(coefficients):
                f.write(f"{i},{item.where},{c},{prop[i, j]:.6f},{prob[i, j]:.6f}\n")
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    plot_propensity(result, out / "propensity_vs_coefficient.png")
    if by_layer:
        plot_layers(by_layer, best, dataset, out / "steerability_by_layer.png")
    return result


def summary_table(results: list[dict]) -> str:
    head = (
        "| dataset | best layer (train) | mean of slopes [95% CI] | slope of mean [95% CI] | anti-steerable "
        "| unsteered matching rate | items (train/test) |\n|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        ms, sm = r["mean_of_slopes_ci95"], r["slope_of_mean_ci95"]
        rows.append(
            f"| {r['dataset']} | {r['best_layer']} | {r['mean_of_slopes']:.3f} [{ms[0]:.3f}, {ms[1]:.3f}] "
            f"| {r['slope_of_mean']:.3f} [{sm[0]:.3f}, {sm[1]:.3f}] | {r['anti_steerable_fraction']:.2f} "
            f"| {r.get('unsteered_matching_rate', float('nan')):.2f} | {r['train_items']}/{r['items']} |"
        )
    if results:
        mean = np.mean([r["mean_of_slopes"] for r in results])
        slope = np.mean([r["slope_of_mean"] for r in results])
        rows.append(f"| **mean over {len(results)} datasets** | | {mean:.3f} | {slope:.3f} | | | |")
    return head + "\n".join(rows) + "\n"


def previous_run(out_dir: Path) -> list[Path]:
    """What an earlier steer run left in `out_dir` (and its dataset folders): stores, vectors,
    plots, summaries."""
    if not out_dir.is_dir():
        return []
    return sorted({p for pattern in RUN_OUTPUTS for p in [*out_dir.glob(pattern), *out_dir.glob(f"*/{pattern}")]})


def clear_previous_run(out_dir: Path, overwrite: bool) -> None:
    """Refuse a directory that holds a steer run, or with `overwrite` remove that run's outputs
    (so none of them is left beside the new run's)."""
    from actors.store import StoreError, remove_path

    old = previous_run(out_dir)
    if old and not overwrite:
        raise StoreError(
            f"output path {out_dir} already holds a steer run (e.g. {old[0].relative_to(out_dir)}): "
            "pass overwrite=true to replace it, or choose another storage.run"
        )
    for path in old:
        remove_path(path)


def run(cfg: DictConfig, out_dir: Path) -> list[dict]:
    from actors.checkpoint import resolve_checkpoint
    from actors.run_spec import check_cluster, check_steering_site
    from pipelines.config import validate_steer
    from pipelines.datasets import resolve_dataset
    from pipelines.lens import save_run_record

    validate_steer(cfg)
    root = dataset_root(cfg.data.root)
    names = sorted(p.stem for p in root.glob("*.jsonl")) if cfg.dataset == "all" else [cfg.dataset]
    if not names:
        raise ConfigError(f"dataset=all found no .jsonl files in {root}")
    paths = {name: resolve_dataset(name, root) for name in names}
    splits = {name: train_test_items(paths[name], cfg.data) for name in names}
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
    clear_previous_run(out_dir, overwrite=cfg.overwrite)
    save_run_record(cfg, out_dir)
    executor = executor_for(cfg)
    cluster = cluster_identity(cfg)
    results = []
    t0 = time.perf_counter()
    from tqdm import tqdm

    for name in tqdm(names, desc="datasets", disable=not cfg.progress or len(names) == 1, file=sys.stderr):
        sub = out_dir / name if len(names) > 1 else out_dir
        sub.mkdir(parents=True, exist_ok=True)
        study = Study(cfg, checkpoint, tokenizer, hf_config, executor, sub)
        result = run_dataset(study, name, *splits[name], cfg, cluster)
        results.append(result)
        print(
            f"{name}: layer {result['best_layer']}, mean of slopes {result['mean_of_slopes']:.3f} "
            f"{[round(x, 3) for x in result['mean_of_slopes_ci95']]}, slope of mean {result['slope_of_mean']:.3f}, "
            f"unsteered matching rate {result.get('unsteered_matching_rate', float('nan')):.2f} ({result['wall_s']} s)",
            flush=True,
        )
    table = summary_table(results)
    (out_dir / "summary.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    print(f"{len(results)} dataset(s) in {time.perf_counter() - t0:.0f} s; results in {out_dir}")
    return results


@hydra.main(version_base=None, config_path="../conf", config_name="steer")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from actors.store import StoreError
    from pipelines.datasets import DatasetError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return run(cfg, out_dir)
    except (ConfigError, DatasetError, StoreError, ValueError) as err:
        exit_with_error(str(err))


if __name__ == "__main__":
    from pipelines.config import SteerConf, check_overrides

    check_overrides(SteerConf)
    main()

"""Steering studies: a study's datasets (`Task`) and sweeps (`Cell`), the `Study` that runs
them as three packed runs of one pool of stages (label activations, layer selection, test
sweeps with the transfer matrix), and the study's outputs in its run directory. The steer
driver, the demo's contrast vector, `distlens.steering_vector` and the benchmark run these."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from actors import storage_fs
from pipelines.config import ConfigError, run_spec

# What a steer run writes into its directory, or into each dataset's folder of it (dataset=all).
# The logs (run.log, steer.log) are appended to, as the lens driver's are.
RUN_OUTPUTS = (
    "*.zarr", "*.zarr.writes.jsonl", "*.zarr.replaced", "vector_layer*.safetensors", "sweep.csv", "summary.json",
    "propensity_vs_coefficient.png", "steerability_by_layer.png", "summary.md", "results.json", "transfer.csv",
    "transfer.json", "transfer.png", "steering_cost.json", "steering_cost.png",
)  # fmt: skip


@dataclass
class Task:
    """One dataset of a study: its items and prompts, split."""

    name: str
    train: list
    test: list
    train_prompts: list = field(default_factory=list)  # ChoicePrompts
    test_prompts: list = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    """One sweep of a study: `items` (with their `prompts`) steered by `vector` at `layer`, at
    each of `coefficients` (coefficient 0 is the unsteered row)."""

    key: tuple
    items: list
    prompts: list
    vector: object  # a SteeringVector
    coefficients: tuple


class Study:
    """A steering study over one or more datasets, in three runs of one pool of stages whatever
    the number of datasets: label activations, layer selection, test sweeps (with the transfer
    matrix). Each run packs every dataset's rows into shared, length-sorted micro-batches."""

    def __init__(
        self, cfg, checkpoint, tokenizer, hf_config, executor, out_dir: Path, several: bool = False, store_dir=None
    ):
        """`several`: the study has several datasets, each writing into its own folder;
        `store_dir`: where the runs' stores go, when not in `out_dir` (a URL: pipelines/run_dir.py)."""
        from actors.run_spec import CaptureSettings, GenerationSettings

        self.cfg, self.tokenizer, self.executor, self.out_dir = cfg, tokenizer, executor, out_dir
        self.checkpoint, self.hf_config = checkpoint, hf_config
        self.store_dir = out_dir if store_dir is None else store_dir
        self.several = several
        self.model_name = cfg.model.name
        self.hidden = hf_config.hidden_size
        base = run_spec(
            cfg, str(checkpoint.path), "", "overwrite", capture=CaptureSettings(layers=()),
            # One step per row leaves no slot to refill; static micro-batches keep prefix sharing.
            generation=GenerationSettings(max_new_tokens=1, batching="static"),
        )  # fmt: skip
        self.base = replace(base, progress=bool(cfg.progress))
        self.runs: dict[str, dict] = {}  # each run's summary, by name

    def _run(self, name: str, prompts, **groups):
        """One run of this study; `groups`: the RunSpec groups that differ from the base."""
        from actors.store import LensStore
        from pipelines import session

        storage = replace(self.base.storage, path=str(storage_fs.join(self.store_dir, f"{name}.zarr")))
        spec = replace(self.base, storage=storage, **groups)
        print(f"[distlens] {name}: {len(prompts)} prompts", file=sys.stderr, flush=True)
        self.runs[name] = session.run_coordinator(spec, prompts, executor=self.executor)
        return LensStore.open(spec.storage.path)

    def activations(self, name: str, prompts, layers: list[int], site: str, reduce: str = "last") -> np.ndarray:
        """Each prompt's activations at (`layers`, `site`), no lens: at its last position
        (`reduce="last"`, the label position, the only one captured) or averaged over its
        positions (`"mean"`): [prompts, layers, d_model]."""
        from actors.run_spec import CaptureSettings

        order = _by_length(prompts)  # balanced micro-batches; the result is in the given order
        capture = CaptureSettings(
            layers=tuple(layers), components=(site,), activations="float32", k=1,
            positions="last" if reduce == "last" else "all", lens=False,
        )  # fmt: skip
        store = self._run(name, [prompts[i] for i in order], capture=capture)
        acts = store.group["activations"]  # [prompt, layer, component, position, d_model]
        out = np.empty((len(prompts), len(layers), self.hidden), np.float32)
        for row, i in enumerate(order):
            n = len(prompts[i])
            out[i] = acts[row, :, 0, n - 1] if reduce == "last" else acts[row, :, 0, :n].mean(axis=1)
        return out

    def build_vectors(self, tasks: list[Task]) -> dict[str, dict]:
        """Every task's vector at every candidate layer, from one run: {dataset: {layer: vector}}."""
        from pipelines.vectors import SteeringVector

        s = self.cfg.steering
        layers = list(s.layers)
        prompts, spans = [], {}
        for t in tasks:
            pos = [p.with_answer(item.matching) for p, item in zip(t.train_prompts, t.train)]
            neg = [p.with_answer(item.not_matching[0]) for p, item in zip(t.train_prompts, t.train)]
            spans[t.name] = (len(prompts), len(t.train))
            prompts += pos + neg
        acts = self.activations("label_activations", prompts, layers, s.site)
        vectors = {}
        for t in tasks:
            a, n = spans[t.name]
            folder = self.folder(t.name)
            vectors[t.name] = {}
            for j, layer in enumerate(layers):
                vec = SteeringVector.build(
                    acts[a : a + n, j], acts[a + n : a + 2 * n, j], aggregator=s.aggregator, normalise=s.normalise,
                    model=self.model_name, layer=layer, site=s.site, dataset=t.name,
                )  # fmt: skip
                vec.save(folder / f"vector_layer{layer}.safetensors")
                vectors[t.name][layer] = vec
        return vectors

    def costs(self, vectors: dict, coefficients) -> dict:
        """Each vector's steering cost at `coefficients` on neutral prompts (pipelines/steering_cost.py),
        on this study's stages; the prompts and continuations recorded in steering_cost.json."""
        from actors.tracing import InterventionRunner
        from pipelines.prompts import special_ids
        from pipelines.steering_cost import greedy, neutral_prompts, record, steering_costs

        cfg = self.cfg
        eos, pad = special_ids(self.tokenizer, self.hf_config)
        sites = sorted({(v.layer, v.site) for v in vectors.values()})
        runner = InterventionRunner(
            self.checkpoint.path, self.hf_config, cfg.cluster.num_stages, self.executor, sites, (),
            cfg.cluster.micro_batch_size, cfg.model.dtype, cfg.cluster.device, pad, sequence_scores=True,
        )  # fmt: skip
        prompts = neutral_prompts(cfg, self.tokenizer)
        print(f"[distlens] steering cost: {len(prompts)} neutral prompts x {len(vectors)} vectors", file=sys.stderr)
        continuations = greedy(runner, prompts, cfg.steering.cost_tokens, eos)
        record(self.out_dir, prompts, continuations)
        return steering_costs(runner, prompts, continuations, vectors, coefficients, cfg.steering.positions)

    def folder(self, dataset: str) -> Path:
        """Where a dataset's own outputs go: its folder when the study has several."""
        path = self.out_dir / dataset if self.several else self.out_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    def sweep(self, name: str, cells: list[Cell]) -> dict:
        """Every cell in one run: {cell key: (propensity, matching probability)}, each
        [items, coefficients]. Rows are (prompt, edit) pairs, each once: the unsteered row of a
        prompt serves every cell that sweeps it."""
        from actors.run_spec import SteeringSettings
        from actors.steering import RowEdit

        s = self.cfg.steering
        prompt_ids: dict = {}  # id(ChoicePrompt) -> prompt index
        prompts, table, table_index = [], [], {}
        row_index: dict = {}  # (prompt, vector, coefficient) -> row
        rows = []
        for cell in cells:
            v = table_index.setdefault(id(cell.vector), len(table))
            if v == len(table):
                table.append(cell.vector.vector)
            for p in cell.prompts:
                if id(p) not in prompt_ids:
                    prompt_ids[id(p)] = len(prompts)
                    prompts.append(p)
                for c in cell.coefficients:
                    key = (prompt_ids[id(p)], None if c == 0 else v, float(c))
                    if key not in row_index:
                        edits = () if c == 0 else (RowEdit(v, cell.vector.layer, cell.vector.site, s.positions, c),)
                        row_index[key] = len(rows)
                        rows.append((prompt_ids[id(p)], edits))
        # Length-sorted rows, a prompt's rows together: micro-batches of like lengths (little
        # padding) that repeat prompts (shared prefixes).
        order = sorted(range(len(rows)), key=lambda r: (len(prompts[rows[r][0]].prefix), rows[r][0], r))
        position = {r: i for i, r in enumerate(order)}
        label_ids = sorted({i for p in prompts for i in p.label_ids})
        col = {i: j for j, i in enumerate(label_ids)}
        steering = SteeringSettings(
            vectors=np.stack(table), rows=tuple(rows[r] for r in order), score_ids=tuple(label_ids),
            share_prefix=self.base.steering.share_prefix,
        )  # fmt: skip
        store = self._run(name, [p.prefix for p in prompts], steering=steering)
        scores = store["scores"][:, 0]  # [rows, labels]: the answer position
        out = {}
        for cell in cells:
            v = table_index[id(cell.vector)]
            propensity = np.empty((len(cell.items), len(cell.coefficients)))
            prob = np.empty_like(propensity)
            for i, (item, p) in enumerate(zip(cell.items, cell.prompts)):
                for j, c in enumerate(cell.coefficients):
                    row = position[row_index[(prompt_ids[id(p)], None if c == 0 else v, float(c))]]
                    logits = scores[row, [col[x] for x in p.label_ids]]  # the item's own labels
                    propensity[i, j] = logits[item.matching] - logits[item.not_matching[0]]
                    e = np.exp(logits - logits.max())
                    prob[i, j] = e[item.matching] / e.sum()
            out[cell.key] = (propensity, prob)
        return out


def _by_length(prompts) -> list[int]:
    return sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))


def train_test_items(path: Path, data) -> tuple[list, list]:
    """One dataset's items, split and cut to `data.max_train` / `data.max_test`."""
    from pipelines.datasets import load_items, split_items

    items = load_items(path, skip_malformed=data.skip_malformed)
    train, test = split_items(items, data.train_fraction, data.seed)
    return train[: data.max_train], test[: data.max_test]


def run_study(study: Study, tasks: list[Task], cfg, cluster: dict | None = None) -> tuple[list[dict], dict | None]:
    """Vectors, layer selection and test sweeps (and the transfer matrix) of every task, one
    packed run each; writes each dataset's outputs. Returns (per-dataset results, transfer)."""
    from pipelines.plots import plot_layers, plot_propensity
    from pipelines.prompts import choice_prompt
    from pipelines.steerability import steerability
    from pipelines.steering_cost import cost_table, plot_costs

    d, s = cfg.data, cfg.steering
    for t in tasks:
        t.train_prompts = [choice_prompt(study.tokenizer, item, cfg.chat_template) for item in t.train]
        t.test_prompts = [choice_prompt(study.tokenizer, item, cfg.chat_template) for item in t.test]
    vectors = study.build_vectors(tasks)
    by_layer: dict = {t.name: {} for t in tasks}
    if cfg.layer is not None:  # among steering.layers: `run` checked
        best = {t.name: int(cfg.layer) for t in tasks}
    else:  # choose on train: the steepest mean per-example slope
        cells = []
        for t in tasks:
            n_sel = min(len(t.train), s.select_items)
            for layer, vec in vectors[t.name].items():
                cells.append(
                    Cell((t.name, layer), t.train[:n_sel], t.train_prompts[:n_sel], vec, tuple(s.select_coefficients))
                )
        for (name, layer), (prop, _) in study.sweep("select", cells).items():
            by_layer[name][layer] = steerability(s.select_coefficients, prop, n_boot=cfg.bootstrap, seed=d.seed)
        best = {name: max(found, key=lambda layer: found[layer]["mean_of_slopes"]) for name, found in by_layer.items()}
    coefficients = tuple(s.coefficients)
    sources = tasks if s.transfer else None
    cells = [
        Cell((src.name, t.name), t.test, t.test_prompts, vectors[src.name][best[src.name]], coefficients)
        for t in tasks
        for src in (sources or [t])
    ]
    swept = study.sweep("test_sweep", cells)
    chosen = {t.name: vectors[t.name][best[t.name]] for t in tasks}
    costs = study.costs(chosen, coefficients) if s.cost_prompts else {}
    results = []
    for t in tasks:
        prop, prob = swept[(t.name, t.name)]
        vec = vectors[t.name][best[t.name]]
        result = steerability(coefficients, prop, prob, n_boot=cfg.bootstrap, seed=d.seed)
        result.update(
            dataset=t.name, format=t.train[0].format, best_layer=best[t.name], site=s.site, positions=s.positions,
            train_items=len(t.train), vector_norm=vec.norm,
            selection={str(k): v for k, v in by_layer[t.name].items()}, layers=list(s.layers), cluster=cluster,
        )  # fmt: skip
        out = study.folder(t.name)
        with open(out / "sweep.csv", "w") as f:
            f.write("item,where,coefficient,propensity,matching_prob\n")
            for i, item in enumerate(t.test):
                for j, c in enumerate(coefficients):
                    f.write(f"{i},{item.where},{c},{prop[i, j]:.6f},{prob[i, j]:.6f}\n")
        if t.name in costs:
            result["cost"] = costs[t.name]
            result["cost_table"] = cost_table(result)
        (out / "summary.json").write_text(json.dumps(result, indent=2))
        plot_propensity(result, out / "propensity_vs_coefficient.png")
        if by_layer[t.name]:
            plot_layers(by_layer[t.name], best[t.name], t.name, out / "steerability_by_layer.png")
        results.append(result)
    if costs:
        plot_costs(results, study.out_dir / "steering_cost.png")
    transfer = None
    if s.transfer:
        from pipelines.transfer import transfer_matrix

        transfer = transfer_matrix(
            swept, [t.name for t in tasks], best, coefficients, study.out_dir, n_boot=cfg.bootstrap, seed=d.seed,
            costs=costs,
        )  # fmt: skip
    return results, transfer


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


def previous_run(out_dir) -> list:
    """What an earlier steer run left in `out_dir` (and its dataset folders; a local path or a
    URL): stores, vectors, plots, summaries."""
    if not storage_fs.names(out_dir):
        return []
    found = {str(p) for pattern in RUN_OUTPUTS for p in [*storage_fs.glob(out_dir, pattern),
             *storage_fs.glob(out_dir, f"*/{pattern}")]}  # fmt: skip
    return sorted(storage_fs.location(p) for p in found)


def clear_previous_run(out_dir, overwrite: bool, staging: Path | None = None) -> None:
    """Refuse a directory that holds a steer run, or with `overwrite` remove that run's outputs
    (so none of them is left beside the new run's). `staging`: the local staging directory of a
    URL `out_dir`, whose leftovers go too."""
    from actors.store import StoreError

    old = previous_run(out_dir)
    if old and not overwrite:
        name = str(old[0])[len(str(storage_fs.location(out_dir))) + 1 :]
        raise StoreError(
            f"output path {out_dir} already holds a steer run (e.g. {name}): "
            "pass overwrite=true to replace it, or choose another storage.run"
        )
    for path in [*old, *(previous_run(staging) if staging is not None else [])]:
        storage_fs.remove(path)


def dataset_names(dataset, root: Path) -> list[str]:
    """`all` (every .jsonl in `root`), a list of names or paths, or one name or path."""
    if isinstance(dataset, str) and dataset == "all":
        names = sorted(p.stem for p in root.glob("*.jsonl"))
        if not names:
            raise ConfigError(f"dataset=all found no .jsonl files in {root}")
        return names
    names = [dataset] if isinstance(dataset, str) else [str(x) for x in dataset]
    if not names:
        raise ConfigError("dataset=[] is empty: give a dataset name, a list of them, or all")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"dataset lists {twice[0]!r} more than once: give each once")
    return names

"""The lens run: generate from prompts while recording the lens of every layer through the
pipeline's stages, then write the heatmaps and print a summary. `python -m pipelines.lens`,
the demo's steered generation and `distlens.lens` all run this."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipelines import session


def steering_edits(cfg, hf_config) -> tuple[tuple, tuple | None]:
    """(edits, coefficient sweep) from `steer.*`; the vector's metadata must fit the model."""
    from actors.steering import SteeringEdit
    from pipelines.vectors import SteeringVector

    s = cfg.steer
    if s.vector is None:
        return (), None
    vec = SteeringVector.load(s.vector, model=cfg.model.name, hidden_size=hf_config.hidden_size)
    edit = SteeringEdit(vec.layer, vec.site, vec.vector, s.positions, 1.0)
    return (edit,), tuple(s.coefficients) if s.coefficients else (float(s.coefficient),)


def run(cfg: DictConfig, out_dir: Path, score_ids: tuple[int, ...] = ()) -> dict:
    """`out_dir`: Hydra's output directory (pipelines/run_dir.py: the run's directory, or its
    staging directory when storage.root is a URL)."""
    from actors import storage_fs
    from actors.checkpoint import resolve_checkpoint
    from actors.run_spec import GenerationSettings, SteeringSettings, check_cluster, check_run
    from actors.sampling import SamplingSpec
    from actors.stopping import RowEnds
    from actors.store import LensStore
    from pipelines.config import cluster_settings, model_checks, run_spec, validate
    from pipelines.prompts import special_ids
    from pipelines.run_dir import run_location

    validate(cfg)
    where = run_location(out_dir, cfg.storage.root)  # the store, its logs and (uploaded) the rest
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    model_checks(check_cluster, cluster_settings(cfg.cluster), hf_config)  # before the tokenizer loads
    tokenizer = checkpoint.tokenizer()
    given = prompt_rows(cfg, tokenizer)  # the prompts: texts, token ids and (from a corpus) its rows
    eos, pad = special_ids(tokenizer, hf_config)
    steering, coefficients = steering_edits(cfg, hf_config)
    g, c = cfg.generation, cfg.cluster
    attrs = store_attrs(cfg, checkpoint, given)
    existing = "resume" if cfg.resume else "overwrite" if cfg.overwrite else "refuse"
    spec = run_spec(
        cfg, str(checkpoint.path), str(storage_fs.join(where, "lens.zarr")), existing, attrs=attrs,
        generation=GenerationSettings(
            g.max_new_tokens, SamplingSpec(g.temperature, g.top_p, g.seed, eos if g.stop_at_eos else (), pad),
            batching=g.batching, stop=tuple(g.stop),
        ),
        steering=SteeringSettings(edits=steering, coefficients=coefficients, score_ids=tuple(score_ids)),
        corpus=given.rows,
    )  # fmt: skip
    prompts = given.token_ids
    stops = None if given.rows is None else given.rows.stops()  # a corpus row's own max_new_tokens and stop
    ends = RowEnds(spec.generation, stops, len(prompts))
    budgets = (ends[p].budget for p in range(len(prompts)))
    model_checks(check_run, spec, hf_config, prompts, budgets)  # every check against the model, before any compute
    if c.executor == "ray":
        attrs["ray_cluster"] = session.connect(c)  # recorded in the store, its summary and the run log
    summary = session.run_coordinator(spec, prompts, given.texts, stops=stops)  # in this process: pipelines/session.py
    store = LensStore.open(storage_fs.join(where, "lens.zarr"))
    summary["plots"] = write_heatmaps(cfg, store, tokenizer, out_dir, where)  # a URL root's: once uploaded
    print_summary(store, tokenizer, summary, rows=None if cfg.corpus.path is None else cfg.plot.max_prompts)
    return summary


def store_attrs(cfg, checkpoint, given) -> dict:
    """The store's attributes: the model, the whole config, and the fingerprint of what
    determines the numbers (not where they are stored or how the stages are spread)."""
    from actors.run_spec import fingerprint

    results_cfg = OmegaConf.to_container(cfg, resolve=True)
    determining = {k: results_cfg[k] for k in ("model", "capture", "generation", "prompts", "steer")}
    if cfg.corpus.path is not None:  # its identity (path, rows, content hash), never its rows
        determining["corpus"] = given.identity
    # How rows share micro-batches does not change a row's numbers (a run may resume either way).
    determining["generation"] = {k: v for k, v in determining["generation"].items() if k != "batching"}
    if cfg.steer.vector:  # the vector's bytes, not just its path
        import hashlib

        determining["steer_vector_sha256"] = hashlib.sha256(Path(cfg.steer.vector).read_bytes()).hexdigest()
    model = {"name": cfg.model.name, "source": checkpoint.source, "revision": cfg.model.revision,
             "path": str(checkpoint.path)}  # fmt: skip
    return {
        "model": model,
        "config": results_cfg,
        "fingerprint": fingerprint(determining),
        **({"corpus": given.identity} if cfg.corpus.path is not None else {}),
        **session.run_info(),
    }


def write_heatmaps(cfg, store, tokenizer, out_dir: Path, where) -> list[str]:
    """One heatmap per prompt (the first `plot.max_prompts`) and lens, heatmap_prompt0.png
    (logit), heatmap_prompt0_tuned.png, ..., replacing a replaced run's; their final places."""
    from actors import storage_fs
    from pipelines.heatmap import write_heatmap

    for old in {*out_dir.glob("heatmap_prompt*.png"), *storage_fs.glob(where, "heatmap_prompt*.png")}:
        storage_fs.remove(old)  # a replaced run's, maybe of more prompts
    plots = [
        write_heatmap(
            store,
            i,
            tokenizer,
            out_dir / f"heatmap_prompt{i}{'' if lens == 'logit' else '_' + lens}.png",
            cfg.plot.max_positions,
            lens=lens,
        )  # fmt: skip
        for i in range(min(cfg.plot.max_prompts, store.group["tokens"].shape[0]))
        for lens in store.lenses
    ]
    return [str(storage_fs.join(where, p.name)) for p in plots]


def prompt_rows(cfg, tokenizer):
    """The run's prompts (texts and token ids) from `prompts`, or streamed from `corpus.path`
    (pipelines/corpus.py: then `.rows` and `.identity` say which corpus rows they are)."""
    from pipelines.corpus import CorpusPrompts, read_corpus
    from pipelines.prompts import encode_prompt

    def encode(text: str) -> list[int]:
        return encode_prompt(tokenizer, text, cfg.generation.chat_template)

    if cfg.corpus.path is not None:
        return read_corpus(cfg.corpus, encode)
    texts = list(cfg.prompts)
    return CorpusPrompts(texts, [encode(t) for t in texts], rows=None, identity={})


def print_summary(store, tokenizer, summary: dict, last: int = 4, rows: int | None = None) -> None:
    """On stdout: each row's generation (the first `rows` rows; None: every row) and the lens's
    top-1 at its last `last` positions, at about ten evenly spaced layers and the last; then the
    run's throughput, memory, store and heatmaps."""
    from actors.store import row_blocks
    from pipelines.heatmap import token_label

    out = sys.stdout
    n_prompts = store.group["tokens"].shape[0]
    steered = bool(store.attrs["config"]["steer"]["vector"])
    shown = n_prompts if rows is None else min(rows, n_prompts)
    coefficients = store.group["coefficient"][:shown]
    for i in range(shown):
        label = f", steering coefficient {coefficients[i]:g}" if steered else ""
        print(f"\n=== row {i}{label}: {str(store.group['prompt_text'][i])!r}", file=out)
        print(f"generated: {str(store.group['generated_text'][i])!r}", file=out)
        ids, probs = store.top1_table(i)
        toks = store.tokens(i)
        n = ids.shape[1]
        cols = list(range(max(0, n - last), n))
        header = "layer | " + " | ".join(f"after {token_label(tokenizer, toks[j])!r}" for j in cols)
        print(header, file=out)
        step = max(1, len(store.layers) // 10)
        for li in list(range(0, len(store.layers), step)) + (
            [len(store.layers) - 1] if (len(store.layers) - 1) % step else []
        ):
            cells = " | ".join(f"{token_label(tokenizer, ids[li, j])!r} {probs[li, j]:.2f}" for j in cols)
            print(f"{store.layers[li]:>5} | {cells}", file=out)
    if shown < n_prompts:
        print(f"\n... and {n_prompts - shown} more rows in the store", file=out)
    mask = store.group["lens_mask"]
    captured = sum(int(mask[block].sum()) for block in row_blocks(mask))  # a shard at a time: any corpus size
    print(
        f"\n{summary['generated_tokens']} tokens generated, {summary['positions']} positions run "
        f"({captured} with a lens) in "
        f"{summary['generate_s']} s ({summary['tokens_per_s']} tokens/s, {summary['positions_per_s']} positions/s; "
        f"stages {summary['stages']})",
        file=out,
    )
    peaks = {info["pid"]: info["peak_rss_bytes"] / 2**20 for info in summary["stage_info"]}
    if len(peaks) < len(summary["stage_info"]):  # stages in one process (cluster=inprocess)
        print(f"peak RSS of the process running every stage: {max(peaks.values()):.0f} MiB", file=out)
    else:
        print(f"peak RSS per stage process: {', '.join(f'{p:.0f} MiB' for p in peaks.values())}", file=out)
    print(f"store:    {summary['store']}", file=out)
    if summary.get("storage"):  # actors/store.py LensStore.size
        size = summary["storage"]
        print(f"stored:   {size['bytes']} bytes in {size['objects']} objects, {size['bytes_per_cell']} bytes per "
              "(row, layer, position) cell", file=out)  # fmt: skip
    for p in summary["plots"]:
        print(f"heatmap:  {p}", file=out)

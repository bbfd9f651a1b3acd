"""The notebook API: run a lens or a steering sweep and get an `xarray.Dataset` back, open a
store the same way, build a steering vector from text pairs, write the viewer page.

Every function composes the same Hydra config as the command line (`conf/lens.yaml`,
`conf/steer.yaml`) with the given overrides, so a notebook run and `python -m pipelines.lens`
with the same overrides write the same store, refused, resumed or overwritten by the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"


def _compose(name: str, overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipelines.config import register

    register()  # the config schemas, as each driver registers them
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(name, overrides=list(overrides))


def _settings(model, cluster, overrides) -> list[str]:
    out = [f"cluster={cluster}"] if cluster else []
    if model:
        out.append(f"model.name={model}")
    return out + list(overrides)


def _list(values) -> str:
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


def lens(
    prompts: Sequence[str] | None = None,
    out: str | Path = "distlens_runs/lens",
    *,
    corpus: str | Path | None = None,
    model: str | None = None,
    cluster: str | None = None,
    max_new_tokens: int | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = False,
):
    """Generate from `prompts` recording the lens of every layer; the store is written to
    `out/lens.zarr` (with its heatmaps) and returned opened as an xarray Dataset.

    `corpus`: the prompts from a corpus instead (`corpus.path`: a JSONL, Parquet, CSV or text
    file, a saved `datasets` directory or hf:<name>; `corpus.field`, `corpus.skip`, `corpus.limit`
    ... as overrides); giving both is refused.
    `model`: a built-in name, a local directory or a Hugging Face id (default: SmolLM2);
    `cluster`: a `conf/cluster` choice (`local_ray` by default, `inprocess` for no Ray);
    `overrides`: any `python -m pipelines.lens` override, e.g. `"capture.layers=[0,10,20]"`."""
    from pipelines.lens_run import run

    extra = [f"generation.max_new_tokens={max_new_tokens}"] if max_new_tokens is not None else []
    if corpus is not None:
        extra.append(f"corpus.path={corpus}")
    cfg = _compose("lens", [*_settings(model, cluster, overrides), *extra, f"overwrite={overwrite}",
                            f"progress={progress}"])  # fmt: skip
    cfg.prompts = [] if prompts is None else [str(p) for p in prompts]  # with a corpus too: both are refused
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run(cfg, out)
    _save_config(cfg, out)
    return open(out / "lens.zarr")


def sweep(
    prompts: Sequence[str],
    vector,
    coefficients: Sequence[float],
    out: str | Path = "distlens_runs/sweep",
    *,
    positions: str | int = "all",
    **kwargs,
):
    """Steered generation with `vector` (a `SteeringVector` or its .safetensors file) at each
    coefficient: one row per (prompt, coefficient), prompt-major, in one run. The Dataset's
    `coefficient` and `source` say which row is which. Other arguments as `lens`."""
    from pipelines.vectors import SteeringVector

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(vector, SteeringVector):
        vector = vector.save(out / "vector.safetensors")
    overrides = [*kwargs.pop("overrides", ()), f"steer.vector={Path(vector).resolve()}",
                 f"steer.coefficients={_list(coefficients)}", f"steer.positions={positions}"]  # fmt: skip
    return lens(prompts, out, overrides=overrides, **kwargs)


def steering_vector(
    positive: Sequence[str],
    negative: Sequence[str],
    layer: int,
    *,
    site: str = "resid_pre",
    aggregator: str = "mean_diff",
    normalise: bool = False,
    chat_template: bool = False,
    model: str | None = None,
    cluster: str | None = None,
    out: str | Path = "distlens_runs/vector",
    overrides: Sequence[str] = (),
):
    """A steering vector at (`layer`, `site`) from paired texts: the activations at each text's
    last token, aggregated over the pairs (`mean_diff`: CAA's mean difference, or `pca`).
    Saved to `out/vector_layer<L>.safetensors`; returns the `SteeringVector`."""
    from actors.checkpoint import resolve_checkpoint
    from pipelines.prompts import encode_prompt
    from pipelines.session import executor_for
    from pipelines.study import Study
    from pipelines.vectors import SteeringVector

    if len(positive) != len(negative) or not positive:
        raise ValueError(f"steering_vector: {len(positive)} positive and {len(negative)} negative texts; give pairs")
    cfg = _compose("steer", [*_settings(model, cluster, overrides), f"steering.site={site}", "progress=false"])
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    if not 0 <= layer < hf_config.num_hidden_layers:
        raise ValueError(
            f"steering_vector: layer={layer} is out of range: valid is 0..{hf_config.num_hidden_layers - 1}"
        )
    tokenizer = checkpoint.tokenizer()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(cfg, checkpoint, tokenizer, hf_config, executor_for(cfg), out)
    texts = [*positive, *negative]
    acts = study.activations("vector_activations", [encode_prompt(tokenizer, t, chat_template) for t in texts],
                             [layer], site)[:, 0]  # fmt: skip
    n = len(positive)
    vec = SteeringVector.build(acts[:n], acts[n:], aggregator=aggregator, normalise=normalise, model=cfg.model.name,
                               layer=layer, site=site, dataset="pairs")  # fmt: skip
    vec.save(out / f"vector_layer{layer}.safetensors")
    return vec


def open(path: str | Path):  # noqa: A001  (distlens.open, like xarray.open_dataset)
    """A lens store (a lens.zarr, or a run folder holding one) as an xarray Dataset, its
    dimensions named, the token strings as the `token` coordinate [prompt, position] and the
    store's attributes as `ds.attrs`. Lazy: nothing of the rows is read until indexed (the
    token strings too are decoded only for the ids of the rows asked for)."""
    import xarray as xr

    from actors.store import LensStore
    from pipelines.view import load_tokenizer

    path = Path(path)
    if (path / "lens.zarr").is_dir():
        path = path / "lens.zarr"
    store = LensStore.open(path)  # checks it is a store of this schema
    ds = xr.open_zarr(str(path), consolidated=False, chunks=None)
    strings = _token_strings(store.group["tokens"], load_tokenizer(store.attrs))
    ds = ds.assign_coords(token=(("prompt", "position"), strings))
    ds.encoding["source"] = str(path)
    return ds


def _token_strings(tokens, tokenizer):
    """The token strings of a store's `tokens` [prompt, position] as a lazily indexed array:
    each read decodes the ids of the part asked for ("" past a row's end, `#id` without a
    tokenizer)."""
    import numpy as np
    from xarray.backends import BackendArray
    from xarray.core import indexing

    class TokenStrings(BackendArray):
        shape, dtype = tuple(tokens.shape), np.dtype(object)

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

        def _read(self, key):
            ids = np.asarray(tokens[key])
            unique, where = np.unique(ids, return_inverse=True)
            words = ["" if t < 0 else tokenizer.decode([int(t)]) if tokenizer is not None else f"#{t}" for t in unique]
            return np.asarray(words, dtype=object)[where].reshape(ids.shape)

    return indexing.LazilyIndexedArray(TokenStrings())


def top1(ds, prompt: int = 0, component: str = "resid_post", lens: str = "logit"):
    """The lens's top-1 token strings of one row as a [layer, position] DataArray (positions
    with a lens only), labelled by layer number and the token at each position."""
    import numpy as np
    import xarray as xr

    from actors.vocabulary import lens_array
    from pipelines.view import load_tokenizer

    tokenizer = load_tokenizer(ds.attrs)
    n = int(ds["lengths"][prompt]) - 1
    ids = ds[lens_array("topk_ids", lens)].sel(component=component)[prompt, :, :n, 0].values
    words = np.vectorize(lambda t: tokenizer.decode([int(t)]) if t >= 0 else "", otypes=[object])(ids)
    return xr.DataArray(
        words.astype(str), dims=("layer", "position"),
        coords={"layer": ds["layer"].values, "position": np.arange(n), "token": ("position", ds["token"][prompt, :n].values)},
    )  # fmt: skip


def trace(
    pairs,
    out: str | Path = "distlens_runs/trace",
    *,
    sites: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    model: str | None = None,
    cluster: str | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
):
    """A causal trace (`python -m pipelines.trace`): `pairs` a JSONL path or a list of
    `{"clean", "corrupt", "target", "foil"?}`; every (site, layer, position) of each corrupted
    prompt restored from its clean run. Writes `out/trace.zarr` (with heatmaps and trace.html)
    and returns it opened as an xarray Dataset (`recovery`, `target_logprob`, ... by pair, site,
    layer, position)."""
    import xarray as xr

    from pipelines.trace_run import run

    settings = [
        f"trace.sites=[{','.join(sites)}]",
        f"resume={resume}",
        f"overwrite={overwrite}",
        f"progress={progress}",
    ]
    if layers is not None:
        settings.append(f"trace.layers=[{','.join(str(int(x)) for x in layers)}]")
    cfg = _compose("trace", [*_settings(model, cluster, overrides), *settings])
    cfg.pairs = str(pairs) if isinstance(pairs, str | Path) else [dict(p) for p in pairs]
    out = Path(out)
    run(cfg, out)
    _save_config(cfg, out)
    return xr.open_zarr(out / "trace.zarr", consolidated=False)


def view(target, out: str | Path | None = None) -> Path:
    """Write the viewer page (`distlens view`) for a Dataset from this API, a store path or a
    steering study folder; returns the page's path."""
    from pipelines.view import write_page

    path = target.encoding.get("source") if hasattr(target, "encoding") else target
    if path is None:
        raise ValueError("view: this Dataset was not opened by distlens.open or distlens.lens; pass the store's path")
    return write_page(path, out)


def _save_config(cfg, out: Path) -> None:
    from omegaconf import OmegaConf

    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml", resolve=True)

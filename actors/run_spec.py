"""What a run is asked to do (`RunSpec`), and every check of it against the model, in one place
(`check_run`), before any compute. A bad value raises `SettingError`, which names the setting;
the drivers print it with the setting's config key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace

import numpy as np

from actors.adapters import adapter_for
from actors.packed_rows import PackedRows, PackedValues
from actors.sampling import SamplingSpec
from actors.vocabulary import COMPONENTS, LENSES, PLACEMENTS, STEERING_SITES

EXECUTORS = ("local", "ray")
EXISTING = ("refuse", "resume", "overwrite")
BATCHING = ("continuous", "static")


class SettingError(ValueError):
    """A run setting that cannot work: `field` names it as a path into `RunSpec`
    ("capture.layers"), `text` says the value and what is valid; `str(err)` is `field + text`."""

    def __init__(self, field: str, text: str):
        super().__init__(f"{field}{text}")
        self.field, self.text = field, text


@dataclass(frozen=True)
class ModelSettings:
    path: str  # a local checkpoint directory (config.json + safetensors)
    dtype: str = "float32"
    name: str = ""  # the model's name (a tuned lens file must have been trained on it)


@dataclass(frozen=True)
class StorageSettings:
    path: str  # the run's lens.zarr
    existing: str = "refuse"  # a store already at `path`: refuse | resume | overwrite
    shard_batches: int | None = None  # micro-batches per stored shard; None: actors.store.sharded picks


@dataclass(frozen=True)
class ClusterSettings:
    executor: str = "local"  # local: every stage in this process; ray: stage actors
    num_stages: int = 2
    tp_size: int = 1
    device: str = "cpu"
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = 0.0
    micro_batch_size: int = 4
    micro_batches_in_flight: int = 2
    placement_timeout_s: float = 60.0  # how long to wait for the cluster to place the stages
    max_restarts: int = 3  # stage-actor failures a run survives (Ray restarts the actor; tp_size 1)
    restart_timeout_s: float = 300.0  # how long to wait for a restarted stage to answer
    placement: str = "PACK"  # Ray placement-group strategy: actors.vocabulary.PLACEMENTS


@dataclass(frozen=True)
class CaptureSettings:
    layers: tuple[int, ...] | None = None  # None = every layer; () = none; negative counts from the end
    components: tuple[str, ...] = ("resid_post",)
    positions: str | tuple[int, ...] = "all"
    k: int = 10
    window: int = 64  # positions buffered on a stage before one batched lens pass
    activations: str | None = None  # also store raw activations in this dtype
    lens: bool = True  # False: store activations only, no lens (what a steering vector needs)
    kl_to_final: bool = True  # KL(final || lens) per captured cell (the final states flow back to every stage)
    lenses: tuple[str, ...] = ("logit",)  # "tuned" adds the tuned lens's arrays (resid_post)
    tuned_lens: str | None = None  # the translators file (python -m pipelines.tune) the tuned lens reads
    jacobian_lens: str | None = None  # the jacobian_lens.safetensors file the Jacobian lens reads


def captured_layers(cap: CaptureSettings, n_layers: int) -> tuple[int, ...]:
    """The global indices `cap.layers` names (None: every layer; negative counts from the end), sorted."""
    return tuple(range(n_layers)) if cap.layers is None else tuple(sorted(i % n_layers for i in cap.layers))


def stage_capture(cap: CaptureSettings, layers: tuple[int, ...]) -> CaptureSettings:
    """`cap` as the stages read it: `layers` resolved to global indices (sorted, none negative,
    never None), `components` a tuple, and `tuned_lens` (`jacobian_lens`) kept only when the tuned
    (Jacobian) lens is recorded."""
    return replace(
        cap,
        layers=layers,
        components=tuple(cap.components),
        tuned_lens=cap.tuned_lens if "tuned" in cap.lenses else None,
        jacobian_lens=cap.jacobian_lens if "jacobian" in cap.lenses else None,
    )


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 16
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    # continuous: a finished row leaves its micro-batch at once and a waiting row takes its slot
    # (actors/continuous.py); static: every micro-batch runs until its longest row ends (prefix
    # sharing applies only here). The drivers default to continuous (pipelines/config.py).
    batching: str = "static"
    stop: tuple[str, ...] = ()  # every row ends once its generated text contains one of these


@dataclass(frozen=True)
class RowStop:
    """One prompt's own stop conditions (a corpus row's `max_new_tokens` and `stop` fields);
    None keeps the run's (`GenerationSettings.max_new_tokens`, `.stop`)."""

    max_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SteeringSettings:
    """The run's rows and their edits (see actors.steering.row_layout): either the sweep
    shorthand (`edits` on every row, times each of `coefficients`) or explicit `rows` over the
    vector table `vectors`."""

    edits: tuple = ()  # SteeringEdits every row carries; each stage applies those on its own layers
    coefficients: tuple[float, ...] | None = None  # a sweep: every prompt runs once per coefficient
    score_ids: tuple[int, ...] = ()  # record these tokens' logits at every generated step
    share_prefix: bool = True  # rows of one prompt compute what their edits cannot reach once
    vectors: np.ndarray | None = None  # [n_vectors, d_model] the table `rows` index
    rows: tuple | None = None  # ((prompt index, (RowEdit, ...)), ...): one entry per row


@dataclass(frozen=True)
class CorpusRows:
    """The prompts' rows of a corpus (pipelines/corpus.py), by prompt (as given, before a sweep
    repeats them): which corpus row each is, and the limits a row carries itself (generation
    reads them as `stops()`; `check_run` bounds each row by its own). Packed in temporary files
    (actors/packed_rows.py), read a prompt at a time: the driver holds none of them."""

    path: str  # the corpus, for messages ("<path> row <index>")
    field: str  # the prompt's field
    index: PackedValues  # [prompts] int64: each prompt's corpus index (stored as `corpus_index`)
    max_new_tokens: PackedValues  # [prompts] int32: the row's own, 0 = generation.max_new_tokens
    stop: PackedRows  # [prompts] texts: the row's own stop strings as a JSON list, "" = none of its own

    def stops(self) -> CorpusStops:
        """Each prompt's own stop conditions; None where a row carries none (the run's apply)."""
        return CorpusStops(self)


class CorpusStops:
    """[prompt] a corpus row's own `RowStop`, or None: read from `CorpusRows` when asked."""

    def __init__(self, rows: CorpusRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows.max_new_tokens)

    def __getitem__(self, prompt: int) -> RowStop | None:
        budget, stop = self.rows.max_new_tokens[prompt], self.rows.stop[prompt]
        if not budget and not stop:
            return None
        return RowStop(budget or None, tuple(json.loads(stop)) if stop else None)


@dataclass(frozen=True)
class RunSpec:
    """One run's settings, grouped as the config groups are."""

    model: ModelSettings
    storage: StorageSettings
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    steering: SteeringSettings = field(default_factory=SteeringSettings)
    attrs: dict = field(default_factory=dict)  # recorded in the store (config, model id, versions)
    progress: bool = True
    tune: object = None  # a tuned_lens.TuneSpec: the stages train tuned-lens translators on the lens windows
    corpus: CorpusRows | None = None  # the prompts came from a corpus: their rows


def fingerprint(config: dict) -> str:
    """A stable hash of what determines a run's results (used to refuse mixing runs)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_cluster(c: ClusterSettings, config) -> None:
    """How the run is spread, against the model: stages, tensor-parallel ranks, executor."""
    adapter = adapter_for(config.model_type)  # an unsupported family: one line naming the supported
    n = config.num_hidden_layers
    if c.executor not in EXECUTORS:
        raise SettingError("cluster.executor", f"={c.executor!r} is not valid: choose one of {list(EXECUTORS)}")
    if not 1 <= c.num_stages <= n:
        raise SettingError(
            "cluster.num_stages", f"={c.num_stages} is out of range: valid is 1..{n} (the model's layer count)"
        )
    if c.placement not in PLACEMENTS:
        raise SettingError("cluster.placement", f"={c.placement!r} is not valid: choose one of {list(PLACEMENTS)}")
    for name in ("placement_timeout_s", "restart_timeout_s"):
        if not getattr(c, name) > 0:
            raise SettingError(f"cluster.{name}", f"={getattr(c, name)!r} is out of range: must be > 0 (seconds)")
    if c.tp_size < 1:
        raise SettingError("cluster.tp_size", f"={c.tp_size} is out of range: must be >= 1")
    if c.tp_size > 1 and c.executor != "ray":
        raise SettingError("cluster.tp_size", f"={c.tp_size} needs executor ray (one process per rank)")
    if c.tp_size > 1 and not adapter.tensor_parallel:
        raise SettingError(
            "cluster.tp_size",
            f"={c.tp_size}: tensor parallelism is not available for model family {config.model_type!r} "
            "(DeepSpeed AutoTP does not shard it exactly); use tp_size=1 and more stages",
        )
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    if heads % c.tp_size or kv % c.tp_size:
        raise SettingError(
            "cluster.tp_size", f"={c.tp_size} does not divide the model's {heads} attention / {kv} key-value heads"
        )


def check_steering_site(config, site: str, field: str = "steering.site") -> None:
    """A steering site the model's family has."""
    have = adapter_for(config.model_type).sites_for(config)
    if site not in have or site not in STEERING_SITES:
        sites = [s for s in STEERING_SITES if s in have]
        text = f" site {site!r}" if field in ("steering.edits", "steering.rows") else f"={site!r}"
        raise SettingError(field, f"{text} does not exist in model family {config.model_type!r}: it has {sites}")


def check_run(spec: RunSpec, config, prompts: list[list[int]], budgets=None, sources=None) -> None:
    """Every check of a run against the model's `config` (a Hugging Face config) and its
    prompts (token ids, one row each); `budgets`: each row's max_new_tokens (default: the run's);
    `sources(row)`: the prompt a row runs, when a sweep repeats them (a corpus row is named by it).
    Raises `SettingError` naming the first bad setting."""
    check_cluster(spec.cluster, config)
    check_batching(spec)
    adapter = adapter_for(config.model_type)
    n = config.num_hidden_layers
    if spec.storage.existing not in EXISTING:
        raise SettingError(
            "storage.existing", f"={spec.storage.existing!r} is not valid: choose one of {list(EXISTING)}"
        )
    if spec.capture.layers is not None:  # () captures nothing (a sweep that only scores tokens)
        for i in spec.capture.layers:
            if not isinstance(i, int) or not -n <= i < n:
                raise SettingError(
                    "capture.layers", f" contains {i!r}, out of range: valid is 0..{n - 1} (or -{n}..-1)"
                )
        _once("capture.layers", [i % n for i in spec.capture.layers])
    if not spec.capture.lens and not spec.capture.activations:
        raise SettingError("capture.lens", "=false with no capture.activations captures nothing: set one of them")
    if not spec.capture.components:
        raise SettingError("capture.components", f"=[] is empty: choose from {list(COMPONENTS)}")
    have = adapter.sites_for(config)
    for comp in spec.capture.components:
        if comp not in COMPONENTS:
            raise SettingError("capture.components", f"={comp!r} is not valid: choose one of {list(COMPONENTS)}")
        if comp not in have:
            raise SettingError(
                "capture.components",
                f"={comp!r} does not exist in model family {config.model_type!r}: it has {list(have)}",
            )
    _once("capture.components", list(spec.capture.components))
    check_lenses(spec, config)
    if spec.tune is not None:
        if spec.cluster.tp_size != 1:
            raise SettingError("cluster.tp_size", f"={spec.cluster.tp_size}: tuned-lens training runs tp_size=1 stages")
        if "resid_post" not in spec.capture.components or not spec.capture.kl_to_final:
            raise SettingError("capture.components", " must hold resid_post (with kl_to_final) to train translators")
    steering = spec.steering
    wheres = {(e.layer, e.site) for e in steering.edits}
    wheres |= {(e.layer, e.site) for _, edits in steering.rows or () for e in edits}
    field_name = "steering.rows" if steering.rows is not None else "steering.edits"
    for layer, site in sorted(wheres):
        check_steering_site(config, site, field=field_name)
        if not 0 <= layer < n:
            raise SettingError(field_name, f" layer {layer} is out of range: valid is 0..{n - 1}")
    if steering.vectors is not None and np.shape(steering.vectors)[-1] != config.hidden_size:
        raise SettingError(
            "steering.vectors",
            f" have shape {tuple(np.shape(steering.vectors))}; this model's hidden size is {config.hidden_size}",
        )
    if not 1 <= spec.capture.k <= config.vocab_size:
        raise SettingError(
            "capture.k", f"={spec.capture.k} is out of range: valid is 1..{config.vocab_size} (the vocabulary)"
        )
    if not prompts:
        raise SettingError("prompts", "=[] is empty: give at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise SettingError("prompts", " holds a prompt with no tokens: every prompt needs at least one")
    longest = _check_rows(spec, config, prompts, budgets, sources)  # the store's positions per row
    if not isinstance(spec.capture.positions, str):
        beyond = [p for p in spec.capture.positions if p >= longest - 1]
        if beyond:
            raise SettingError(
                "capture.positions",
                f" contains {beyond[0]}, out of range: this run's lens positions are 0..{longest - 2}",
            )


def _check_rows(spec: RunSpec, config, prompts, budgets, sources) -> int:
    """Each row's max_new_tokens (`budgets`: its own, or None: the run's) is >= 1 and its prompt
    and the tokens it may generate fit the model's context; a corpus row is named by its corpus
    index and field. `sources(row)`: the prompt a row runs (None: row i runs prompt i). One pass
    over the rows, holding none of them; returns the longest row's positions."""
    context = getattr(config, "max_position_embeddings", None)
    budgets = itertools.repeat(spec.generation.max_new_tokens) if budgets is None else budgets
    longest = 0
    for row, (ids, budget) in enumerate(zip(prompts, budgets)):
        if not (isinstance(budget, int) and budget >= 1):
            raise SettingError("prompts", f"[{row}] max_new_tokens={budget!r} is out of range: must be >= 1")
        longest = max(longest, len(ids) + budget)
        if not context or len(ids) + budget <= context:
            continue
        prompt = row if sources is None else sources(row)
        if spec.corpus is None:
            where, what = "prompts", f"[{prompt}] is {len(ids)} tokens; with max_new_tokens={budget}"
        else:
            c = spec.corpus
            own = " (the row's own)" if c.max_new_tokens[prompt] else ""
            where = "corpus"
            what = f" {c.path} row {c.index[prompt]} field {c.field!r} is {len(ids)} tokens; with max_new_tokens={budget}{own}"
        raise SettingError(where, f"{what} that exceeds the model's context of {context} positions")
    return longest


def check_batching(spec: RunSpec) -> None:
    """generation.batching, and what continuous batching does not combine with."""
    g = spec.generation
    if g.batching not in BATCHING:
        raise SettingError("generation.batching", f"={g.batching!r} is not valid: choose one of {list(BATCHING)}")
    if g.batching == "continuous" and spec.tune is not None:
        raise SettingError(
            "generation.batching", "=continuous: tuned-lens training steps once per static micro-batch; use static"
        )
    if any(not isinstance(s, str) or not s for s in g.stop):
        raise SettingError("generation.stop", f"={list(g.stop)!r}: every stop string must be a non-empty string")


def check_lenses(spec: RunSpec, config) -> None:
    """capture.lenses, capture.tuned_lens and capture.jacobian_lens: the logit lens always, the
    tuned lens with a translators file trained on this model, the Jacobian lens with a
    `jacobian_lens.safetensors` fitted on it (each checked from its header)."""
    cap = spec.capture
    for lens in cap.lenses:
        if lens not in LENSES:
            raise SettingError("capture.lenses", f" contains {lens!r}, which is not valid: choose from {list(LENSES)}")
    _once("capture.lenses", list(cap.lenses))
    if "logit" not in cap.lenses:
        raise SettingError("capture.lenses", f"={list(cap.lenses)} lacks logit: the logit lens is always recorded")
    check_jacobian_lens(spec, config)
    if "tuned" not in cap.lenses:
        if cap.tuned_lens:
            raise SettingError("capture.tuned_lens", " is set but capture.lenses lacks tuned: add it, or drop the file")
        return
    if not cap.tuned_lens:
        raise SettingError("capture.tuned_lens", "=null: capture.lenses holds tuned, so give a translators file")
    if "resid_post" not in cap.components or not cap.lens:
        raise SettingError(
            "capture.lenses", " holds tuned: its translators read resid_post, so capture it (with the lens)"
        )
    from actors.tuned_lens import check_translators

    try:
        check_translators(cap.tuned_lens, spec.model.name, config.hidden_size, config.num_hidden_layers)
    except ValueError as err:
        raise SettingError("capture.tuned_lens", str(err).removeprefix("capture.tuned_lens")) from None


def check_jacobian_lens(spec: RunSpec, config) -> None:
    """capture.jacobian_lens: set exactly when capture.lenses holds jacobian, a Jacobian lens file
    (safetensors, never a pickle) fitted on this model and hidden size, holding every captured
    layer but the last (whose J is the identity: there it is the logit lens)."""
    cap = spec.capture
    if "jacobian" not in cap.lenses:
        if cap.jacobian_lens:
            raise SettingError(
                "capture.jacobian_lens", " is set but capture.lenses lacks jacobian: add it, or drop the file"
            )
        return
    if not cap.jacobian_lens:
        raise SettingError(
            "capture.jacobian_lens", "=null: capture.lenses holds jacobian, so give a jacobian_lens.safetensors file"
        )
    if "resid_post" not in cap.components or not cap.lens:
        raise SettingError("capture.lenses", " holds jacobian: J_l reads resid_post, so capture it (with the lens)")
    from actors.jacobian_lens import check_file

    n = config.num_hidden_layers
    try:
        meta = check_file(cap.jacobian_lens, spec.model.name, config.hidden_size, n)
    except ValueError as err:
        raise SettingError("capture.jacobian_lens", str(err).removeprefix("capture.jacobian_lens")) from None
    wanted = range(n) if cap.layers is None else sorted({i % n for i in cap.layers})
    missing = [i for i in wanted if i != n - 1 and i not in meta["layers"]]
    if missing:
        raise SettingError(
            "capture.jacobian_lens",
            f"={cap.jacobian_lens!r} holds layers {meta['layers']}, not {missing}: capture only fitted layers",
        )


def _once(field: str, values: list) -> None:
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise SettingError(field, f" lists {twice[0]!r} more than once: give each once")

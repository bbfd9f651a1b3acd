"""Typed configuration: dataclass schemas registered with Hydra's ConfigStore, validated once
at the driver with errors that name the field, the bad value and what is valid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from actors.vocabulary import (
    ACTIVATION_DTYPES,
    INTERVENTION_SITES,
    MODEL_DTYPES,
    STEERING_POSITIONS,
    STEERING_SITES,
)
from pipelines.errors import exit_with_error

POSITION_WORDS = ("all", "prompt", "generated")


class ConfigError(ValueError):
    """A bad config value; the message names the field, the value and what is valid."""


@dataclass
class ModelConf:
    name: str | None = "smollm2-135m-instruct"  # built-in name, local directory, or Hugging Face id
    revision: str | None = None
    dtype: str = "float32"


@dataclass
class ClusterConf:
    executor: str = "ray"  # ray: stage actors in a placement group; local: all stages in-process
    num_stages: int = 2
    tp_size: int = 1
    device: str = "cpu"  # cpu | cuda
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = 0.0
    num_cpus: int | None = None  # CPUs of a local Ray cluster the driver starts (None: all)
    address: str | None = None  # join this cluster; else $RAY_ADDRESS; else start a local one
    micro_batch_size: int = 4
    micro_batches_in_flight: int = 2
    placement_timeout_s: float = 60.0  # refuse, naming the resources, if the stages cannot be placed by then
    max_restarts: int = 3  # stage-actor deaths a run survives: Ray restarts the actor, in-flight batches re-run
    restart_timeout_s: float = 300.0  # how long a lost stage may take to come back (a node with room, its weights)
    placement: str = "PACK"  # how stage ranks spread over nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD


@dataclass
class StorageConf:
    root: str = "outputs"
    run: str = "run"
    shard_batches: int | None = None  # micro-batches per stored shard; None: about 32 MiB uncompressed, <= 1,024 rows


@dataclass
class CaptureConf:
    layers: Any = None  # None = every layer; else a list of indices (negative counts from the end)
    components: list[str] = field(default_factory=lambda: ["resid_post"])
    positions: Any = "all"  # all | prompt | generated | list of token positions
    k: int = 10
    window: int = 64
    activations: str | None = None  # store raw activations in this dtype
    kl_to_final: bool = True  # KL(final || lens) per cell: the final states flow back to every stage
    lenses: list[str] = field(default_factory=lambda: ["logit"])  # [logit, tuned, jacobian]: also those lenses
    tuned_lens: str | None = None  # translators file (python -m pipelines.tune) for the tuned lens
    jacobian_lens: str | None = None  # jacobian_lens.safetensors (pipelines.tune lens=jacobian) for the Jacobian lens


@dataclass
class GenerationConf:
    max_new_tokens: int = 24
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    stop_at_eos: bool = True  # false: always generate max_new_tokens (fixed-length trajectories)
    stop: list[str] = field(default_factory=list)  # a row ends once its generated text contains one of these
    # continuous: a finished row leaves its micro-batch at once and a waiting row takes its slot;
    # static: each micro-batch runs until its longest row ends (benchmarks; steering prefix sharing)
    batching: str = "continuous"


@dataclass
class PlotConf:
    max_prompts: int = 4  # heatmaps written (one PNG per prompt)
    max_positions: int = 32  # the last N positions of each prompt's trajectory


@dataclass
class SteerEditConf:
    """Steered generation: add a saved steering vector while generating (at its own layer and
    site), with one coefficient or a sweep of them (one batch row per coefficient)."""

    vector: str | None = None  # a .safetensors file written by pipelines.steer or pipelines.demo
    coefficient: float = 1.0
    coefficients: list[float] | None = None  # a sweep; overrides coefficient
    positions: Any = "all"  # all | prompt | generated | last | an index i (positions >= i)


@dataclass
class CorpusConf:
    """Prompts from a corpus (pipelines/corpus.py) instead of `prompts`: streamed, its identity
    (never its rows) recorded."""

    path: str | None = None  # a .jsonl/.json, .parquet, .csv or .txt file (local or s3://), a saved dataset, hf:<name>
    field: str | None = None  # the prompt's field; None: the first the corpus has of prompt, text, question
    format: str | None = None  # jsonl | parquet | csv | text | dataset | hf_hub; None: from the path
    skip: int = 0  # rows passed over first
    limit: int | None = None  # rows taken after them (None: to the end)
    split: str = "train"  # the split of a saved DatasetDict or a hub dataset


@dataclass
class LensConf:
    model: ModelConf = field(default_factory=ModelConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    storage: StorageConf = field(default_factory=StorageConf)
    capture: CaptureConf = field(default_factory=CaptureConf)
    generation: GenerationConf = field(default_factory=GenerationConf)
    plot: PlotConf = field(default_factory=PlotConf)
    steer: SteerEditConf = field(default_factory=SteerEditConf)
    prompts: list[str] = field(default_factory=list)  # conf/lens.yaml: three examples, or none with a corpus
    corpus: CorpusConf = field(default_factory=CorpusConf)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass
class DataConf:
    root: str | None = None  # folder of <name>.jsonl files; default: ../shared/datasets/mwe
    train_fraction: float = 0.5
    seed: int = 0
    max_train: int = 24  # items used to build vectors (and choose the layer)
    max_test: int = 24  # items swept on the test split
    skip_malformed: bool = False


@dataclass
class SteeringConf:
    site: str = "resid_pre"  # resid_pre | resid_post | attn_in | mlp_in
    layers: list[int] = field(default_factory=lambda: [6, 12, 18])  # candidate layers
    positions: Any = "all"  # all | prompt | generated | last | an index i (positions >= i)
    aggregator: str = "mean_diff"  # mean_diff | pca
    normalise: bool = False
    coefficients: list[float] = field(default_factory=lambda: [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    select_coefficients: list[float] = field(default_factory=lambda: [-1.0, 0.0, 1.0])
    select_items: int = 12  # train items swept per candidate layer
    transfer: bool = False  # also every dataset's vector on every other dataset's test items
    cost_prompts: int = 8  # neutral prompts steering's side effects are measured on (0: not measured)
    cost_tokens: int = 16  # the unsteered model's greedy tokens after each, scored under steering
    cost_corpus: str | None = None  # text/JSONL of neutral prompts; None: the shared datasets' questions


@dataclass
class SteerConf:
    model: ModelConf = field(default_factory=ModelConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    storage: StorageConf = field(default_factory=StorageConf)
    data: DataConf = field(default_factory=DataConf)
    steering: SteeringConf = field(default_factory=SteeringConf)
    dataset: Any = "corrigible-neutral-HHH"  # a name in data.root, a .jsonl path, org/repo:file.jsonl, a list, or all
    layer: int | None = None  # steer at this layer instead of choosing one on train
    chat_template: bool = True
    bootstrap: int = 1000
    overwrite: bool = False  # replace the steer run in <root>/<run> (refused otherwise)
    progress: bool = True


@dataclass
class DemoConf:
    model: ModelConf = field(default_factory=ModelConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    storage: StorageConf = field(default_factory=StorageConf)
    layer: int = 8
    site: str = "resid_pre"
    coefficients: list[float] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    positive_words: list[str] = field(default_factory=list)
    negative_words: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class ServeSettingsConf:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # else $DISTLENS_API_KEY; unset: no key asked
    vectors: list[str] = field(default_factory=list)  # steering study folders or vector files ([name=]path)
    max_waiting: int = 64  # requests waiting for a slot; past it: 429 with Retry-After
    app: str = "distlens"  # the Ray Serve application's name
    model_name: str | None = None  # the `model` clients send; default: model.name


@dataclass
class ServeConf:
    model: ModelConf = field(default_factory=ModelConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    capture: CaptureConf = field(default_factory=CaptureConf)
    serve: ServeSettingsConf = field(default_factory=ServeSettingsConf)
    progress: bool = False


@dataclass
class BenchConf:
    model: ModelConf = field(default_factory=ModelConf)
    storage: StorageConf = field(default_factory=StorageConf)
    prompt: str = "Tell me a story."
    prompts: int = 1
    sizes: list[int] = field(default_factory=lambda: [64, 256])
    long_size: int | None = 1500  # positions of the long trajectory (None: skip)
    long_prompts: list[int] = field(default_factory=lambda: [1, 8])  # distlens prompts per batch there
    baseline_long: bool = True  # measure the baseline at long_size (else extrapolate it)
    report_only: bool = False  # rebuild table.md and plots from the run's results.json
    baseline_max: int = 256  # largest T the paper's baseline runs at
    stages: list[int] = field(default_factory=lambda: [1, 2, 4])
    ray_stages: list[int] = field(default_factory=lambda: [2])
    repeats: int = 3
    sweep_coefficients: list[int] = field(default_factory=lambda: [1, 3, 7])
    components: list[str] = field(default_factory=lambda: ["resid_post", "attn_out", "mlp_out"])  # [] skips
    scaling_size: int = 64  # T of the scaling workloads
    scaling_layers: list[int] = field(default_factory=lambda: [1, 8, 15, 30])  # layers captured ([] skips)
    scaling_prompts: list[int] = field(default_factory=lambda: [1, 4, 8])  # prompts per batch ([] skips)
    sweep_items: int = 8
    sweep_dataset: str = "corrigible-neutral-HHH"
    lens_floor: bool = True  # measure the exact lens's own cost (a ceiling on capture throughput)
    sweep_positions: list[str] = field(default_factory=lambda: ["last", "all"])  # steered span, each measured
    data_root: str | None = None
    study_datasets: Any = "all"  # the study workload's datasets: all, a list, or null to skip it
    study_overrides: list[str] = field(default_factory=list)  # pipelines.steer settings of the study workload
    tune_steps: int = 3  # the tuned-lens training workload's optimizer steps (0 skips it)
    tune_batch: int = 4  # sequences per step
    tune_tokens: int = 128  # tokens per sequence
    jacobian_sequences: int = 2  # the jacobian workload's sequences fitted on (one per micro-batch)
    jacobian_tokens: int = 32  # tokens per sequence
    jacobian_block: int = 64  # output dimensions per backward; must divide d_model
    jacobian_skip: int = 8  # source positions before this one are left out
    peers: list[str] = field(default_factory=lambda: ["nnsight", "transformer_lens", "steering_vectors"])
    # which workloads run (each also skipped by its own settings); pipelines.bench.settings.WORKLOADS names them
    workloads: list[str] = field(
        default_factory=lambda: ["lens_floor", "long", "trajectory", "scaling", "sweep", "study", "tune", "capture"]
    )
    capture_size: int = 128  # the capture workload's generated tokens
    capture_rounds: int = 3  # its rounds, every system once per round, in turn
    corpus_prompts: int = 256  # the corpus workload's rows (the shared datasets' questions, interleaved)
    corpus_max_new_tokens: int = 64  # tokens each row may generate (EOS on)
    corpus_batch: int = 16  # micro_batch_size of distlens and HF generate's batch
    corpus_rounds: int = 1  # its rounds, every system once per round, in turn
    corpus_layers: list[int] | None = None  # layers its capture systems read (resid_post lens); null: every layer


@dataclass
class TuneDataConf:
    paths: list[str] = field(default_factory=list)  # text / JSONL files; [] = the default corpus (below)
    tokens: int = 128  # tokens per training sequence
    heldout_fraction: float = 0.1  # documents held out (whole documents, never split)
    seed: int = 0
    # The default corpus: the shared datasets' questions (chat-templated, seeded shuffle, at most
    # max_documents) each followed by the model's own sampled continuation of them.
    max_documents: int = 2000
    continuation_tokens: int = 48  # tokens sampled after each question (0: the questions alone)
    temperature: float = 1.0
    generate_batch: int = 16  # rows per micro-batch while sampling continuations
    heldout_sequences: int = 64  # evaluate=true: held-out sequences of `tokens` tokens read


@dataclass
class TuneTrainConf:
    steps: int = 200  # optimizer steps, one per micro-batch
    batch: int = 8  # sequences per step
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    schedule: str = "linear"  # constant | linear | cosine, after a linear warm-up
    warmup: int = 10
    save_every: int = 50  # steps between checkpoints (the last step always saves)
    seed: int = 0  # the order of the training sequences


@dataclass
class TuneJacobianConf:
    block: int = 64  # output dimensions per backward (memory grows with it); must divide d_model
    skip: int = 16  # source positions before this one are left out (attention sinks)
    sequences: int = 256  # training sequences fitted on (a seeded choice; at most what the corpus holds)
    batch: int = 4  # sequences per micro-batch
    save_every: int = 16  # micro-batches between checkpoints (resume=true continues from the latest)


@dataclass
class TuneConf:
    model: ModelConf = field(default_factory=ModelConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    storage: StorageConf = field(default_factory=StorageConf)
    data: TuneDataConf = field(default_factory=TuneDataConf)
    train: TuneTrainConf = field(default_factory=TuneTrainConf)
    lens: str = "tuned"  # tuned: train translators; jacobian: fit the Jacobian lens (pipelines/jacobian_tune.py)
    jacobian: TuneJacobianConf = field(default_factory=TuneJacobianConf)
    merge: list[str] = field(default_factory=list)  # lens=jacobian: merge these partial fits (files or run folders)
    resume: bool = False  # continue from the latest step every stage checkpointed
    evaluate: bool = False  # then compare the lens with the logit lens on the held-out documents (eval.md/png)
    tuned_lens: str | None = None  # lens=jacobian evaluate=true: a translators file to compare as well
    progress: bool = True


@dataclass
class TraceSettingsConf:
    sites: list[str] = field(default_factory=lambda: ["resid_post"])  # resid_post, attn_out, mlp_out, ...
    layers: Any = None  # None = every layer; else a list of indices (negative counts from the end)


@dataclass
class TraceConf:
    model: ModelConf = field(default_factory=ModelConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    pairs: Any = None  # a JSONL file of {clean, corrupt, target, foil?}, or the pairs inline
    trace: TraceSettingsConf = field(default_factory=TraceSettingsConf)
    resume: bool = False  # continue the trace.zarr in hydra.run.dir: pairs already traced are skipped
    overwrite: bool = False
    progress: bool = True


@dataclass
class PatchConf:
    model: ModelConf = field(default_factory=ModelConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    rows: Any = None  # a JSONL file of {prompt, edits, targets?}, or the rows inline (pipelines/patch_rows.py)
    targets: list[str] = field(default_factory=list)  # tokens whose log-probs every row reports
    progress: bool = True


def register() -> None:
    from omegaconf import OmegaConf

    from pipelines.run_dir import hydra_root

    # conf/*.yaml: Hydra's run directory is local even when storage.root is a URL (pipelines/run_dir.py)
    OmegaConf.register_new_resolver("local_dir", hydra_root, replace=True)
    # conf/lens.yaml: its example prompts give way to a corpus, so that giving both can be refused
    OmegaConf.register_new_resolver("unless_corpus", lambda path, prompts: [] if path else prompts, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="tune_schema", node=TuneConf)
    cs.store(name="lens_schema", node=LensConf)
    cs.store(name="steer_schema", node=SteerConf)
    cs.store(name="demo_schema", node=DemoConf)
    cs.store(name="bench_schema", node=BenchConf)
    cs.store(name="serve_schema", node=ServeConf)
    cs.store(name="trace_schema", node=TraceConf)
    cs.store(name="patch_schema", node=PatchConf)
    cs.store(group="model", name="schema", node=ModelConf)
    cs.store(group="cluster", name="schema", node=ClusterConf)
    cs.store(group="storage", name="schema", node=StorageConf)


def choice(field_name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{field_name}={value!r} is not valid: choose one of {list(allowed)}")


def at_least(field_name: str, value, low) -> None:
    if value is None or value < low:
        raise ConfigError(f"{field_name}={value!r} is out of range: must be >= {low}")


def _validate_model_and_cluster(cfg) -> None:
    """The `model` and `cluster` checks every driver shares."""
    c = cfg.cluster
    choice("cluster.device", c.device, ("cpu", "cuda"))  # cluster.executor: run_spec.check_cluster
    choice("model.dtype", cfg.model.dtype, MODEL_DTYPES)
    if c.device == "cpu" and cfg.model.dtype == "float16":
        raise ConfigError(
            "model.dtype='float16' is not valid on device cpu (DeepSpeed refuses it): use float32 or bfloat16"
        )
    _check_storage_root(cfg.storage.root if "storage" in cfg else None)
    if "storage" in cfg and cfg.storage.get("shard_batches") is not None:
        at_least("storage.shard_batches", cfg.storage.shard_batches, 1)
    if not cfg.model.name:
        raise ConfigError(
            "model.name is not set: give a built-in name, a local directory with config.json or a Hugging "
            "Face id, e.g. model=hf model.name=meta-llama/Llama-3.1-8B-Instruct"
        )
    for name in ("micro_batch_size", "micro_batches_in_flight"):  # num_stages, tp_size: run_spec.check_cluster
        at_least(f"cluster.{name}", getattr(c, name), 1)
    at_least("cluster.max_restarts", c.max_restarts, 0)
    for name in ("cpus_per_stage", "gpus_per_stage"):
        at_least(f"cluster.{name}", getattr(c, name), 0)
    if c.num_cpus is not None:
        at_least("cluster.num_cpus", c.num_cpus, 1)


def validate(cfg) -> None:
    """Checks that need no model: enums, ranges, prompts, flags."""
    _validate_model_and_cluster(cfg)
    cap = cfg.capture  # components, layers, k and positions are checked against the model (`model_checks`)
    _steer_positions("steer.positions", cfg.steer.positions)
    if cfg.steer.coefficients is not None and not cfg.steer.coefficients:
        raise ConfigError(
            "steer.coefficients=[] is empty: give coefficients to sweep, or null to use steer.coefficient"
        )
    at_least("plot.max_prompts", cfg.plot.max_prompts, 0)
    at_least("plot.max_positions", cfg.plot.max_positions, 1)
    _validate_capture(cap)
    g = cfg.generation
    at_least("generation.max_new_tokens", g.max_new_tokens, 1)
    at_least("generation.temperature", g.temperature, 0.0)
    if not 0.0 < g.top_p <= 1.0:
        raise ConfigError(f"generation.top_p={g.top_p!r} is out of range: must be in (0, 1]")
    choice("generation.batching", g.batching, ("continuous", "static"))
    if not _is_list(g.stop) or not all(isinstance(x, str) and x for x in g.stop):
        raise ConfigError(f"generation.stop={g.stop!r}: give a list of non-empty strings, e.g. ['\\n\\n']")
    if cfg.corpus.path is not None:
        _validate_corpus(cfg)
    elif not cfg.prompts:
        raise ConfigError(
            "prompts=[] is empty: give at least one prompt, e.g. prompts='[\"The capital of France is\"]', "
            "or a corpus (corpus.path=prompts.jsonl)"
        )
    for i, p in enumerate(cfg.prompts):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"prompts[{i}]={p!r} is empty: every prompt needs text")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other: choose one")


def _validate_capture(cap) -> None:
    """The `capture` group's own settings (layers and components against the model: `model_checks`)."""
    if cap.layers is not None and not _is_list(cap.layers):
        raise ConfigError(
            f"capture.layers={cap.layers!r} is not a list: give a list of indices, e.g. [{cap.layers}], or null"
        )
    if cap.layers is not None and not cap.layers:
        raise ConfigError("capture.layers=[] is empty: give layer indices or null for every layer")
    if isinstance(cap.positions, str):
        choice("capture.positions", cap.positions, POSITION_WORDS)
    elif not _is_list(cap.positions) or not all(isinstance(p, int) and p >= 0 for p in cap.positions):
        raise ConfigError(
            f"capture.positions={cap.positions!r}: use {list(POSITION_WORDS)} or a list of positions >= 0"
        )
    elif not cap.positions:
        raise ConfigError(f"capture.positions=[] is empty: use {list(POSITION_WORDS)} or a list of positions >= 0")
    at_least("capture.k", cap.k, 1)
    at_least("capture.window", cap.window, 1)
    if cap.activations is not None:
        choice("capture.activations", cap.activations, ACTIVATION_DTYPES)


def _validate_corpus(cfg) -> None:
    """The `corpus` group's own settings (its rows are checked as they are read: pipelines/corpus.py)."""
    from pipelines.corpus import FORMATS, corpus_format

    c = cfg.corpus
    if cfg.prompts:
        raise ConfigError(
            f"prompts and corpus.path={c.path!r} both give the prompts: use one (prompts=[...] or corpus.path)"
        )
    if not str(c.path).strip():
        raise ConfigError("corpus.path='' is empty: give a file, a saved dataset directory or hf:<name>")
    if c.format is not None:
        choice("corpus.format", c.format, FORMATS)
    at_least("corpus.skip", c.skip, 0)
    if c.limit is not None:
        at_least("corpus.limit", c.limit, 1)
    if c.field is not None and corpus_format(c.path, c.format) == "text":
        raise ConfigError(
            f"corpus.field={c.field!r}: a text corpus has no fields (each line is a prompt); leave it out"
        )


def _check_storage_root(root, cwd=None) -> None:
    """A relative storage.root inside a Ray job's temporary working directory would put the
    results where Ray deletes them with its session: refused, asking for an absolute path."""
    import os
    from pathlib import Path

    from actors.storage_fs import is_url

    cwd = Path(cwd or os.getcwd())
    if root and not is_url(root) and not Path(root).is_absolute() and "runtime_resources" in cwd.parts:
        raise ConfigError(
            f"storage.root={root!r} is relative, and this job runs in Ray's temporary working directory "
            f"{cwd}, deleted with the Ray session: pass an absolute path every node can reach, e.g. "
            "storage.root=/shared/distlens"
        )


def check_storage_writable(root: str, object_storage: bool = True) -> None:
    """The storage root exists (created if missing) and this user can create files in it;
    checked before Hydra opens its log there and before Ray starts. `object_storage`: the driver
    can write to a URL root (`s3://bucket/prefix`), checked by writing and deleting an object."""
    import os
    import tempfile
    from pathlib import Path

    from actors.storage_fs import is_url

    if is_url(root):
        if not object_storage:
            raise ConfigError(
                f"storage.root={root!r} is object storage, which this driver does not write to (pipelines.lens "
                "and pipelines.steer do): give a local or mounted path"
            )
        return _check_object_storage_writable(root)
    path = Path(os.path.expanduser(root))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".distlens-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"storage.root={root!r} cannot be written ({err.strerror or err}): give a directory this user can "
            "create files in"
        ) from None


def _check_object_storage_writable(root: str) -> None:
    """Write and delete one small object under `root`, with short timeouts: a missing bucket, no
    permission, no credentials or no server answering is one line naming the cause."""
    import uuid

    scheme = root.split("://", 1)[0]
    if scheme not in ("s3", "s3a"):
        raise ConfigError(
            f"storage.root={root!r}: object storage scheme {scheme!r} is not supported: use s3://bucket/prefix"
        )
    bucket = root.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"storage.root={root!r} names no bucket: use s3://bucket/prefix")
    from actors import storage_fs

    probe = storage_fs.join(root, f".distlens-write-check-{uuid.uuid4().hex}")
    short = {"connect_timeout": 10, "read_timeout": 30, "retries": {"max_attempts": 2}}
    try:
        fs, key = storage_fs.filesystem(probe, config_kwargs=short)
        fs.pipe_file(key, b"")
        fs.rm_file(key)
    except Exception as err:  # botocore and s3fs raise many kinds: name the cause in one line
        text = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, FileNotFoundError):
            text = f"bucket {bucket!r} does not exist ({text})"
        elif isinstance(err, PermissionError):
            text = f"no permission to write there ({text})"
        raise ConfigError(
            f"storage.root={root!r} cannot be written: {text}; give a bucket these credentials can write to "
            "(credentials come from the AWS environment: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "~/.aws; AWS_ENDPOINT_URL for an S3-compatible server)"
        ) from None


def _is_list(value) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, list | tuple | ListConfig)


def _steer_positions(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key}={value!r}: choose one of {list(STEERING_POSITIONS)} or an index >= 0")
    if isinstance(value, str):
        choice(key, value, STEERING_POSITIONS)
    elif value < 0:
        raise ConfigError(
            f"{key}={value} is negative: an index i steers every position >= i (0 = all); "
            "for the last prompt token use 'last'"
        )


# Config keys that differ from the RunSpec paths actors.run_spec names in its errors.
SETTING_KEYS = {"steering.edits": "steer.vector", "storage.existing": "resume"}


def model_checks(check, *args, keys: dict | None = None) -> None:
    """Run one of actors.run_spec's checks (`check_run`, `check_cluster`, ...) and report a bad
    setting with its config key."""
    from actors.run_spec import SettingError

    try:
        check(*args)
    except SettingError as err:
        key = {**SETTING_KEYS, **(keys or {})}.get(err.field, err.field)
        raise ConfigError(f"{key}{err.text}") from None


def check_serve(cfg) -> str:
    """Every check of `distlens serve`'s config (the model's included); returns the checkpoint's path."""
    import re

    from actors.checkpoint import resolve_checkpoint
    from actors.run_spec import check_run

    _validate_model_and_cluster(cfg)
    _validate_capture(cfg.capture)
    s = cfg.serve
    if not isinstance(s.host, str) or not s.host:
        raise ConfigError(f"serve.host={s.host!r}: give an address to bind, e.g. 127.0.0.1")
    if not 1 <= s.port <= 65535:
        raise ConfigError(f"serve.port={s.port!r} is out of range: valid is 1..65535")
    at_least("serve.max_waiting", s.max_waiting, 1)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.app or ""):
        raise ConfigError(f"serve.app={s.app!r}: letters, digits, '.', '_' and '-' only")
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    spec = run_spec(cfg, str(checkpoint.path), "")
    model_checks(check_run, spec, hf_config, [[0]])
    from pipelines.serve_api import RequestError  # the vectors load here first: a bad one is refused before Ray starts

    try:
        from pipelines.serve_api import Vectors, model_facts

        vectors = Vectors(model_facts(cfg, str(checkpoint.path), spec)[0])
        for entry in s.vectors:
            vectors.load(str(entry), cfg.model.name)
    except (ValueError, RequestError) as err:
        raise ConfigError(f"serve.vectors: {err}" if not str(err).startswith("serve.vectors") else str(err)) from None
    return str(checkpoint.path)


def check_interventions_run(cfg, hf_config) -> None:
    """The `model` and `cluster` of a run of interventions (pipelines.trace, pipelines.patch)."""
    from actors.run_spec import check_cluster

    _validate_model_and_cluster(cfg)
    if cfg.cluster.tp_size != 1:
        raise ConfigError(f"cluster.tp_size={cfg.cluster.tp_size}: interventions run on tp_size=1 pipeline stages")
    model_checks(check_cluster, cluster_settings(cfg.cluster), hf_config)


def check_trace(cfg, hf_config) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Every check of a causal trace's settings against the model (the pairs: pipelines/trace_pairs.py);
    returns (sites, layers) with layers as indices from 0."""
    check_interventions_run(cfg, hf_config)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other: choose one")
    sites = cfg.trace.sites
    if not _is_list(sites) or not sites:
        raise ConfigError(f"trace.sites={sites!r}: give a list of sites, e.g. [resid_post, attn_out, mlp_out]")
    for site in sites:
        choice("trace.sites", site, INTERVENTION_SITES)
    n = hf_config.num_hidden_layers
    layers = range(n) if cfg.trace.layers is None else cfg.trace.layers
    if not _is_list(layers) and not isinstance(layers, range) or not len(layers):
        raise ConfigError(f"trace.layers={layers!r}: give a list of layer indices, or null for every layer")
    for layer in layers:
        if not isinstance(layer, int) or not -n <= layer < n:
            raise ConfigError(f"trace.layers has {layer!r}: valid is -{n}..{n - 1} (the model has {n} layers)")
    return tuple(sites), tuple(sorted({layer % n for layer in layers}))


def cluster_settings(c):
    """The `cluster` group as a run's ClusterSettings (the driver-only keys left out)."""
    from actors.run_spec import ClusterSettings

    return ClusterSettings(
        executor=c.executor, num_stages=c.num_stages, tp_size=c.tp_size, device=c.device,
        cpus_per_stage=c.cpus_per_stage, gpus_per_stage=c.gpus_per_stage, micro_batch_size=c.micro_batch_size,
        micro_batches_in_flight=c.micro_batches_in_flight, placement_timeout_s=c.placement_timeout_s,
        max_restarts=c.max_restarts, restart_timeout_s=c.restart_timeout_s, placement=c.placement,
    )  # fmt: skip


def run_spec(cfg, model_path: str, store_path: str, existing: str = "refuse", **groups):
    """A driver's config as a RunSpec, group by group: `model` and `cluster` from its groups,
    `capture` from its group when it has one (the lens config does), and any group given in
    `groups` (as actors.run_spec settings) instead."""
    from actors.run_spec import CaptureSettings, ModelSettings, RunSpec, StorageSettings

    parts = {"cluster": cluster_settings(cfg.cluster)}
    if "capture" in cfg:
        cap = cfg.capture
        parts["capture"] = CaptureSettings(
            layers=None if cap.layers is None else tuple(cap.layers), components=tuple(cap.components),
            positions=cap.positions if isinstance(cap.positions, str) else tuple(cap.positions), k=cap.k,
            window=cap.window, activations=cap.activations, kl_to_final=cap.kl_to_final, lenses=tuple(cap.lenses),
            tuned_lens=None if cap.tuned_lens is None else str(Path(cap.tuned_lens).expanduser().resolve()),
            jacobian_lens=None if cap.get("jacobian_lens") is None
            else str(Path(cap.jacobian_lens).expanduser().resolve()),
        )  # fmt: skip
    parts.update(groups)
    return RunSpec(
        model=ModelSettings(model_path, cfg.model.dtype, cfg.model.name or ""),
        storage=StorageSettings(store_path, existing, cfg.storage.get("shard_batches") if "storage" in cfg else None),
        progress=cfg.progress,
        **parts,
    )


def validate_steer(cfg) -> None:
    from pipelines.vectors import AGGREGATORS

    c = cfg.cluster
    _validate_model_and_cluster(cfg)
    if c.tp_size != 1:
        raise ConfigError(
            f"cluster.tp_size={c.tp_size}: steering studies run tp_size=1 stages (pooled across datasets)"
        )
    s = cfg.steering
    choice("steering.site", s.site, STEERING_SITES)
    _steer_positions("steering.positions", s.positions)
    choice("steering.aggregator", s.aggregator, tuple(sorted(AGGREGATORS)))
    if not s.layers:
        raise ConfigError("steering.layers=[] is empty: give candidate layer indices")
    if len(s.coefficients) < 2 or len(s.select_coefficients) < 2:
        raise ConfigError("steering.coefficients and steering.select_coefficients need at least 2 values for a slope")
    d = cfg.data  # data.train_fraction: pipelines.datasets.split_items, where the split is made
    at_least("data.max_train", d.max_train, 2)
    at_least("data.max_test", d.max_test, 2)
    at_least("steering.select_items", s.select_items, 2)
    at_least("steering.cost_prompts", s.cost_prompts, 0)
    at_least("steering.cost_tokens", s.cost_tokens, 1)
    at_least("bootstrap", cfg.bootstrap, 1)


def check_overrides(schema: type, argv: list[str] | None = None, object_storage: bool = False) -> None:
    """Refuse unknown keys and config-group options in the command line's `key=value` overrides
    before Hydra composes anything, with one line that names the key or option and what is
    valid (Hydra's own message spans several lines and lists nothing valid). Overrides Hydra
    treats specially (`~key`, `hydra.*`) and free-form fields are left to Hydra; `+key` is checked
    like `key` (adding keys is never meaningful here). `object_storage`: the driver writes to a
    URL storage.root (the lens and steer drivers)."""
    import dataclasses
    import sys
    import typing
    from pathlib import Path

    conf = Path(__file__).resolve().parent.parent / "conf"
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in conf.iterdir() if d.is_dir()}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith(("-", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+")  # `+key=` adds a key Hydra would accept: none is meaningful here
        if key.startswith("hydra.") or key == "hydra":
            continue
        if key in groups:  # a config-group choice; a multirun sweeps "a,b"
            for option in value.split(",") if "[" not in value else [value]:
                if option not in groups[key] and option != "null":
                    exit_with_error(f"{key}={option!r} is not a config of group {key}: choose one of {groups[key]}")
            continue
        cls, parts = schema, key.split(".")
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                where = ".".join(parts[:i]) or "the top level"
                exit_with_error(f"unknown config key {key!r}: valid keys of {where} are {sorted(names)}")
            kind = typing.get_type_hints(cls).get(part)
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                cls = kind
                continue
            if i + 1 < len(parts) and kind is not Any and typing.get_origin(kind) is not dict and kind is not dict:
                exit_with_error(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is a single value")
            break  # a value (or a free-form mapping): Hydra and `validate` check it
        if key == "storage.root" and "," not in value:
            try:
                check_storage_writable(value, object_storage)
            except ConfigError as err:
                exit_with_error(str(err))

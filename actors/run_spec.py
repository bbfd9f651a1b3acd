"""What a run is asked to do (`RunSpec`), and every check of it against the model, in one place
(`check_run`), before any compute. A bad value raises `SettingError`, which names the setting;
the drivers print it with the setting's config key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from actors.adapters import adapter_for
from actors.sampling import SamplingSpec
from actors.vocabulary import COMPONENTS, STEERING_SITES

EXECUTORS = ("local", "ray")
EXISTING = ("refuse", "resume", "overwrite")


class SettingError(ValueError):
    """A run setting that cannot work: `field` names it (a `RunSpec` field), `text` says the
    value and what is valid; `str(err)` is `field + text`."""

    def __init__(self, field: str, text: str):
        super().__init__(f"{field}{text}")
        self.field, self.text = field, text


@dataclass(frozen=True)
class RunSpec:
    model_path: str
    store_path: str
    num_stages: int = 2
    tp_size: int = 1
    executor: str = "local"
    dtype: str = "float32"
    device: str = "cpu"
    layers: tuple[int, ...] | None = None  # None = every layer
    components: tuple[str, ...] = ("resid_post",)
    k: int = 10
    lens_window: int = 64
    activations: str | None = None
    positions: str | tuple[int, ...] = "all"
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    max_new_tokens: int = 16
    micro_batch_size: int = 4
    micro_batches_in_flight: int = 2
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = 0.0
    placement_timeout_s: float = 60.0  # how long to wait for the cluster to place the stages
    max_restarts: int = 3  # stage-actor failures a run survives (Ray restarts the actor; tp_size 1)
    restart_timeout_s: float = 300.0  # how long to wait for a restarted stage to answer
    steering: tuple = ()  # SteeringEdits; each stage applies those on its own layers
    coefficients: tuple[float, ...] | None = None  # a sweep: every prompt runs once per coefficient
    score_ids: tuple[int, ...] = ()  # record these tokens' logits at the first generated step
    share_prefix: bool = True  # a sweep computes the columns before its edits once per prompt
    existing: str = "refuse"  # what to do with a store already at store_path: refuse | resume | overwrite
    attrs: dict = field(default_factory=dict)  # recorded in the store (config, model id, versions)
    progress: bool = True


def fingerprint(config: dict) -> str:
    """A stable hash of what determines a run's results (used to refuse mixing runs)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_cluster(spec: RunSpec, config) -> None:
    """How the run is spread, against the model: stages, tensor-parallel ranks, executor."""
    adapter = adapter_for(config.model_type)  # an unsupported family: one line naming the supported
    n = config.num_hidden_layers
    if spec.executor not in EXECUTORS:
        raise SettingError("executor", f"={spec.executor!r} is not valid: choose one of {list(EXECUTORS)}")
    if not 1 <= spec.num_stages <= n:
        raise SettingError(
            "num_stages", f"={spec.num_stages} is out of range: valid is 1..{n} (the model's layer count)"
        )
    if spec.tp_size > 1 and spec.executor != "ray":
        raise SettingError("tp_size", f"={spec.tp_size} needs executor ray (one process per rank)")
    if spec.tp_size > 1 and not adapter.tensor_parallel:
        raise SettingError(
            "tp_size",
            f"={spec.tp_size}: tensor parallelism is not available for model family {config.model_type!r} "
            "(DeepSpeed AutoTP does not shard it exactly); use tp_size=1 and more stages",
        )
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    if heads % spec.tp_size or kv % spec.tp_size:
        raise SettingError(
            "tp_size", f"={spec.tp_size} does not divide the model's {heads} attention / {kv} key-value heads"
        )


def check_steering_site(config, site: str, field: str = "site") -> None:
    """A steering site the model's family has."""
    have = adapter_for(config.model_type).sites_for(config)
    if site not in have or site not in STEERING_SITES:
        sites = [s for s in STEERING_SITES if s in have]
        text = f"={site!r}" if field == "site" else f" site {site!r}"
        raise SettingError(field, f"{text} does not exist in model family {config.model_type!r}: it has {sites}")


def check_run(spec: RunSpec, config, prompts: list[list[int]]) -> None:
    """Every check of a run against the model's `config` (a Hugging Face config) and its
    prompts (token ids, one row each). Raises `SettingError` naming the first bad setting."""
    check_cluster(spec, config)
    adapter = adapter_for(config.model_type)
    n = config.num_hidden_layers
    if spec.existing not in EXISTING:
        raise SettingError("existing", f"={spec.existing!r} is not valid: choose one of {list(EXISTING)}")
    if spec.layers is not None:  # () captures nothing (a sweep that only scores tokens)
        for i in spec.layers:
            if not isinstance(i, int) or not -n <= i < n:
                raise SettingError("layers", f" contains {i!r}, out of range: valid is 0..{n - 1} (or -{n}..-1)")
        _once("layers", [i % n for i in spec.layers])
    if not spec.components:
        raise SettingError("components", f"=[] is empty: choose from {list(COMPONENTS)}")
    have = adapter.sites_for(config)
    for c in spec.components:
        if c not in COMPONENTS:
            raise SettingError("components", f"={c!r} is not valid: choose one of {list(COMPONENTS)}")
        if c not in have:
            raise SettingError(
                "components", f"={c!r} does not exist in model family {config.model_type!r}: it has {list(have)}"
            )
    _once("components", list(spec.components))
    for e in spec.steering:
        check_steering_site(config, e.site, field="steering")
        if not 0 <= e.layer < n:
            raise SettingError("steering", f" layer {e.layer} is out of range: valid is 0..{n - 1}")
    if not 1 <= spec.k <= config.vocab_size:
        raise SettingError("k", f"={spec.k} is out of range: valid is 1..{config.vocab_size} (the vocabulary)")
    if not prompts:
        raise SettingError("prompts", "=[] is empty: give at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise SettingError("prompts", " holds a prompt with no tokens: every prompt needs at least one")
    longest = max(len(p) for p in prompts)
    context = getattr(config, "max_position_embeddings", None)
    if context and longest + spec.max_new_tokens > context:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        raise SettingError(
            "prompts",
            f"[{i}] is {longest} tokens; with max_new_tokens={spec.max_new_tokens} that exceeds the model's "
            f"context of {context} positions",
        )
    if not isinstance(spec.positions, str):
        beyond = [p for p in spec.positions if p >= longest + spec.max_new_tokens - 1]
        if beyond:
            raise SettingError(
                "positions",
                f" contains {beyond[0]}, out of range: this run's lens positions are "
                f"0..{longest + spec.max_new_tokens - 2}",
            )


def _once(field: str, values: list) -> None:
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise SettingError(field, f" lists {twice[0]!r} more than once: give each once")

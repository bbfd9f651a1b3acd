"""The benchmark's own settings checks, made before anything is measured: a bad value raises
`ConfigError` naming it and what is valid (the driver prints it as one line)."""

from __future__ import annotations

from pathlib import Path

from actors.vocabulary import COMPONENTS
from pipelines.config import ConfigError, at_least, choice

# The workloads `workloads=[...]` selects from, each also skipped by its own settings:
# the lens's own cost, the long trajectory, the trajectory at each of `sizes`, the components and
# scaling rows, the steering sweep, the steering study, tuned-lens training, Jacobian-lens fitting
# (distlens's Ray stages against plain torch), the capture workload (HF generate, distlens with and
# without kl_to_final and nnsight, rounds in turn), and the corpus workload (continuous against
# static batching and HF generate on a ragged corpus, rounds in turn).
WORKLOADS = ("lens_floor", "long", "trajectory", "scaling", "sweep", "study", "tune", "jacobian", "capture", "corpus")


def sweep_dataset_path(cfg) -> Path:
    """The A/B dataset the sweep workload scores."""
    from pipelines.datasets import dataset_root

    return dataset_root(cfg.data_root) / f"{cfg.sweep_dataset}.jsonl"


def check(cfg, hf, prompt_len: int) -> None:
    """Refuse settings the workloads cannot run, for a model of HF config `hf` and a prompt of
    `prompt_len` tokens."""
    n_layers = hf.num_hidden_layers
    for value in cfg.workloads:
        choice("workloads", value, WORKLOADS)
    chosen = set(cfg.workloads)
    if not cfg.sizes and chosen & {"trajectory", "scaling"}:
        raise ConfigError("sizes=[] is empty: give the trajectory's generated tokens T, e.g. sizes=[64,256]")
    for name in ("sizes", "stages", "ray_stages", "scaling_prompts", "sweep_coefficients", "long_prompts"):
        for value in cfg[name]:
            at_least(name, value, 1)
    corpus = ("corpus_prompts", "corpus_max_new_tokens", "corpus_batch", "corpus_rounds")
    for name in ("scaling_size", "repeats", "prompts", "sweep_items", "capture_size", "capture_rounds", *corpus):
        at_least(name, cfg[name], 1)
    at_least("tune_steps", cfg.tune_steps, 0)
    if cfg.tune_steps:
        at_least("tune_batch", cfg.tune_batch, 1)
        at_least("tune_tokens", cfg.tune_tokens, 2)
    if "jacobian" in chosen:
        check_jacobian(cfg, hf.hidden_size)
    if "long" in chosen and cfg.long_size is not None and cfg.long_size <= prompt_len:
        raise ConfigError(
            f"long_size={cfg.long_size} is out of range: positions must exceed the prompt's {prompt_len} "
            "(or long_size=null to skip the long trajectory)"
        )
    for value in cfg.sweep_positions:
        choice("sweep_positions", value, ("last", "all"))
    for value in cfg.scaling_layers if "scaling" in chosen else []:
        if not 1 <= value <= n_layers:
            raise ConfigError(f"scaling_layers={value!r} is out of range: layers captured must be 1..{n_layers}")
    for value in cfg.components:
        choice("components", value, COMPONENTS)
    for value in (cfg.corpus_layers or []) if "corpus" in chosen else []:
        if not 0 <= value < n_layers:
            raise ConfigError(f"corpus_layers={value!r} is out of range: layers are 0..{n_layers - 1}")
    for workload in sorted(chosen & {"corpus", "jacobian"}):  # their text: the shared datasets' questions
        from pipelines.datasets import dataset_root

        root = dataset_root(cfg.data_root)
        if not any(root.glob("*.jsonl")):
            raise ConfigError(
                f"workloads=[{workload}]: {root} holds no *.jsonl datasets to take questions from; set data_root "
                "(or $DISTLENS_MWE_DIR) to the directory of the shared datasets"
            )
    if "sweep" in chosen and cfg.sweep_coefficients:
        path = sweep_dataset_path(cfg)
        if not path.is_file():
            raise ConfigError(
                f"sweep_dataset={cfg.sweep_dataset!r}: {path} does not exist; set data_root (or "
                "$DISTLENS_MWE_DIR) to the directory of the A/B datasets, or sweep_coefficients=[] to skip the sweep"
            )


def check_jacobian(cfg, d_model: int) -> None:
    """The jacobian workload's settings, for a model of hidden size `d_model`."""
    for name in ("jacobian_sequences", "jacobian_block"):
        at_least(name, cfg[name], 1)
    at_least("jacobian_tokens", cfg.jacobian_tokens, 2)
    at_least("jacobian_skip", cfg.jacobian_skip, 0)
    if cfg.jacobian_skip >= cfg.jacobian_tokens:
        raise ConfigError(
            f"jacobian_skip={cfg.jacobian_skip} leaves no source position in sequences of "
            f"jacobian_tokens={cfg.jacobian_tokens}: must be < jacobian_tokens"
        )
    if d_model % cfg.jacobian_block:
        raise ConfigError(
            f"jacobian_block={cfg.jacobian_block} does not divide d_model={d_model}: choose a divisor of {d_model}"
        )

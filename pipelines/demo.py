"""`python -m pipelines.demo`: open-ended steering on the default model, end to end.

Builds a sentiment vector from the contrast set in conf/demo.yaml (positive minus negative
sentences, each averaged over its positions), then generates with it at every coefficient in
one batched pass of the lens run (pipelines/lens_run.py: the lens of every layer is recorded
under steering), and measures the effect: the log-odds of positive against negative sentiment words
at each generated position, averaged over the continuation."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipelines import session
from pipelines.config import ConfigError, LensConf, register

register()


def word_ids(tokenizer, words) -> list[int]:
    return [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]


def effect(scores: np.ndarray, n_pos: int) -> np.ndarray:
    """scores: [rows, steps, words] logits -> mean over valid steps of
    logsumexp(positive words) - logsumexp(negative words), per row."""

    def logsumexp(x, axis):
        top = np.max(x, axis=axis, keepdims=True)
        return np.squeeze(top, axis) + np.log(np.exp(x - top).sum(axis=axis))

    gap = logsumexp(scores[..., :n_pos], axis=-1) - logsumexp(scores[..., n_pos:], axis=-1)
    return np.nanmean(gap, axis=1)


def lens_config(cfg: DictConfig) -> DictConfig:
    """The demo's keys checked, then the steered generation's lens config (its vector set once
    built), validated before the contrast pass computes anything: the keys its errors can name
    (model.*, cluster.*, prompts) are the demo's too."""
    from actors.vocabulary import STEERING_SITES
    from pipelines.config import validate

    if cfg.site not in STEERING_SITES:
        raise ConfigError(f"site={cfg.site!r} is not valid: choose one of {list(STEERING_SITES)}")
    if len(cfg.positive) != len(cfg.negative) or not cfg.positive:
        raise ConfigError(
            f"positive ({len(cfg.positive)}) and negative ({len(cfg.negative)}) need the same, non-zero length"
        )
    if len(cfg.coefficients) < 2:
        raise ConfigError(f"coefficients={list(cfg.coefficients)}: give at least 2")
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} is out of range: must be >= 1")
    lens_cfg = OmegaConf.structured(LensConf)
    lens_cfg.model, lens_cfg.cluster, lens_cfg.storage = cfg.model, cfg.cluster, cfg.storage
    lens_cfg.prompts = list(cfg.prompts)
    lens_cfg.generation.max_new_tokens = cfg.max_new_tokens
    lens_cfg.steer.coefficients = list(cfg.coefficients)
    lens_cfg.plot.max_prompts = len(cfg.coefficients) * len(cfg.prompts)
    lens_cfg.overwrite = True
    lens_cfg.progress = cfg.progress
    validate(lens_cfg)
    return lens_cfg


def run(cfg: DictConfig, out_dir: Path) -> dict:
    from actors.checkpoint import resolve_checkpoint
    from actors.run_spec import check_cluster, check_steering_site
    from actors.store import LensStore
    from pipelines import lens_run
    from pipelines.config import cluster_settings, model_checks
    from pipelines.prompts import encode_prompt
    from pipelines.study import Study
    from pipelines.vectors import SteeringVector

    lens_cfg = lens_config(cfg)
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    if not 0 <= cfg.layer < hf_config.num_hidden_layers:
        raise ConfigError(f"layer={cfg.layer} is out of range: valid is 0..{hf_config.num_hidden_layers - 1}")
    model_checks(check_cluster, cluster_settings(cfg.cluster), hf_config)
    model_checks(check_steering_site, hf_config, cfg.site, keys={"site": "site"})
    tokenizer = checkpoint.tokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [encode_prompt(tokenizer, s, chat_template=False) for s in [*cfg.positive, *cfg.negative]]
    session.connect(cfg.cluster)
    # No executor given: the run's stage actors are released before the steered run starts.
    study = Study(cfg, checkpoint, tokenizer, hf_config, None, out_dir)
    means = study.activations("contrast_activations", prompts, [cfg.layer], cfg.site, reduce="mean")[:, 0]
    n = len(cfg.positive)
    vector = SteeringVector.build(
        means[:n], means[n:], model=cfg.model.name, layer=cfg.layer, site=cfg.site, dataset="sentiment-contrast"
    )
    vector_path = vector.save(out_dir / "sentiment_vector.safetensors")
    lens_cfg.steer.vector = str(vector_path)
    ids = word_ids(tokenizer, cfg.positive_words) + word_ids(tokenizer, cfg.negative_words)
    lens_run.run(lens_cfg, out_dir, score_ids=tuple(ids))
    store = LensStore.open(out_dir / "lens.zarr")
    scores = store["scores"]
    first = effect(scores[:, :1], len(cfg.positive_words))
    whole = effect(scores, len(cfg.positive_words))
    rows = [
        {
            "coefficient": float(c),
            "first_token_effect": float(a),
            "effect": float(b),
            "text": str(store.group["generated_text"][i]),
        }
        for i, (c, a, b) in enumerate(zip(store["coefficient"], first, whole))
    ]
    table = (
        "| coefficient | effect at the first token | effect over the continuation | generation (greedy) |\n"
        "|---|---|---|---|\n"
        + "\n".join(
            f"| {r['coefficient']:g} | {r['first_token_effect']:+.2f} | {r['effect']:+.2f} | {r['text'].strip()!r} |"
            for r in rows
        )
    )
    (out_dir / "demo.md").write_text(table + "\n")
    summary = {"vector_norm": vector.norm, "layer": cfg.layer, "site": cfg.site, "rows": rows}
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2))
    plot_effect(rows, out_dir / "effect_vs_coefficient.png")
    print(f"\nsentiment vector |v| = {vector.norm:.2f} at layer {cfg.layer} {cfg.site}\n\n{table}\n")
    print(f"results: {out_dir}/demo.md, effect_vs_coefficient.png, lens.zarr")
    return summary


def plot_effect(rows: list[dict], path: Path) -> None:
    from pipelines.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["coefficient"] for r in rows]
    ax.plot(x, [r["first_token_effect"] for r in rows], marker="o", label="first response token")
    ax.plot(x, [r["effect"] for r in rows], marker="s", label="mean over the continuation")
    ax.legend(fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("steering coefficient")
    ax.set_ylabel("positive - negative word log-odds")
    ax.set_title("sentiment steering: effect over the generated text", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@hydra.main(version_base=None, config_path="../conf", config_name="demo")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    with session.refusals():
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import DemoConf, check_overrides

    check_overrides(DemoConf)
    head_watch.exit_on_loss()
    main()

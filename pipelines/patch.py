"""`python -m pipelines.patch rows=<file.jsonl> targets='[" Paris"]'`: prompts run through the
pipeline stages with their interventions (patch from another row or stored activations, zero or
mean ablation, scale, add; pipelines/patch_rows.py), in batched micro-batches (actors/tracing.py).
Writes patch.json: each row's greedy next token and the log-probs of the targets at its last
prompt position."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines import session
from pipelines.config import ConfigError, register

register()
CONF = str(Path(__file__).resolve().parent.parent / "conf")


def run(cfg, out_dir: Path) -> dict:
    from actors.checkpoint import load_tokenizer, resolve_checkpoint
    from actors.tracing import InterventionRunner
    from pipelines.config import check_interventions_run
    from pipelines.patch_rows import read_rows, row_edits
    from pipelines.prompts import one_token

    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    check_interventions_run(cfg, hf_config)
    tokenizer = load_tokenizer(str(checkpoint.path))
    rows = read_rows(cfg.rows)
    edits = row_edits(rows, hf_config.num_hidden_layers, hf_config.hidden_size)
    shared = [one_token(tokenizer, t, f"targets[{i}]") for i, t in enumerate(cfg.targets)]
    own = [
        [one_token(tokenizer, t, f"{where}: targets[{i}]") for i, t in enumerate(row.get("targets", []))]
        for where, row in rows
    ]
    score_ids = sorted(set(shared).union(*own))
    if not score_ids:
        raise ConfigError(
            "targets=[] is empty: name the tokens whose log-probs each row reports, e.g. targets='[\" Paris\"]'"
        )
    sites = sorted({(e.layer, e.site) for row in edits for e in row if hasattr(e, "layer")})
    prompts = [tokenizer(row["prompt"]).input_ids for _, row in rows]
    runner = InterventionRunner(
        checkpoint.path, hf_config, cfg.cluster.num_stages, session.executor_for(cfg), sites, score_ids,
        cfg.cluster.micro_batch_size, cfg.model.dtype, cfg.cluster.device, tokenizer.pad_token_id or 0,
    )  # fmt: skip
    got = runner.run_rows(prompts, edits)
    results = []
    for r, (_, row) in enumerate(rows):
        lp = got.scores[r] - got.logz[r]
        wanted = sorted(set(shared) | set(own[r]))
        results.append({
            "row": r, "prompt": row["prompt"], "edits": row.get("edits", []),
            "next_token": int(got.next_token[r]), "next_text": tokenizer.decode([int(got.next_token[r])]),
            "logprobs": {tokenizer.decode([t]): round(float(lp[score_ids.index(t)]), 6) for t in wanted},
        })  # fmt: skip
        print(f"[distlens] row {r}: next {results[-1]['next_text']!r}, log-probs {results[-1]['logprobs']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "patch.json").write_text(json.dumps({"model": cfg.model.name, "rows": results}, indent=2))
    return {"rows": len(results), "file": str(out_dir / "patch.json")}


@hydra.main(version_base=None, config_path=CONF, config_name="patch")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with session.refusals():
        summary = run(cfg, out_dir)
        session.save_run_record(cfg, out_dir)
        return summary


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import PatchConf, check_overrides

    check_overrides(PatchConf)
    head_watch.exit_on_loss()
    main()

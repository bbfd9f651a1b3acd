"""Train the PyPI `tuned-lens` package's own lens on the same token sequences distlens trains on, for comparison; runs in its own virtual environment, never in distlens's.

Setup (once; the package's trainer imports `torchdata.dataloader2`, gone from torchdata>=0.10):

    python -m venv /work/tl-venv
    /work/tl-venv/bin/pip install torch==2.13.0          # the CPU wheel first
    /work/tl-venv/bin/pip install tuned-lens==0.2.0      # keeps torch 2.13.0 (it asks torch>=1.13)
    /work/tl-venv/bin/pip install torchdata==0.9.0       # makes tuned_lens.scripts importable

Run:

    /work/tl-venv/bin/python pipelines/bench/tuned_lens_package.py --model DIR --data data.json \
        --out result.json [--steps N --batch B --lr X --warmup W --weight-decay D --seed S]

data.json: {"train": [[ids]...], "heldout": [[ids]...], "steps", "batch", "lr", "warmup",
"weight_decay", "seed"}; flags override its fields. Step s takes the next `batch` train sequences
in the given order, wrapping around.

What the package does (tuned-lens 0.2.0), and how this script maps it:
- `TunedLens.from_model(model)` holds `num_hidden_layers` = L translators, indexed like HF's
  `hidden_states`: translator i reads `hidden_states[i]`, where `hidden_states[0]` is the token
  embeddings and `hidden_states[i]` (1 <= i <= L-1) is block i-1's output. There is no
  translator for `hidden_states[L]`: the package's trainer drops it (`hidden_states[:-1]`), and
  in HF Llama it is already final-normed and gives the model's logits. So distlens layer l
  (block l's output) is package index l+1 for l <= L-2; layer L-1 has no translator and its
  tuned lens is its logit lens, norm(block L-1) @ W_U, i.e. the final distribution itself.
  Translator 0 (embeddings) is trained as the package does and reported apart ("embeddings").
- tuned_i(h) = unembedding(final_norm(h + A_i h + b_i)), A_i and b_i zero at the start
  (`Unembed.forward` = the frozen copy of the model's final norm, then its lm_head, so the lens
  includes the final norm); `LogitLens` is unembedding(final_norm(h)).
- Loss (package `Train.execute`, loss=KL, token_shift 0): for each translator,
  sum_v p_final * (log p_final - log_softmax(lens)) averaged over all positions, one backward
  per translator; the step's gradient is the sum over translators.

Recipes (`--recipe`):
- `package` (default): the package trainer's defaults through its own `ingredients.Optimizer`:
  SGD, Nesterov momentum 0.9, lr = lr_scale * (1 - 0.9) = 0.1, weight decay 1e-3, its
  `create_scheduler` (warmup 0, linear decay to zero), grad-norm clip 1.0. data.json's
  lr/warmup/weight_decay are not used (`--lr-scale`, `--package-optimizer adam` are).
- `adamw`: torch AdamW(lr, betas 0.9/0.999, weight_decay) with distlens's "linear" schedule
  (linear warmup over `warmup` steps, then linear decay to zero at `steps`), no clipping.
The package's trainer autocasts the lens to bfloat16; here it runs in float32 unless
`--bf16-autocast`. Evaluation is float32: per layer, the mean over held-out positions of
KL(final || lens) in nats and the top-1 agreement with the final distribution.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model directory (config.json, model.safetensors, ...)")
    ap.add_argument("--data", required=True, help="data.json with train/heldout token ids and hyperparameters")
    ap.add_argument("--out", required=True, help="result.json to write")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--recipe", choices=("package", "adamw"), default="package")
    ap.add_argument("--package-optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="package recipe: its lr_scale")
    ap.add_argument("--clip", type=float, help="grad-norm clip (default: 1.0 for package, none for adamw)")
    ap.add_argument("--bf16-autocast", action="store_true", help="autocast the lens to bfloat16 in training")
    ap.add_argument("--micro", type=int, default=4, help="sequences per model forward")
    ap.add_argument("--max-heldout", type=int, help="evaluate on the first N held-out sequences only")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--save-lens", help="directory for TunedLens.save (params.pt, config.json)")
    return ap.parse_args(argv)


def load_config(args) -> dict:
    data = json.loads(Path(args.data).read_text())
    cfg = {k: data.get(k) for k in ("steps", "batch", "lr", "warmup", "weight_decay", "seed")}
    for k in cfg:
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    cfg["seed"] = 0 if cfg["seed"] is None else cfg["seed"]
    cfg["warmup"] = 0 if cfg["warmup"] is None else cfg["warmup"]
    cfg["weight_decay"] = 0.0 if cfg["weight_decay"] is None else cfg["weight_decay"]
    missing = [k for k in ("steps", "batch") if cfg[k] is None] + (
        ["lr"] if cfg["lr"] is None and args.recipe == "adamw" else []
    )
    if missing:
        raise SystemExit(f"tuned_lens_package: error: {', '.join(missing)} missing from {args.data} and flags")
    train, heldout = data.get("train") or [], data.get("heldout") or []
    if not train or not heldout:
        raise SystemExit(f"tuned_lens_package: error: {args.data} needs non-empty 'train' and 'heldout'")
    if args.max_heldout:
        heldout = heldout[: args.max_heldout]
    cfg["train"], cfg["heldout"] = train, heldout
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args)
    t_start = time.perf_counter()

    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from tuned_lens.model_surgery import get_transformer_layers
    from tuned_lens.nn import LogitLens, TunedLens
    from tuned_lens.utils import shift_labels, shift_preds

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg["seed"])

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    L = model.config.num_hidden_layers
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    lens = TunedLens.from_model(model)  # L translators, for hidden_states[0..L-1]
    logit_lens = LogitLens.from_model(model)
    assert len(lens) == L
    _, blocks = get_transformer_layers(model)
    captured = {}

    def keep_last_block(_module, _inputs, output):
        captured["last"] = output[0] if isinstance(output, tuple) else output

    blocks[L - 1].register_forward_hook(keep_last_block)

    def run_model(seqs):
        """-> (hidden_states[:-1] (L tensors), final log-probs, block L-1's raw output, mask)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = True
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        final_lp = out.logits.float().log_softmax(-1)
        return out.hidden_states[:-1], final_lp, captured.pop("last"), mask

    # ---- optimizer: the package's own ingredient, or AdamW like distlens ----
    params = [p for p in lens.parameters() if p.requires_grad]
    steps, batch = int(cfg["steps"]), int(cfg["batch"])
    if args.recipe == "package":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tuned_lens.scripts.ingredients as ing
        opt_cfg = ing.Optimizer(optimizer=ing.OptimizerOption(args.package_optimizer), lr_scale=args.lr_scale)
        opt = opt_cfg.create_optim(params)
        scheduler = opt_cfg.create_scheduler(opt, steps)
        clip = 1.0 if args.clip is None else args.clip
        optimizer_info = {
            "recipe": "package",
            "class": type(opt).__name__,
            "defaults": {k: v for k, v in opt.defaults.items() if isinstance(v, (int, float, bool, tuple))},
            "scheduler": f"tuned_lens ingredients.Optimizer.create_scheduler (warmup_steps={opt_cfg.warmup_steps})",
            "clip_grad_norm": clip,
        }
    else:
        opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.999), weight_decay=cfg["weight_decay"])
        warm = int(cfg["warmup"])

        def factor(step):  # distlens actors/tuned_lens.lr_factor, schedule "linear"
            if warm and step < warm:
                return (step + 1) / warm
            return max(0.0, 1.0 - (step - warm) / max(1, steps - warm))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        clip = args.clip
        optimizer_info = {
            "recipe": "adamw",
            "class": "AdamW",
            "defaults": {"lr": cfg["lr"], "betas": [0.9, 0.999], "weight_decay": cfg["weight_decay"]},
            "scheduler": f"linear warmup {warm} steps, then linear decay to 0 at step {steps}",
            "clip_grad_norm": clip,
        }
    log(f"tuned_lens_package: {L} translators, optimizer {optimizer_info}")

    # ---- training: the package trainer's inner loop (loss=KL, token_shift=0) ----
    train = cfg["train"]
    shift = 0
    tokens_seen = 0
    losses_per_step = []
    lens.train()
    t_train = time.perf_counter()
    for step in range(steps):
        seqs = [train[(step * batch + j) % len(train)] for j in range(batch)]
        step_tokens = sum(len(s) for s in seqs)
        opt.zero_grad(set_to_none=False)
        layer_loss = [0.0] * L
        for m0 in range(0, len(seqs), args.micro):
            hidden, final_lp, _, mask = run_model(seqs[m0 : m0 + args.micro])
            labels = shift_labels(final_lp, shift)
            mask = shift_labels(mask, shift)
            weight = mask.sum().item() / step_tokens  # token-weighted; 1/grad_acc_steps for equal lengths
            for i, h in enumerate(hidden):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
                    logits = shift_preds(lens(h, idx=i), shift)
                    kl = torch.sum(labels.exp() * (labels - logits.float().log_softmax(-1)), dim=-1)
                    loss = kl[mask].mean()
                (loss * weight).backward()
                layer_loss[i] += loss.item() * weight
        if clip:
            torch.nn.utils.clip_grad_norm_(lens.parameters(), clip)
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        scheduler.step()
        tokens_seen += step_tokens
        total = sum(layer_loss)
        losses_per_step.append(total)
        elapsed = time.perf_counter() - t_train
        log(
            f"step {step + 1}/{steps} loss {total:.4f} (sum over {L} translators of mean KL, nats; "
            f"mean {total / L:.4f}) lr {lr_now:.3g} tokens {tokens_seen} {tokens_seen / elapsed:.0f} tok/s"
        )
    wall_s = time.perf_counter() - t_train
    lens.eval()
    if args.save_lens:
        lens.save(args.save_lens)

    # ---- evaluation on held-out: distlens layers 0..L-1 (block outputs) + the embeddings ----
    t_eval = time.perf_counter()
    # rows: 0 = embeddings (package idx 0); 1 + l = block l (package idx l+1, none for l = L-1)
    kl_sum = {"tuned": [0.0] * (L + 1), "logit": [0.0] * (L + 1)}
    top1 = {"tuned": [0] * (L + 1), "logit": [0] * (L + 1)}
    count = 0
    heldout = cfg["heldout"]
    with torch.no_grad():
        for m0 in range(0, len(heldout), args.micro):
            hidden, final_lp, last_raw, mask = run_model(heldout[m0 : m0 + args.micro])
            final_top = final_lp.argmax(-1)[mask]
            fin = final_lp[mask]
            count += int(mask.sum())
            for row in range(L + 1):
                if row < L:  # hidden_states[row]: embeddings (row 0) or block row-1's output
                    h = hidden[row]
                    outs = {"tuned": lens(h, idx=row), "logit": logit_lens(h, idx=row)}
                else:  # block L-1: no translator in the package; its lens is norm + unembed
                    outs = {"logit": logit_lens(last_raw, idx=L - 1)}
                    outs["tuned"] = outs["logit"]
                for name, logits in outs.items():
                    lp = logits[mask].float().log_softmax(-1)
                    kl_sum[name][row] += float(torch.sum(fin.exp() * (fin - lp), -1).sum())
                    top1[name][row] += int((lp.argmax(-1) == final_top).sum())
    eval_s = time.perf_counter() - t_eval

    def per_layer(d, row):
        return d[row] / count

    result = {
        "package_version": version("tuned-lens"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "layers": list(range(L)),
        "tuned_kl": [per_layer(kl_sum["tuned"], 1 + layer) for layer in range(L)],
        "logit_kl": [per_layer(kl_sum["logit"], 1 + layer) for layer in range(L)],
        "tuned_top1": [per_layer(top1["tuned"], 1 + layer) for layer in range(L)],
        "logit_top1": [per_layer(top1["logit"], 1 + layer) for layer in range(L)],
        "tokens_seen": tokens_seen,
        "wall_s": wall_s,
        "tokens_per_s": tokens_seen / wall_s if wall_s > 0 else None,
        "embeddings": {
            "package_index": 0,
            "tuned_kl": per_layer(kl_sum["tuned"], 0),
            "logit_kl": per_layer(kl_sum["logit"], 0),
            "tuned_top1": per_layer(top1["tuned"], 0),
            "logit_top1": per_layer(top1["logit"], 0),
        },
        "package_index": [layer + 1 if layer < L - 1 else None for layer in range(L)],
        "heldout_tokens": count,
        "train_loss": losses_per_step,
        "steps": steps,
        "batch": batch,
        "optimizer": optimizer_info,
        "bf16_autocast": bool(args.bf16_autocast),
        "eval_s": eval_s,
        "total_s": time.perf_counter() - t_start,
        "notes": (
            "tuned-lens TunedLens.from_model: L translators indexed by HF hidden_states index "
            "(0 = embeddings, i = block i-1's output); hidden_states[L] (final-normed) has none. "
            "layers[l] = block l's output = package index l+1 (package_index); layer L-1 has no "
            "translator, so its tuned lens is its logit lens norm(h) @ W_U, equal to the final "
            "distribution (KL ~0, top-1 1). The package lens is unembedding(final_norm(h + A h + b)) "
            "(final norm included, A, b zero at init); LogitLens is unembedding(final_norm(h)). "
            "Training loss: sum over the L translators (embeddings included) of the mean over all "
            "positions of KL(final || lens), one backward per translator; wall_s and tokens_per_s "
            "cover training only (model forward included). KL in nats per token over every held-out "
            "position; top1 = argmax lens == argmax final. Optimizer: see 'optimizer'."
        ),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"tuned_lens_package: wrote {args.out} (train {wall_s:.1f}s, eval {eval_s:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

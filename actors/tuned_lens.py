"""The tuned lens (Belrose et al. 2023): one affine translator per layer,
`tuned_l(h) = lens(h + A_l h + b_l)`, with A and b zero at the start (an untrained tuned lens is
the logit lens), trained to minimise KL(final || tuned_l) where layer l lives: each stage holds
and trains its own layers' translators against the final distribution rebuilt from the
final-normed states the last stage sends back (no backward pass through the model, no
gradients between stages). Translators are saved as safetensors with metadata, checked
against the running model when loaded."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class Translators(nn.Module):
    """The translators of `layers`: weight [n, d, d] (A) and bias [n, d] (b), zero at the start."""

    def __init__(self, layers: tuple[int, ...], d_model: int):
        super().__init__()
        self.layers = tuple(layers)
        self.weight = nn.Parameter(torch.zeros(len(layers), d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(len(layers), d_model))

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden: [n, d_model] at `layer`'s output -> h + A h + b."""
        i = self.layers.index(layer)
        return hidden + hidden @ self.weight[i].T.to(hidden.dtype) + self.bias[i].to(hidden.dtype)


def kl_to_final(logits: torch.Tensor, final_logits: torch.Tensor) -> torch.Tensor:
    """Per row KL(softmax(final_logits) || softmax(logits)) in nats: [n, vocab] each -> [n]."""
    final = torch.log_softmax(final_logits.float(), -1)
    return (final.exp() * (final - torch.log_softmax(logits.float(), -1))).sum(-1)


def save_translators(path: str | Path, translators: Translators, meta: dict) -> Path:
    """Safetensors with metadata: model, revision, layers, d_model and whatever `meta` adds
    (tokens seen, final loss, the training config)."""
    from safetensors.torch import save_file

    d = translators.weight.shape[-1]
    info = {**meta, "layers": list(translators.layers), "d_model": d}
    tensors = {"weight": translators.weight.detach().cpu().contiguous(), "bias": translators.bias.detach().cpu()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in info.items()})
    return Path(path)


def load_translators(path: str | Path, model: str, d_model: int, n_layers: int) -> tuple[Translators, dict]:
    """Translators from `path`, refused in one line when they were trained for another model,
    another hidden size, or layers the model does not have."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"capture.tuned_lens={str(path)!r} does not exist: give a translators .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except Exception as err:
        raise ValueError(f"capture.tuned_lens={str(path)!r} is not a translators file ({type(err).__name__})") from None
    if meta.get("d_model") != d_model or weight.shape[-1] != d_model:
        raise ValueError(
            f"capture.tuned_lens={str(path)!r} has hidden size {meta.get('d_model')}; this model's is {d_model}"
        )
    if meta.get("model") != model:
        raise ValueError(
            f"capture.tuned_lens={str(path)!r} was trained on model {meta.get('model')!r}; this run uses {model!r}"
        )
    layers = tuple(meta.get("layers", ()))
    if any(not 0 <= layer < n_layers for layer in layers) or len(layers) != weight.shape[0]:
        raise ValueError(
            f"capture.tuned_lens={str(path)!r} holds layers {list(layers)}; this model has 0..{n_layers - 1}"
        )
    translators = Translators(layers, d_model)
    with torch.no_grad():
        translators.weight.copy_(weight)
        translators.bias.copy_(bias)
    return translators, meta


SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TuneSpec:
    """How a stage trains its translators: AdamW over `steps` optimizer steps (one per
    micro-batch), the learning rate warmed up linearly over `warmup` steps, then held
    (`constant`) or decayed to zero (`linear`, `cosine`). Checkpoints every `save_every` steps
    into `checkpoint_dir`; `resume_step` > 0 starts from that step's checkpoint."""

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    schedule: str = "linear"
    checkpoint_dir: str = ""
    save_every: int = 0
    resume_step: int = 0
    model: str = ""  # recorded in the translators' metadata


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, steps - warmup)
    return max(0.0, 1.0 - done) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


class TranslatorTrainer:
    """One stage's translators and optimizer. `train` takes one micro-batch's states of each
    layer and the final-normed states of the same positions, and makes one optimizer step."""

    def __init__(self, spec: TuneSpec, lens, layers: tuple[int, ...], d_model: int, stage: int, device):
        self.spec, self.lens, self.stage = spec, lens, stage
        for p in [*lens.parameters(), lens.weight]:  # the head is frozen: gradients reach the translators only
            p.requires_grad_(False)
        self.translators = Translators(layers, d_model).to(device)
        self.optimizer = torch.optim.AdamW(
            self.translators.parameters(), lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay
        )
        self.step = 0
        self.tokens = 0
        if spec.resume_step:
            self.load(spec.resume_step)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's head on a (not yet normed) state, soft-capped as the model does: [n, vocab]."""
        logits = self.lens.norm(hidden) @ self.lens.weight.T
        cap = self.lens.softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def train(self, hidden: dict, final: torch.Tensor) -> dict:
        """hidden: {layer: [n, d]}; final: [n, d] final-normed. Returns {layer: [n] KL before
        the step}; the loss is the sum over layers of the mean KL over positions."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.spec.lr * lr_factor(self.step, self.spec.steps, self.spec.warmup, self.spec.schedule)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            final_logits = final @ self.lens.weight.T
            cap = self.lens.softcap
            final_logits = final_logits if cap is None else torch.tanh(final_logits / cap) * cap
        losses = {}
        with torch.enable_grad():
            for layer, h in hidden.items():  # layers are independent: one backward each keeps one graph alive
                kl = kl_to_final(self._logits(self.translators(h.detach(), layer)), final_logits)
                kl.mean().backward()
                losses[layer] = kl.detach()
        self.optimizer.step()
        self.step += 1
        self.tokens += int(final.shape[0])
        if self.step == self.spec.steps or (self.spec.save_every and self.step % self.spec.save_every == 0):
            self.save()
        return losses

    def _path(self, step: int) -> Path:
        return Path(self.spec.checkpoint_dir) / f"stage{self.stage}.step{step}.safetensors"

    def save(self) -> Path:
        """Translators, AdamW moments and counters at this step (written aside, then renamed)."""
        from safetensors.torch import save_file

        tensors = {"weight": self.translators.weight.detach().cpu(), "bias": self.translators.bias.detach().cpu()}
        for name, p in (("weight", self.translators.weight), ("bias", self.translators.bias)):
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    tensors[f"adam.{name}.{key}"] = (
                        torch.as_tensor(state[key]).detach().cpu().reshape(-1 if key == "step" else state[key].shape)
                    )
        meta = {"step": self.step, "tokens": self.tokens, "layers": list(self.translators.layers)}
        path = self._path(self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_suffix(".partial")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(aside),
            metadata={k: json.dumps(v) for k, v in meta.items()},
        )
        aside.rename(path)
        return path

    def load(self, step: int) -> None:
        from safetensors import safe_open

        path = self._path(step)
        if not path.is_file():
            raise ValueError(f"resume: no checkpoint {path} (stage {self.stage} at step {step})")
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        with torch.no_grad():
            self.translators.weight.copy_(tensors["weight"])
            self.translators.bias.copy_(tensors["bias"])
        for name, p in (("weight", self.translators.weight), ("bias", self.translators.bias)):
            if f"adam.{name}.exp_avg" in tensors:
                self.optimizer.state[p] = {
                    "step": tensors[f"adam.{name}.step"].reshape(()).clone(),
                    "exp_avg": tensors[f"adam.{name}.exp_avg"].to(p.device),
                    "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(p.device),
                }
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])


def merge_stage_checkpoints(checkpoints: Path, n_stages: int, step: int, d_model: int, path: Path, meta: dict) -> Path:
    """One translators file from every stage's checkpoint at `step` (layers in order)."""
    from safetensors import safe_open

    weights, biases, layers = [], [], []
    for s in range(n_stages):
        with safe_open(str(Path(checkpoints) / f"stage{s}.step{step}.safetensors"), framework="pt") as f:
            layers += json.loads(f.metadata()["layers"])
            weights.append(f.get_tensor("weight"))
            biases.append(f.get_tensor("bias"))
    translators = Translators(tuple(layers), d_model)
    with torch.no_grad():
        translators.weight.copy_(torch.cat(weights))
        translators.bias.copy_(torch.cat(biases))
    return save_translators(path, translators, meta)

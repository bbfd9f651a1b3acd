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


def check_translators(path: str | Path, model: str, d_model: int, n_layers: int) -> dict:
    """The metadata of the translators file at `path`, refused in one line when it is missing,
    not a translators file, or trained for another model, another hidden size, or layers the
    model does not have. Reads the header only."""
    from safetensors import safe_open

    path = Path(path)
    where = f"capture.tuned_lens={str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist: give a translators .safetensors file (python -m pipelines.tune)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            shape = tuple(f.get_slice("weight").get_shape())
            bias = tuple(f.get_slice("bias").get_shape())
    except Exception as err:
        raise ValueError(f"{where} is not a translators file ({type(err).__name__})") from None
    if meta.get("d_model") != d_model or shape[-1] != d_model:
        raise ValueError(f"{where} has hidden size {meta.get('d_model')}; this model's is {d_model}")
    if model and meta.get("model") != model:
        raise ValueError(f"{where} was trained on model {meta.get('model')!r}; this run uses {model!r}")
    layers = tuple(meta.get("layers", ()))
    if any(not 0 <= layer < n_layers for layer in layers) or len(layers) != shape[0] or bias[0] != shape[0]:
        raise ValueError(f"{where} holds layers {list(layers)}; this model has 0..{n_layers - 1}")
    return meta


def load_translators(
    path: str | Path, model: str, d_model: int, n_layers: int, only: tuple[int, ...] | None = None
) -> tuple[Translators, dict]:
    """Translators from `path` after `check_translators`; `only`: just these layers' (a stage
    reads its own slice of the file, never the whole of it). Layers the file lacks are left out
    (their tuned lens is the logit lens)."""
    from safetensors import safe_open

    meta = check_translators(path, model, d_model, n_layers)
    stored = list(meta["layers"])
    keep = [layer for layer in stored if only is None or layer in only]
    translators = Translators(tuple(keep), d_model)
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        weight, bias = f.get_slice("weight"), f.get_slice("bias")
        for i, layer in enumerate(keep):
            j = stored.index(layer)
            translators.weight[i].copy_(weight[j : j + 1][0])
            translators.bias[i].copy_(bias[j : j + 1][0])
    return translators, meta


SCHEDULES = ("constant", "linear", "cosine")
ROWS_PER_CHUNK = 128  # positions per head product in training: [128, vocab] float32 stays small


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
        self.last_loss: float | None = None  # the last step's KL, averaged over layers (progress bars)
        if spec.resume_step:
            self.load(spec.resume_step)

    @classmethod
    def for_stage(cls, stage, lens, n_layers: int, d_model: int, device) -> TranslatorTrainer:
        """The trainer of a stage (a `stage.StageSpec` with `tune` set): the captured layers of
        its slice, less the model's last (its lens is the final distribution: nothing to learn)."""
        last = n_layers - 1
        layers = tuple(i for i in stage.capture.layers if stage.start <= i < stage.end and i != last)
        return cls(stage.tune, lens, layers, d_model, stage.stage, device)

    def train_window(self, windows: dict, final: torch.Tensor, rows: torch.Tensor) -> dict:
        """One optimizer step on a stage's lens window: `windows` {(layer, component): [batch, n, d]}
        its captured states, `final` [batch, n, d] the final-normed states of the same columns,
        `rows` the flat (batch-major) positions to learn from. Returns `train`'s {layer: [rows] KL}."""
        dev_rows = rows.to(final.device)
        batch, n, d = final.shape
        hidden = {
            layer: windows[(layer, comp)].reshape(batch * n, d)[dev_rows]
            for layer, comp in windows
            if comp == "resid_post" and layer in self.translators.layers
        }
        return self.train(hidden, final.reshape(batch * n, d)[dev_rows])

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.lens.softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def train(self, hidden: dict, final: torch.Tensor) -> dict:
        """hidden: {layer: [n, d]}; final: [n, d] final-normed. Returns {layer: [n] KL before
        the step}; the loss is the sum over layers of the mean KL over positions.

        The head's part of the gradient is written out rather than left to autograd: for
        KL(p_f || softmax(z)) the gradient in the logits is softmax(z) - p_f (times the soft-cap's
        derivative 1 - (z/c)^2), so each `ROWS_PER_CHUNK` rows need one product with the head
        forward and one back, no [n, vocab] graph is kept, and the final distribution is built
        once per step for every layer. Autograd carries the rest (final norm and translator)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.spec.lr * lr_factor(self.step, self.spec.steps, self.spec.warmup, self.spec.schedule)
        self.optimizer.zero_grad(set_to_none=True)
        weight, cap = self.lens.weight, self.lens.softcap
        n = final.shape[0]
        with torch.no_grad():  # the final distribution, once: log p_f, p_f and sum p_f log p_f per row
            log_pf = torch.log_softmax(self._cap(final.to(weight.dtype) @ weight.T).float(), -1)
            pf = log_pf.exp()
            pf_log_pf = (pf * log_pf).sum(-1)
            del log_pf
        losses = {}
        for layer, h in hidden.items():
            kl = torch.empty(n, device=final.device)
            for a in range(0, n, ROWS_PER_CHUNK):
                rows = slice(a, a + ROWS_PER_CHUNK)
                with torch.enable_grad():
                    x = self.lens.norm(self.translators(h[rows].detach(), layer))
                with torch.no_grad():
                    z = self._cap(x.detach().to(weight.dtype) @ weight.T).float()  # [c, vocab]
                    log_q = torch.log_softmax(z, -1)
                    kl[rows] = pf_log_pf[rows] - (pf[rows] * log_q).sum(-1)
                    grad = log_q.exp_().sub_(pf[rows]).div_(n)  # d mean(KL) / d z
                    if cap is not None:
                        grad.mul_(1 - (z / cap) ** 2)
                    grad_x = (grad.to(weight.dtype) @ weight).to(x.dtype)
                x.backward(grad_x)
            losses[layer] = kl
        self.optimizer.step()
        self.last_loss = float(torch.stack([kl.mean() for kl in losses.values()]).mean()) if losses else None
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

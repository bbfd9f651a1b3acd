"""The OpenAI API of `distlens serve`, without the server: a request body checked field by field
into an `actors.serving.ServeRequest` (a bad value is a `RequestError` naming the field: HTTP
400), the registered steering vectors, and the response bodies (completion, chat completion,
their streamed chunks, the `distlens.lens` readout). pipelines/serve.py puts it behind HTTP."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.sampling import SamplingSpec
from actors.serving import ServeRequest
from actors.steering import VectorEdit
from actors.vocabulary import STEERING_POSITIONS, STEERING_SITES

# Fields that change nothing in the output are accepted; any other field not handled is refused.
NO_EFFECT = {"user", "stream_options", "metadata", "store", "service_tier", "parallel_tool_calls"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n", "distlens"}
COMPLETION = COMMON | {"prompt", "logprobs", "echo", "best_of", "presence_penalty", "frequency_penalty", "logit_bias"}
CHAT = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "presence_penalty",
                 "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice"}  # fmt: skip
MAX_TOP_LOGPROBS = 20


class RequestError(ValueError):
    """A request the server refuses: `status` (400, 401, 404), the field it names, the message."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(self.status)
        return {"error": {"message": str(self), "type": kind or "server_error", "param": self.field, "code": None}}


@dataclass(frozen=True)
class Vector:
    """A registered steering vector: its values and where it was built (the defaults of an edit)."""

    name: str
    values: np.ndarray  # [d_model] float32
    layer: int
    site: str
    source: str

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer, "site": self.site, "norm": float(np.linalg.norm(self.values)),
                "source": self.source}  # fmt: skip


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need of the served model and its capture."""

    name: str
    n_layers: int
    d_model: int
    context: int  # max_position_embeddings
    sites: tuple[str, ...]  # the steering sites this family has
    lens_layers: tuple[int, ...]  # the layers the stages capture
    components: tuple[str, ...]
    lenses: tuple[str, ...]
    k: int
    eos: tuple[int, ...]
    pad: int


def model_facts(cfg, model_path: str, spec):
    """(serve_api.ModelFacts, the Hugging Face config) of the served model and its capture."""
    from transformers import AutoConfig

    from actors.adapters import adapter_for
    from actors.checkpoint import load_tokenizer
    from actors.run_spec import captured_layers
    from pipelines.prompts import special_ids

    hf = AutoConfig.from_pretrained(model_path)
    n = hf.num_hidden_layers
    cap = spec.capture
    eos, pad = special_ids(load_tokenizer(model_path), hf)
    have = adapter_for(hf.model_type).sites_for(hf)
    facts = ModelFacts(
        name=cfg.serve.model_name or cfg.model.name, n_layers=n, d_model=hf.hidden_size,
        context=int(getattr(hf, "max_position_embeddings", 2048) or 2048),
        sites=tuple(s for s in STEERING_SITES if s in have),
        lens_layers=captured_layers(cap, n),
        components=tuple(cap.components), lenses=tuple(cap.lenses) if cap.lens else (), k=cap.k, eos=tuple(eos), pad=pad,
    )  # fmt: skip
    return facts, hf


class Vectors:
    """The server's steering vectors by name: registered at start (`serve.vectors`) or by POST."""

    def __init__(self, facts: ModelFacts):
        self.facts, self.table = facts, {}

    def add(self, body: dict, source: str = "POST /v1/vectors") -> Vector:
        if not isinstance(body, dict):
            raise RequestError(None, "the body must be a JSON object with name, layer, site and values")
        _only(body, {"name", "layer", "site", "values"}, "")
        name = body.get("name")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise RequestError("name", f"name={name!r}: a non-empty string of at most 128 characters")
        values = _vector_values(body.get("values"), "values", self.facts.d_model)
        layer = _layer(body.get("layer"), "layer", self.facts.n_layers)
        site = _site(body.get("site"), "site", self.facts.sites)
        self.table[name] = vec = Vector(name, values, layer, site, source)
        return vec

    def load(self, entry: str, model: str) -> list[Vector]:
        """`serve.vectors` entry: a steering-vector .safetensors file (named after the file), a
        steering study's folder (its chosen layer's vector, named after the dataset), or a steer
        run folder of several datasets (each one's); `name=path` names the vector."""
        from pipelines.vectors import SteeringVector

        name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = Path(path).expanduser()
        if path.is_dir():
            folders = (
                [path] if (path / "summary.json").is_file() else sorted(p.parent for p in path.glob("*/summary.json"))
            )
            if not folders:
                raise ValueError(
                    f"serve.vectors: {path} holds no steering study (no summary.json in it or its folders)"
                )
            import json

            out = []
            for folder in folders:
                study = json.loads((folder / "summary.json").read_text())
                vec = SteeringVector.load(
                    folder / f"vector_layer{study['best_layer']}.safetensors", model, self.facts.d_model
                )
                out.append(self._put(name or study.get("dataset") or folder.name, vec, str(folder)))
            return out
        vec = SteeringVector.load(path, model, self.facts.d_model)
        return [self._put(name or path.stem, vec, str(path))]

    def _put(self, name: str, vec, source: str) -> Vector:
        if not 0 <= vec.layer < self.facts.n_layers or vec.site not in self.facts.sites:
            raise ValueError(f"serve.vectors: {source} steers layer {vec.layer} at {vec.site}, which this model lacks")
        self.table[name] = v = Vector(name, np.asarray(vec.vector, np.float32), int(vec.layer), vec.site, source)
        return v


@dataclass(frozen=True)
class LensAsk:
    """What a request's `distlens.lens` asks for: a subset of what the stages capture."""

    lenses: tuple[str, ...]
    layers: tuple[int, ...]
    components: tuple[str, ...]
    k: int
    positions: str  # generated | all


@dataclass(frozen=True)
class Parsed:
    request: ServeRequest
    stream: bool
    lens: LensAsk | None
    prompt_tokens: int


def parse(body, kind: str, facts: ModelFacts, vectors: Vectors, encode) -> Parsed:
    """A /v1/completions (`kind` "completion") or /v1/chat/completions ("chat") body as the
    engine's request; `encode(prompt | messages)` gives its token ids."""
    if not isinstance(body, dict):
        raise RequestError(None, "the body must be a JSON object")
    _only(body, (COMPLETION if kind == "completion" else CHAT) | NO_EFFECT, "")
    model = body.get("model")
    if model not in (facts.name, None):
        raise RequestError("model", f"model={model!r} is not served here: this server serves {facts.name!r}", 404)
    for name, neutral in (("n", 1), ("best_of", 1), ("echo", False), ("presence_penalty", 0), ("frequency_penalty", 0)):
        if body.get(name, neutral) not in (neutral, None):
            raise RequestError(name, f"{name}={body[name]!r} is not supported: only {name}={neutral!r}")
    for name in ("logit_bias", "tools", "tool_choice"):
        if body.get(name) not in (None, {}, [], "none"):
            raise RequestError(name, f"{name} is not supported by this server")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise RequestError("response_format", "only response_format {'type': 'text'} is supported")
    ids = _prompt_ids(body, kind, encode)
    limit = body.get("max_completion_tokens") if kind == "chat" and "max_completion_tokens" in body else None
    field = "max_completion_tokens" if limit is not None else "max_tokens"
    max_tokens = body.get(field, 16) if limit is None else limit
    room = facts.context - len(ids)
    if room < 1:
        raise RequestError(
            "messages" if kind == "chat" else "prompt",
            f"the prompt's {len(ids)} tokens fill the context of {facts.context}",
        )
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= room:
        raise RequestError(
            field, f"{field}={max_tokens!r} is out of range: valid is 1..{room} (context {facts.context} minus the "
            f"prompt's {len(ids)} tokens)"
        )  # fmt: skip
    sampling = _sampling(body, facts)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
        raise RequestError("stop", "stop must be a non-empty string or a list of at most 4 of them")
    logprobs = _logprobs(body, kind)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"stream={stream!r}: true or false")
    extra = body.get("distlens") or {}
    if not isinstance(extra, dict):
        raise RequestError("distlens", "distlens must be an object with optional steering and lens")
    _only(extra, {"steering", "lens"}, "distlens.")
    edits = _steering(extra.get("steering"), facts, vectors)
    lens = _lens(extra.get("lens"), facts)
    positions = None
    if lens is not None:  # the position whose lens predicts each generated token, or every position
        first = len(ids) - 1 if lens.positions == "generated" else 0
        positions = tuple(range(first, len(ids) - 1 + max_tokens))
    request = ServeRequest(tuple(ids), max_tokens, tuple(stop), sampling, edits, positions, logprobs)
    return Parsed(request, stream, lens, len(ids))


def _only(body: dict, allowed: set, prefix: str) -> None:
    for key in body:
        if key not in allowed:
            raise RequestError(
                f"{prefix}{key}", f"{prefix}{key} is not supported by this server: valid are {sorted(allowed)}"
            )


def _prompt_ids(body: dict, kind: str, encode) -> list[int]:
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt", "prompt must be one non-empty string (one prompt per request)")
        return encode(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise RequestError(f"messages[{i}]", f"messages[{i}] must be {{role: system|user|assistant, content: str}}")
    return encode(messages)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        raise RequestError(name, f"{name}={value!r} is out of range: valid is {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _sampling(body: dict, facts: ModelFacts) -> SamplingSpec | None:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError("seed", f"seed={seed!r}: an integer >= 0")
    if temperature == 0:
        return None
    if seed is None:
        seed = uuid.uuid4().int % 2**63
    return SamplingSpec(temperature, top_p, seed, facts.eos, facts.pad)


def _logprobs(body: dict, kind: str) -> int | None:
    if kind == "completion":
        n = body.get("logprobs")
        if n is None:
            return None
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS:
            raise RequestError("logprobs", f"logprobs={n!r}: an integer 0..{MAX_TOP_LOGPROBS}")
        return n
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want not in (None, True, False):
        raise RequestError("logprobs", f"logprobs={want!r}: true or false")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise RequestError("top_logprobs", f"top_logprobs={top!r}: an integer 0..{MAX_TOP_LOGPROBS}")
    if top is not None and not want:
        raise RequestError("top_logprobs", "top_logprobs needs logprobs=true")
    return (top or 0) if want else None


def _layer(value, field: str, n_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_layers:
        raise RequestError(field, f"{field}={value!r} is out of range: valid is 0..{n_layers - 1}")
    return value


def _site(value, field: str, sites) -> str:
    if value not in sites:
        raise RequestError(field, f"{field}={value!r} is not valid: choose one of {list(sites)}")
    return value


def _vector_values(values, field: str, d_model: int) -> np.ndarray:
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise RequestError(field, f"{field} must be a list of {d_model} numbers")
    if len(values) != d_model:
        raise RequestError(field, f"{field} has {len(values)} values; this model's d_model is {d_model}")
    arr = np.asarray(values, np.float64)
    if not np.isfinite(arr).all() or not np.isfinite(arr.astype(np.float32)).all():
        raise RequestError(field, f"{field} holds a value that is not finite in float32")
    return arr.astype(np.float32)


def _steering(items, facts: ModelFacts, vectors: Vectors) -> tuple:
    if items is None:
        return ()
    if not isinstance(items, list) or len(items) > 16:
        raise RequestError("distlens.steering", "distlens.steering must be a list of at most 16 edits")
    edits = []
    for i, item in enumerate(items):
        at = f"distlens.steering[{i}]"
        if not isinstance(item, dict):
            raise RequestError(at, f"{at} must be {{vector, layer, site, positions, coefficient}}")
        _only(item, {"vector", "layer", "site", "positions", "coefficient"}, f"{at}.")
        vector = item.get("vector")
        if isinstance(vector, str):
            if vector not in vectors.table:
                raise RequestError(
                    f"{at}.vector", f"{at}.vector={vector!r} is not registered: known are {sorted(vectors.table)} "
                    "(GET /v1/vectors)"
                )  # fmt: skip
            known = vectors.table[vector]
            values, layer, site = known.values, item.get("layer", known.layer), item.get("site", known.site)
        else:
            values = _vector_values(vector, f"{at}.vector", facts.d_model)
            if "layer" not in item or "site" not in item:
                raise RequestError(f"{at}.layer", f"{at}: an inline vector needs layer and site")
            layer, site = item["layer"], item["site"]
        layer = _layer(layer, f"{at}.layer", facts.n_layers)
        site = _site(site, f"{at}.site", facts.sites)
        positions = item.get("positions", "all")
        if isinstance(positions, bool) or not (
            positions in STEERING_POSITIONS or isinstance(positions, int) and positions >= 0
        ):
            raise RequestError(
                f"{at}.positions", f"{at}.positions={positions!r}: one of {list(STEERING_POSITIONS)} or an int >= 0"
            )  # fmt: skip
        c = item.get("coefficient", 1.0)
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or abs(c) > 1e6:
            raise RequestError(f"{at}.coefficient", f"{at}.coefficient={c!r}: a finite number (|c| <= 1e6)")
        edits.append(VectorEdit(values, layer, site, positions, float(c)))
    return tuple(edits)


def _lens(ask, facts: ModelFacts) -> LensAsk | None:
    if ask is None:
        return None
    if not isinstance(ask, dict):
        raise RequestError("distlens.lens", "distlens.lens must be {lenses, layers, k, components, positions}")
    _only(ask, {"lenses", "layers", "k", "components", "positions"}, "distlens.lens.")
    if not facts.lens_layers:
        raise RequestError("distlens.lens", "this server captures no layers (capture.layers=[]): no lens to return")

    def subset(name: str, have: tuple, default: tuple) -> tuple:
        got = ask.get(name, list(default))
        if not isinstance(got, list) or not got or any(g not in have for g in got):
            raise RequestError(
                f"distlens.lens.{name}", f"distlens.lens.{name}={got!r}: a non-empty list from {list(have)}"
            )
        return tuple(dict.fromkeys(got))

    layers = ask.get("layers")
    if layers is not None:  # negative counts from the end, as capture.layers does
        if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise RequestError("distlens.lens.layers", "distlens.lens.layers must be a list of layer indices")
        layers = [i % facts.n_layers if -facts.n_layers <= i < 0 else i for i in layers]
        ask = dict(ask, layers=layers)
    k = ask.get("k", min(5, facts.k))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= facts.k:
        raise RequestError(
            "distlens.lens.k", f"distlens.lens.k={k!r} is out of range: valid is 1..{facts.k} (capture.k)"
        )
    positions = ask.get("positions", "generated")
    if positions not in ("generated", "all"):
        raise RequestError("distlens.lens.positions", f"distlens.lens.positions={positions!r}: generated or all")
    return LensAsk(
        subset("lenses", facts.lenses, ("logit",)), tuple(sorted(subset("layers", facts.lens_layers, facts.lens_layers))),
        subset("components", facts.components, facts.components[:1]), k, positions,
    )  # fmt: skip


# -- responses -------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def lens_body(lens: dict, ask: LensAsk, facts: ModelFacts, ids: list[int], decode) -> list[dict]:
    """`distlens.lens`: per position (the engine's {position: {(layer, component index): fields}}),
    the requested lenses, layers and components, each with its top-k ids, decoded tokens and
    log-probs, entropy and KL to the final layer. `ids`: prompt and generated tokens."""
    out = []
    for position, cells in sorted(lens.items()):
        entries = []
        for layer in ask.layers:
            for comp in ask.components:
                fields = cells.get((layer, facts.components.index(comp)))
                if fields is None:
                    continue
                for name in ask.lenses:
                    pre = "" if name == "logit" else f"{name}_"
                    top = [int(t) for t in fields[f"{pre}topk_ids"][: ask.k]]
                    entries.append({
                        "layer": layer, "component": comp, "lens": name, "top_ids": top,
                        "top_tokens": [decode([t]) for t in top],
                        "top_logprobs": [float(v) for v in fields[f"{pre}topk_logprobs"][: ask.k]],
                        "entropy": _float(fields.get(f"{pre}entropy")),
                        "kl_to_final": _float(fields.get(f"{pre}kl_to_final")),
                    })  # fmt: skip
        nxt = ids[position + 1] if position + 1 < len(ids) else None
        out.append({"position": position, "token_id": ids[position], "next_token_id": nxt, "cells": entries})
    return out


def _float(x):
    if x is None:
        return None
    v = float(np.asarray(x))
    return v if math.isfinite(v) else None


def logprob_entry(token: int, got, decode) -> dict:
    """One generated token's logprobs in the chat format ({token, logprob, bytes, top_logprobs})."""
    chosen, top_ids, top_values = got
    return {
        "token": decode([token]), "logprob": chosen, "bytes": list(decode([token]).encode()),
        "top_logprobs": [{"token": decode([t]), "logprob": v, "bytes": list(decode([t]).encode())}
                         for t, v in zip(top_ids, top_values)],
    }  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def created() -> int:
    return int(time.time())

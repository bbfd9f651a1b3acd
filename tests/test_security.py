"""Security defaults: weights never come from pickle, model code never comes from the
checkpoint (no trust_remote_code), config values cannot name classes to build, and a local
Ray cluster the driver starts listens on loopback only."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

from driver import REPO, run_driver


class _Trap:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _driver(model, tmp_path, *extra):
    return run_driver(
        "pipelines.lens", f"model.name={model}", "cluster=inprocess", f"storage.root={tmp_path}", "storage.run=r",
        *extra, cwd=tmp_path,
    )  # fmt: skip


def test_a_pickle_checkpoint_is_refused_unopened(tiny_with_tokenizer, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text((tiny_with_tokenizer / "config.json").read_text())
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    result = _driver(model, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds no *.safetensors: distlens loads safetensors only, never pickle" in result.stderr
    assert "pytorch_model.bin" in result.stderr
    assert not marker.exists() and not (tmp_path / "r" / "lens.zarr").exists()


def test_checkpoint_code_is_never_run(tiny_with_tokenizer, tmp_path):
    model = tmp_path / "remote"
    model.mkdir()
    marker = tmp_path / "imported"
    (model / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes((tiny_with_tokenizer / "model.safetensors").read_bytes())
    result = _driver(model, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "distlens: error:" in result.stderr
    assert not marker.exists()


def test_config_cannot_name_a_class_to_instantiate(tiny_with_tokenizer, tmp_path):
    marker = tmp_path / "instantiated"
    result = _driver(tiny_with_tokenizer, tmp_path, "+model._target_=pathlib.Path.touch", f"+model.self={marker}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unknown config key 'model._target_': valid keys of model are" in result.stderr
    assert not marker.exists() and not (tmp_path / "r").exists()
    sources = [p.read_text() for d in ("actors", "pipelines") for p in (REPO / d).glob("*.py")]
    assert not any("instantiate(" in text for text in sources)  # no code path builds objects from config


def test_a_local_cluster_listens_on_loopback_only(tmp_path):
    script = (
        "from types import SimpleNamespace\n"
        "from pipelines.session import connect_ray\n"
        "import ray\n"
        "connect_ray(SimpleNamespace(address=None, num_cpus=1))\n"
        "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()}), ray.get_runtime_context().gcs_address)\n"
        "ray.shutdown()\n"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": __import__("os").environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    addresses, gcs = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert addresses == "['127.0.0.1']" and gcs.startswith("127.0.0.1:")

"""A Python with the heavy libraries already imported that forks one child per driver run, so
each `python -m pipelines.<driver>` of the tests skips seconds of imports but still runs as a
process of its own: its own exit code, stdout and stderr, atexit handlers and Ray cluster.

Protocol (one JSON object per line on stdin, answers on stdout): a request
{"argv", "cwd", "env", "out", "err", "script"} gets {"pid"} once the child runs, then
{"returncode"} once it has ended (negative: the signal that ended it, as `subprocess`).
Only third-party libraries are imported here: the project's own modules (some keep
per-process state, e.g. pipelines/run_dir.py's start time) import in each child, and so does
Ray, whose token authentication is settled by the first `ray.init` of a process."""

from __future__ import annotations

import json
import os
import signal
import sys

ANSWERS = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's; what the imports print goes to stderr
os.dup2(2, 1)

import gc  # noqa: E402

gc.disable()  # the imports below with the collector paused, then frozen (as actors/libraries.py does)
import deepspeed  # noqa: E402, F401
import hydra  # noqa: E402, F401
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import numcodecs  # noqa: E402, F401
import omegaconf  # noqa: E402, F401
import safetensors.torch  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401
import xarray  # noqa: E402, F401
import zarr  # noqa: E402, F401
from transformers import AutoModelForCausalLM  # noqa: E402, F401


def _warm() -> None:
    """What a driver run imports lazily, done once here: transformers' per-family config and
    modeling modules (the families tests/tiny_models.py builds, and what they pull in: torch's
    distributed tensors, accelerate), the tokenizers, DeepSpeed's inference engine,
    matplotlib's pyplot and its fonts (a first savefig), object storage's clients, scipy's
    statistics, the corpus readers' pyarrow and datasets. Without it, each forked driver paid them again (seconds each)."""
    import importlib
    import io

    import matplotlib.pyplot as plt
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for family in (
        "llama",
        "qwen3",
        "mistral",
        "gpt2",
        "gpt_neox",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "qwen3_moe",
    ):
        getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
        AutoConfig.for_model(family)
    for name in (
        "accelerate",
        "tokenizers",
        "deepspeed.inference.engine",
        "scipy.stats",
        "s3fs",
        "fsspec.implementations.local",
        "pyarrow.parquet",
        "datasets",
    ):
        importlib.import_module(name)
    fig, ax = plt.subplots()
    ax.imshow([[0.0, 1.0]])
    ax.set_title("warm")
    fig.colorbar(ax.images[0])
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


_warm()
gc.freeze()  # what the children share stays out of their collections (and their pages unwritten)
gc.enable()
assert "ray" not in sys.modules, "the zygote must not import Ray (its auth is settled per process)"


def serve() -> dict | None:
    """Answer requests until stdin closes (returns None); in a forked child, return its request."""
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), file=ANSWERS, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=ANSWERS, flush=True)
    return None


def become(request: dict) -> None:
    """Turn this forked child into `python [-m] argv...` run in `cwd` with `env`."""
    os.setsid()  # like a fresh process of the test's: signals to the test run's group do not reach it
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C interrupts, as in a terminal
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.close(devnull)
    ANSWERS.close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdin = open(0, closefd=False)  # noqa: SIM115


request = serve()
if request is None:
    sys.exit(0)
become(request)
import runpy  # noqa: E402

target, *rest = request["argv"]
if request["script"]:
    sys.argv = [target, *rest]
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")
else:
    sys.argv = ["-m", *rest]
    sys.path[0] = os.getcwd()
    runpy.run_module(target, run_name="__main__", alter_sys=True)

"""One measurement in a fresh process, so its peak memory is its own: `measure(job)` starts
`python -m pipelines.bench.worker '<json job>'`, which runs the job's system (`systems`,
`peers`) and prints its figures as one `BENCH_RESULT <json>` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = "BENCH_RESULT "


def measure(job: dict, python: str = sys.executable) -> dict:
    """The job's figures, or {"error": the last line the process wrote on stderr}."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run(
        [python, "-m", "pipelines.bench.worker", json.dumps(job)], capture_output=True, text=True, env=env
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith(PREFIX)), None)
    if proc.returncode != 0 or line is None:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()] or ["no output"]
        return {"error": lines[-1][:300]}
    return json.loads(line[len(PREFIX) :])


def run_job(job: dict) -> dict:
    """The job's system run in this process (what the fresh process runs): its figures."""
    import torch

    from pipelines.bench import corpus_workload, jacobian, peers, study, systems, tune

    torch.manual_seed(0)
    return {
        **systems.RUNNERS,
        **peers.RUNNERS,
        "steer_study": study.steer_study,
        "tune_distlens": tune.tune_distlens,
        "tune_plain": tune.tune_plain,
        "jacobian_distlens": jacobian.jacobian_distlens,
        "jacobian_plain": jacobian.jacobian_plain,
        "distlens_corpus": corpus_workload.distlens_corpus,
        "hf_generate_corpus": corpus_workload.hf_generate_corpus,
    }[job["system"]](job)


def main() -> None:
    print(PREFIX + json.dumps(run_job(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()

"""The way from a laptop to a cluster, on loopback: a real Ray head started with `ray start`
(and waited for until its job agent takes submissions), the lens driver submitted with
`ray job submit --working-dir .`, its store checked; with that head up, a driver given no
address starts a private cluster and `cluster.address=auto` joins the head; the head stopped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from driver import REPO, ray_head, run_driver

from actors.store import LensStore

# `python -c WAIT_FOR_JOBS <dashboard url> <job id>...`: waits until every job has ended, then
# prints {job id: {"status", "logs"}}
WAIT_FOR_JOBS = """
import json, sys, time
from ray.job_submission import JobSubmissionClient
client, ids = JobSubmissionClient(sys.argv[1]), sys.argv[2:]
deadline = time.monotonic() + 1200
while time.monotonic() < deadline and not all(client.get_job_status(j).is_terminal() for j in ids):
    time.sleep(2)
print(json.dumps({j: {"status": str(client.get_job_status(j).value), "logs": client.get_job_logs(j)} for j in ids}))
"""

# `python -c HOLD_CPUS <gcs address> <dashboard url>`: holds the head's 2 CPUs (a placement
# group), prints "held", reads job ids from stdin, waits until each job's log says it waits for
# placement, then releases the CPUs and exits 0 (1 if a job never said so within 300 s)
HOLD_CPUS = """
import sys, time
import ray
from ray.job_submission import JobSubmissionClient
from ray.util.placement_group import placement_group, remove_placement_group
ray.init(address=sys.argv[1], log_to_driver=False)
pg = placement_group([{"CPU": 2}])
ray.get(pg.ready(), timeout=120)
print("held", flush=True)
client, ids = JobSubmissionClient(sys.argv[2]), sys.stdin.readline().split()
deadline = time.monotonic() + 300
waiting = lambda j: "waiting up to 600s (cluster.placement_timeout_s)" in client.get_job_logs(j)
while not all(waiting(j) for j in ids) and time.monotonic() < deadline:
    time.sleep(1)
remove_placement_group(pg)
sys.exit(0 if all(waiting(j) for j in ids) else 1)
"""


@pytest.fixture(scope="module")
def head():
    """One `ray start` head with 2 CPUs (room for one run's two stages) for the module's tests,
    which share one test process (the `xdist_group` mark): (gcs address, dashboard port, env)."""
    with ray_head(num_cpus=2) as (gcs, dashboard, env, _):
        yield gcs, dashboard, env


@pytest.mark.xdist_group("job_submit_head")
def test_with_a_head_up_a_driver_starts_a_private_cluster_unless_told_auto(head, tiny_with_tokenizer, tmp_path):
    """Which cluster a driver joins while a `ray start` head is up: none unless told (a private
    local cluster, gone with the driver); `cluster.address=auto` joins the head. (The jobs
    submitted to that head: the next test.)"""
    gcs, _, env = head
    # one stage each: which cluster a run joins is the point, not its pipeline
    base = [f"model.name={tiny_with_tokenizer}", f"storage.root={tmp_path}", "generation.max_new_tokens=2",
            "cluster.num_stages=1"]  # fmt: skip
    # `auto` reads this head's record; the token is the head's
    env = {name: env[name] for name in ("RAY_AUTH_MODE", "RAY_TMPDIR", "RAY_AUTH_TOKEN")}
    private = run_driver("pipelines.lens", *base, "storage.run=private", cwd=tmp_path, env=env)
    joined = run_driver("pipelines.lens", *base, "storage.run=auto", "cluster.address=auto", cwd=tmp_path, env=env)
    for result in (private, joined):
        assert result.returncode == 0, result.stderr[-3000:]
    used = {run: LensStore.open(tmp_path / run / "lens.zarr").attrs["ray_cluster"] for run in ("private", "auto")}
    assert used["private"]["kind"].startswith("private local cluster") and used["private"]["address"] != gcs
    assert used["auto"]["kind"].startswith("joined (cluster.address=auto)") and used["auto"]["address"] == gcs
    for run in ("private", "auto"):
        store = LensStore.open(tmp_path / run / "lens.zarr")
        assert store.attrs["summary"]["ray_cluster"] == used[run]
        log = (tmp_path / run / "run.log").read_text()
        assert f"ray cluster: {used[run]['kind']} at {used[run]['address']}" in log
    assert f"[distlens] ray cluster: {used['private']['kind']}" in private.stderr


@pytest.mark.xdist_group("job_submit_head")
def test_two_jobs_submitted_at_once_to_a_head_with_room_for_one_both_complete_and_verify(
    head, tiny_with_tokenizer, tmp_path
):
    """`ray job submit --working-dir .` twice to a head with 2 CPUs whose CPUs the test holds (a
    placement group of its own) until both jobs say they wait for placement
    (cluster.placement_timeout_s, raised here to 600 s) instead of failing; each run's two
    stages then take both CPUs, so the second keeps waiting until the first ends. The first is
    submitted as a user does, waiting (the command follows the job's log and says it succeeded),
    the second with `--no-wait`. Every store completes and verifies (`distlens verify`), its two
    stages ran in two processes, and both hold the same numbers, which match the unsliced model.
    (Held, not raced: two jobs submitted back to back could run one after the other without
    either ever waiting.)"""
    from reference import assert_kl_to_final_matches_hf, assert_stores_equal
    from tiny_models import load_reference

    runs = [f"job{i}" for i in range(2)]
    gcs, dashboard, env = head
    address = ["--address", f"http://127.0.0.1:{dashboard}"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CPUS, gcs, f"http://127.0.0.1:{dashboard}"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()[-2000:]

    def submit(run: str, *wait: str) -> list[str]:
        return ["ray", "job", "submit", *address, *wait, "--working-dir", ".", "--runtime-env",
                "cluster/runtime_env.yaml", "--", "python", "-m", "pipelines.lens", f"model.name={tiny_with_tokenizer}",
                f"storage.root={tmp_path}", f"storage.run={run}", "generation.max_new_tokens=3", "progress=false",
                "cluster.placement_timeout_s=600"]  # fmt: skip

    def job_id(text: str) -> str | None:
        return next((w.strip("'") for w in text.split() if w.strip("'").startswith("raysubmit_")), None)

    # the first as a user submits it: the command waits for the job, following its log
    waiting = subprocess.Popen(submit(runs[0]), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    ids, head_lines = [], []
    try:
        while not ids:
            line = waiting.stdout.readline()
            assert line, "".join(head_lines)[-2000:]
            head_lines.append(line)
            if job_id(line):
                ids.append(job_id(line))
        submitted = subprocess.run(submit(runs[1], "--no-wait"), cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=300)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        ids.append(job_id(submitted.stdout))
    except BaseException:
        waiting.kill()
        holder.kill()
        raise

    holder.stdin.write(" ".join(ids) + "\n")
    holder.stdin.close()
    released = holder.wait(timeout=600)
    assert released == 0, holder.stderr.read()[-2000:]
    # polled from a process of its own: Ray settles its auth mode once per process, and another
    # test of this process may have settled it without a token
    polled = subprocess.run([sys.executable, "-c", WAIT_FOR_JOBS, f"http://127.0.0.1:{dashboard}", *ids],
                            env=env, capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert polled.returncode == 0, polled.stderr[-2000:]
    jobs = json.loads(polled.stdout)
    states, logs = (
        {job: got["status"] for job, got in jobs.items()},
        {job: got["logs"] for job, got in jobs.items()},
    )
    assert set(states.values()) == {"SUCCEEDED"}, (states, {j: log[-2000:] for j, log in logs.items()})
    followed = "".join(head_lines) + waiting.communicate(timeout=300)[0]
    assert waiting.returncode == 0 and "succeeded" in followed, followed[-3000:]
    waited = [job for job, log in logs.items() if "[distlens] waiting up to 600s (cluster.placement_timeout_s)" in log]
    assert sorted(waited) == sorted(ids), "a job did not wait for placement while the head's CPUs were held"
    stores = [LensStore.open(tmp_path / run / "lens.zarr") for run in runs]
    checked = subprocess.run(["distlens", "verify", *(str(tmp_path / run / "lens.zarr") for run in runs)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert checked.returncode == 0 and checked.stdout.count(": ok") == len(runs), checked.stdout + checked.stderr
    for store in stores:
        assert store.is_complete
        assert_stores_equal(store, stores[0])
        summary = store.attrs["summary"]
        assert len(summary["stages"]) == 2 and len({info["pid"] for info in summary["stage_info"]}) == 2
    assert assert_kl_to_final_matches_hf(load_reference(tiny_with_tokenizer), stores[0]) > 0


@pytest.mark.xdist_group("job_submit_head")
def test_serve_under_ray_job_submit_on_a_head_names_its_actors_and_stops_with_the_job(
    head, tiny_with_tokenizer, tmp_path
):
    """`distlens serve` submitted as a job to a `ray start` head: its two stage actors (on the
    head) and its Serve replica are listed by `ray list actors` under their names, a chat answer
    equals HF greedy generation of the request alone, and `ray job stop` takes it all down."""
    import time

    import openai
    import requests
    from transformers import AutoTokenizer

    from actors.distributed import free_port
    from reference import HookedModel

    gcs, dashboard, env = head
    hooked, tok = HookedModel(tiny_with_tokenizer), AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    ids = list(
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=False)
    )
    seq, _ = hooked.alone(ids, (), 4, tok.eos_token_id)
    port, address = free_port(), ["--address", f"http://127.0.0.1:{dashboard}"]
    submitted = subprocess.run(
        ["ray", "job", "submit", *address, "--no-wait", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
         "--", "python", "-m", "pipelines.serve", f"model.name={tiny_with_tokenizer}", f"serve.port={port}",
         "serve.app=asjob"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job = next(w.strip("'") for w in submitted.stdout.split() if w.strip("'").startswith("raysubmit_"))
    deadline, health = time.monotonic() + 300, None
    while (health or {}).get("status") != "ok" and time.monotonic() < deadline:  # the job's driver starts it
        try:
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        except (requests.RequestException, ValueError):
            time.sleep(1)
    assert health and health["status"] == "ok", health
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    chat = client.chat.completions.create(model=str(tiny_with_tokenizer), messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)  # fmt: skip
    assert chat.choices[0].message.content == tok.decode(seq[len(ids) :], skip_special_tokens=True)

    def alive() -> set:
        listed = subprocess.run(["ray", "list", "actors", "--address", gcs, "--filter", "state=ALIVE", "--format", "json"],
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert listed.returncode == 0, listed.stderr[-2000:]
        return {a.get("name") or a.get("class_name") for a in json.loads(listed.stdout)}

    names = alive()
    assert {"distlens-asjob-stage0-rank0", "distlens-asjob-stage1-rank0"} <= names, names
    assert any("DistlensServer" in (n or "") for n in names), names
    stopped = subprocess.run(
        ["ray", "job", "stop", *address, job], env=env, capture_output=True, text=True, timeout=300
    )
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    polled = subprocess.run([sys.executable, "-c", WAIT_FOR_JOBS, f"http://127.0.0.1:{dashboard}", job],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert json.loads(polled.stdout)[job]["status"] == "STOPPED", polled.stdout[-2000:]
    deadline = time.monotonic() + 120
    while any("asjob" in (n or "") or "DistlensServer" in (n or "") for n in alive()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any("asjob" in (n or "") or "DistlensServer" in (n or "") for n in alive())

"""storage.root=s3://bucket/prefix: the drivers write their stores, write logs and run logs
straight to object storage and upload the rest of the run's files there. Run against moto's S3
server on 127.0.0.1 (started and stopped here), the credentials and endpoint in the AWS
environment variables only; every S3 store is compared, array by array, with the same run
written to a local directory."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import requests
from driver import run_driver

from actors.store import LensStore
from reference import assert_stores_equal

BUCKET = "distlens-test"
SECRET = "not-a-real-secret-0123456789"  # must never reach the store or its files
PROMPTS = '["The lighthouse keeper", "Once upon a time", "In the beginning", "A cat sat"]'
LENS = ["cluster.micro_batch_size=2", "generation.max_new_tokens=4", "progress=false", f"prompts={PROMPTS}"]
MWE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "mwe"
STEER = ["dataset=survival-instinct", f"data.root={MWE}", "data.max_train=4", "data.max_test=4", "steering.select_items=2",
         "steering.layers=[0,1]", "bootstrap=50", "progress=false", "cluster=inprocess", "steering.cost_prompts=2",
         "steering.cost_tokens=2"]  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with one bucket; yields (env for the drivers, s3fs filesystem).
    The same variables are set in this process while the module runs (its reads of the stores)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in this process, across servers: another module's server of this
    # test process left its bucket behind, so start from an empty account
    requests.post(f"http://{host}:{port}/moto-api/reset", timeout=30).raise_for_status()
    env = {
        "AWS_ACCESS_KEY_ID": "distlens-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "DISTLENS_CACHE": str(tmp_path_factory.mktemp("cache")),  # the drivers' staging directories
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        import s3fs

        # fsspec caches filesystems by their arguments, not the environment: one made for another
        # module's server (the stores this process opens) would still point there
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield env, fs
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


def _lens(root, run: str, *extra: str, cwd: Path, env: dict, model, faults=None):
    args = (f"model.name={model}", *LENS, f"storage.root={root}", f"storage.run={run}", *extra)
    if faults is None:
        return run_driver("pipelines.lens", *args, cwd=cwd, env=env, timeout=600)
    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    return run_driver(wrapper, json.dumps(faults), "pipelines.lens", *args, cwd=cwd, env=env, script=True)


@pytest.fixture(scope="module")
def lens_runs(s3, tiny_with_tokenizer, tmp_path_factory):
    """The same lens run (in-process stages: the driver alone writes, whichever executor runs the
    stages) to S3 and to a local directory: (completed S3 run, S3 run URL, local store)."""
    env, _ = s3
    cwd = tmp_path_factory.mktemp("lens")
    local = _lens(cwd, "local", "cluster=inprocess", cwd=cwd, env=env, model=tiny_with_tokenizer)
    assert local.returncode == 0, local.stderr[-3000:]
    url = f"s3://{BUCKET}/runs"
    remote = _lens(url, "lens", "cluster=inprocess", cwd=cwd, env=env, model=tiny_with_tokenizer)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert not any(cwd.glob("s3*")), "nothing named after the URL locally"
    return remote, f"{url}/lens", LensStore.open(cwd / "local" / "lens.zarr")


def test_lens_run_to_s3_equals_a_local_run_with_its_files_under_the_prefix(s3, lens_runs):
    _, fs = s3
    result, run, local = lens_runs
    store = LensStore.open(f"{run}/lens.zarr")
    assert store.path == f"{run}/lens.zarr" and store.is_complete and store.verify() == []
    assert_stores_equal(store, local, atol=0)  # the same process layout: bit for bit
    for name in ("prompt_text", "generated_text"):
        assert store.group[name][:].tolist() == local.group[name][:].tolist()
    files = {f[len(f"{BUCKET}/runs/lens/") :] for f in fs.find(f"{BUCKET}/runs/lens")}
    assert {"run.log", ".hydra/config.yaml", ".hydra/overrides.yaml", "heatmap_prompt0.png"} <= files
    assert "lens.zarr.lease.json" not in files  # released at the end
    assert not any(f.endswith(".log") and f != "run.log" for f in files)  # Hydra's own log stays in staging
    log = fs.cat_file(f"{BUCKET}/runs/lens/run.log").decode()
    assert "complete:" in log and "run: 4 prompts in 2 micro-batches" in log
    writes = store.write_log()
    # both micro-batches share one shard (storage.shard_batches by size): written once, then both records
    assert [(r["event"], r["batch"]) for r in writes] == [("begin", 0), ("begin", 1), ("done", 0), ("done", 1)]
    assert f"store:    {run}/lens.zarr" in result.stdout and f"heatmap:  {run}/heatmap_prompt0.png" in result.stdout
    for f in fs.find(f"{BUCKET}/runs/lens"):  # credentials come from the environment, never into the run's files
        if "/c/" not in f:
            assert SECRET.encode() not in fs.cat_file(f), f


def test_verify_on_s3_passes_a_whole_store_and_names_a_deleted_chunk_object(s3, lens_runs, tmp_path):
    env, fs = s3
    _, run, _ = lens_runs
    ok = run_driver("pipelines.verify", f"{run}/lens.zarr", cwd=tmp_path, env=env)
    assert ok.returncode == 0 and ok.stdout.splitlines()[0] == f"{run}/lens.zarr: ok", ok.stderr
    assert "bytes per cell" in ok.stdout.splitlines()[1]  # then what the store costs
    src, dst = f"{BUCKET}/runs/lens/lens.zarr", f"{BUCKET}/damaged/lens.zarr"
    files = fs.find(src)
    fs.copy(files, [dst + f[len(src) :] for f in files])
    chunk = sorted(f for f in fs.find(f"{dst}/topk_logprobs/c"))[0]
    total = sum(1 for _ in fs.find(f"{dst}/topk_logprobs/c"))
    fs.rm_file(chunk)
    bad = run_driver("pipelines.verify", f"s3://{dst}", cwd=tmp_path, env=env)
    assert bad.returncode == 1, bad.stderr
    assert f"distlens verify: s3://{dst}: topk_logprobs: 1 of {total} chunks missing" in bad.stderr


def test_steer_run_to_s3_equals_a_local_run_with_its_outputs_under_the_prefix(s3, tiny_with_tokenizer, tmp_path):
    env, fs = s3
    local = run_driver("pipelines.steer", f"model.name={tiny_with_tokenizer}", *STEER, f"storage.root={tmp_path}",
                       "storage.run=s", cwd=tmp_path, env=env)  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    url = f"s3://{BUCKET}/steer-root"
    remote = run_driver("pipelines.steer", f"model.name={tiny_with_tokenizer}", *STEER, f"storage.root={url}",
                        "storage.run=s", cwd=tmp_path, env=env)  # fmt: skip
    assert remote.returncode == 0, remote.stderr[-3000:]
    out, run = tmp_path / "steer" / "s", f"{BUCKET}/steer-root/steer/s"
    files = {f[len(run) + 1 :] for f in fs.find(run)}
    expected = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".zarr" not in str(p)}
    expected.discard("steer.log")  # Hydra's own log stays in the local (staging) directory
    assert expected <= files, expected - files
    for name in ("sweep.csv", "summary.md"):
        assert fs.cat_file(f"{run}/{name}").decode() == (out / name).read_text(), name
    summary, reference = json.loads(fs.cat_file(f"{run}/summary.json")), json.loads((out / "summary.json").read_text())
    assert summary["mean_of_slopes"] == reference["mean_of_slopes"] and summary["best_layer"] == reference["best_layer"]
    for name in ("label_activations", "select", "test_sweep"):
        store = LensStore.open(f"s3://{run}/{name}.zarr")
        assert store.is_complete and store.verify() == [], name
        reference_store = LensStore.open(out / f"{name}.zarr")
        for array in ("tokens", "source", "coefficient", "scores" if name != "label_activations" else "activations"):
            np.testing.assert_array_equal(store[array], reference_store[array], err_msg=f"{name}/{array}")
    again = run_driver("pipelines.steer", f"model.name={tiny_with_tokenizer}", *STEER, f"storage.root={url}",
                       "storage.run=s", cwd=tmp_path, env=env)  # fmt: skip
    (line,) = [x for x in again.stderr.splitlines() if x.startswith("distlens: error:")]
    assert again.returncode == 2 and f"output path s3://{run} already holds a steer run" in line


def test_driver_killed_on_s3_then_resumed_equals_an_uninterrupted_run(s3, tiny_with_tokenizer, tmp_path):
    env, fs = s3
    model, url = tiny_with_tokenizer, f"s3://{BUCKET}/resume"
    one = ["cluster=inprocess", "cluster.micro_batch_size=1", "storage.shard_batches=1"]  # a shard per batch
    full = _lens(tmp_path, "full", *one, cwd=tmp_path, env=env, model=model)
    assert full.returncode == 0, full.stderr[-3000:]
    fault = {"kill_driver": {"after_batches": 2, "mid_write": True}}  # between batch 1's data and its record
    cut = _lens(url, "cut", *one, cwd=tmp_path, env=env, model=model, faults=fault)
    assert cut.returncode == -9, cut.stderr[-3000:]
    store = LensStore.open(f"{url}/cut/lens.zarr")
    assert not store.is_complete and any("incomplete" in p for p in store.verify())
    assert store.done_batches() == {0}
    assert fs.exists(f"{BUCKET}/resume/cut/lens.zarr.lease.json")  # the dead driver's lease
    stale = _lens(url, "cut", *one, cwd=tmp_path, env=env, model=model)
    assert stale.returncode == 2 and "held by a driver that is gone" in stale.stderr, stale.stderr[-3000:]
    resumed = _lens(url, "cut", *one, "resume=true", cwd=tmp_path, env=env, model=model)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store, reference = LensStore.open(f"{url}/cut/lens.zarr"), LensStore.open(tmp_path / "full" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    assert_stores_equal(store, reference, atol=0)  # same process layout: bit for bit
    log = store.write_log()
    done = [r["batch"] for r in log if r["event"] == "done"]
    begun = [r["batch"] for r in log if r["event"] == "begin"]
    assert sorted(done) == [0, 1, 2, 3] and begun.count(0) == 1 and begun.count(1) == 2  # batch 1 again, whole
    assert len({r["pid"] for r in log}) == 2
    assert not fs.exists(f"{BUCKET}/resume/cut/lens.zarr.lease.json")
    assert fs.cat_file(f"{BUCKET}/resume/cut/run.log").decode().count("complete:") == 1


def test_storage_that_cannot_be_written_is_refused_in_one_line_before_ray_starts(s3, tmp_path):
    env, _ = s3
    cases = [
        ("pipelines.lens", "s3://no-such-bucket-here/runs", "cannot be written: bucket 'no-such-bucket-here' does not exist"),
        ("pipelines.steer", "s3://no-such-bucket-here/runs", "cannot be written: bucket 'no-such-bucket-here' does not exist"),
        ("pipelines.tune", f"s3://{BUCKET}/runs", "is object storage, which this driver does not write to"),
    ]  # fmt: skip
    for module, root, message in cases:
        result = run_driver(module, f"storage.root={root}", cwd=tmp_path, env=env, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (module, result.stderr[-3000:])
        assert lines[0].startswith(f"distlens: error: storage.root='{root}'") and message in lines[0], lines[0]
        assert not list(tmp_path.iterdir()), "nothing written locally (no Hydra directory, no Ray session)"
    # credentials of a user without permission to write (moto enforcing IAM from here on)
    import boto3
    from moto import settings

    iam = boto3.client("iam")
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    enforced = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        result = run_driver("pipelines.lens", f"storage.root=s3://{BUCKET}/runs", cwd=tmp_path, timeout=120,
                            env={**env, **creds})  # fmt: skip
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = enforced
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert f"storage.root='s3://{BUCKET}/runs' cannot be written: no permission to write there" in lines[0], lines[0]
    # no server answering at the endpoint: one line too, within the check's short timeouts
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    result = run_driver("pipelines.lens", f"storage.root=s3://{BUCKET}/runs", cwd=tmp_path, timeout=120,
                        env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"})  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "cannot be written" in lines[0], result.stderr[-3000:]


def test_a_url_root_is_never_refused_as_relative_inside_a_ray_job(tmp_path):
    from pipelines.config import _check_storage_root

    _check_storage_root("s3://bucket/runs", tmp_path / "runtime_resources" / "working_dir_files" / "x")  # no error

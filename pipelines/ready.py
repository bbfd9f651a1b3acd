"""`python -m pipelines.ready [host:port] [--timeout S]`: wait until a Ray head accepts job
submissions (its job agent has registered with the GCS), bounded; exits 1 in one line if not.

`ray start` returns before the head's dashboard agent is up, and `ray job submit` in that window
fails with "No available agent to submit job" (Ray's job head waits 10 s for it); on a loaded
machine the agent can take longer. The address is the GCS address (`ray start --port`), default
$RAY_ADDRESS, else 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def job_agent_ready(address: str) -> bool:
    """The head node's job agent address is in the GCS (what Ray's job head looks up)."""
    from ray._private import ray_constants
    from ray._raylet import GcsClient
    from ray.dashboard import consts

    client = GcsClient(address=address)
    head = client.internal_kv_get(ray_constants.KV_HEAD_NODE_ID_KEY, namespace=ray_constants.KV_NAMESPACE_JOB)
    if not head:
        return False
    key = f"{consts.DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head.decode()}".encode()
    return bool(client.internal_kv_get(key, namespace=ray_constants.KV_NAMESPACE_DASHBOARD))


def wait_for_job_agent(address: str, timeout_s: float = 120.0, poll_s: float = 0.5) -> float:
    """Seconds waited; raises TimeoutError naming the address when the agent never comes."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout_s:
        try:
            if job_agent_ready(address):
                return time.monotonic() - t0
        except Exception as err:  # GCS not answering yet
            last = err
        time.sleep(poll_s)
    why = f" (last error: {type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''})" if last else ""
    raise TimeoutError(f"the Ray head at {address} has no job agent after {timeout_s:.0f} s{why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ready", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=os.environ.get("RAY_ADDRESS") or "127.0.0.1:6379")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    address = args.address.removeprefix("ray://")
    if address.startswith("http"):
        print(f"error: {args.address!r} is a dashboard URL; give the GCS address host:port", file=sys.stderr)
        return 2
    try:
        waited = wait_for_job_agent(address, args.timeout)
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ray head {address} accepts jobs (waited {waited:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

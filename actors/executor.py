"""Executors: where stage workers live and how calls reach them. One interface, two backends.

`LocalExecutor` keeps every worker in this process and calls it directly (tests, debugging, a
single GPU). `RayExecutor` creates each worker as a Ray actor inside one placement group (one
bundle per stage rank, placed by `cluster.placement`) and returns object refs, so chained calls
pipeline across stages. When a node dies Ray moves its bundles to a node with room, and the
restarted actors come back there.
"""

from __future__ import annotations

import sys

from actors.stage import StageSpec, StageWorker, tp_place


class ClusterError(RuntimeError):
    """The cluster cannot run what was asked (for example, resources it cannot place)."""


class LocalExecutor:
    name = "local"

    def create(self, specs: list[StageSpec]) -> list[StageWorker]:
        """tp_size 1 only (one process per rank needs Ray): actors.run_spec.check_cluster."""
        return [StageWorker(spec) for spec in specs]

    def call(self, worker, method, *args, num_returns: int = 1):
        """`method`: a `StageWorker` method (the function itself, never its name)."""
        return method(worker, *args)

    def get(self, handle, timeout: float | None = None):
        return handle

    def wait_first(self, handles: list) -> int:
        return 0  # everything local is already done

    def ready(self, handles: list) -> bool:
        return True

    def shutdown(self) -> None:
        pass

    close = shutdown


class RayExecutor:
    """Stage actors in one placement group. With `persistent=True` the actors outlive a run
    and later runs with no more ranks reuse them: each worker reloads only its new slice,
    skipping process start-up and imports (seconds per actor). A tensor-parallel rank keeps its
    process group, so a run reuses the pool only where each rank it needs sits in the same
    (stage, rank, tp_size) place as when the pool was made (any model; tp_size 1 ranks anywhere
    outside a group)."""

    name = "ray"

    def __init__(
        self,
        cpus_per_stage: float = 1.0,
        gpus_per_stage: float = 0.0,
        placement_timeout_s: float = 60.0,
        max_restarts: int = 0,
        persistent: bool = False,
        placement: str = "PACK",
        actor_names: str | None = None,
    ):
        self.cpus = cpus_per_stage
        self.gpus = gpus_per_stage
        self.placement_timeout_s = placement_timeout_s
        self.max_restarts = max_restarts
        self.persistent = persistent
        self.placement = placement  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray's strategies)
        self._pg = None
        self._actors = []
        self._places: list[tuple] = []  # each actor's tensor-parallel place when it was made
        self.actor_names = actor_names  # name the actors "<this>-stage<s>-rank<r>" (see `_name`)

    @classmethod
    def for_cluster(cls, cluster, persistent: bool = False, actor_names: str | None = None) -> RayExecutor:
        """From a run's ClusterSettings: a tensor-parallel group cannot re-form, so no restarts there."""
        return cls(
            cluster.cpus_per_stage, cluster.gpus_per_stage, cluster.placement_timeout_s,
            max_restarts=cluster.max_restarts if cluster.tp_size == 1 else 0, persistent=persistent,
            placement=cluster.placement, actor_names=actor_names,
        )  # fmt: skip

    @property
    def bundle(self) -> dict:
        """The resources of one stage rank."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def create(self, specs: list[StageSpec]) -> list:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.persistent and self._fits(specs):
            actors = self._actors[: len(specs)]
            ray.get([a.configure.remote(spec) for a, spec in zip(actors, specs)])
            return actors
        self.close()
        bundle = self.bundle
        self._pg = placement_group([dict(bundle) for _ in specs], strategy=self.placement)
        first = min(2.0, self.placement_timeout_s)
        ready, _ = ray.wait([self._pg.ready()], timeout=first)
        if not ready and self.placement_timeout_s > first:  # a busy cluster (other jobs hold it): wait, say so
            print(
                f"[distlens] waiting up to {self.placement_timeout_s:g}s (cluster.placement_timeout_s) for the cluster "
                f"to place {len(specs)} stage ranks of {bundle} each; available now: {self.available()}",
                file=sys.stderr,
                flush=True,
            )
            ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s - first)
        if not ready:
            remove_placement_group(self._pg)
            self._pg = None
            raise ClusterError(
                f"the Ray cluster cannot place {len(specs)} stage ranks of {bundle} each within "
                f"{self.placement_timeout_s:.0f}s (placement {self.placement}); available: {ray.available_resources()}. "
                "Lower num_stages/tp_size or cluster.cpus_per_stage/gpus_per_stage, or add nodes."
            )
        self._places = [tp_place(spec) for spec in specs]
        remote_cls = ray.remote(StageWorker)
        self._actors = [
            remote_cls.options(
                num_cpus=self.cpus,
                num_gpus=self.gpus,
                max_restarts=self.max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
                **(self._name(spec) if self.actor_names else {}),
            ).remote(spec)
            for i, spec in enumerate(specs)
        ]
        return self._actors

    def _name(self, spec: StageSpec) -> dict:
        """A named actor in namespace "distlens" (`ray list actors`, the dashboard, `ray.get_actor`)."""
        return {"name": f"{self.actor_names}-stage{spec.stage}-rank{spec.tp_rank}", "namespace": "distlens"}

    def _fits(self, specs: list[StageSpec]) -> bool:
        """Whether the pooled actors can run `specs`: enough of them, each in the same
        tensor-parallel place (actors.stage.StageWorker.configure keeps a rank's group)."""
        return len(self._actors) >= len(specs) and all(
            tp_place(spec) == place for spec, place in zip(specs, self._places)
        )

    def call(self, worker, method, *args, num_returns: int = 1):
        return getattr(worker, method.__name__).options(num_returns=num_returns).remote(*args)

    def get(self, handle, timeout: float | None = None):
        """The result; with `timeout`, a TimeoutError (Ray's GetTimeoutError) when not ready by then."""
        import ray

        return ray.get(handle, timeout=timeout)

    def wait_first(self, handles: list) -> int:
        import ray

        ready, _ = ray.wait(handles, num_returns=1)
        return handles.index(ready[0])

    def ready(self, handles: list) -> bool:
        """Whether every handle has a result (or an error), without waiting."""
        import ray

        done, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
        return len(done) == len(handles)

    def available(self) -> dict:
        """The cluster's free resources now (for messages)."""
        import ray

        return {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}

    def shutdown(self) -> None:
        """End of a run: release the actors unless they are pooled for the next one."""
        if not self.persistent:
            self.close()

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

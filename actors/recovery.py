"""Stage failures within a run's budget: whether an error is a lost stage actor, loading the
stages' weights again after one, waiting (bounded) for restarted actors to answer, and counting
failures against `cluster.max_restarts`. Shared by every loop that drives a stage group (the
lens coordinator's static and continuous batching); what to re-run is the loop's own."""

from __future__ import annotations

import logging
import sys
import time

from actors.executor import ClusterError
from actors.run_spec import ClusterSettings
from actors.stage import LostStateError
from actors.stage_group import StageGroup

log = logging.getLogger("distlens")


class StageRecovery:
    """The failures one run has survived (`restarts`) and the rules for the next."""

    def __init__(self, cluster: ClusterSettings):
        self.cluster = cluster
        self.restarts = 0

    def lost(self, stages: StageGroup, err: Exception) -> bool:
        """A stage actor died, or restarted and lost its state (Ray actors only)."""
        if stages.executor.name != "ray":
            return False
        from ray.exceptions import RayActorError

        return isinstance(err, RayActorError | LostStateError)

    def refuse_under_tp(self, err: Exception, loading: bool) -> None:
        """A tensor-parallel group cannot re-form: a lost rank ends the run in one line."""
        tp = self.cluster.tp_size
        if tp > 1 and loading:
            raise ClusterError(
                f"a stage actor died while loading its weights and is not restarted (tp_size={tp}: a "
                "tensor-parallel group cannot re-form); run again"
            ) from err
        if tp > 1:
            raise ClusterError(
                f"a stage actor died and is not restarted (tp_size={tp}: a tensor-parallel group cannot re-form "
                "mid-run); finished micro-batches are in the store: run again with resume=true"
            ) from err

    def setup(self, stages: StageGroup) -> None:
        """Load every stage's weights; a stage actor lost while loading is restarted from the
        same budget as one lost mid-run (`cluster.max_restarts`), or the run stops in one line."""
        while True:
            try:
                stages.setup()
                return
            except Exception as err:
                if not self.lost(stages, err):
                    raise
                self.refuse_under_tp(err, loading=True)
                self.count(err, "while loading weights; loading again")
                self.rejoin(stages)

    def count(self, err: Exception, doing: str) -> None:
        """One more stage failure against `cluster.max_restarts`: logged, or the run stops."""
        self.restarts += 1
        budget = self.cluster.max_restarts
        reason = str(err).strip().splitlines()[0][:200]
        log.warning("stage failure %d of at most %d (%s): %s", self.restarts, budget, doing, reason)
        print(f"[distlens] a stage failed ({reason}); {doing}", file=sys.stderr)
        if self.restarts > budget:
            raise ClusterError(
                f"stages failed {self.restarts} times (cluster.max_restarts={budget}); "
                "finished micro-batches are in the store: run again with resume=true"
            ) from err

    def rejoin(self, stages: StageGroup) -> None:
        """Wait (bounded by `cluster.restart_timeout_s`) until every stage answers again: a
        restarted actor whose node died waits for Ray to find it a node with room."""
        limit = self.cluster.restart_timeout_s
        deadline = time.monotonic() + limit
        while True:
            try:
                stages.rejoin(timeout=max(1.0, deadline - time.monotonic()))
                return
            except Exception as again:
                if not (self.lost(stages, again) or isinstance(again, TimeoutError)):
                    raise
                if time.monotonic() > deadline:
                    ex = stages.executor
                    raise ClusterError(
                        f"a lost stage did not come back within cluster.restart_timeout_s={limit:g}: it waited for "
                        f"a node with room for {ex.bundle} (available now: {ex.available()}); add a node, then run "
                        "again with resume=true"
                    ) from again
                time.sleep(0.2)

    def recovered(self, stages: StageGroup, err: Exception, doing: str) -> None:
        """Count the failure, wait for every stage to answer again (Ray restarts a dead actor),
        and load the weights again; the caller then re-runs what was in flight."""
        self.count(err, doing)
        self.rejoin(stages)
        self.setup(stages)

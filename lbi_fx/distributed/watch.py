"""The failure side channel: why a rank stops instead of hanging when a peer dies.

Every wait polls its ``torch.distributed`` work and the process group's store. A rank
whose step raises writes a record there (rank, regions, phase, error) before re-raising;
every other rank then ends its step with :class:`PeerFailedError`, or, when a peer does
not arrive within ``timeout`` seconds, with :class:`DistributedTimeout` naming the ranks
that did not arrive and where they were last seen. Neither relies on the transport
noticing a dead socket. After either error the process group is unusable: end the
process (as ``torchrun`` does with a failed worker).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence

from lbi_fx.errors import DistributedTimeout, PeerFailedError

# What a step is doing, in order: named by failure records and timeouts.
STEP_PHASES = ("forward", "jacobian", "epilogue", "backward-seed", "scan-exchange", "scan",
               "local", "prologue-backward", "allreduce", "loss")


class Watch:
    """Failure records and progress over a ``torch.distributed`` store.

    ``fail`` writes the first failure of the job (rank, regions, phase, error); ``wait``
    polls a work's completion and that record, and gives up after ``timeout`` seconds
    naming the peers that have not reached the caller's phase. The store is served by a
    thread of rank 0's process, so a peer stuck in Python still answers; a store that
    cannot be reached means rank 0's process is gone."""

    POLL_S = 0.02  # how often a waiting rank reads the store

    def __init__(self, store, prefix: str, rank: int, timeout: float, roles: dict):
        self.store, self.prefix, self.rank, self.timeout = store, prefix, rank, timeout
        self.roles = roles  # global rank -> {"regions": [...], "dp": replica}, for messages
        self.step, self.phase = 0, "init"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _store(self, fn: str, *args):
        try:
            return getattr(self.store, fn)(*args)
        except Exception as exc:  # noqa: BLE001 - any store failure means its host is gone
            raise PeerFailedError(
                f"rank {self.rank} (phase {self.phase!r}) cannot reach the process group's "
                f"store, which rank 0's process serves: rank 0 has died ({exc})",
                rank=0, phase=self.phase) from exc

    def enter(self, phase: str) -> None:
        """Record that this rank reached ``phase`` of the current step."""
        self.phase = phase
        self._store("set", self._key(f"at/{self.rank}"),
                    f"{self.step}:{STEP_PHASES.index(phase)}:{phase}")

    def fail(self, exc: BaseException, culprit: int | None = None, kind: str = "error") -> None:
        """Publish this rank's failure (first writer wins); never raises."""
        who = self.rank if culprit is None else culprit
        rec = dict(rank=who, seen_by=self.rank, phase=self.phase, step=self.step, kind=kind,
                   error=f"{type(exc).__name__}: {exc}"[:2000], **self.roles.get(who, {}))
        try:
            if self.store.add(self._key("nfail"), 1) == 1:
                self.store.set(self._key("failed"), json.dumps(rec))
        except Exception:  # noqa: BLE001 - the store's host is gone: peers time out instead
            pass

    def failure(self) -> dict | None:
        if not self._store("check", [self._key("failed")]):
            return None
        return json.loads(self._store("get", self._key("failed")))

    def raise_failure(self, rec: dict, op: str):
        who = rec["rank"]
        regions = rec.get("regions", [])
        if rec["kind"] == "timeout":
            raise DistributedTimeout(
                f"rank {who} (regions {regions}) did not arrive: rank {rec['seen_by']} gave up "
                f"waiting for it after {self.timeout:g} s ({rec['error']}); rank {self.rank} "
                f"stopped in phase {self.phase!r} ({op})",
                rank=who, regions=regions, phase=rec["phase"])
        raise PeerFailedError(
            f"rank {who} (regions {regions}, dp replica {rec.get('dp', 0)}) failed in phase "
            f"{rec['phase']!r} of step {rec['step']}: {rec['error']}. Rank {self.rank} stopped "
            f"waiting in phase {self.phase!r} ({op}). The process group is unusable now: end "
            "this process and restart the job (from a checkpoint)",
            rank=who, regions=regions, phase=rec["phase"])

    def progress(self, peers: Sequence[int]) -> dict[int, tuple]:
        """(step, phase index, phase) each peer last recorded; (-1, -1, 'nothing') if none."""
        out = {}
        for r in peers:
            key = self._key(f"at/{r}")
            if self._store("check", [key]):
                s, i, ph = self._store("get", key).decode().split(":", 2)
                out[r] = (int(s), int(i), ph)
            else:
                out[r] = (-1, -1, "nothing")
        return out

    def wait(self, done: threading.Event, op: str, peers: Sequence[int]) -> None:
        """Block until ``done`` is set (it wakes this thread at once); every ``POLL_S`` a
        peer's failure record or the ``timeout`` raises."""
        t0 = time.monotonic()
        while not done.wait(self.POLL_S):
            rec = self.failure()
            if rec is not None:
                # a peer that raised right after a collective both finished (a refusal every
                # rank makes alike, e.g. unequal dp shards) must not pre-empt this rank's own
                # outcome: the op finishing within one more poll carries on here
                if done.wait(4 * self.POLL_S):
                    return
                self.raise_failure(rec, op)
            if time.monotonic() - t0 > self.timeout:
                self._timeout(op, peers)

    def _timeout(self, op: str, peers: Sequence[int]):
        me = (self.step, STEP_PHASES.index(self.phase) if self.phase in STEP_PHASES else -1)
        seen = self.progress([r for r in peers if r != self.rank])
        late = {r: v for r, v in seen.items() if v[:2] < me} or seen
        names = ", ".join(f"rank {r} (regions {self.roles.get(r, {}).get('regions', '?')}; "
                          f"last seen in step {v[0]} phase {v[2]!r})" for r, v in late.items())
        exc = DistributedTimeout(
            f"rank {self.rank} waited {self.timeout:g} s in phase {self.phase!r} of step "
            f"{self.step} ({op}) for: {names}. A peer is stuck, dead, or slower than "
            "timeout= allows (raise it if one phase legitimately takes longer)",
            rank=min(late, default=None), phase=self.phase)
        self.fail(exc, culprit=min(late, default=None), kind="timeout")
        raise exc


def _waiter(work) -> tuple[threading.Event, list]:
    """(done, errors): a daemon thread blocks in ``work.wait()`` (``is_completed`` cannot
    be trusted: gloo's send/recv never report completion) and sets ``done``. If the peer
    never comes, the thread stays blocked until the process ends."""
    ev, box = threading.Event(), []

    def run():
        try:
            work.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the polling thread
            box.append(exc)
        ev.set()

    threading.Thread(target=run, daemon=True).start()
    return ev, box


"""`vitscope.evaluate` on Ray: chunks of images scored by a pool of actors, each holding the model once.

The batch engine's machinery is reused (`vitscope.batch.ray_engine`): ``import_ray`` (one-line install hint),
``_connect`` (a running cluster at ``address`` / ``RAY_ADDRESS``, else a local one sized for the pool) and
``ray_output`` (Ray's own log lines to a file). Each actor runs the local engine's chunk function
(passed in: `vitscope.evaluate.core._run_chunk`); the driver writes the records as chunks finish, so a run stopped
half-way resumes like a local one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vitscope.errors import VitscopeError


class _ChunkActor:
    """Holds the model; scores chunks with the function it is given."""

    def __init__(self, vit: Any, num_threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.vit = vit

    def run(self, fn: Callable[..., list[dict[str, Any]]], chunk: Any, options: Any, policy: Any, size: Any,
            ) -> list[dict[str, Any]]:
        return fn(self.vit, chunk, options, policy, size)


def run_ray(fn: Callable[..., list[dict[str, Any]]], vit: Any, todo: Sequence[tuple[int, Any]], options: Any,
            policy: Any, size: Any,
            save: Callable[[list[dict[str, Any]]], None], bar: Any, *, address: str | None = None,
            concurrency: int | None = None, num_cpus: float | None = None, batch_size: int = 64) -> None:
    """Score ``todo`` (``(index, Sample)`` pairs) with the chunk function ``fn(vit, chunk, options, policy,
    size)`` on ``concurrency`` actors of ``num_cpus`` CPUs each, calling
    ``save`` with each finished chunk's records (in the order chunks finish)."""
    from vitscope.batch.ray_engine import _connect, import_ray, ray_output

    conc = 1 if concurrency is None else concurrency
    cpus = 1.0 if num_cpus is None else float(num_cpus)
    if isinstance(conc, bool) or not isinstance(conc, int) or conc < 1:
        raise VitscopeError("concurrency", f"expected an integer >= 1, got {concurrency!r}", "pass e.g. 2")
    if not cpus > 0:
        raise VitscopeError("num_cpus", f"expected a positive number, got {num_cpus!r}", "pass e.g. 1")
    ray = import_ray()
    with ray_output(False):
        started = _connect(ray, address, conc * cpus)
        try:
            actor_cls = ray.remote(num_cpus=cpus)(_ChunkActor)
            vit_ref = ray.put(vit)
            actors = [actor_cls.remote(vit_ref, max(1, int(cpus))) for _ in range(conc)]
            chunks = [list(todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
            pending: dict[Any, int] = {}
            next_chunk = 0
            free = list(range(conc))
            while next_chunk < len(chunks) or pending:
                while free and next_chunk < len(chunks):
                    a = free.pop()
                    ref = actors[a].run.remote(fn, chunks[next_chunk], options, policy, size)
                    pending[ref] = a
                    next_chunk += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    free.append(pending.pop(ref))
                    entries = ray.get(ref)
                    save(entries)
                    bar.update(len(entries))
        finally:
            if started:
                ray.shutdown()

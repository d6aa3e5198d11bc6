"""Step-cache policies by name: the request's `cache` field -> the policy its job runs with.

A policy object lives for one job on one rank. Every policy here takes its reuse decision the
same way on every rank of the mesh (see `bagel.step_cache`).
"""

from __future__ import annotations

from collections.abc import Callable

from bagel.step_cache import NoStepCache, StepCache
from diffusion_service.parallel.mesh import ParallelMesh
from serving.errors import InvalidParams
from serving.params import CachePolicy, NoCache

PolicyFactory = Callable[[CachePolicy, ParallelMesh], StepCache]

STEP_CACHES: dict[type, PolicyFactory] = {
    NoCache: lambda policy, mesh: NoStepCache(),
}


def check_step_cache(policy: CachePolicy) -> None:
    """InvalidParams unless this server runs `policy`."""
    if type(policy) not in STEP_CACHES:
        served = ", ".join(cls.__name__ for cls in STEP_CACHES)
        raise InvalidParams(
            f"cache policy {type(policy).__name__} is not served by this diffusion service "
            f"(served: {served})"
        )


def make_step_cache(policy: CachePolicy, mesh: ParallelMesh) -> StepCache:
    check_step_cache(policy)
    return STEP_CACHES[type(policy)](policy, mesh)

"""Step caching: policies that let a denoising step reuse what some layers added at an earlier
step, as diffusers' and cache-dit's cache hooks do.

- `policy`: what every policy is (its config dataclass, its decision rule) and the step it sees;
- `registry`: the policies by name, read by the request codec, the CLI's help and the tests;
- `policies/`: one module per policy (config, state, decision), found by the registry;
- `taylorseer`: forecasting of the reused residual, a calibrator any policy composes with;
- `store`: the per-branch residual history, kept apart from the decision;
- `collective`: the runtime every rank runs (torch), which takes each decision once for all
  ranks and serves `bagel.diffusion.step_cache`'s seam.

Everything but `store` and `collective` imports no torch, so the request schema can use it.
"""

# The schema first: `serving.params` imports the policies, and they import `serving.codecs`;
# loading `serving` before them keeps either import order from meeting a half-loaded module.
import serving  # noqa: F401, I001

from step_cache.policy import Policy, PolicyConfig, Statistic, Step
from step_cache.registry import POLICIES, register

__all__ = ["POLICIES", "Policy", "PolicyConfig", "Statistic", "Step", "register"]

"""The settings of `--method ddpo` (ddpo.py, methods.ddpo): the form of the advantage, PPO's clip range and
the updates per sampled batch, with their defaults. JAX-free, so that the command's options (options.py)
take their choices and defaults from here without starting JAX."""

from __future__ import annotations

from typing import NamedTuple

ADVANTAGES = ("normalized", "raw")  # λ (R − mean R)/(std R + 1e-8) over the batch, or λ R (ddpo.advantages)


class PPO(NamedTuple):
    """advantage ∈ ADVANTAGES; clip range ε > 0 of the per-step ratios π_θ/π_θold (Schulman et al. 2017's
    0.2); inner epochs E ≥ 1, the updates per sampled batch."""

    advantage: str = "normalized"
    clip_range: float = 0.2
    inner_epochs: int = 1

"""The settings of `--method ddpo` (ddpo.py, methods.ddpo): the form of the advantage and its clip, PPO's clip
range, the passes over each sampling round and its minibatches, with their defaults (ddpo-pytorch's
config/base.py). JAX-free, so that the command's options (options.py) take their choices and defaults from
here without starting JAX."""

from __future__ import annotations

from typing import NamedTuple, Optional

# λ clip((R − mean R)/(std R + eps), ±adv_clip) with per-label or batch statistics, or λ R (ddpo.advantages)
ADVANTAGES = ("normalized", "raw")


class PPO(NamedTuple):
    """advantage ∈ ADVANTAGES; clip range ε > 0 of the per-step ratios π_θ/π_θold (ddpo-pytorch's 1e-4);
    inner epochs E ≥ 1, the passes over each round's paths; train_batch: paths per update, dividing the
    round's batch (None: batch // 2, at least 1: ddpo-pytorch's two updates per pass); adv_clip: the bound
    of the normalised advantages (ddpo-pytorch's adv_clip_max)."""

    advantage: str = "normalized"
    clip_range: float = 1e-4
    inner_epochs: int = 1
    train_batch: Optional[int] = None
    adv_clip: float = 5.0

    def minibatch(self, batch: int) -> int:
        """Paths per update for rounds of `batch` paths."""
        return self.train_batch if self.train_batch is not None else max(batch // 2, 1)

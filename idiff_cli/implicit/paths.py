"""A pretrained sampler seen as a function of θ: the bound step used by the queue and the adjoints.

`diffusion.samplers.Sampler` steps take a parameter-free score and a key used as given. Here a path is
named by one *slot key* s, exactly as `Sampler.sample(score, s, shape)` names its sample:
x_0 = sampler.init(split(s)[0]) and step k uses fold_in(split(s)[1], k). So a path can be re-run under
another θ with the same noise (the paper's same-seed figures) and the adjoint regenerates each step's
noise from s instead of storing it. The slot key names the batch's conditioning as well: fixed class labels
per batch position, or a function of the key (a text-to-image run draws each slot's prompts from it), so a
path carries no conditioning of its own through the queue and the adjoints.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax


class SamplerPaths(NamedTuple):
    """init(slot_key) -> x_0 [B, ...]; step(params, x, k, slot_key) -> x_{k+1}; denoise(params, x_n) -> image
    (the sampler's last, Tweedie, step; identity when the sampler has none); step_and_score(params, x, k,
    slot_key) -> (x_{k+1}, the score sθ(x_k, t_k) [B, ...] the step evaluated, for a running cost to share);
    tweedie: whether denoise is the Tweedie step, a deterministic map that evaluates the score (one network
    pass) and lies outside the Gaussian transitions the Girsanov KL covers; step_fn: the sampler's step
    function, whose Gaussian transition (samplers.GaussianStep) the Girsanov KL reads; stochastic: the
    sampler's `stochastic`, whether that transition exists (the Girsanov KL and DDPO's policy apply);
    score(params, x, t, labels) -> sθ(x, t) [B, ...] under the conditioning `labels` [B] (or None);
    labels(slot_key) -> the slot's labels [B] int (or None: an unconditional model); n_labels: the labels
    lie in [0, n_labels) (0: no labels, or none to keep statistics of: DDPO's per-label advantages)."""

    init: Callable[[jax.Array], jax.Array]
    step: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    denoise: Callable[[Any, jax.Array], jax.Array]
    n_steps: int
    step_and_score: Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    tweedie: bool
    step_fn: Callable
    stochastic: bool
    score: Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
    labels: Callable[[jax.Array], Any]
    n_labels: int


def sampler_paths(sampler: Any, score: Callable, shape: tuple[int, ...],
                  labels: Union[jax.Array, Callable[[jax.Array], jax.Array], None] = None,
                  n_labels: int = 0) -> SamplerPaths:
    """Binds a `Sampler` and a score(params, x, t, labels) for batches of `shape` [B, H, W, C]; `labels`
    [B] are the same for every slot, or labels(slot_key) -> [B] the slot's own, in [0, n_labels).
    ValueError for per-slot labels with a sampler whose last step is the Tweedie denoiser (denoise sees
    no slot key)."""
    per_slot = callable(labels)
    if per_slot and sampler.denoise_final:
        raise ValueError("per-slot labels need a sampler without the Tweedie step: denoise(params, x) sees no slot")

    def slot_labels(slot_key):
        return labels(slot_key) if per_slot else labels

    def bound(params, slot_key=None):
        return lambda y, t: score(params, y, t, slot_labels(slot_key))

    def init(slot_key):
        return sampler.init(jax.random.split(slot_key)[0], shape)

    def noise_key(slot_key, k):
        return jax.random.fold_in(jax.random.split(slot_key)[1], k)

    def step(params, x, k, slot_key):
        return sampler.step(bound(params, slot_key), x, k, noise_key(slot_key, k))

    def step_and_score(params, x, k, slot_key):
        evaluated = []

        def recorded(y, t):
            evaluated.append((y is x, bound(params, slot_key)(y, t)))
            return evaluated[-1][1]

        x_next = sampler.step(recorded, x, k, noise_key(slot_key, k))
        if [at_x for at_x, _ in evaluated] != [True]:
            raise ValueError(f"step_and_score needs a sampler step that evaluates the score once, at x_k; "
                             f"{sampler.step_fn.__name__} evaluated it {len(evaluated)} times")
        return x_next, evaluated[0][1]

    def denoise(params, x):
        return sampler.finalize(bound(params), x)

    return SamplerPaths(init, step, denoise, sampler.n_steps, step_and_score, sampler.denoise_final,
                        sampler.step_fn, sampler.stochastic, score, slot_labels, n_labels)

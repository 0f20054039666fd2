"""Finetuning methods: how each outer step gets its batch of samples and its gradient Γ (paper §3.3, §5.2).

Every method is a pair of functions over a method-specific carry, registered under kind
"finetune-method":

    init(params0, key) -> carry                          # e.g. the warm queue P_M of Algorithm 2
    estimate(params, carry, key) -> (carry, Estimate)    # samples under the current θ and Γ(p, θ)

and the outer step applies the optimizer to Γ. A method that takes several optimizer steps per outer
step (ddpo's minibatch updates) also has

    update(params, opt_state, carry, optimizer) -> (params, opt_state, carry, Estimate, metrics)

which is the outer step instead (metrics: a dict of scalars, extra columns of the step's row).
`estimate` and `update` are pure and traced inside the jitted outer step; `init` runs once and is
jitted (finetune traces it inside its own jit, with the frozen weights as arguments).

* `implicit` (Algorithm 2): a queue of M slots advanced by T/M steps per outer step under the current
  θ; the completed slot's gradient by the discrete adjoint along its stored path.
* `implicit` with `--adjoint pipelined` (beyond the paper): Algorithm 2 with a second queue of
  adjoint states walked back T/M steps per outer step (pipeline.py): 2 sequential calls with M = T.
* `nested`: a full T-step sampling under θ_k, then the adjoint gradient, every outer step.
* `truncated-K`: as nested, but backpropagates through the last K sampling steps only (DRaFT-K;
  K = 1 is last-step unrolling).
* `full-backprop`: `jax.grad` through the unrolled sampler with each step `jax.checkpoint`ed
  (AlignProp-like); the same gradient as `nested`, computed by autodiff instead of the adjoint scan.
* `ddpo`: policy gradient on the sampler's Gaussian transitions with PPO's clipped ratios and DPOK's
  KL term (ddpo.py): no ∇R. An outer step is one sampling round of B T-step paths under the current θ
  and E = --inner-epochs passes over it in minibatches of b = --train-batch paths, one Adam update each
  (ddpo-pytorch's epoch).

The i-th batch of paths any method samples is named by the slot key fold_in(key, i) (paths.py), so
all methods see the same noise. `Cost` counts network passes per outer step, in batches of B images;
`spent` the passes of the first s outer steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from idiff_cli import registry
from idiff_cli.errors import UserError
from idiff_cli.implicit import adjoint, ddpo as ddpo_lib, pipeline
from idiff_cli.implicit import queue as queue_lib
from idiff_cli.implicit.paths import SamplerPaths
from idiff_cli.implicit.ppo import PPO
from idiff_cli.registry import register

SHUFFLE_STREAM = 0x5F1E  # fold_in(slot_key, SHUFFLE_STREAM): ddpo's permutations of a round's paths


@dataclasses.dataclass(frozen=True)
class Problem:
    """The bound pieces of F(θ) = −λ E R(denoise_θ(x_n)) + β KL(P_θ ‖ P_θ0) for one run, the KL being
    that of the sampler's paths x_0..x_n (girsanov.py; denoise_θ is outside it).

    terminal(θ, x_n, slot_key) = −λ R(denoise_θ(x_n), prompts(slot_key)) [B]; transition(θ, x_k, k, key) =
    (x_{k+1}, β × Girsanov KL increment [B]) (adjoint.Transition; with_kl False: zeros, β = 0);
    reward(images, prompts) [B]; prompts(slot_key): the slot's rewards.Prompts (None for an unconditional
    model); policy: the sampler's Gaussian transitions, λ and β × their KLs as `ddpo` reads them (None for
    a deterministic sampler); walk and advance: how the discrete adjoint walks back and the queue advances
    (adjoint.walk_paths and queue.queue_advance, or ones with their signatures: per device on a mesh)."""

    paths: SamplerPaths
    terminal: Callable
    transition: Callable
    reward: Callable
    with_kl: bool
    policy: Optional[ddpo_lib.Policy] = None
    prompts: Callable = lambda slot_key: None
    walk: Callable = adjoint.walk_paths
    advance: Callable = queue_lib.queue_advance


class Estimate(NamedTuple):
    """One outer step's gradient and the completed batch it came from (states [T + 1, B, ...], its slot key)."""

    grad: Any
    states: jax.Array
    images: jax.Array  # [B, H, W, C] the denoised samples the reward is computed on
    key: jax.Array  # the batch's slot key: its noise and its prompts (Problem.prompts)


class Cost(NamedTuple):
    """Network passes of an outer step (or of the warm-up: Method), in batches of B images; net_evals is
    (forward + backward) × B. tests/test_implicit_cost.py counts the images every pass of the network
    processes and checks these numbers against the count for every method and adjoint, with and without
    the KL term.

    forward: batches through a forward pass of θ's network (sampling steps; the forward half of each
    vjp; with paths.tweedie, the Tweedie denoiser, once inside the terminal cost's vjp and once for the
    completed batch's images) and, with a KL term, of θ0's (the Girsanov increment compares sθ and sθ0 at x_k).
    backward: batches through a backward pass, the pullback of a vjp: θ's network w.r.t. its weights
    and input, and, with a KL term, θ0's w.r.t. its input alone (the increment ‖sθ(x_k) − sθ0(x_k)‖²
    depends on x_k through both scores). An adjoint step is one vjp of the transition: a forward and a
    backward pass of each network it evaluates.
    sequential: batched network calls on the critical path (on parallel hardware every slot of a wave is
    the same call; a vjp counts as one call)."""

    forward: int
    backward: int
    sequential: int


class Method(NamedTuple):
    """An outer step (`update` where there is one, else `estimate` and one optimizer step) costs `cost`;
    `init` costs `warmup`, once."""

    name: str
    init: Callable[[Any, jax.Array], Any]
    estimate: Callable[[Any, Any, jax.Array], tuple[Any, Estimate]]
    cost: Cost  # per outer step
    warmup: Cost  # once, by init
    update: Optional[Callable[[Any, Any, Any, Any], tuple[Any, Any, Any, Estimate, dict]]] = None


def spent(method: Method, steps: int) -> Cost:
    """The passes of the warm-up and of the first `steps` outer steps, in batches of B (finetune logs
    net_evals = (forward + backward) × B and sequential_calls)."""
    return Cost(*(w + steps * c for w, c in zip(method.warmup, method.cost)))


def _denoiser_passes(problem: Problem) -> int:
    """Network passes of one denoise_θ: 1 for the Tweedie step, 0 when the reward sees x_n itself."""
    return int(problem.paths.tweedie)


def _adjoint_passes(problem: Problem, n_steps: int) -> int:
    """Forward passes of an adjoint over n steps, and as many backward passes: one vjp of the
    transition per step (θ's network, and θ0's with a KL term: girsanov.kl_transition) and one of the
    terminal cost (through the denoiser, when it is a network pass)."""
    return n_steps * (1 + problem.with_kl) + _denoiser_passes(problem)


def _step_cost(problem: Problem, sampling: int, n_adjoint: int, sequential: int) -> Cost:
    """An outer step that samples `sampling` forward passes, adjoints over n_adjoint steps and denoises
    the completed batch for its reward images."""
    passes = _adjoint_passes(problem, n_adjoint)
    return Cost(sampling + _denoiser_passes(problem) + passes, passes, sequential)


def _images(problem: Problem, params, states):
    return problem.paths.denoise(params, states[-1])


def _path_gradient(problem: Problem, kind: str, n_steps: int) -> Callable:
    """grad(params, states [n + 1, B, ...], key, first) -> adjoint.Gradient of one batch of paths:
    `full` = the exact discrete adjoint along the stored states; `continuous` = the probability-flow
    adjoint ODE integrated back from the final state alone (whole paths only: first = 0)."""
    p = problem.paths
    if kind == "continuous":
        return lambda params, states, key, first=0: adjoint.continuous_adjoint(
            p.step, params, states[-1], key, problem.terminal, n_steps)
    return lambda params, states, key, first=0: adjoint.discrete_adjoint(
        problem.transition, params, states, key, problem.terminal, first=first, walk=problem.walk)


def implicit(problem: Problem, T: int, M: int, kind: str = "full") -> Method:
    """Algorithm 2 with the full (or continuous) adjoint on the completed slot."""
    L = queue_lib.check_divides(M, T)
    p = problem.paths
    path_gradient = _path_gradient(problem, kind, T)

    @jax.jit
    def init(params0, key):
        return queue_lib.queue_init(p.step, params0, key, p.init, M, T), key

    def estimate(params, carry, key):
        queue, root = carry
        queue, done = problem.advance(p.step, params, queue, M, T)
        grad = path_gradient(params, done.states, done.key)
        queue = queue_lib.queue_push(queue, root, p.init)
        return (queue, root), Estimate(grad.params, done.states, _images(problem, params, done.states), done.key)

    warmup = L * M * (M - 1) // 2  # slot m pre-advanced m·L steps under θ0, one slot after the other
    name = "implicit" if kind == "full" else f"implicit-{kind}"
    # critical path: the queue's L steps, the terminal vjp (a call with the Tweedie step), the T adjoint
    # vjps (the images beside them)
    cost = _step_cost(problem, T, T, L + _denoiser_passes(problem) + T)
    return Method(name, init, estimate, cost, Cost(warmup, 0, warmup))


def implicit_pipelined(problem: Problem, T: int, M: int) -> Method:
    """Algorithm 2 with the pipelined adjoint (pipeline.py): the completed slots are walked back L steps
    per outer step in a second queue; with M = T, 2 sequential batched calls per outer step."""
    L = queue_lib.check_divides(M, T)
    p = problem.paths

    @jax.jit
    def init(params0, key):
        aq = pipeline.adjoint_queue_init(p.step, problem.transition, params0, key, p.init, problem.terminal, M, T,
                                         walk=problem.walk)
        return queue_lib.queue_init(p.step, params0, key, p.init, M, T, first=M + 1), aq, key

    def estimate(params, carry, key):
        queue, aq, root = carry
        queue, done = problem.advance(p.step, params, queue, M, T)
        aq, finished = pipeline.backward_wave(problem.transition, params, aq, problem.terminal, M, T, walk=problem.walk)
        aq = aq._replace(pending_states=done.states, pending_key=done.key)
        queue = queue_lib.queue_push(queue, root, p.init)
        return (queue, aq, root), Estimate(finished.g, done.states, _images(problem, params, done.states), done.key)

    # the same work as one full adjoint; critical path: the forward wave's L steps, then the backward
    # wave's L vjps (the terminal vjp of the pending path and the images beside them)
    cost = _step_cost(problem, T, T, 2 * L)
    # warm-up: the forward queue, M + 1 paths of T steps (one vmapped rollout), M backward waves of
    # M slots × L vjps and the pending path's terminal vjp each
    queue, wave = L * M * (M - 1) // 2, _adjoint_passes(problem, L * M)
    warmup = Cost(queue + (M + 1) * T + M * wave, M * wave, queue + T + M * L)
    return Method("implicit-pipelined", init, estimate, cost, warmup)


def _fresh_paths(problem: Problem, params, carry, T: int):
    """A new batch of paths under θ: slot key i = fold_in(root, i), as in the queue."""
    started, root = carry
    key = queue_lib.slot_key(root, started)
    states = adjoint.rollout(problem.paths.step, params, problem.paths.init(key), key, T)
    return (started + 1, root), key, states


def _fresh_init(params0, key):
    return jnp.asarray(0, jnp.int32), key


def nested(problem: Problem, T: int, K: Optional[int] = None, kind: str = "full") -> Method:
    """T sampling steps under θ_k, then the adjoint through the last K steps (all T when K is None)."""
    K = T if K is None else K
    if not 1 <= K <= T:
        raise UserError(f"--method truncated-{K}: truncated-K needs 1 <= K <= --T ({T})")
    path_gradient = _path_gradient(problem, kind, K)

    def estimate(params, carry, key):
        carry, slot, states = _fresh_paths(problem, params, carry, T)
        grad = path_gradient(params, states[T - K:], slot, T - K)
        return carry, Estimate(grad.params, states, _images(problem, params, states), slot)

    name = ("nested" if K == T else f"truncated-{K}") + ("" if kind == "full" else f"-{kind}")
    cost = _step_cost(problem, T, K, T + _denoiser_passes(problem) + K)
    return Method(name, _fresh_init, estimate, cost, Cost(0, 0, 0))


def full_backprop(problem: Problem, T: int) -> Method:
    """jax.grad through the unrolled, per-step rematerialised sampler (AlignProp-like)."""
    p = problem.paths

    def estimate(params, carry, key):
        started, root = carry
        slot = queue_lib.slot_key(root, started)
        grad, states = adjoint.unrolled_gradient(problem.transition, params, p.init(slot), slot, T,
                                                 problem.terminal, with_states=True)
        return (started + 1, root), Estimate(grad, states, _images(problem, params, states), slot)

    # grad of the unrolled scan: its forward (T transitions), then the terminal vjp and per step a vjp
    # of the rematerialised transition (its recompute is the vjp's forward half)
    cost = _step_cost(problem, T * (1 + problem.with_kl), T, 2 * T + _denoiser_passes(problem))
    return Method("full-backprop", _fresh_init, estimate, cost, Cost(0, 0, 0))


def ddpo(problem: Problem, T: int, ppo: PPO = PPO()) -> Method:
    """DDPO with PPO clipping and DPOK's KL term (ddpo.py) on the T Gaussian transitions of a stochastic
    sampler (problem.policy), with the settings `ppo`, structured as ddpo-pytorch's training loop.

    An outer step (`update`) is one round: B paths sampled under the current θ = θ_old from slot key
    fold_in(root, started), their images denoised and rewarded and their advantages formed
    (ddpo.advantages), θ_old's means at every step of every path stored (T forward passes of the
    batch); then E = ppo.inner_epochs passes over the round, each a permutation of the B paths (keys
    from the slot key) cut into K = B / b minibatches of b = ppo.minibatch(B) paths, each minibatch
    one optimizer update with its gradient summed over the T steps: E·K updates in a `lax.scan`. The
    first update has ratios exactly 1, the later ones the ratios of the moved θ to θ_old. Its Estimate:
    the round's paths and images and the mean of the E·K updates' gradients; its metrics: clipfrac and
    approx_kl (ddpo.Diagnostics) averaged over them. `estimate` is the round's gradient at θ = θ_old:
    all B paths in one update (the score-function estimate), no optimizer step.

    Carry (started, root, tracker): the rounds sampled so far, the root key and, with normalized
    advantages and labelled paths (paths.n_labels > 0), the per-label reward buffers (ddpo.Tracker;
    else ()); part of the checkpoint, so a resumed run normalises as the uninterrupted one."""
    p, policy, epochs = problem.paths, problem.policy, ppo.inner_epochs
    B = jax.eval_shape(p.init, jax.random.key(0)).shape[0]
    b = ppo.minibatch(B)
    if B % b:
        raise UserError(f"--train-batch ({b}) must divide --batch ({B})")
    tracked = ppo.advantage == "normalized" and p.n_labels > 0

    def init(params0, key):
        x0 = jax.eval_shape(p.init, key)
        tracker = ddpo_lib.tracker_init(p.n_labels, x0.dtype) if tracked else ()
        return jnp.asarray(0, jnp.int32), key, tracker

    def sample(params, carry):
        """(carry, slot key, the round's Batch without old means, its images) under θ."""
        started, root, tracker = carry
        slot = queue_lib.slot_key(root, started)
        states = adjoint.rollout(p.step, params, p.init(slot), slot, T)
        images = _images(problem, params, states)
        labels = p.labels(slot)
        rewards = problem.reward(images, problem.prompts(slot))
        advantages, tracker = ddpo_lib.advantages(rewards, ppo.advantage, policy.lam, ppo.adv_clip, labels,
                                                  tracker if tracked else None)
        batch = ddpo_lib.Batch(states, None, advantages.astype(states.dtype), labels)
        return (started + 1, root, tracker if tracked else ()), slot, batch, images

    def estimate(params, carry, key):
        carry, slot, batch, images = sample(params, carry)
        grad, _ = ddpo_lib.policy_gradient(policy, params, batch, ppo.clip_range)
        return carry, Estimate(grad, batch.states, images, slot)

    def update(params, opt_state, carry, optimizer):
        carry, slot, batch, images = sample(params, carry)
        batch = batch._replace(means=ddpo_lib.old_means(policy, params, batch.states, batch.labels))
        shuffle = jax.random.fold_in(slot, SHUFFLE_STREAM)
        order = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(shuffle, e), B))(jnp.arange(epochs))
        order = order.reshape(-1, b)  # [E·K, b]: the minibatches of pass 0, then of pass 1, …

        def one(state, xs):
            params, opt_state, total = state
            rows, first = xs
            grad, stats = ddpo_lib.policy_gradient(policy, params, ddpo_lib.minibatch(batch, rows), ppo.clip_range,
                                                   first)
            updates, opt_state = optimizer.update(grad, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, jax.tree.map(jnp.add, total, (grad, stats))), None

        zeros = (jax.tree.map(jnp.zeros_like, params), ddpo_lib.Diagnostics(*jnp.zeros((2,), batch.states.dtype)))
        n = order.shape[0]
        (params, opt_state, (grad, stats)), _ = jax.lax.scan(one, (params, opt_state, zeros),
                                                            (order, jnp.arange(n) == 0))
        grad = jax.tree.map(lambda g: g / n, grad)
        return params, opt_state, carry, Estimate(grad, batch.states, images, slot), {
            name: v / n for name, v in stats._asdict().items()}

    d = _denoiser_passes(problem)
    # a round: T sampling steps, the denoiser for the reward images, T passes for θ_old's means, then E
    # passes over the B paths of one vjp per step of θ's network (and a forward pass of θ0's with the KL)
    # in E·K updates of b paths, their T steps one after another
    cost = Cost(2 * T + d + epochs * T * (1 + problem.with_kl), epochs * T, 2 * T + d + epochs * (B // b) * T)
    return Method("ddpo", init, estimate, cost, Cost(0, 0, 0), update)


def truncated(K: int) -> Callable:
    """The builder (problem, T, M) -> Method of `truncated-K`: `nested` through the last K steps."""
    return lambda problem, T, M: nested(problem, T, K)


register("finetune-method", "implicit", implicit)
register("finetune-method", "nested", lambda problem, T, M, kind="full": nested(problem, T, kind=kind))
register("finetune-method", "truncated-K", truncated)  # every integer K; `nested` checks 1 <= K <= T
register("finetune-method", "full-backprop", lambda problem, T, M: full_backprop(problem, T))
register("finetune-method", "ddpo", lambda problem, T, M, ppo=PPO(): ddpo(problem, T, ppo))


def make_method(name: str, problem: Problem, T: int, M: int, kind: str = "full",
                ppo: Optional[PPO] = None) -> Method:
    """`implicit`, `nested`, `truncated-K` for an integer K (e.g. truncated-1), `full-backprop`, `ddpo`
    (with the settings `ppo`, default PPO()), or a plug-in builder `package.module:function(problem, T, M)
    -> Method`; `kind` is the adjoint: `full`; `pipelined`, Algorithm 2's only; `continuous`, whole paths
    only (implicit, nested), of a deterministic sampler (it differentiates the terminal cost alone); ddpo
    differentiates no path (`full` only). UserError for the other pairs."""
    if name == "ddpo":
        if kind != "full":
            raise UserError(f"--method ddpo differentiates log-probabilities of the sampled transitions, no path: "
                            f"--adjoint {kind} does not apply (leave --adjoint full)")
        return registry.get("finetune-method", name)(problem, T, M, ppo=ppo or PPO())
    if kind == "pipelined":
        if name != "implicit":
            raise UserError(f"--adjoint pipelined is a queue of adjoint states beside Algorithm 2's queue: it needs "
                            f"--method implicit, got --method {name}")
        return implicit_pipelined(problem, T, M)
    if kind == "continuous":
        if name not in ("implicit", "nested"):
            raise UserError(f"--adjoint continuous integrates back over whole paths: it needs --method implicit or "
                            f"nested, got --method {name}")
        return registry.get("finetune-method", name)(problem, T, M, kind=kind)
    return registry.get("finetune-method", name)(problem, T, M)

"""The network passes of the finetuning methods, counted: the score network is wrapped so that every
forward and every backward pass reports the images it processed, and the warm-up and an outer step of
every method and adjoint (ddpo's: a round and its minibatch updates, `Method.update`), with and without
the KL term, must make exactly the passes its `Cost` declares (the numbers finetune logs as net_evals),
on the paper's 1-D Gaussian (§4)."""

import collections
import math

import jax
import jax.numpy as jnp
import optax
import pytest

from idiff_cli.diffusion.samplers import Sampler, euler_maruyama_step, probability_flow_step
from idiff_cli.implicit import finetune, girsanov, methods, pipeline
from idiff_cli.implicit.paths import sampler_paths
from idiff_cli.implicit.ppo import PPO
from implicit_gaussian import SDE, score, theta

IMAGE = (1,)  # the shape of one "image" of the 1-D problem
B = 3
THETA0, THETA = theta(0.5, 1.0, jnp.float32), theta(0.8, 1.3, jnp.float32)


class CountedScore:
    """implicit_gaussian's score(params, x, t, labels) with its passes counted in images, keyed by
    (pass, network): pass "forward" or "backward", network "θ0" when called with θ0's weights (compared
    by value), else "θ".

    A custom_vjp whose forward rules and backward rule hand x to a jax.debug.callback, which adds
    x.size / prod(IMAGE). The callback receives x itself, not a static size: under vmap it is then run
    once per mapped slot (or given the whole batched x), under lax.map once per iteration, so a batched
    call of M slots of B images counts M·B either way."""

    def __init__(self):
        self.images = collections.Counter()

        def record(kind, params, x):
            def add(m, x):
                network = "θ0" if float(m) == float(THETA0["m"]) else "θ"
                self.images[kind, network] += x.size // math.prod(IMAGE)

            jax.debug.callback(add, params["m"], x)

        @jax.custom_vjp
        def apply(params, x, t, labels=None):
            record("forward", params, x)
            return score(params, x, t)

        def forward(params, x, t, labels=None):
            record("forward", params, x)
            return score(params, x, t), (params, x, t)

        def backward(residuals, g):
            params, x, t = residuals
            record("backward", params, x)
            return (*jax.vjp(score, params, x, t)[1](g), None)

        apply.defvjp(forward, backward)
        self.apply = apply

    def count(self, fn, *args) -> tuple[dict, object]:
        """(the images of the passes that `fn(*args)` makes when run (not traced), its result)."""
        jax.effects_barrier()
        self.images.clear()
        out = jax.block_until_ready(fn(*args))
        jax.effects_barrier()
        return dict(self.images), out


def totals(images: dict) -> tuple[int, int]:
    return tuple(sum(n for (kind, _), n in images.items() if kind == k) for k in ("forward", "backward"))


def x_of(n: int) -> jax.Array:
    return jnp.linspace(-1.0, 1.0, n * B).reshape(n, B, *IMAGE)


def t_of(x: jax.Array) -> jax.Array:
    return jnp.full(x.shape[:1], 0.5)


def test_counter_counts_images_per_pass():
    """Known cases: one forward of B images → B; vmap and lax.map over M slots → M·B; a vjp → B forward
    and B backward, M·B each when vmapped; grad through jax.checkpoint → the forward twice (the remat
    recompute) and one backward; θ0's weights are counted apart."""
    M, net = 4, CountedScore()
    x = x_of(M)
    one = lambda p, y: jnp.sum(net.apply(p, y, t_of(y)))  # noqa: E731
    vjp = lambda p, y: jax.vjp(lambda p, y: net.apply(p, y, t_of(y)), p, y)[1](y)  # noqa: E731
    def passes(forward, backward=0, network="θ"):
        return {key: n for key, n in ((("forward", network), forward), (("backward", network), backward)) if n}

    cases = {
        "one forward": (lambda: net.apply(THETA, x[0], t_of(x[0])), passes(B)),
        "vmap": (lambda: jax.vmap(lambda y: net.apply(THETA, y, t_of(y)))(x), passes(M * B)),
        "lax.map": (lambda: jax.lax.map(lambda y: net.apply(THETA, y, t_of(y)), x), passes(M * B)),
        "vjp": (lambda: vjp(THETA, x[0]), passes(B, B)),
        "vmapped vjp": (lambda: jax.vmap(vjp, (None, 0))(THETA, x), passes(M * B, M * B)),
        "remat grad": (lambda: jax.grad(jax.checkpoint(one))(THETA, x[0]), passes(2 * B, B)),
        "θ0": (lambda: vjp(THETA0, x[0]), passes(B, B, "θ0")),
    }
    for name, (fn, expected) in cases.items():
        assert net.count(jax.jit(fn))[0] == expected, name


def counted_problem(net: CountedScore, T: int, beta: float, deterministic: bool = False,
                    tweedie: bool = True) -> methods.Problem:
    """The Gaussian problem on the counted score as finetune binds it (λ = 2, R = sin), with a Tweedie
    denoiser (a network pass, as the U-Net's) in the terminal cost and the reward images (or none:
    finetune --final-step none), and the Girsanov KL when β > 0."""
    sampler = Sampler(SDE, T, probability_flow_step if deterministic else euler_maruyama_step, denoise_final=tweedie)
    p = sampler_paths(sampler, net.apply, (B, *IMAGE))
    return finetune.bind_problem(p, SDE, sampler.grid, lambda x: jnp.sin(x[:, 0]), bool(beta))(
        THETA0, 2.0, beta)


METHODS = [("implicit", "full"), ("implicit", "pipelined"), ("nested", "full"), ("truncated-2", "full"),
           ("full-backprop", "full")]
CASES = ([(name, kind, 2, beta, True, None) for name, kind in METHODS for beta in (0.0, 0.3)]
         + [("implicit", "pipelined", 4, 0.3, True, None),  # M = T: L = 1
            ("implicit", "continuous", 2, 0.0, True, None), ("nested", "continuous", 2, 0.0, True, None)]
         + [(name, kind, 2, 0.3, False, None) for name, kind in METHODS]  # no Tweedie step
         # ddpo: E passes over a round of B = 3 paths in minibatches of 1 (the default B // 2) or of 3
         + [("ddpo", "full", 2, beta, tweedie, ppo) for beta in (0.0, 0.3) for tweedie in (True, False)
            for ppo in (PPO(), PPO(inner_epochs=2, train_batch=3))])


def outer_step(method):
    """jit: (θ, Adam's state, carry) -> the same after one outer step as finetune makes it: the method's
    `update`, else its `estimate` and an Adam step."""
    adam = optax.adam(1e-3)

    def step(params, opt_state, carry):
        if method.update is not None:
            return method.update(params, opt_state, carry, adam)[:3]
        carry, est = method.estimate(params, carry, None)
        updates, opt_state = adam.update(est.grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, carry

    return adam.init, jax.jit(step)


@pytest.mark.parametrize("name, kind, M, beta, tweedie, ppo", CASES)
def test_counted_passes_equal_the_declared_cost(name, kind, M, beta, tweedie, ppo):
    """At T = 4: the images through forward and backward passes (of θ's and θ0's networks) in the
    warm-up and in the second outer step are the method's declared passes × B, the numbers finetune
    logs: `methods.spent(method, 0)` for the warm-up (step 0's net_evals), then `spent(method, 2) −
    spent(method, 1)`."""
    T, net = 4, CountedScore()
    method = methods.make_method(name, counted_problem(net, T, beta, kind == "continuous", tweedie), T, M, kind, ppo)
    warmup, carry = net.count(method.init, THETA0, jax.random.key(3))
    logged = methods.spent(method, 0)
    assert totals(warmup) == (logged.forward * B, logged.backward * B), warmup
    init, step = outer_step(method)
    state = step(THETA, init(THETA), carry)
    counted, _ = net.count(step, *state)
    declared = [after - before for after, before in zip(methods.spent(method, 2), methods.spent(method, 1))]
    assert totals(counted) == (declared[0] * B, declared[1] * B), counted


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_backward_wave_vmapped_or_mapped_makes_the_same_passes(beta):
    """The pipelined backward wave walks its M slots in one vmapped call (accelerators) or one after
    another (`lax.map`, the CPU default the method test above counts): the same passes."""
    T, M, net = 4, 2, CountedScore()
    prob = counted_problem(net, T, beta)
    aq = pipeline.adjoint_queue_init(prob.paths.step, prob.transition, THETA0, jax.random.key(8), prob.paths.init,
                                     prob.terminal, M, T)
    counts = [net.count(jax.jit(lambda aq: pipeline.backward_wave(prob.transition, THETA, aq, prob.terminal, M, T,
                                                                  batched)), aq)[0]
              for batched in (True, False)]
    assert counts[0] == counts[1] and totals(counts[0])[1] > 0, counts


def test_counted_passes_of_the_logged_kl_equal_the_declared_cost():
    """girsanov.fresh_path_kl on 3 batches of B paths over T = 4 steps (the KL finetune logs) makes
    fresh_path_kl_passes(T, 3·B) images of forward passes, half of θ's network and half of θ0's, and
    no backward pass."""
    T, n_batches, net = 4, 3, CountedScore()
    sampler = Sampler(SDE, T, euler_maruyama_step, denoise_final=True)
    p = sampler_paths(sampler, net.apply, (B, *IMAGE))
    transition = girsanov.kl_transition(p, SDE, sampler.grid, THETA0, 1.0)
    keys = jax.random.split(jax.random.key(4), n_batches)
    images, _ = net.count(jax.jit(lambda params: girsanov.fresh_path_kl(transition, p.init, params, keys, T)), THETA)
    half = girsanov.fresh_path_kl_passes(T, n_batches * B) // 2
    assert images == {("forward", "θ"): half, ("forward", "θ0"): half}, images

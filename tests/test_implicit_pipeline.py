"""The pipelined adjoint and the `--adjoint` choices of the finetuning methods, on the paper's 1-D
Gaussian diffusion (§4) with a KL running cost, in float64. The network passes each method makes per
outer step are counted in test_implicit_cost.py (the pipelined adjoint makes those of the full one)."""

import jax
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.errors import UserError
from idiff_cli.implicit import adjoint, methods
from idiff_cli.implicit import queue as q
from implicit_gaussian import finetune_problem as problem
from implicit_gaussian import outer_steps, theta


def gradients(method, params, key, n_steps):
    """The Γ of outer steps 1..n_steps with θ frozen at `params`."""
    return [grad for grad, _ in outer_steps(method, params, key, n_steps)]


@pytest.mark.parametrize("M, T", [pytest.param(4, 4, marks=pytest.mark.slow), (2, 4)])  # (4, 4): a longer queue
def test_frozen_theta_pipelined_gradient_equals_full_adjoint_of_the_same_path(M, T):
    """With θ frozen, the i-th pipelined Γ is the full discrete adjoint of the path with slot key i − 1,
    the same path the full-adjoint `implicit` method differentiates at step i: equal to relative 1e-10
    in float64 (the same vjps, batched differently). Covers the M + 1 warm paths and the steady state."""
    with enable_x64(True):
        prob, params0 = problem(T)
        params, key = theta(0.8, 1.3), jax.random.key(5)
        full = gradients(methods.make_method("implicit", prob, T, M), params, key, 2 * M + 3)
        piped = gradients(methods.make_method("implicit", prob, T, M, "pipelined"), params, key, 2 * M + 3)
        for i, (f, g) in enumerate(zip(full, piped)):
            k = q.slot_key(key, i)
            states = adjoint.rollout(prob.paths.step, params, prob.paths.init(k), k, T)
            oracle = adjoint.discrete_adjoint(prob.transition, params, states, k, prob.terminal)
            for name in ("m", "c"):
                np.testing.assert_allclose(g[name], oracle.params[name], rtol=1e-10, err_msg=f"step {i + 1}")
                np.testing.assert_allclose(f[name], oracle.params[name], rtol=1e-10, err_msg=f"step {i + 1}")


def test_pipelined_backward_wave_uses_the_current_theta():
    """After θ changes, the next Γ is the adjoint of the oldest slot's last L steps taken under the new
    θ from the state the earlier waves left: checked against adjoint_walk under θ' directly."""
    M, T = 2, 4
    with enable_x64(True):
        prob, _ = problem(T)
        old, new, key = theta(0.8, 1.3), theta(-0.4, 0.9), jax.random.key(6)
        method = methods.make_method("implicit", prob, T, M, "pipelined")
        _, aq, _ = method.init(old, key)
        _, est = method.estimate(new, method.init(old, key), None)
        oldest = jax.tree.map(lambda x: x[-1], aq.adj)
        expect = adjoint.adjoint_walk(prob.transition, new, aq.states[-1, : T // M + 1], aq.keys[-1], oldest, 0)
        for name in ("m", "c"):
            np.testing.assert_allclose(est.grad[name], expect.g[name], rtol=1e-10)


def test_backward_wave_batched_or_one_slot_at_a_time_is_the_same():
    """The wave vmapped over the slots (accelerators) and walked one slot after another (CPU): the same
    adjoint states to relative 1e-12 (the same vjps)."""
    from idiff_cli.implicit import pipeline

    M, T = 2, 4
    with enable_x64(True):
        prob, params0 = problem(T)
        aq = pipeline.adjoint_queue_init(prob.paths.step, prob.transition, params0, jax.random.key(8), prob.paths.init,
                                         prob.terminal, M, T)
        new = theta(-0.4, 0.9)
        waves = [pipeline.backward_wave(prob.transition, new, aq, prob.terminal, M, T, batched) for batched in (True, False)]
        for a, b in zip(*(jax.tree.leaves(w) for w in waves)):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_allclose(a, b, rtol=1e-12)


def test_continuous_adjoint_method_differentiates_the_completed_path():
    """`--adjoint continuous` on the probability-flow sampler: with θ frozen, the Γ of `implicit` and
    `nested` at step i is `adjoint.continuous_adjoint` from the final state of the path with slot key
    i − 1 (relative 1e-10; its convergence to the exact gradient is tested in test_implicit_adjoint.py),
    and differs from the full adjoint at this coarse T = 16 (so the choice is really wired through)."""
    M, T = 4, 16
    with enable_x64(True):
        prob, _ = problem(T, deterministic=True, beta=0.0)
        params, key = theta(0.8, 1.3), jax.random.key(7)
        for name in ("implicit", "nested"):
            cont = gradients(methods.make_method(name, prob, T, M, "continuous"), params, key, 3)
            full = gradients(methods.make_method(name, prob, T, M), params, key, 3)
            for i, (c, f) in enumerate(zip(cont, full)):
                k = q.slot_key(key, i)
                states = adjoint.rollout(prob.paths.step, params, prob.paths.init(k), k, T)
                oracle = adjoint.continuous_adjoint(prob.paths.step, params, states[-1], k, prob.terminal, T)
                np.testing.assert_allclose(c["m"], oracle.params["m"], rtol=1e-10)
                np.testing.assert_allclose(c["c"], oracle.params["c"], rtol=1e-10)
                assert abs(float(c["c"] - f["c"])) > 1e-3 * abs(float(f["c"]))


@pytest.mark.parametrize("method, kind, message", [
    ("nested", "pipelined", "--adjoint pipelined .* needs --method implicit, got --method nested"),
    ("truncated-1", "continuous", "--adjoint continuous .* needs --method implicit or nested, got --method truncated-1"),
    ("ddpo", "pipelined", "--method ddpo differentiates log-probabilities .* --adjoint pipelined does not apply"),
    ("truncated-5", "full", r"^--method truncated-5: truncated-K needs 1 <= K <= --T \(4\)$"),
    ("truncated-0", "full", r"^--method truncated-0: truncated-K needs 1 <= K <= --T \(4\)$"),
    ("truncated-x", "full", r"^unknown finetune-method 'truncated-x' \(truncated-K takes an integer K\); valid choices: "
                            r"ddpo, full-backprop, implicit, nested, truncated-K, or package.module:function$"),
])
def test_adjoint_and_method_choice_errors(method, kind, message):
    with enable_x64(True):
        prob, _ = problem(4)  # with a KL term (β = 0.3)
    with pytest.raises(UserError, match=message):
        methods.make_method(method, prob, 4, 2, kind)

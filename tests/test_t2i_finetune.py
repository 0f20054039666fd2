"""Finetuning a latent text-to-image model with LoRA, in process: every gradient method in float32 and
bfloat16 on the micro Stable Diffusion pipeline of tests/micro_pipeline.py (one-level U-Net and VAE);
the float64 discrete adjoint through LoRA adapters against the unrolled gradient and finite differences;
and the subject's prompt stream and frozen weights."""

from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax.flatten_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from micro_pipeline import FIXTURE, micro_model

from idiff_cli.diffusion import lora
from idiff_cli.diffusion.samplers import Sampler, euler_maruyama_step
from idiff_cli.diffusion.sde import OrnsteinUhlenbeck
from idiff_cli.implicit import adjoint, finetune, subject as subject_lib
from idiff_cli.implicit.options import SCHEMA
from idiff_cli.implicit.paths import sampler_paths

CLIP = pathlib.Path(__file__).parent / "fixtures" / "clip_tiny"  # a tiny CLIP and aesthetic head: --reward-weights
AESTHETIC = dict(reward="aesthetic", reward_weights=str(CLIP))
METHODS = (("implicit", "full"), ("implicit", "pipelined"), ("nested", "full"), ("full-backprop", "full"),
           ("truncated-1", "full"), ("ddpo", "full"))
SAME_GRADIENT = ("implicit-full", "implicit-pipelined", "nested-full", "full-backprop-full")
# --remat where it changes the program: the adjoint walk (nested) and the unrolled sampler (full-backprop)
REMAT = {("nested-full", "float32"), ("full-backprop-full", "bfloat16")}


@pytest.fixture(scope="module")
def model():
    return micro_model()


def run_config(model, **options):
    values = dict(T=2, M=2, batch=2, **{"reward": "brightness", "beta": 0.1, **options})
    return finetune.complete(SCHEMA.resolve(values), pathlib.Path("micro"), model)


def first_gradient(model, cfg):
    """Γ of the first outer step at θ = θ0 (the warm-up and one estimate in one program), as a flat vector."""
    parts = finetune.build(cfg, model, subject_lib.subject_of(cfg, model))

    @jax.jit
    def gradient(frozen, key):
        _, method = parts.bind(frozen)
        theta = parts.subject.reference(frozen["subject"])
        _, est = method.estimate(theta, method.init(theta, key), None)
        return jax.flatten_util.ravel_pytree(est.grad)[0], est.images

    return gradient(parts.frozen, jax.random.key(1))


@pytest.mark.slow  # 12 compiled outer steps (1 min)
def test_every_method_in_both_dtypes(model):
    """One outer step of every method with LoRA adapters, float32 and bfloat16, at θ = θ0 and β = 0 (there
    the KL's gradient vanishes exactly, and what a float32 program leaves of it is rounding divided by the
    last step's small variance; the KL's gradient through LoRA is checked in float64 below). The exact
    methods (implicit with the full or pipelined adjoint, nested, full-backprop) take the same path (slot
    key 0) with the aesthetic reward (the tiny CLIP of tests/fixtures/clip_tiny: the gradient passes
    through CLIP and the VAE decoder), and their float32 gradients agree (rtol 1e-4, atol 1e-6 of the
    largest entry: the reassociation of two float32 programs). Nested runs in float32 with --remat (the
    U-Net's and the VAE decoder's blocks rematerialised in the adjoint walk): atol 1e-5 of the largest
    entry for it, the same operations recomputed and fused otherwise by XLA (measured 3e-4 relative on
    entries 100× below the largest). truncated-1 and ddpo estimate other gradients, here of brightness
    (through the VAE decoder alone): finite and nonzero. Each bfloat16 gradient points where the float32
    one does (cosine > 0.98: bfloat16's 8-bit mantissa perturbs every activation by ~0.4 %, the frozen
    weights and activations only — adapters, latents and sums stay float32) and its norm is within 10 %;
    full-backprop's bfloat16 run rematerialises its unrolled sampler."""
    grads = {}
    for dtype in ("float32", "bfloat16"):
        for method, kind in METHODS:
            name = f"{method}-{kind}"
            cfg = run_config(model, method=method, adjoint=kind, dtype=dtype, lora_rank=2, beta=0.0,
                             remat=(name, dtype) in REMAT, **(AESTHETIC if name in SAME_GRADIENT else {}))
            g, images = first_gradient(model, cfg)
            assert images.dtype == jnp.float32 and images.shape == (2, 8, 8, 3)
            assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 0, (name, dtype)
            grads[name, dtype] = np.asarray(g, np.float64)
    reference = grads["implicit-full", "float32"]
    for name in SAME_GRADIENT[1:]:
        atol = (1e-5 if (name, "float32") in REMAT else 1e-6) * np.abs(reference).max()
        np.testing.assert_allclose(grads[name, "float32"], reference, rtol=1e-4, atol=atol, err_msg=name)
    for method, kind in METHODS:
        f32, bf16 = grads[f"{method}-{kind}", "float32"], grads[f"{method}-{kind}", "bfloat16"]
        cosine = f32 @ bf16 / (np.linalg.norm(f32) * np.linalg.norm(bf16))
        assert cosine > 0.98 and abs(np.linalg.norm(bf16) / np.linalg.norm(f32) - 1) < 0.1, (method, cosine)


def test_prompts_frozen_weights_and_lora_file(model, tmp_path):
    """The subject: θ the adapters (up = 0, so the merged U-Net is the base's) over bfloat16 frozen weights;
    each slot draws its prompts from its slot key (the same key, the same prompts; 64 slots cover the
    training prompts and only them); the evaluation grid shows the evaluation prompts in order; a JSONL
    record's negative prompt is its own; --lora starts from a diffusers file (θ0 = that file's adapters);
    --dtype bfloat16 casts the frozen weights, not the adapters or the embeddings."""
    prompts = tmp_path / "train.jsonl"
    prompts.write_text('{"prompt": "a red cube", "negative": "blurry"}\n{"prompt": "a blue ball"}\n')
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("a green cone\na cat\na dog\n")
    cfg = run_config(model, prompts=str(prompts), eval_prompts=str(evaluation), negative_prompt="ugly")
    subject = subject_lib.subject_of(cfg, model)
    half = subject_lib.subject_of(run_config(model, dtype="bfloat16"), model)
    assert jax.tree.leaves(half.frozen["base"])[0].dtype == jnp.bfloat16
    assert half.frozen["contexts"].dtype == jnp.float32
    assert subject.lora.rank == subject_lib.DEFAULT_RANK and subject.lora.targets == lora.select(
        model.params["unet"], lora.SD_TARGETS)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(half.theta0))
    assert all(not np.any(np.asarray(a["up"])) for _, a in lora._adapted(subject.theta0))
    draw = subject.labels(subject.frozen, False)
    rows = np.stack([np.asarray(draw(jax.random.fold_in(jax.random.key(0), i))) for i in range(64)])
    assert set(rows.ravel()) == {0, 1}
    np.testing.assert_array_equal(draw(jax.random.key(3)), draw(jax.random.key(3)))
    np.testing.assert_array_equal(subject.labels(subject.frozen, True), [2, 3])
    t2i = model.model  # float32: one prompt at a time equals the batched table up to float32 rounding
    embed = lambda text: np.asarray(t2i.embed(model.params, jnp.asarray(t2i.tokenizer.encode([text])[0])))[0]  # noqa: E731
    for table, row, text in (("negatives", 0, "blurry"), ("negatives", 1, "ugly"), ("contexts", 2, "a green cone")):
        np.testing.assert_allclose(subject.frozen[table][row], embed(text), rtol=1e-5, atol=1e-6)

    file = tmp_path / lora.LORA_WEIGHTS
    start = jax.tree.map(lambda a: a + 0.01, subject.theta0)
    lora.write(file, start, subject.lora.scale)
    loaded = subject_lib.subject_of(run_config(model, lora=str(file)), model)
    merged = lambda s, theta: lora.merge(model.params["unet"], theta, s.lora.scale)  # noqa: E731
    for a, b in zip(jax.tree.leaves(merged(loaded, loaded.theta0)), jax.tree.leaves(merged(subject, start))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert loaded.reference(loaded.frozen) is loaded.frozen["theta0"]


class Score(nn.Module):
    """A two-layer score network of (x [B, 2], t [B]) for the float64 LoRA oracle."""

    @nn.compact
    def __call__(self, x, t):
        h = jnp.tanh(nn.Dense(8)(jnp.concatenate([x, t[:, None]], axis=1)))
        return nn.Dense(2)(h)


@pytest.mark.slow  # float64 programs of the micro pipeline
def test_lora_adjoint_gradient_matches_unrolled_and_finite_differences():
    """float64: the finetune objective (−λ R of the final state + β × the Girsanov KL of 4 Euler–Maruyama
    steps) as a function of LoRA adapters on both layers of a score network: the discrete adjoint's
    gradient equals jax.grad through the unrolled sampler (rtol 1e-9: the same exact gradient by two
    algorithms) and central finite differences along a random direction (ε = 1e-5: truncation O(ε²) ~
    1e-10 against a derivative of order 1; rtol 1e-6)."""
    with enable_x64(True):
        net = Score()
        base = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
        base = jax.tree.map(lambda p: p.astype(jnp.float64), base)
        spec = lora.LoRASpec(2, 4.0, ("Dense_0", "Dense_1"))
        adapters0 = jax.tree.map(lambda a: a.astype(jnp.float64), lora.init(jax.random.key(1), base, spec))
        keys = iter(jax.random.split(jax.random.key(2), 100))
        theta = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape, a.dtype), adapters0)

        def score(params, x, t, labels):
            return net.apply(lora.merge(base, params, spec.scale), x, t)

        sde = OrnsteinUhlenbeck()
        sampler = Sampler(sde, 4, euler_maruyama_step, denoise_final=False)
        paths = sampler_paths(sampler, score, (6, 2))
        reward = lambda x: jnp.sin(x[:, 0]) + x[:, 1]  # noqa: E731
        problem = finetune.bind_problem(paths, sde, sampler.grid, reward, True)(adapters0, 1.5, 0.3)
        key = jax.random.key(3)
        x0 = paths.init(key)
        states = adjoint.rollout(paths.step, theta, x0, key, 4)
        exact = adjoint.discrete_adjoint(problem.transition, theta, states, key, problem.terminal)
        unrolled = adjoint.unrolled_gradient(problem.transition, theta, x0, key, 4, problem.terminal)
        flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
        np.testing.assert_allclose(flat(exact.params), flat(unrolled), rtol=1e-9)

        def objective(params):
            def body(carry, k):
                x, total = carry
                x_next, cost = problem.transition(params, x, k, key)
                return (x_next, total + jnp.mean(cost)), None

            (x, total), _ = jax.lax.scan(body, (x0, 0.0), jnp.arange(4))
            return jnp.mean(problem.terminal(params, x, key)) + total

        vector, unravel = jax.flatten_util.ravel_pytree(theta)
        direction = jax.random.normal(jax.random.key(4), vector.shape, vector.dtype)
        eps = 1e-5
        fd = (objective(unravel(vector + eps * direction)) - objective(unravel(vector - eps * direction))) / (2 * eps)
        np.testing.assert_allclose(float(flat(exact.params) @ direction), float(fd), rtol=1e-6)
        assert np.linalg.norm(flat(exact.params)) > 0


def test_a_prompt_aware_reward_sees_each_paths_own_prompts():
    """float64, a toy of prompts drawn per slot: score sθ(x, t, c) = −x + θ·u_c for 3 prompts, the slot's
    prompts c ~ its key, and a prompt-aware reward R(x, prompts) = Σ_d x_d w_{c}. `nested`'s gradient
    (the discrete adjoint from the terminal cost the run builds) equals jax.grad of the objective written
    out with the prompts fixed to those of the slot (rtol 1e-9: one exact gradient by two routes), and
    differs from it when the reward reads the rows' prompts permuted (it must see each image's own prompt)."""
    with enable_x64(True):
        u = jnp.array([[1.0, -0.5], [-0.7, 0.9], [0.2, 1.4]])
        w = jnp.array([[2.0, 0.5], [-1.0, 1.5], [0.3, -2.0]])
        texts = ("a cat", "a dog", "a cow")

        def score(params, x, t, labels):
            return -x + params["theta"] * u[labels]

        def draw(slot_key):
            return jax.random.randint(jax.random.fold_in(slot_key, 7), (5,), 0, 3)

        def reward(images, prompts):
            assert prompts.texts == texts
            return jnp.sum(images * w[prompts.ids], axis=1)

        sde = OrnsteinUhlenbeck()
        sampler = Sampler(sde, 4, euler_maruyama_step, denoise_final=False)
        paths = sampler_paths(sampler, score, (5, 2), draw, 3)
        problem = finetune.bind_problem(paths, sde, sampler.grid, reward, False, texts=texts)(None, 1.5, 0.0)
        method = finetune.methods.make_method("nested", problem, 4, 1, "full", None)
        theta = {"theta": jnp.asarray(0.8)}
        _, est = method.estimate(theta, method.init(theta, jax.random.key(3)), None)

        def objective(params, ids, rewarded_as):
            fixed = sampler_paths(sampler, score, (5, 2), ids, 3)
            x = adjoint.rollout(fixed.step, params, fixed.init(est.key), est.key, 4)[-1]
            return -1.5 * jnp.mean(jnp.sum(x * w[rewarded_as], axis=1))

        ids = draw(est.key)
        assert len(set(np.asarray(ids).tolist())) > 1  # the batch mixes prompts
        own = jax.grad(objective)(theta, ids, ids)["theta"]
        np.testing.assert_allclose(est.grad["theta"], own, rtol=1e-9)
        permuted = jax.grad(objective)(theta, ids, jnp.roll(ids, 1))["theta"]
        assert abs(float(permuted - own)) > 1e-3 * abs(float(own))


def test_bad_lora_options_are_one_line(model, tmp_path):
    """A target matching no module names the closest; a prompts file without a prompt; LoRA options with
    --lora; a LoRA file of another architecture (the fixture's, for the micro U-Net)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat", "seed": 3}\n')
    fixture_file = FIXTURE.parent / "lora" / lora.LORA_WEIGHTS
    cases = [
        (dict(lora_targets=("to_qq",)), "to_qq"),
        (dict(prompts=str(empty)), "holds no prompt"),
        (dict(prompts=str(bad)), "unknown key 'seed'; valid keys: prompt, negative"),
        (dict(lora=str(fixture_file), lora_rank=2), "--lora-rank with --lora"),
        (dict(lora=str(fixture_file)), str(fixture_file)),
    ]
    for options, message in cases:
        with pytest.raises(finetune.UserError, match=None) as info:
            subject_lib.subject_of(run_config(model, **options), model)
        assert message in str(info.value) and "\n" not in str(info.value), (options, str(info.value))
    assert dataclasses.is_dataclass(run_config(model))

"""`idiff finetune`: reward training of a pretrained diffusion model (paper §5.2, Appendix A.2).

Minimises F(θ) = −λ E[R(x)] + β KL(P_θ ‖ P_θ0) over the U-Net weights θ, starting from the
pretrained θ0, with one of the methods of methods.py (default: Implicit Diffusion, Algorithm 2) and
optax Adam. P_θ is the law of the sampler's path x_{t_max} .. x_{t_min} (its T Euler–Maruyama
transitions; Girsanov KL, girsanov.py) and x is what the reward sees (--final-step): the Tweedie
denoising D_θ(x_{t_min}), outside the penalty, or x_{t_min} itself, whose path law the penalty is.
The run is one `loop.Unit`: the run loop dispatches one jitted outer step at a time (one program
per outer step compiles faster on XLA:CPU than a scan of them) and reads the metrics once per chunk.
At step 0, every --log-every steps and at the last step it logs the KL of the current θ on --kl-n
fresh paths from fixed keys, with its standard error.
Same-seed sample grids samples/step_XXXXXX.png use noise keys fixed for the whole run (Figs 7, 13,
14, 16). The θ of every checkpoint is also kept on its own in
weights/ with finetuned.json, so `model.load` (hence `idiff sample`, `idiff evaluate-fid`) reads a
finetuned run like a pretrained one (and samples with the model's own sampler and final step).
The image batches are split over --devices local devices of every process (per_device.py): θ, θ0 and
the optimiser state replicated, the queue's paths split along the batch; every process runs the
same programs, takes part in the checkpoints, and process 0 alone writes the other files.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli import loop, sharding, storage
from idiff_cli.checkpoint import Checkpointer, restore_template
from idiff_cli.diffusion import ddpm
from idiff_cli.diffusion.model import ImportedModel, Model, TextToImageModel, finetuned_weights, load, write_finetuned
from idiff_cli.errors import UserError
from idiff_cli.fid.metric import PeriodicFID
from idiff_cli.images import save_grid, to_uint8
from idiff_cli.implicit import adjoint, ddpo, girsanov, labels, methods, per_device, report
from idiff_cli.implicit.options import SCHEMA, STOCHASTIC_SAMPLERS, TEXT_OPTIONS
from idiff_cli.implicit.paths import SamplerPaths, sampler_paths
from idiff_cli.implicit.subject import Subject, pixel, subject_of
from idiff_cli.implicit.ppo import PPO
from idiff_cli.implicit.rewards import Prompts, carried, check_reward, prompted, resolve
from idiff_cli.runs import RunDir, atomic_path, default_run_dir
from idiff_cli.sharding import initialize_distributed_from_env, use_compilation_cache

EVOLUTION_IMAGES = 8  # fixed-key images per step kept in samples/step_XXXXXX.npy for the evolution strip
# fold_in(root, i) of the run's seed: the method's slot keys, the grid's, the periodic FID's, the KL's paths
METHOD_KEY, GRID_KEY, FID_KEY, KL_KEY, LABEL_KEY = 0, 1, 2, 3, 4


def latest_pretrain_run(root: pathlib.Path = pathlib.Path("runs")) -> pathlib.Path:
    """The most recently modified run under `root` holding a pretrained model (pretrained.json)."""
    found = sorted(root.glob("*/pretrained.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise UserError(f"no pretrained model under '{root}/' (no */pretrained.json); run `idiff pretrain mnist` "
                        "first or pass --from RUN_DIR")
    return found[-1].parent


def complete(cfg: Any, from_run: pathlib.Path, model: Model) -> Any:
    """The config completed for the pretrained `model` of `from_run` (options.TABLE: M, T and batch by its
    dataset and the preset, paper Tables 2 and 4; its sampler by its kind)."""
    return SCHEMA.complete(cfg, {"dataset": model.cfg.dataset, "imported": isinstance(model, ImportedModel),
                                 "text_to_image": isinstance(model, TextToImageModel), "from_run": from_run})


def check_text_options(cfg: Any, model: Model) -> None:
    """UserError when a text-to-image option meets a pixel model, or the periodic FID a text-to-image one
    (checked before the prompts are read and embedded)."""
    if isinstance(model, TextToImageModel):
        if cfg.fid_every:
            raise UserError("--fid-every: the periodic FID compares with a dataset's images; a text-to-image run "
                            "has none (use --fid-every 0; `idiff evaluate-fid RUN --prompts FILE` measures a run)")
        return
    given = [name for name in TEXT_OPTIONS if getattr(cfg, name) is not None] + (["remat"] if cfg.remat else [])
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"{flags}: text-to-image option(s); '{cfg.from_run}' is an unconditional or "
                        "label-conditioned pixel model")


STOCHASTIC = ", ".join(STOCHASTIC_SAMPLERS) + ", or ddim with --ddim-eta > 0"


def check_against_model(cfg: Any, model: Model) -> None:
    """The checks of a completed config that need the pretrained `model` (the schema has checked the
    rest; `check_method` those that need the run's parts): UserError (one line) when a text-to-image
    option meets a pixel model or the periodic FID a text-to-image one, the continuous adjoint meets a
    discrete chain or another sampler than the probability flow, the sampler does not apply to the
    model, a deterministic sampler (Sampler.stochastic) is asked for the Girsanov KL (β > 0) or ddpo's
    policy, or the periodic FID for non-square images or label_kept for other than 28×28 digits."""
    check_text_options(cfg, model)
    if cfg.adjoint == "continuous":
        if not model.continuous_time:
            raise UserError("--adjoint continuous is the probability-flow ODE adjoint of a continuous-time process; "
                            "this model is a discrete DDPM chain: use --adjoint full or pipelined")
        if cfg.sampler != "probability-flow":
            raise UserError("--adjoint continuous is the adjoint ODE of the probability flow: it needs "
                            "--sampler probability-flow (and --beta 0)")
    if cfg.final_step == "noisy" and (model.continuous_time or cfg.sampler != "ddpm"):
        raise UserError(f"--final-step noisy makes the last ancestral step of a discrete DDPM chain draw noise "
                        f"(--sampler ddpm on an imported model); this run samples with {cfg.sampler} on a "
                        f"{'continuous-time process: use --final-step none' if model.continuous_time else 'discrete chain: use --sampler ddpm'}")
    sampler = run_sampler(cfg, model)
    if not sampler.stochastic and cfg.beta:
        raise UserError(f"--sampler {cfg.sampler} is deterministic: the Girsanov KL needs noise; "
                        f"use --beta 0 or a stochastic sampler ({STOCHASTIC})")
    if not sampler.stochastic and cfg.method == "ddpo":
        raise UserError(f"--method ddpo needs a stochastic sampler ({STOCHASTIC}): --sampler "
                        f"{cfg.sampler} is deterministic, its steps have no transition probabilities")
    height, width = model.image_shape[:2]
    if cfg.fid_every and height != width:
        raise UserError(f"--fid-every: the periodic FID compares with square dataset images; this model samples "
                        f"{height}×{width} images (use --fid-every 0)")
    if cfg.label_every and (height, width) != (28, 28):
        raise UserError(f"--label-every: label_kept reads 28×28 digits, this model makes {height}×{width} images")


def check_method(cfg: Any, parts: "Parts") -> None:
    """UserError when the reward does not fit the subject's images or prompts (or lacks the ∇R the method
    needs), or the method does not build on the run's problem: an adjoint it does not take, truncated-K's
    K > T, a plug-in builder's error."""
    subject = parts.subject
    check_reward(resolve(cfg.reward, cfg.reward_weights), cfg.reward, subject.image_shape,
                 needs_gradient=cfg.method != "ddpo", method=cfg.method, texts=subject.texts)
    parts.bind(parts.frozen)


class FinetuneState(NamedTuple):
    params: Any
    opt_state: Any
    carry: Any  # the method's carry (the queue for `implicit`)
    step: jax.Array
    kl_net_evals: jax.Array  # images through the network in the logged KL evaluations so far (int32)


def run_sampler(cfg: Any, model: Model) -> Any:
    """The model's sampler of the run (--sampler, --T, --ddim-eta), its step into x_0 drawing noise with
    --final-step noisy (ddpm.noisy_last_moments)."""
    sampler = model.sampler(cfg.T, cfg.sampler, cfg.ddim_eta)
    return ddpm.with_noisy_last_step(sampler) if cfg.final_step == "noisy" else sampler


def run_paths(sampler: Any, score: Callable, shape: tuple[int, ...], labels: Any, final_step: str,
              clip: bool, decode: Callable | None = None, n_labels: int = 0) -> SamplerPaths:
    """The sampler's paths with the run's final step: `tweedie`, the sampler's own (the Tweedie denoiser
    for a continuous-time model); `none`, the identity, so the reward sees x_{t_min}; `noisy`, the
    sampler's own (a discrete chain's, whose step into x_0 `run_sampler` made noisy); then `decode`
    (a latent model's VAE decoder), when given. With `clip`, the result is clipped to [-1, 1], as the
    images are shown (no gradient for pushing a pixel beyond white or black, so brightness cannot be
    gained by unbounded pixel values). `labels`: fixed [B], or a function of the slot key, in [0, n_labels)
    (paths.py)."""
    if final_step == "none":
        sampler = dataclasses.replace(sampler, denoise_final=False)
    paths = sampler_paths(sampler, score, shape, labels, n_labels)
    denoise = paths.denoise
    if decode is not None:
        paths = paths._replace(denoise=lambda params, x: decode(denoise(params, x)))
    if clip:
        decoded = paths.denoise
        paths = paths._replace(denoise=lambda params, x: jnp.clip(decoded(params, x), -1.0, 1.0))
    return paths


def bind_problem(paths: SamplerPaths, sde: Any, grid: jax.Array, reward: Callable, with_kl: bool,
                 mesh: Any = None, texts: tuple[str, ...] = ()) -> Callable[[Any, Any, Any], methods.Problem]:
    """(θ0, λ, β) -> the Problem of F(θ) = −λ E[R(denoise_θ(x_n), c)] + β KL(P_θ ‖ P_θ0): terminal cost
    −λ R(paths.denoise(θ, x_n), prompts of the slot) (the prompts, rows of `texts` named by the slot's
    labels, reach a prompt-aware reward: rewards.takes_prompts), running cost β × the Girsanov increment
    of each transition (with_kl), or none, and for a stochastic sampler the policy of its Gaussian
    transitions (ddpo); with the `mesh` of a BatchSharded model, the queue advances and the adjoint walks
    back per device (per_device.py). λ and β may be traced; `with_kl` is static (it changes the program
    and its cost)."""
    on_mesh = ({} if mesh is None else
               dict(walk=per_device.walk_per_device(mesh), advance=per_device.advance_per_device(mesh)))
    scored = prompted(reward)

    def prompts(slot_key):
        ids = paths.labels(slot_key)
        return None if ids is None else Prompts(ids, texts)

    def bind(params0, lam, beta):
        terminal = lambda params, x, slot_key: -lam * scored(paths.denoise(params, x), prompts(slot_key))  # noqa: E731
        transition = (girsanov.kl_transition(paths, sde, grid, params0, beta) if with_kl
                      else adjoint.transition(paths.step))
        policy = (ddpo.gaussian_policy(paths.step_fn, paths.score, sde, grid, params0, lam, beta, with_kl)
                  if paths.stochastic else None)
        return methods.Problem(paths, terminal, transition, scored, with_kl, policy, prompts, **on_mesh)

    return bind


class Parts(NamedTuple):
    """A run's pieces: bind(frozen, lam, beta, evaluation=False) -> (problem, method), called inside
    each jitted program with the frozen weights as an argument (evaluation: the fixed-key grids'
    labels); the optimiser; kl_estimator(keys) -> jit (θ, frozen) -> (mean, se) of the KL, or None when
    the sampler is deterministic (no Girsanov KL); the subject (what θ is); frozen, the argument every
    program takes: {"subject": subject.frozen, "reward": the reward's weights (a rewards.carried reward
    itself, else None)}."""

    bind: Callable
    optimizer: Any
    kl_estimator: Callable
    subject: Subject
    frozen: Any


def build(cfg: Any, model: Model, subject: Subject | None = None) -> Parts:
    """The Parts of a run on the pretrained `model` (a config completed for it); `subject` what θ is
    (default: all the weights of a pixel model, frozen = θ0 = its weights).

    θ0, the frozen weights and a reward's weights enter through `bind`'s argument: neither the weights nor
    λ and β are baked into the compiled programs as constants."""
    subject = subject or pixel(model, cfg.batch)
    reward = resolve(cfg.reward, cfg.reward_weights)
    carry_reward = carried(reward)
    sampler = run_sampler(cfg, model)
    mesh = model.mesh if isinstance(model, per_device.BatchSharded) else None
    ppo = (PPO(cfg.advantage, cfg.clip_range, cfg.inner_epochs, cfg.train_batch, cfg.adv_clip)
           if cfg.method == "ddpo" else None)

    def paths_of(frozen, evaluation=False):
        weights = frozen["subject"]
        decode = subject.decode(weights) if subject.decode else None
        return run_paths(sampler, subject.score(weights), subject.shape, subject.labels(weights, evaluation),
                         cfg.final_step, cfg.clip, decode, 0 if evaluation else subject.n_labels)

    def bind(frozen, lam=cfg.lam, beta=cfg.beta, evaluation=False):
        objective = bind_problem(paths_of(frozen, evaluation), model.sde, sampler.grid,
                                 frozen["reward"] if carry_reward else reward, bool(cfg.beta), mesh, subject.texts)
        problem = objective(subject.reference(frozen["subject"]), lam, beta)
        return problem, methods.make_method(cfg.method, problem, cfg.T, cfg.M, cfg.adjoint, ppo)

    def kl_estimator(keys):
        if not sampler.stochastic:
            return None
        return make_kl_estimator(sampler, paths_of, keys, lambda frozen: subject.reference(frozen["subject"]))

    frozen = {"subject": subject.frozen, "reward": reward if carry_reward else None}
    return Parts(bind, optimizer_of(cfg), kl_estimator, subject, frozen)


def optimizer_of(cfg: Any) -> optax.GradientTransformation:
    """Adam at --lr on θ (the adapters alone with LoRA: the optimiser state is theirs)."""
    return optax.adam(cfg.lr)


def make_outer_step(bind, optimizer, frozen, coef: tuple[float, float], mesh=None, state_sharding=None):
    """step(state, i) -> (state after one outer step with (λ, β) = `coef`, its metrics: a dict of scalars,
    reward_mean, reward_std (of the step's batch), grad_norm (of its Estimate's gradient) and the
    method's own (methods.Method.update)): one jitted program, dispatched by the run loop once per outer
    step (asynchronously: the host reads the metrics once per chunk), taking the `frozen` weights as an
    argument. The method's `update` is the outer step where it has one; else its `estimate` and one
    optimizer step. With a `mesh`, the state keeps `state_sharding` and the metrics are replicated (one
    compiled program whatever the step)."""

    def outer(state: FinetuneState, frozen, coef):
        problem, method = bind(frozen, *coef)
        if method.update is not None:
            params, opt_state, carry, est, extra = method.update(state.params, state.opt_state, state.carry, optimizer)
        else:
            carry, est = method.estimate(state.params, state.carry, None)
            updates, opt_state = optimizer.update(est.grad, state.opt_state, state.params)
            params, extra = optax.apply_updates(state.params, updates), {}
        r = problem.reward(est.images, problem.prompts(est.key))
        metrics = {"reward_mean": jnp.mean(r), "reward_std": jnp.std(r), "grad_norm": optax.tree.norm(est.grad),
                   **extra}
        return state._replace(params=params, opt_state=opt_state, carry=carry, step=state.step + 1), metrics

    coef = jnp.asarray(coef, jnp.float32)
    if mesh is None:
        outer_jit = jax.jit(outer)
    else:
        outer_jit = jax.jit(outer, out_shardings=(state_sharding, sharding.replicated(mesh)))
        coef = sharding.put(coef, sharding.replicated(mesh))
    return lambda state, i: outer_jit(state, frozen, coef)


def make_kl_estimator(sampler: Any, paths_of: Callable, keys: jax.Array, reference: Callable = lambda frozen: frozen):
    """jit: (θ, frozen) -> (mean, standard error) of the Girsanov KL(P_θ ‖ P_θ0) over len(keys) · B fresh
    paths paths_of(frozen) sampled under θ, batch i from slot key keys[i] (the same keys for every θ),
    θ0 = reference(frozen); one compiled program. Cost: girsanov.fresh_path_kl_passes(T, len(keys) · B)
    images, forward passes only."""

    def estimate(params, frozen):
        paths = paths_of(frozen)
        transition = girsanov.kl_transition(paths, sampler.sde, sampler.grid, reference(frozen), 1.0)
        return girsanov.mean_and_se(girsanov.fresh_path_kl(transition, paths.init, params, keys, paths.n_steps))

    return jax.jit(estimate)


def make_grid_sampler(problem_of: Callable, grid_n: int, batch: int, key: jax.Array, mesh=None,
                      rewarded: bool = False):
    """jit: (θ, frozen) -> [grid_n, H, W, C] images of the paths of problem_of(frozen) from fixed noise
    keys (the same for every θ; replicated over `mesh`); with `rewarded`, (images, their rewards [grid_n]
    under the problem's prompts)."""
    keys = jax.random.split(key, -(-grid_n // batch))

    def sample(params, frozen):
        problem = problem_of(frozen)
        p = problem.paths

        def one(k):
            images = p.denoise(params, adjoint.rollout(p.step, params, p.init(k), k, p.n_steps)[-1])
            return images, (problem.reward(images, problem.prompts(k)) if rewarded else None)

        images, rewards = jax.lax.map(one, keys)
        images = images.reshape(-1, *images.shape[2:])[:grid_n]
        return (images, rewards.reshape(-1)[:grid_n]) if rewarded else images

    return jax.jit(sample, out_shardings=None if mesh is None else sharding.replicated(mesh))


def start_state(method: methods.Method, optimizer, params0, key: jax.Array, kl_net_evals: int) -> FinetuneState:
    """The state at step 0: θ = θ0, the method's warm carry from `key` (real work)."""
    return FinetuneState(params0, optimizer.init(params0), method.init(params0, key), jnp.asarray(0, jnp.int32),
                         jnp.asarray(kl_net_evals, jnp.int32))


def finetune_unit(cfg: Any, model: Model, parts: Parts, run_dir: RunDir, weights: Checkpointer, mesh,
                  is_main: bool = True) -> loop.Unit:
    """The run as one loop unit: state FinetuneState, one row per outer step, the KL of the current θ
    every --log-every steps, at the last step and at step 0, the fixed-key grid and its reward every
    --sample-every steps, the periodic FID, θ into weights/ at every checkpoint. The state lives on
    `mesh` (per_device.state_shardings: the carried batches of states split, the rest replicated), each
    leaf committed to its sharding so that the outer step compiles once; only `is_main` writes files.
    Every program takes the subject's frozen weights as an argument."""
    bind, optimizer, subject = parts.bind, parts.optimizer, parts.subject
    root = jax.random.key(cfg.seed)
    replicated = sharding.replicated(mesh)
    frozen = sharding.put(parts.frozen, jax.tree.map(lambda _: replicated, parts.frozen))
    theta0 = lambda frozen: subject.reference(frozen["subject"])  # noqa: E731
    method = bind(frozen)[1]  # static facts: the method's cost
    # the logged KL: --kl-n fresh paths under θ from fixed keys; deterministic paths have no Girsanov KL
    kl_of = parts.kl_estimator(jax.random.split(jax.random.fold_in(root, KL_KEY), cfg.kl_n // cfg.batch))
    kl_images = girsanov.fresh_path_kl_passes(cfg.T, cfg.kl_n) if kl_of else 0

    method_key = sharding.put(jax.random.fold_in(root, METHOD_KEY), replicated)

    @jax.jit
    def fresh(frozen, key) -> FinetuneState:
        """The warm-up on the mesh from θ at step 0; kl_net_evals counts the KL evaluation of step 0's row."""
        return start_state(bind(frozen)[1], optimizer, theta0(frozen), key, kl_images)

    shardings = per_device.state_shardings(jax.eval_shape(fresh, frozen, method_key), mesh, subject.shape)

    def init() -> FinetuneState:
        return sharding.put(fresh(frozen, method_key), shardings)

    def template() -> FinetuneState:  # shapes only: restoring does no warm-up work
        return sharding.put(restore_template(jax.eval_shape(fresh, frozen, method_key)), shardings)

    outer_step = make_outer_step(bind, optimizer, frozen, (cfg.lam, cfg.beta), mesh, shardings)
    evaluation = lambda frozen: bind(frozen, evaluation=True)[0]  # noqa: E731
    grid = make_grid_sampler(evaluation, cfg.grid_n, cfg.batch, jax.random.fold_in(root, GRID_KEY), mesh, rewarded=True)

    def kl_row(state: FinetuneState) -> dict:
        """kl, kl_se of the current θ and the cumulative kl_net_evals (state's count, this evaluation in)."""
        if kl_of is None:
            return {}
        kl, se = jax.device_get(kl_of(state.params, frozen))
        return {"kl": float(kl), "kl_se": float(se), "kl_net_evals": int(state.kl_net_evals)}

    def evaluate(state: FinetuneState, step: int) -> dict:
        """The fixed-key grid of θ (PNG, and the first images as uint8 for the evolution strip) and its reward."""
        images, rewards = jax.device_get(grid(state.params, frozen))
        path = run_dir.path / "samples" / f"step_{step:06d}.png"
        if not is_main:
            return {}
        save_grid(images, path)
        with atomic_path(path.with_suffix(".npy")) as tmp:
            np.save(tmp, to_uint8(images[:EVOLUTION_IMAGES]))
        return {"eval_reward": float(np.mean(rewards)),
                "samples": loop.Image(path)}

    def periodic_fid() -> Callable[[FinetuneState, int], dict]:
        """FID of fid_n samples of θ (the finetuning sampler and final step, fixed keys)."""
        periodic = PeriodicFID(cfg.fid_features, model.cfg.dataset, model.cfg.data_dir, model.cfg.image_size,
                               model.image_shape)
        fid_sampler = make_grid_sampler(evaluation, cfg.fid_n, cfg.batch, jax.random.fold_in(root, FID_KEY), mesh)
        return lambda state, step: {"fid": periodic(fid_sampler(state.params, frozen)), "fid_n": cfg.fid_n}

    fid_of = periodic_fid() if cfg.fid_every else None
    label_sampler = (make_grid_sampler(evaluation, cfg.label_n, cfg.batch, jax.random.fold_in(root, LABEL_KEY), mesh)
                     if cfg.label_every else None)
    label_hook = (labels.label_kept_hook(lambda params: label_sampler(params, frozen), theta0(frozen),
                                         cfg.label_every, run_dir.path) if cfg.label_every else None)
    hooks = ([loop.Hook(cfg.sample_every, evaluate)] + ([loop.Hook(cfg.fid_every, fid_of, at_end=False)] if fid_of else [])
             + ([label_hook] if label_hook else []))

    def net_evals(step: int) -> int:
        """Images through a forward or backward pass of θ's or θ0's network, warm-up included (the
        logged KL's passes are counted apart, in kl_net_evals)."""
        cost = methods.spent(method, step)
        return (cost.forward + cost.backward) * cfg.batch

    def first_rows(state: FinetuneState) -> loop.Rows:
        row = {"step": 0, **evaluate(state, 0), "net_evals": net_evals(0),
               "sequential_calls": methods.spent(method, 0).sequential, **kl_row(state),
               **(fid_of(state, 0) if fid_of else {}),
               **(label_hook.fn(state, 0) if label_hook else {})}
        return [row]

    def logs_kl(step: int) -> bool:
        return kl_of is not None and (step % cfg.log_every == 0 or step == cfg.steps)

    def step(state: FinetuneState, i: int):
        """Outer step i + 1; kl_net_evals counts the logged KL of its row ahead (`kl_hook`)."""
        state, metrics = outer_step(state, i)
        if logs_kl(i + 1):
            state = state._replace(kl_net_evals=state.kl_net_evals + kl_images)
        return state, metrics

    def rows(start: int, metrics: list, seconds: float) -> loop.Rows:
        return [{"step": start + i + 1, **{name: float(v) for name, v in jax.device_get(m).items()},
                 "net_evals": net_evals(start + i + 1),
                 "sequential_calls": methods.spent(method, start + i + 1).sequential}
                for i, m in enumerate(metrics)]

    def kl_hook(state: FinetuneState, step: int) -> dict:
        return kl_row(state) if logs_kl(step) else {}

    def on_checkpoint(state: FinetuneState, step: int, final: bool) -> None:
        if step not in weights.all_steps():  # a finished run re-run: its θ is already stored
            weights.save(step, state.params)
            weights.wait()
        if is_main:
            write_finetuned(run_dir, cfg.from_run, step, final, subject.lora)

    return loop.Unit(cfg.steps, init, step=step, rows=rows, template=template, first_rows=first_rows,
                     hooks=[*hooks, loop.Hook(cfg.log_every, kl_hook)], chunk=cfg.log_every,
                     finite=("reward_mean", "grad_norm"), nan_hint="lower --lr or |--lambda|",
                     progress=("reward_mean", "kl"), on_checkpoint=on_checkpoint)


def trained(subject: Subject) -> str:
    """What θ is, in words for the settings line."""
    if subject.lora is None:
        return "all weights"
    spec = subject.lora
    return f"LoRA rank {spec.rank}, α {spec.alpha:g}, on {len(spec.targets)} modules"


def main(cfg: Any, out: pathlib.Path | None) -> FinetuneState:
    """`idiff finetune`: loads the pretrained model, fills M/T/batch and checks the config against the
    model before the run directory is claimed; runs (or resumes) the finetuning; draws its figures."""
    initialize_distributed_from_env()
    use_compilation_cache()
    from_run = storage.path(cfg.from_run) if cfg.from_run else latest_pretrain_run()
    model = load(from_run)
    cfg = complete(cfg, from_run, model)
    check_against_model(cfg, model)
    n, note = sharding.device_count(cfg.batch, cfg.devices, len(jax.local_devices()), jax.process_count())
    mesh = sharding.mesh_of(n)
    parts = build(cfg, per_device.BatchSharded(model, mesh), subject_of(cfg, model, mesh))
    check_method(cfg, parts)
    is_main = jax.process_index() == 0
    run_dir = RunDir(out or default_run_dir("finetune"))
    run = loop.Run(SCHEMA, cfg, run_dir, cfg.ckpt_every, keep=2, is_main=is_main)
    with run:
        sharding.check_visible(run_dir.path)
        if note:
            run.print(note)
        run.print(f"[bold]finetune[/] {model.cfg.dataset} from {from_run} ({cfg.method}, reward {cfg.reward}, "
                  f"λ={cfg.lam}, β={cfg.beta}, M={cfg.M}, T={cfg.T}, batch {cfg.batch} on {mesh.size} device(s) / "
                  f"{jax.process_count()} process(es), lr {cfg.lr}, final step {cfg.final_step}, θ: {trained(parts.subject)}) "
                  f"-> {run_dir.path}")
        with finetuned_weights(run_dir, keep=cfg.steps // cfg.ckpt_every + 1) as weights:
            state = run.run(finetune_unit(cfg, model, parts, run_dir, weights, mesh, is_main))
        if is_main:
            report.finish_run(run_dir.path)
        run.done("config.json, metrics.jsonl, samples/, figures/, checkpoints/, weights/, finetuned.json")
    return state

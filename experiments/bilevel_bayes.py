"""Hyperparameters of a Bayesian model tuned through its posterior sampler: Algorithm 1 against the nested loop.

A model is a potential V(w, θ) = −log p(y, w | θ) of weights w ∈ R^d given hyperparameters θ
(`idiff_cli/langevin/bayes.py`: the prior's log-scale of a linear model), whose Gibbs measure π*(θ) is
the posterior. θ minimises an outer loss ℓ(θ) = F(π*(θ)):

    evidence   ℓ(θ) = −log p(y | θ) = −log Z_θ          Γ_evidence = E_p[∇θV]         (Fisher's identity)
    held-out   ℓ(θ) = −E_{π*(θ)}[R], R = held_out(w)     Γ_reward = Cov_p[R, ∇θV]      (paper §3.2)
    package.module:function   ℓ(θ) = −E_{π*(θ)}[R] for that reward R, Γ_reward

Each objective runs Implicit Diffusion (Algorithm 1: one ULA step, then θ ← θ − η Γ) and the nested
loop at each --T (T ULA steps per θ update, chains kept), all for the same number of gradient
evaluations (ULA steps), every seed vmapped in one jitted lax.scan (`langevin.simulate`). The target
line: the closed-form θ* (and θ*_γ, where ULA with step γ settles) of the conjugate model
(`langevin.conjugate`), otherwise, for a scalar θ, the reference of `langevin.importance`.

    python experiments/bilevel_bayes.py --out runs/bilevel               # both models, both objectives
    python experiments/bilevel_bayes.py --model linear-regression --objective evidence
    python experiments/bilevel_bayes.py --model my_pkg.models:mine --objective my_pkg.models:reward --theta0 0,0

Writes OUT/<model>.png (θ_k against gradient evaluations, per objective) and OUT/summary.json, and
prints a table: per method, θ over the last half of its updates (mean over seeds ± standard error),
the target, the distance to it, and the evaluations at which the mean over seeds first comes within
REACHED of it. The conjugate model's implicit run must reach θ* within TOLERANCE (✓ or ✗ in the table).
docs/bilevel.md holds the derivations, the measured figures and the plug-in route.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from idiff_cli import registry  # noqa: E402
from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.langevin import bayes, importance, methods, simulate  # noqa: E402
from idiff_cli.langevin.conjugate import Conjugate  # noqa: E402
from idiff_cli.langevin.runner import no_statistic  # noqa: E402
from idiff_cli.runs import RunDir, save_figure  # noqa: E402

# |θ reached − θ*| the conjugate runs must meet: the ULA bias θ*_γ − θ* (≤ 0.008 at the default γ) plus
# the noise of a tail average (standard error ≤ 0.002 at the default sizes), with room to spare.
TOLERANCE = 0.02
REACHED = 0.05  # the band around the target that counts as reaching it (α within 5 %)


class Settings(NamedTuple):
    """One model's run: θ0, ULA step γ, SGD learning rate η per objective (`default`: the others),
    gradient evaluations per method, particles per seed, seeds, nested-loop T values, and the bracket of the
    scalar θ in which the reference is sought."""

    theta0: tuple[float, ...] = (0.0,)
    gamma: float = 0.01
    lr: dict[str, float] = {"default": 0.01}  # never mutated: a shared default is safe
    evals: int = 20_000
    batch: int = 256
    seeds: int = 4
    T: tuple[int, ...] = (10, 100)
    bracket: tuple[float, float] = (-3.0, 3.0)

    def rate(self, objective: str) -> float:
        return self.lr.get(objective, self.lr["default"])


# The built-in models' settings; a plug-in model starts from Settings() and the flags.
SETTINGS = {
    "linear-regression": Settings(theta0=(0.5,), gamma=0.005, lr={"evidence": 0.002, "default": 0.02}),
    "logistic-iris": Settings(gamma=0.02, lr={"evidence": 0.01, "default": 0.02}, bracket=(-2.0, 3.0)),
}


def reward_of(model, objective: str):
    """The reward R of a reward objective, None for the evidence (module docstring)."""
    if objective == "evidence":
        return None
    if objective == "held-out":
        if not callable(getattr(model, "held_out", None)):
            raise UserError("objective 'held-out' needs a model with a held_out(w) method; valid choices: "
                            "evidence, or a reward package.module:function")
        return model.held_out
    if ":" not in objective:
        raise UserError(f"unknown objective '{objective}'; valid choices: evidence, held-out, or "
                        "package.module:function")
    return registry.get("reward", objective)


def estimator(model, objective: str) -> methods.Estimator:
    """Γ of an outer objective: Γ_evidence, or Γ_reward of its reward."""
    reward = reward_of(model, objective)
    return methods.evidence(model) if reward is None else methods.covariance(model, reward)


def targets(model, objective: str, s: Settings) -> dict[str, float]:
    """θ* and θ*_γ of the conjugate model; else, for a scalar θ, θ_ref (and its effective sample size)."""
    if isinstance(model, bayes.LinearModel) and isinstance(model.likelihood, bayes.Gaussian) \
            and objective in bayes.OBJECTIVES:
        exact = Conjugate(model)
        return {"theta_star": exact.optimum(objective), "theta_star_gamma": exact.optimum(objective, s.gamma)}
    if len(s.theta0) == 1:
        try:
            theta, ess = importance.optimum(model, reward_of(model, objective), model.dim, s.bracket)
        except ValueError:  # the slope keeps its sign over the bracket: no reference line
            return {}
        return {"theta_ref": theta, "ess": ess}
    return {}


def run_method(model, objective: str, s: Settings, T: int, seed: int, points: int = 1000) -> dict[str, np.ndarray]:
    """One method (T = 1: Algorithm 1; T > 1: the nested loop) for s.evals gradient evaluations, every seed
    at once from x0 ~ N(0, I) [S, d, B] and θ0; returns the logged steps, evaluations and θ [L, S, p]."""
    method = methods.trained(f"T{T}", T, methods.ula_sampler(methods.potential_energy(model), s.gamma, T),
                             estimator(model, objective), optax.sgd(s.rate(objective)))
    k_init, k_run = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k_init, (s.seeds, model.dim, s.batch))
    theta0 = jnp.tile(jnp.asarray(s.theta0, jnp.float32), (s.seeds, 1))
    state = jax.vmap(method.init)(x0, theta0)
    steps = s.evals // T
    start = time.perf_counter()
    _, logged, _, theta, _ = simulate.advance(method.update, no_statistic, state,
                                              jax.random.split(k_run, s.seeds), 0, steps, max(1, steps // points))
    theta = np.concatenate([np.asarray(theta0)[None], np.asarray(theta)])
    bad = np.flatnonzero(~np.isfinite(theta).all(axis=(1, 2)))
    if len(bad):
        step = int(np.append(0, logged)[bad[0]])
        raise UserError(f"θ is not finite at step {step} ({objective}, T = {T}): lower --gamma or --lr")
    return {"steps": np.append(0, logged), "evals": np.append(0, logged) * T, "theta": theta,
            "wall_s": time.perf_counter() - start}


def tail(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """θ [L, S, p] averaged over the last half of the logged steps: (mean over seeds, its standard error)."""
    per_seed = theta[len(theta) // 2:].mean(axis=0)
    return per_seed.mean(axis=0), per_seed.std(axis=0, ddof=1) / np.sqrt(len(per_seed))


def reached(run: dict[str, np.ndarray], target: float) -> int | None:
    """The gradient evaluations at which the mean over seeds of θ first comes within REACHED of `target`
    (None: never); the noise around the target afterwards is the tail's standard error."""
    inside = np.flatnonzero(np.abs(run["theta"].mean(axis=1) - target).max(axis=-1) <= REACHED)
    return int(run["evals"][inside[0]]) if len(inside) else None


def target_of(targets: dict[str, float]) -> float | None:
    """The line a method is measured against: θ* of the closed form, else θ_ref."""
    return targets.get("theta_star", targets.get("theta_ref"))


def figure(out: pathlib.Path, name: str, results: dict[str, dict[str, Any]]) -> pathlib.Path:
    """θ_k against gradient evaluations: one panel per objective and θ coordinate, the mean over seeds with
    its min..max band per method, and the target lines."""
    n_params = next(iter(next(iter(results.values()))["methods"].values()))["theta"].shape[-1]
    fig, axes = plt.subplots(n_params, len(results), figsize=(5.2 * len(results), 3.6 * n_params), squeeze=False)
    for j, (objective, result) in enumerate(results.items()):
        for i in range(n_params):
            ax = axes[i, j]
            for k, (label, run) in enumerate(result["methods"].items()):
                x, th = run["evals"][1:], run["theta"][1:, :, i]
                ax.plot(x, th.mean(axis=1), color=f"C{k}", lw=1.2, label=label)
                ax.fill_between(x, th.min(axis=1), th.max(axis=1), color=f"C{k}", alpha=0.2, lw=0)
            t = result["targets"]
            for key, style, label in (("theta_star", "-", "θ* (closed form)"),
                                      ("theta_star_gamma", ":", "θ*_γ (where ULA settles)"),
                                      ("theta_ref", "--", "θ_ref (Laplace-placed weights)")):
                if key in t:
                    ax.axhline(t[key], color="k", ls=style, lw=1, label=label)
            ax.set(xscale="log", xlabel="gradient evaluations (ULA steps)", ylabel=f"θ[{i}]",
                   title=f"{name}: {objective}")
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, out / f"{name.replace(':', '_')}.png")


def resolve(name: str, args: argparse.Namespace) -> tuple[Any, Settings]:
    """The model `name` and its settings (SETTINGS, then the flags), checked against the objectives."""
    model = registry.get("bayes-model", name)
    if not isinstance(getattr(model, "dim", None), int):
        raise UserError(f"model '{name}' has no integer attribute dim (the dimension d of w)")
    s = SETTINGS.get(name, Settings())
    flags = {k: getattr(args, k) for k in ("theta0", "gamma", "evals", "batch", "seeds", "T")
             if getattr(args, k) is not None}
    s = s._replace(**flags, **({"lr": {"default": args.lr}} if args.lr is not None else {}))
    n_params = getattr(model, "n_params", None)
    if n_params is not None and len(s.theta0) != n_params:
        raise UserError(f"--theta0 has {len(s.theta0)} entries; model '{name}' takes {n_params}")
    if s.evals < max(s.T, default=1):
        raise UserError(f"--evals {s.evals} is less than one update of the nested loop (--T {max(s.T)})")
    for objective in args.objective:
        reward_of(model, objective)
    return model, s


def run_model(name: str, model, s: Settings, args: argparse.Namespace, run_dir: RunDir) -> dict[str, Any]:
    """Every objective and method of one model; its figure; its summary."""
    results = {}
    for objective in args.objective:
        runs = {label: run_method(model, objective, s, T, args.seed)
                for label, T in [("implicit", 1)] + [(f"nested-T{T}", T) for T in s.T]}
        results[objective] = {"targets": targets(model, objective, s), "methods": runs}
    figure(run_dir.path, name, results)
    summary = {}
    for objective, r in results.items():
        target = target_of(r["targets"])
        summary[objective] = {"targets": r["targets"], "methods": {
            label: {"theta": tail(run["theta"])[0].tolist(), "se": tail(run["theta"])[1].tolist(),
                    "updates": int(run["steps"][-1]), "evals": int(run["evals"][-1]),
                    "reached_evals": None if target is None else reached(run, target), "wall_s": run["wall_s"]}
            for label, run in r["methods"].items()}}
    return {"settings": s._asdict(), "objectives": summary}


def print_table(summary: dict[str, Any]) -> None:
    """One row per model, objective and method; the conjugate implicit rows say whether θ* is reached."""
    print(f"| model | objective | method | updates | evals | θ (last half, ± SE) | target | distance | "
          f"evals to within {REACHED} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in summary.items():
        for objective, o in m["objectives"].items():
            target = target_of(o["targets"])
            for label, r in o["methods"].items():
                theta = ", ".join(f"{v:.4f} ± {e:.4f}" for v, e in zip(r["theta"], r["se"]))
                distance = "–" if target is None else f"{abs(r['theta'][0] - target):.4f}"
                if "theta_star" in o["targets"] and label == "implicit":
                    distance += " ✓" if abs(r["theta"][0] - target) <= TOLERANCE else f" ✗ (> {TOLERANCE})"
                when = "–" if target is None else "never" if r["reached_evals"] is None else f"{r['reached_evals']:,}"
                print(f"| {name} | {objective} | {label} | {r['updates']:,} | {r['evals']:,} | {theta} | "
                      f"{'–' if target is None else f'{target:.4f}'} | {distance} | {when} |")
            if "theta_star_gamma" in o["targets"]:
                t = o["targets"]
                print(f"| {name} | {objective} | θ*_γ (ULA step γ) | | | {t['theta_star_gamma']:.4f} | "
                      f"{t['theta_star']:.4f} | {abs(t['theta_star_gamma'] - t['theta_star']):.4f} | |")


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one-line UserErrors (exit code 2 through `main`)."""

    def error(self, message: str):
        raise UserError(message)


def comma_list(flag: str, text: str | None, kind: type) -> tuple | None:
    """`--flag a,b,c` as a tuple of `kind` (None when absent)."""
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes {kind.__name__} values separated by commas, got {text!r}") from None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="linear-regression,logistic-iris",
                        help="models, comma-separated: linear-regression, logistic-iris, or package.module:name")
    parser.add_argument("--objective", default="evidence,held-out",
                        help="outer objectives, comma-separated: evidence, held-out, or package.module:function")
    parser.add_argument("--T", help="inner ULA steps per θ update of the nested loop, comma-separated")
    parser.add_argument("--evals", type=int, help="gradient evaluations (ULA steps) of every method")
    parser.add_argument("--batch", type=int, help="particles per seed")
    parser.add_argument("--seeds", type=int, help="independent repetitions, vmapped")
    parser.add_argument("--gamma", type=float, help="ULA step size γ")
    parser.add_argument("--lr", type=float, help="SGD learning rate η of θ, for every objective")
    parser.add_argument("--theta0", help="initial θ, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="root random seed")
    parser.add_argument("--out", default="runs/bilevel-bayes", help="directory of the figures and summary.json")
    args = parser.parse_args(argv)
    args.T, args.theta0 = comma_list("--T", args.T, int), comma_list("--theta0", args.theta0, float)
    args.model = [m.strip() for m in args.model.split(",") if m.strip()]
    args.objective = [o.strip() for o in args.objective.split(",") if o.strip()]
    for key in ("evals", "batch", "seeds", "gamma", "lr"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise UserError(f"--{key} must be positive, got {getattr(args, key)}")
    if args.T and min(args.T) < 1:
        raise UserError(f"--T values must be positive, got {args.T}")
    if args.seeds is not None and args.seeds < 2:
        raise UserError(f"--seeds must be at least 2 (standard errors are over seeds), got {args.seeds}")
    if not args.model or not args.objective:
        raise UserError("--model and --objective must each name at least one")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the experiment of `argv` (the command line by default); bad input is one line and exit code 2."""
    try:
        args = parse(argv)
        run_dir = RunDir(args.out)
        run_dir.check_writable()
        models = {name: resolve(name, args) for name in args.model}  # every input checked before any work
        run_dir.create()
        summary = {name: run_model(name, model, s, args, run_dir) for name, (model, s) in models.items()}
        run_dir.write_json("summary.json", summary)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()

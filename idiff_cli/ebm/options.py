"""Options of `idiff ebm-train` (paper Appendix A.1, "training from scratch"). JAX-free.

The defaults that depend on the energy are one table, `TABLE`, a row per energy family: wells
(Appendix A.1: seven wells, θ0 = (−7, …, −7, 11), 40,000 SGD steps; plug-in energies too) and mlp (a
Flax MLP energy on eight Gaussians with Adam, the optimiser settings it needs), so `--energy mlp`
brings its settings unless they are given. `--log-every` defines the run: it fixes the logged steps
whose θ arrays and figures keep.
"""

from __future__ import annotations

from typing import Any

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError

TRAINED = ("implicit", "nested", "short-run")
SAMPLERS = ("langevin-theta0", "langevin-theta-opt")  # the initial and the trained model, sampled (Fig. 12)

ROWS: dict[tuple[str, str], dict[str, Any]] = {
    ("paper", "wells"): {"data": "wells", "steps": 40000, "seeds": 10, "gamma": 0.2, "optimizer": "sgd", "lr": 0.1,
                         "ckpt_every": 10000},
    # Adam at 1e-4 with γ = 0.05: at 3e-4 θ outruns the persistent chains and two-moons diverges; SGD at
    # the wells' lr 0.1 diverges on eight Gaussians.
    ("paper", "mlp"): {"data": "eight-gaussians", "steps": 5000, "seeds": 2, "gamma": 0.05, "optimizer": "adam",
                       "lr": 1e-4, "ckpt_every": 1000},
}
TABLE = cfglib.Table(family=lambda values, context: "mlp" if values["energy"] == "mlp" else "wells",
                     what="energy (wells and plug-ins: wells)", rows=ROWS)


def method_names(method: str) -> list[str]:
    asked = [m.strip() for m in method.split(",") if m.strip()]
    return list(TRAINED) if "all" in asked else list(dict.fromkeys(asked))


def _check_methods(cfg: Any) -> None:
    names = method_names(cfg.method)
    bad = next((n for n in names if n not in TRAINED), None if names else cfg.method)
    if bad is not None:
        raise UserError(f"unknown --method '{bad}'; valid choices: all, {', '.join(TRAINED)}")


SCHEMA = cfglib.Schema(
    "ebm-train",
    "Energy-based models trained by Implicit Diffusion (paper Appendix A.1, \"training from scratch\"): fits "
    "V(·, θ) to data with Γ_ref = E_data[∇θV] − E_chains[∇θV]; exact KLs and NLL by quadrature. Writes "
    "config.json, metrics.jsonl, methods/, summary.json, checkpoints/ and figures/ (Figs 11, 12).",
    (
        cfglib.Option("energy", str, "wells", "Energy V(x, θ): wells (7-well mixture, θ ∈ R⁷), mlp (Flax MLP), or "
                      "package.module:attribute; it picks the defaults of the options that depend on it.",
                      choices="energy"),
        cfglib.Option("data", str, None, "Data: wells (exact draws of the A.1 target), two-moons, eight-gaussians, "
                      "checkerboard, rings, or FILE.npy ([N, 2])."),
        cfglib.Option("method", str, "implicit", "implicit (1 ULA step per update, persistent chains), nested "
                      "(T steps), short-run (restart from N(0, I), T steps), a comma-separated list, or all."),
        cfglib.Option("T", int, (10,), "Inner ULA steps of nested and short-run; each value runs (--T 10,100).",
                      many=True, positive=True, flags=("--T",)),
        cfglib.Option("steps", int, None, "Outer (θ update) steps; may grow when resuming.", defining=False,
                      positive=True),
        cfglib.Option("batch", int, 1000, "Chains and data points per update, per seed.", positive=True),
        cfglib.Option("seeds", int, None, "Independent repetitions, run together.", positive=True),
        cfglib.Option("gamma", float, None, "ULA step size γ.", positive=True),
        cfglib.Option("optimizer", str, None, "Optimiser of θ (optax).", choices=("sgd", "adam")),
        cfglib.Option("lr", float, None, "Learning rate of θ.", positive=True),
        cfglib.Option("lr_schedule", str, "constant", "constant, or inv-sqrt (η/√(k+1)).",
                      choices=("constant", "inv-sqrt")),
        cfglib.Option("theta0", float, (-7.0,) * 6 + (11.0,), "Initial θ of the wells energy.", many=True),
        cfglib.Option("hidden", int, (64, 64), "Hidden widths of the mlp energy.", many=True, positive=True),
        cfglib.Option("samplers", bool, True, "Also run Langevin at θ0 and at the trained θ (Figs 11-12)."),
        cfglib.Option("log_every", int, 100, "Log metrics (and keep θ) every N outer steps.", positive=True),
        cfglib.Option("ckpt_every", int, None, "Orbax checkpoint of each method every N outer steps (a multiple "
                      "of --log-every); 0: at the end of each method only.", defining=False, minimum=0),
        cfglib.Option("n_test", int, 10000, "Held-out points for the NLL.", positive=True),
        cfglib.preset_option({"paper": "Appendix A.1 and its settings per energy"}, "paper"),
        cfglib.seed_option(),
        cfglib.out_option(),
        *cfglib.tracking_options(),
        cfglib.CONFIG_OPTION,
    ),
    table=TABLE,
    checks=(cfglib.check_tracking, _check_methods, cfglib.multiple_of(["ckpt_every"])),
)

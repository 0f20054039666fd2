"""Options of `idiff langevin-reward` (paper §5.1, Appendix A.1). JAX-free: `--help` starts no JAX.

Presets: `reference` (the authors' released constants, which made the paper's figures) and `paper`
(the text of Appendix A.1). `--log-every` defines the run: it fixes the logged steps whose θ and
samples arrays.npz and the figures keep.
"""

from __future__ import annotations

from typing import Any

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError

# The methods `--method all` runs, in order: `implicit` first, its final θ is θ_opt.
METHOD_ORDER = ("implicit", "langevin-theta0", "nested", "unrolled", "guidance", "langevin-theta-opt")
# Methods that run once per value of --T (the others take T = 1).
PER_T = ("nested", "unrolled", "short-run")

PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    "paper": {"potential": "hexagon-paper", "reward": "corner-paper", "theta0": (1.0, 0.0, 1.0, 0.0, 1.0, 0.0)},
}


def method_names(method: str) -> list[str]:
    """The method names of `--method`, `implicit` first (it defines θ_opt)."""
    asked = [m.strip() for m in method.split(",") if m.strip()]
    if "all" in asked:
        return list(METHOD_ORDER)
    return ["implicit"] + [m for m in dict.fromkeys(asked) if m != "implicit"]


def _check_methods(cfg: Any) -> None:
    if not [m for m in cfg.method.split(",") if m.strip()]:
        raise UserError("--method must name at least one method")


SCHEMA = cfglib.Schema(
    "langevin-reward",
    "Reward training of Langevin processes (paper §5.1, Appendix A.1): Implicit Diffusion and its "
    "baselines on a 2-D Gaussian mixture, all seeds run together. Writes config.json, metrics.jsonl, "
    "methods/*.npz, arrays.npz, checkpoints/<method>/ and figures/ (Figs 4, 5, 8, 10).",
    (
        cfglib.Option("method", str, "all", "Method(s): all, implicit, langevin-theta0, nested, unrolled, guidance, "
                      "langevin-theta-opt, short-run, a comma-separated list, or package.module:builder. "
                      "`implicit` always runs first: its final θ is θ_opt.", flags=("--method", "--baseline")),
        cfglib.Option("T", int, (1, 10, 100), "Inner sampling steps per θ update of nested, unrolled and short-run; "
                      "each value runs (--T 1,10,100).", many=True, positive=True, flags=("--T",)),
        cfglib.Option("steps", int, 5000, "Outer (θ update) steps K; may grow when resuming.", defining=False,
                      positive=True),
        cfglib.Option("batch", int, 1000, "Particles per seed.", positive=True),
        cfglib.Option("seeds", int, 10, "Independent repetitions, run together.", positive=True),
        cfglib.Option("gamma", float, 0.2, "ULA step size γ.", positive=True),
        cfglib.Option("lr", float, 0.1, "Learning rate η of θ (SGD).", positive=True),
        cfglib.Option("lr_schedule", str, "constant", "constant, or inv-sqrt (η/√(k+1)).",
                      choices=("constant", "inv-sqrt")),
        cfglib.Option("lam", float, 1.0, "Guidance strength λ of the guidance baseline: V(·, θ0) − λ R_smooth.",
                      flags=("--lambda",)),
        cfglib.Option("beta", float, 0.0, "KL weight β: θ updates add β Γ_ref with exact draws of π*(θ0), the "
                      "gradient of β KL(π*(θ0) ‖ π*(θ)).", minimum=0),
        cfglib.Option("potential", str, "hexagon", "Potential V(x, θ): hexagon, hexagon-paper, seven-wells, or "
                      "package.module:function.", choices="potential"),
        cfglib.Option("reward", str, "corner", "Reward R(x): corner, corner-paper, or package.module:function.",
                      choices="reward"),
        cfglib.Option("theta0", float, (1.5, 0.0, 1.5, 0.0, 1.5, 0.0), "Initial θ0.", many=True),
        cfglib.Option("log_every", int, 10, "Log metrics (and keep θ) every N outer steps.", positive=True),
        cfglib.Option("ckpt_every", int, 0, "Orbax checkpoint of each method every N outer steps (a multiple of "
                      "--log-every); 0: at the end of each method only.", defining=False, minimum=0),
        cfglib.preset_option({"reference": "the authors' released constants",
                              "paper": "the text of Appendix A.1"}, "reference"),
        cfglib.seed_option(),
        cfglib.out_option(),
        *cfglib.tracking_options(),
        cfglib.CONFIG_OPTION,
    ),
    presets=PRESETS,
    checks=(cfglib.check_tracking, _check_methods, cfglib.multiple_of(["ckpt_every"])),
)

"""Gradient evaluations to reach the same exact KL: Implicit Diffusion against nested loops and
short-run MCMC on the `idiff ebm-train` problem (paper Appendix A.1, training from scratch).

Every method trains the seven-well energy from θ0 = (−7, ..., −7, 11) on exact target draws with
the paper's SGD (η = 0.1, γ = 0.2, batch 1000); KL(π_target ‖ π*(θ)) is exact (quadrature), averaged
over seeds at every logged step. A gradient evaluation is one ULA step of one chain (∇x V); each θ
update also costs one ∇θ V pass, the same for all methods. Prints, measured in one run, the
gradient evaluations (and outer steps, wall seconds) each method needs to first reach each KL
threshold, and the ratio to `implicit`.

Usage: python benchmarks/ebm.py [--seeds 2] [--steps 5000] [--thresholds 0.1,0.01]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from idiff_cli.devices import use_host_cores

use_host_cores()

import numpy as np  # noqa: E402

from idiff_cli.ebm.experiment import main as ebm_train  # noqa: E402
from idiff_cli.ebm.options import SCHEMA  # noqa: E402
from idiff_cli.runs import RunDir  # noqa: E402

# (method, T, outer steps as a fraction of --steps): the T = 100 loops get half the outer steps.
METHODS = (("implicit", 1, 1.0), ("nested", 10, 1.0), ("nested", 100, 0.5), ("short-run", 10, 1.0),
           ("short-run", 100, 0.5))


def curve(method: str, T: int, steps: int, seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(grad evals [L], outer steps [L], seed-mean exact KL [L], wall seconds) of one method."""
    log_every = max(1, steps // 200)
    cfg = SCHEMA.resolve({"method": method, "T": (T,), "steps": steps, "seeds": seeds, "samplers": False,
                          "log_every": log_every, "ckpt_every": 0})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ebm_train(cfg, pathlib.Path(tmp))
        seconds = time.perf_counter() - start
        rows = RunDir(tmp).read_metrics()
    return (np.array([r["grad_evals"] for r in rows]), np.array([r["step"] for r in rows]),
            np.array([r["kl_fwd_mean"] for r in rows]), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--thresholds", default="0.1,0.01")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    results = {}
    for method, T, fraction in METHODS:
        name = method if method == "implicit" else f"{method}-T{T}"
        results[name] = curve(method, T, int(args.steps * fraction), args.seeds)

    print(f"\nseven-well EBM, SGD η = 0.1, γ = 0.2, batch 1000, {args.seeds} seeds; KL(θ0) = "
          f"{results['implicit'][2][0]:.3f}")
    header = "| method | outer steps run | final KL | " + " | ".join(
        f"grad evals to KL ≤ {t} (× implicit)" for t in thresholds) + " | wall s |"
    print(header)
    print("|" + " --- |" * (3 + len(thresholds) + 1))
    base = {}
    for name, (evals, steps, kl, seconds) in results.items():
        cells = []
        for t in thresholds:
            hit = np.nonzero(kl <= t)[0]
            if len(hit) == 0:
                cells.append("not reached")
                continue
            g = int(evals[hit[0]])
            base.setdefault(t, g) if name == "implicit" else None
            ratio = f" ({g / base[t]:.0f}×)" if t in base else ""
            cells.append(f"{g:,} at step {int(steps[hit[0]]):,}{ratio}")
        print(f"| {name} | {int(steps[-1]):,} | {kl[-1]:.4f} | " + " | ".join(cells) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()

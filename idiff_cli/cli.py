"""The `idiff` command line: one thin function per subcommand (parse -> config -> run).

Every subcommand shares --out, --seed, --preset and --config; per-field flags override the preset
and the config file. Bad input prints one line `error: ...` and exits with code 2.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Annotated, Callable, Optional

from idiff_cli.parallel import use_host_cores

use_host_cores()  # before JAX starts: one XLA host device per CPU core

import typer  # noqa: E402

from idiff_cli import __version__  # noqa: E402
from idiff_cli.errors import UserError  # noqa: E402

app = typer.Typer(
    name="idiff",
    help="Implicit Diffusion (Marion et al., AISTATS 2025): optimise through stochastic sampling.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# ---- options shared by every subcommand ----
Out = Annotated[Optional[pathlib.Path], typer.Option("--out", help="Run directory (default: runs/<command>-<timestamp>).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Root random seed of the run (default: 0).")]
ConfigFile = Annotated[Optional[pathlib.Path], typer.Option("--config", help="JSON or TOML file of config overrides (flags win).")]


def user_errors(fn: Callable) -> Callable:
    """Turns UserError into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: files written so far are complete and kept", err=True)
            raise typer.Exit(130) from None

    return wrapper


def run_dir_for(out: Optional[pathlib.Path], command: str):
    from idiff_cli.runs import RunDir, default_run_dir

    return RunDir(out or default_run_dir(command))


def parse_list(values: Optional[list[str]], cast: Callable, flag: str) -> Optional[tuple]:
    """`--T 1,10 --T 100` -> (1, 10, 100); None when the flag is absent."""
    if not values:
        return None
    items = [v for value in values for v in value.replace(",", " ").split()]
    try:
        return tuple(cast(v) for v in items)
    except ValueError:
        raise UserError(f"{flag} takes numbers separated by commas, got {','.join(values)!r}") from None


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"idiff {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True,
                                                     help="Print the version and exit.")] = None,
) -> None:
    """Implicit Diffusion experiment runner. Run `idiff COMMAND --help` for a command's options."""


@user_errors
def langevin_reward(
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="Method(s) to run: all, implicit, langevin-theta0, nested, unrolled, guidance, "
                           "langevin-theta-opt, a comma-separated list, or package.module:builder. "
                           "`implicit` always runs too: its final θ is θ_opt. (default: all)")] = None,
    T: Annotated[Optional[list[str]], typer.Option(
        "--T", help="Inner sampling steps per θ update for nested and unrolled; several values run "
                    "each (--T 1,10,100). (default: 1,10,100)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Outer (θ update) steps K. (default: 5000)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Particles per seed. (default: 1000)")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Independent repetitions, run together. (default: 10)")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="ULA step size γ. (default: 0.2)")] = None,
    eta: Annotated[Optional[float], typer.Option(help="Learning rate η of θ (SGD). (default: 0.1)")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Guidance strength λ of the guidance "
                                                  "baseline, V(·,θ0) − λ R_smooth. (default: 1)")] = None,
    eta_schedule: Annotated[Optional[str], typer.Option(help="constant or inv-sqrt (η/√(k+1)). (default: constant)")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log metrics every N outer steps. (default: 10)")] = None,
    potential: Annotated[Optional[str], typer.Option(help="Potential V(x, θ): hexagon, hexagon-paper, or "
                                                      "package.module:function. (default: by preset)")] = None,
    reward: Annotated[Optional[str], typer.Option(help="Reward R(x): corner, corner-paper, or "
                                                   "package.module:function. (default: by preset)")] = None,
    theta0: Annotated[Optional[str], typer.Option(help="Initial θ0, comma-separated. (default: by preset)")] = None,
    preset: Annotated[str, typer.Option(help="reference (the authors' released constants) or paper "
                                             "(the text of Appendix A.1).")] = "reference",
    out: Out = None,
    seed: Seed = None,
    config: ConfigFile = None,
) -> None:
    """Reward training of Langevin processes (paper §5.1, Appendix A.1).

    Implicit Diffusion and its five baselines on a 2-D Gaussian mixture, 10 seeds run together. Writes config.json, metrics.jsonl, arrays.npz and figures/ (Figs 4, 5, 8, 10) to the run directory.
    """
    from idiff_cli import config as cfglib
    from idiff_cli.langevin import experiment

    flags = dict(baseline=baseline, T=parse_list(T, int, "--T"), steps=steps, batch=batch, seeds=seeds,
                 gamma=gamma, eta=eta, guidance_lambda=lam, eta_schedule=eta_schedule, log_every=log_every,
                 potential=potential, reward=reward, theta0=parse_list([theta0] if theta0 else None, float, "--theta0"),
                 seed=seed)
    cfg = cfglib.resolve(experiment.LangevinConfig, experiment.PRESETS, preset, config, flags)
    experiment.run(cfg, run_dir_for(out, "langevin-reward"))


app.command("langevin-reward")(langevin_reward)
app.command("langevin", help="Alias of `langevin-reward`.")(langevin_reward)


def main() -> None:
    app()

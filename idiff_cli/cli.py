"""The `idiff` command line, generated from the commands' option schemas.

Each command is a schema (in a JAX-free `options` module of its package, so that `--help` and bad
flags answer without starting JAX) and an entry point `main(cfg, out)` imported when the command
runs. Flags override `--config FILE`, which overrides the preset. Bad input prints one line
`error: ...` and exits with code 2, before anything is written.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from typing import Annotated, Any, Callable, Optional

from idiff_cli import storage
from idiff_cli.devices import lost_peer, use_host_cores

use_host_cores()  # before JAX starts: one XLA host device per CPU core
storage.use_emulator()  # before tensorstore starts: a GCS emulator for every client, if one is named

import typer  # noqa: E402

from idiff_cli import __version__  # noqa: E402
from idiff_cli import config as cfglib  # noqa: E402
from idiff_cli.diffusion import import_options  # noqa: E402
from idiff_cli.diffusion import options as diffusion_options  # noqa: E402
from idiff_cli.ebm import options as ebm_options  # noqa: E402
from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.fid import options as fid_options  # noqa: E402
from idiff_cli.implicit import options as finetune_options  # noqa: E402
from idiff_cli.langevin import options as langevin_options  # noqa: E402
from idiff_cli.report import SCHEMA as REPORT_SCHEMA  # noqa: E402
from idiff_cli.signals import Interrupted  # noqa: E402

app = typer.Typer(
    name="idiff",
    help="Implicit Diffusion (Marion et al., AISTATS 2025): optimise through stochastic sampling.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# (command, schema, entry point "module:function", aliases)
COMMANDS = (
    ("langevin-reward", langevin_options.SCHEMA, "idiff_cli.langevin.experiment:main", ("langevin",)),
    ("ebm-train", ebm_options.SCHEMA, "idiff_cli.ebm.experiment:main", ()),
    ("pretrain", diffusion_options.PRETRAIN, "idiff_cli.diffusion.pretrain:main", ()),
    ("import", import_options.SCHEMA, "idiff_cli.diffusion.imports:main", ()),
    ("export", import_options.EXPORT, "idiff_cli.diffusion.export:main", ()),
    ("sample", diffusion_options.SAMPLE, "idiff_cli.diffusion.sample:main", ()),
    ("finetune", finetune_options.SCHEMA, "idiff_cli.implicit.finetune:main", ()),
    ("evaluate-fid", fid_options.SCHEMA, "idiff_cli.fid.evaluate:main", ()),
    ("report", REPORT_SCHEMA, "idiff_cli.report:main", ()),
)


# The options that name run directories, which may be object-store prefixes (gs://, storage.py) in every
# command; every other path option names a local file (import's source directory too).
RUN_DIR_OPTIONS = ("out", "run_dir", "from_run", "runs")


def check_object_store(schema: cfglib.Schema, values: dict[str, Any]) -> None:
    """A one-line UserError for a gs:// path where it is not supported (in an option that reads a local
    file, or beside a tracker that writes into the run directory with its own file I/O), and for a gs://
    run directory to read whose bucket cannot be reached or does not exist."""
    for option in (o for o in schema.options if o.kind == "path"):
        value = values.get(option.name)
        remote = [v for v in (value if option.many else [value]) if v and storage.is_remote(v)]
        if not remote:
            continue
        if option.name not in RUN_DIR_OPTIONS:
            raise UserError(f"{option.flag} names a local path; gs:// paths are for run directories")
        if option.name != "out":  # a run directory read: its bucket reached before any work (--out: when made)
            for v in remote:
                storage.check_prefix(v, option.flag)
        for tracker in ("tensorboard", "wandb"):
            if values.get(tracker):
                raise UserError(f"--{tracker} writes into a local run directory only; drop it or use a local --out")


def user_errors(fn: Callable) -> Callable:
    """Turns UserError into one line on stderr and exit code 2; a run stopped by a signal into its
    message and 128 + the signal's number; Ctrl-C elsewhere into exit code 130; a collective of a
    multi-process run that failed (another process ended) into one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(e.code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: files written so far are complete and kept", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            reason = lost_peer(e)
            if reason is None:
                raise
            typer.echo(f"error: {reason}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # exit now: jax.distributed's shutdown barrier at exit would wait for the lost process and abort
            os._exit(1)

    return wrapper


def parse(option: cfglib.Option, raw: Any) -> Any:
    """A command-line value as the option's type: comma-separated lists become tuples."""
    if raw is None:
        return None
    if option.kind == "path":
        return tuple(str(v) for v in raw) if option.many else str(raw)
    if not option.many:
        return raw
    items = [v for value in ([raw] if isinstance(raw, str) else raw) for v in value.replace(",", " ").split()]
    try:
        return tuple(option.kind(v) for v in items)
    except ValueError:
        raise UserError(f"{option.flag} takes {option.kind.__name__} values separated by commas, got {raw!r}") from None


def parameter(option: cfglib.Option) -> inspect.Parameter:
    """The Typer parameter of one option: help with its default, `--x/--no-x` for booleans."""
    text = f"{option.help} (default: {option.default_text()})"
    kind = {"path": str}.get(option.kind, option.kind)
    if option.many:
        kind = list[str] if option.argument else str
    if option.argument:
        info = typer.Argument(help=text if not option.required else option.help, show_default=False,
                              metavar=option.name.upper())
    elif option.kind is bool:
        names = [f"{s}/--no-{s[2:]}" for s in option.spellings]
        info = typer.Option(*names, help=text, show_default=False)
    else:
        info = typer.Option(*option.spellings, help=text, show_default=False)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], info])


def make_command(schema: cfglib.Schema, target: str) -> Callable:
    """A Typer command for `schema`: parse, resolve the config, call `target`'s `main(cfg, out)`."""
    options = {o.name: o for o in schema.options}

    @user_errors
    def command(**raw: Any) -> None:
        values = {name: parse(options[name], value) for name, value in raw.items()}
        check_object_store(schema, values)
        cfg = schema.resolve(values, values.get("config"))
        check_object_store(schema, {**vars(cfg), "out": values.get("out")})  # values from --config too
        out = values.get("out")
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(cfg, storage.path(out) if out else None)

    command.__signature__ = inspect.Signature([parameter(o) for o in schema.options])
    command.__doc__ = schema.help
    return command


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


for _name, _schema, _target, _aliases in COMMANDS:
    _fn = make_command(_schema, _target)
    app.command(_name)(_fn)
    for _alias in _aliases:
        app.command(_alias, help=f"Alias of `{_name}`.")(_fn)


def main() -> None:
    """The `idiff` entry point. After a refusal (exit 2: its one line is printed) the interpreter's
    shutdown writes nothing more: the late callbacks of a failed checkpoint write (a full disk) would
    print tracebacks of their own."""
    try:
        app()
    except SystemExit as e:
        if e.code == 2:
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        raise

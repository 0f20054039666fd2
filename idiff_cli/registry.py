"""Named components (potentials, rewards, methods, datasets, ...) looked up by string.

Only the CLI layer resolves names; the numerical core receives the objects themselves.

    @register("reward", "brightness")
    def brightness(x): ...

    get("reward", "brightness")            # a registered component
    get("reward", "my_pkg.rewards:bluish")  # a user plug-in, imported on demand
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from idiff_cli.errors import UserError

_COMPONENTS: dict[str, dict[str, Any]] = {}

# The modules that register the built-in components of each kind, imported on first lookup.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "potential": ("idiff_cli.langevin.potentials",),
    "reward": ("idiff_cli.langevin.rewards",),
    "method": ("idiff_cli.langevin.methods",),
    "energy": ("idiff_cli.ebm.energies",),
    "toy-data": ("idiff_cli.ebm.toy_data",),
    "dataset": ("idiff_cli.data.datasets",),
    "sde": ("idiff_cli.diffusion.sde",),
    "sampler": ("idiff_cli.diffusion.samplers", "idiff_cli.diffusion.ddpm"),
    "image-reward": ("idiff_cli.implicit.rewards",),
    "finetune-method": ("idiff_cli.implicit.methods",),
    "features": ("idiff_cli.fid.features",),
}


def _load_builtins(kind: str) -> dict[str, Any]:
    for module in PROVIDERS.get(kind, ()):
        importlib.import_module(module)
    return _COMPONENTS.get(kind, {})


def register(kind: str, name: str, obj: Any = None) -> Any:
    """Registers `obj` as `kind`/`name`; without `obj`, returns a decorator that does."""

    def add(component: Any) -> Any:
        table = _COMPONENTS.setdefault(kind, {})
        if name in table:
            raise ValueError(f"{kind} '{name}' is registered twice")
        table[name] = component
        return component

    return add if obj is None else add(obj)


def names(kind: str) -> list[str]:
    """The registered names of one kind, sorted."""
    return sorted(_load_builtins(kind))


def choices_text(kind: str) -> str:
    return ", ".join(names(kind)) + ", or package.module:function"


def get(kind: str, name: str) -> Any:
    """The component `kind`/`name`, or a plug-in when `name` reads `package.module:attribute`.

    Raises UserError (one line, listing the valid choices) for an unknown name or a plug-in that
    cannot be imported.
    """
    if ":" in name:
        return _load_plugin(kind, name)
    table = _load_builtins(kind)
    if name not in table:
        raise UserError(f"unknown {kind} '{name}'; valid choices: {choices_text(kind)}")
    return table[name]


def _load_plugin(kind: str, spec: str) -> Callable:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import failure is the user's plug-in, reported in one line
        raise UserError(f"cannot import {kind} plug-in module '{module_name}': {e}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise UserError(f"{kind} plug-in '{spec}': module '{module_name}' has no '{attribute}'") from None

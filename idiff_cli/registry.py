"""Named components (potentials, rewards, methods, datasets, ...) looked up by string.

Only the CLI layer resolves names; the numerical core receives the objects themselves.

    @register("reward", "brightness")
    def brightness(x): ...

    get("reward", "brightness")            # a registered component
    get("reward", "my_pkg.rewards:bluish")  # a user plug-in, imported on demand

A family of components indexed by an integer registers under "prefix:N" with its valid values:

    register("image-reward", "digit:N", digit_reward, values=range(10))
    get("image-reward", "digit:7")          # digit_reward(7)

A registered family's prefix takes precedence over a plug-in module of the same name.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from idiff_cli.errors import UserError

_COMPONENTS: dict[str, dict[str, Any]] = {}
# kind -> prefix -> (factory, valid values): the families "prefix:N" whose members are factory(N).
_FAMILIES: dict[str, dict[str, tuple[Callable[[int], Any], range]]] = {}

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


def register(kind: str, name: str, obj: Any = None, values: range | None = None) -> Any:
    """Registers `obj` as `kind`/`name`; without `obj`, returns a decorator that does. A name
    "prefix:N" with `values` registers a family: "prefix:<n>" for n in `values` resolves to obj(n)."""
    if name.endswith(":N") != (values is not None):
        raise ValueError(f"{kind} '{name}': a family is named 'prefix:N' and given its values, and only a family")

    def add(component: Any) -> Any:
        table = _COMPONENTS.setdefault(kind, {}) if values is None else _FAMILIES.setdefault(kind, {})
        key = name if values is None else name.removesuffix(":N")
        if key in table:
            raise ValueError(f"{kind} '{name}' is registered twice")
        table[key] = component if values is None else (component, values)
        return component

    return add if obj is None else add(obj)


def names(kind: str) -> list[str]:
    """The registered names of one kind, sorted; a family reads "prefix:N"."""
    return sorted([*_load_builtins(kind), *(f"{prefix}:N" for prefix in _FAMILIES.get(kind, {}))])


def choices_text(kind: str) -> str:
    return ", ".join(names(kind)) + ", or package.module:function"


def get(kind: str, name: str) -> Any:
    """The component `kind`/`name`: a registered one, a family's member when `name` reads
    `prefix:<n>` for a registered family "prefix:N", else a plug-in when it reads `package.module:attribute`.

    Raises UserError (one line, listing the valid choices) for an unknown name or a plug-in that
    cannot be imported.
    """
    table = _load_builtins(kind)
    prefix, colon, index = name.partition(":")
    if colon and prefix in _FAMILIES.get(kind, {}):
        factory, values = _FAMILIES[kind][prefix]
        if index not in map(str, values):
            raise UserError(f"unknown {kind} '{name}' ({prefix}:N takes N in {values.start}..{values[-1]}); "
                            f"valid choices: {choices_text(kind)}")
        return factory(int(index))
    if colon:
        return _load_plugin(kind, name)
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

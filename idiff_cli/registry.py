"""Named components (potentials, rewards, methods, datasets, ...) looked up by string.

Only the CLI layer resolves names; the numerical core receives the objects themselves.

    @register("reward", "brightness")
    def brightness(x): ...

    get("reward", "brightness")            # a registered component
    get("reward", "my_pkg.rewards:bluish")  # a user plug-in, imported on demand

A family of components indexed by an integer registers under its prefix, a ":" or "-", and one capital
letter standing for the index, with the index's valid values or none (every integer n >= 0, which the
member then checks):

    register("image-reward", "digit:N", digit_reward, values=range(10))
    get("image-reward", "digit:7")          # digit_reward(7)
    register("finetune-method", "truncated-K", truncated)
    get("finetune-method", "truncated-4")   # truncated(4)

A registered family's prefix takes precedence over a plug-in module of the same name.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from idiff_cli.errors import UserError

_COMPONENTS: dict[str, dict[str, Any]] = {}
# kind -> prefix with its separator ("digit:", "truncated-") -> (family name, factory, valid values or None):
# the families whose members are factory(n).
_FAMILIES: dict[str, dict[str, tuple[str, Callable[[int], Any], range | None]]] = {}
FAMILY_NAME = re.compile(r"(.+[:-])([A-Z])")  # "digit:N", "truncated-K": the prefix and the index's letter

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
    """Registers `obj` as `kind`/`name`; without `obj`, returns a decorator that does. A family name
    ("prefix:N", "prefix-K") registers a family: "prefix:<n>" for n in `values` (every n >= 0 without
    `values`) resolves to obj(n)."""
    family = FAMILY_NAME.fullmatch(name)
    if values is not None and not family:
        raise ValueError(f"{kind} '{name}': a family is named 'prefix:N' or 'prefix-N' (any capital letter), and "
                         "only a family takes values")

    def add(component: Any) -> Any:
        table = _FAMILIES.setdefault(kind, {}) if family else _COMPONENTS.setdefault(kind, {})
        key = family.group(1) if family else name
        if key in table:
            raise ValueError(f"{kind} '{name}' is registered twice")
        table[key] = (name, component, values) if family else component
        return component

    return add if obj is None else add(obj)


def names(kind: str) -> list[str]:
    """The registered names of one kind, sorted; a family reads as registered ("digit:N", "truncated-K")."""
    return sorted([*_load_builtins(kind), *(family for family, _, _ in _FAMILIES.get(kind, {}).values())])


def choices_text(kind: str) -> str:
    return ", ".join(names(kind)) + ", or package.module:function"


def get(kind: str, name: str) -> Any:
    """The component `kind`/`name`: a registered one, a family's member when `name` reads
    `prefix:<n>` (or `prefix-<n>`) for a registered family "prefix:N" ("prefix-N"), else a plug-in when
    it reads `package.module:attribute`.

    Raises UserError (one line, listing the valid choices) for an unknown name, an index outside its
    family's values, or a plug-in that cannot be imported.
    """
    table = _load_builtins(kind)
    if name in table:
        return table[name]
    for prefix, (family, factory, values) in _FAMILIES.get(kind, {}).items():
        if name.startswith(prefix):
            index, letter = name.removeprefix(prefix), family[-1]
            n = int(index) if index.isascii() and index.isdigit() and str(int(index)) == index else None
            if n is None or (values is not None and n not in values):
                valid = f"{letter} in {values.start}..{values[-1]}" if values is not None else f"an integer {letter}"
                raise UserError(f"unknown {kind} '{name}' ({family} takes {valid}); "
                                f"valid choices: {choices_text(kind)}")
            return factory(n)
    if ":" in name:
        return _load_plugin(kind, name)
    raise UserError(f"unknown {kind} '{name}'; valid choices: {choices_text(kind)}")


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

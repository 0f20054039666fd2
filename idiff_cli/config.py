"""Configs: a dataclass per subcommand, named presets, and overrides from a file and from flags.

Precedence, lowest first: dataclass defaults < preset < `--config FILE` (JSON or TOML) < flags.
The resolved config is written to the run directory as `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping, TypeVar

from idiff_cli.errors import UserError

C = TypeVar("C")


def flag(cls_or_cfg: Any, name: str) -> str:
    """The command-line spelling of a config field (`eta_schedule` -> `--eta-schedule`)."""
    for f in dataclasses.fields(cls_or_cfg):
        if f.name == name:
            return f.metadata.get("flag", "--" + name.replace("_", "-"))
    raise KeyError(name)


def load_overrides(path: pathlib.Path | str | None) -> dict[str, Any]:
    """Reads a JSON or TOML file of config overrides (a flat table of field: value)."""
    if path is None:
        return {}
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the `toml` package comes with tensorflow-datasets
                import toml as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise UserError(f"cannot parse config file '{path}': {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a table of field: value")
    return data


def resolve(
    cls: type[C],
    presets: Mapping[str, Mapping[str, Any]],
    preset: str,
    config_file: pathlib.Path | str | None = None,
    flags: Mapping[str, Any] | None = None,
) -> C:
    """Builds `cls` from defaults < preset < file < flags (flags set to None are left out)."""
    if preset not in presets:
        raise UserError(f"unknown preset '{preset}'; valid choices: {', '.join(presets)}")
    values: dict[str, Any] = dict(presets[preset])
    values.update(load_overrides(config_file))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    values["preset"] = preset
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(fields)}")
    for name, value in values.items():
        if isinstance(value, list):  # JSON/TOML lists become tuples, so configs stay hashable
            values[name] = tuple(value)
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---- validation helpers: each raises a one-line UserError naming the flag and the bad value ----


def require_int(cfg: Any, name: str, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{flag(cfg, name)} must be an integer >= {minimum}, got {value!r}")


def require_ints(cfg: Any, name: str, minimum: int = 1) -> None:
    values = getattr(cfg, name)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise UserError(f"{flag(cfg, name)} must be one or more integers >= {minimum}, got {values!r}")


def require_float(cfg: Any, name: str, positive: bool = True) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a finite number > 0" if positive else "a finite number"
        raise UserError(f"{flag(cfg, name)} must be {kind}, got {value!r}")


def require_choice(cfg: Any, name: str, choices: list[str] | tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise UserError(f"unknown {flag(cfg, name)} '{value}'; valid choices: {', '.join(choices)}")

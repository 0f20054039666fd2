"""Option schemas: every option of a command defined once, and the configs resolved from them.

An `Option` carries its name, type, default, help, validation and whether it *defines the run*
(changes results: model, data, method, λ, β, seeds, …) or is *run-time* (cadences, devices, how
far `--steps` goes). A `Schema` is a command's options, its presets (named sets of overrides a
reader can diff), its `Table` of the defaults that depend on the preset and on a family (the
dataset's family, the energy, the pretrained model's) and its cross-option checks. The CLI
generates the Typer options from a schema; `Schema.resolve` builds the frozen config, one precedence:

    schema defaults < preset < table row (preset, family) < `--config FILE` (JSON or TOML) < flags

so a flag that changes the family (e.g. `--energy mlp`) brings that family's defaults, except those
the user set. The help text of a table's option is generated from its rows. A family known only
when the command runs (the pretrained model's dataset) or a default computed from such a fact (the
preset's U-Net for the dataset's image size) is applied by `Schema.complete(cfg, context)` with the
same precedence; `config.json` holds the completed values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
from typing import Any, Callable, Mapping, Sequence

from idiff_cli import registry
from idiff_cli.errors import UserError
from idiff_cli.runs import DAMAGED


@dataclasses.dataclass(frozen=True)
class Option:
    """One option. `kind` is int, float, str, bool or path; `many` makes it a tuple of `kind`
    (comma-separated on the command line). Checks: `minimum` (inclusive), `positive` (> 0),
    `below` (exclusive upper bound), `choices` (a tuple, or a registry kind whose names are valid,
    plug-ins `package.module:name` included)."""

    name: str
    kind: type | str
    default: Any
    help: str
    defining: bool = True
    many: bool = False
    flags: tuple[str, ...] = ()  # command-line spellings (default: --name-with-dashes)
    rule: str = ""  # how a `None` default is resolved, shown in --help
    minimum: float | None = None
    positive: bool = False
    below: float | None = None
    choices: tuple[str, ...] | str = ()
    argument: bool = False  # positional (its name in --help: NAME in capitals)
    required: bool = False
    config: bool = True  # False: a CLI-only input (e.g. --out), not part of config.json

    @property
    def flag(self) -> str:
        if self.argument:
            return self.name.upper()
        return self.flags[0] if self.flags else ("--" + self.name.replace("_", "-"))

    @property
    def spellings(self) -> tuple[str, ...]:
        return self.flags or (self.flag,)

    def default_text(self) -> str:
        if self.rule:
            return self.rule
        if self.default is None or self.default == "":
            return "none"
        if self.many:
            return ",".join(str(v) for v in self.default)
        if self.kind is bool:
            return "yes" if self.default else "no"
        return str(self.default)

    def check(self, value: Any) -> None:
        """Raises a one-line UserError naming the flag when `value` is not valid for this option."""
        if value is None:
            if self.required:
                what = self.name.upper() if self.argument else self.flag
                choices = f" ({', '.join(self.choices)})" if isinstance(self.choices, tuple) and self.choices else ""
                raise UserError(f"missing {what}{choices}")
            if self.default is None:
                return
            raise UserError(f"{self.flag} must be given")
        values = value if self.many else (value,)
        if self.many and (not isinstance(value, tuple) or not value):
            raise UserError(f"{self.flag} must be one or more values separated by commas, got {value!r}")
        for v in values:
            self._check_one(v, value)

    def _check_one(self, v: Any, whole: Any) -> None:
        shown = ",".join(map(str, whole)) if self.many else whole
        if self.kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise UserError(f"{self.flag} must be an integer, got {shown!r}")
        if self.kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise UserError(f"{self.flag} must be a finite number, got {shown!r}")
        if self.kind is bool and not isinstance(v, bool):
            raise UserError(f"{self.flag} must be true or false, got {shown!r}")
        if self.kind in (str, "path") and not isinstance(v, str):
            raise UserError(f"{self.flag} must be a string, got {shown!r}")
        if self.minimum is not None and v < self.minimum:
            raise UserError(f"{self.flag} must be >= {_number(self.minimum)}, got {shown}")
        if self.positive and v <= 0:
            raise UserError(f"{self.flag} must be > 0, got {shown}")
        if self.below is not None and v >= self.below:
            raise UserError(f"{self.flag} must be < {_number(self.below)}, got {shown}")
        if isinstance(self.choices, tuple) and self.choices and v not in self.choices:
            raise UserError(f"unknown {self.flag} '{v}'; valid choices: {', '.join(self.choices)}")
        if isinstance(self.choices, str):
            registry.get(self.choices, v)


# The options every command that writes a run directory shares.
def _number(x: float) -> str:
    """A bound as written in a message: integers exactly, floats short."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def out_option(what: str = "Run directory") -> Option:
    return Option("out", "path", None, f"{what}.", config=False, rule="runs/<command>-<timestamp>")


def seed_option(default: int = 0) -> Option:
    return Option("seed", int, default, "Root random seed.", minimum=0, below=2**63)  # JAX's keys take a C long


def devices_option() -> Option:
    """`--devices N`: the local devices of every process that a training command splits its batch over."""
    return Option("devices", int, None, "Local devices (on the CPU: cores exposed as host devices) the batch is "
                  "split over, on every process; the weights and the optimiser are replicated. It must divide "
                  "--batch (times the process count).", defining=False, positive=True,
                  rule="every local device, or the largest count that divides the batch (said in one line)")


CONFIG_OPTION = Option("config", "path", None, "JSON or TOML file of option values (flags win).", config=False)


def tracking_options() -> tuple[Option, ...]:
    """`--tensorboard` and `--wandb PROJECT`: live tracking of a long run (run-time options)."""
    return (Option("tensorboard", bool, False, "Write TensorBoard event files (scalars of metrics.jsonl, sample "
                   "grids, figures) into RUN/tb/.", defining=False),
            Option("wandb", str, "", "Log to this Weights & Biases project (needs pip install -e '.[wandb]'; "
                   "WANDB_MODE=offline works without a network).", defining=False))


def check_tracking(cfg: Any) -> None:
    """--wandb needs the optional wandb package: refused before anything is written."""
    if getattr(cfg, "wandb", "") and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb needs the optional extra: pip install -e '.[wandb]'")


def preset_option(presets: Mapping[str, str], default: str) -> Option:
    """`--preset`, from {name: what it is}; run-time, since the values it sets are compared one by one."""
    described = "; ".join(f"{name}: {what}" for name, what in presets.items())
    return Option("preset", str, default, f"Named set of defaults ({described}).", defining=False,
                  choices=tuple(presets))


@dataclasses.dataclass(frozen=True)
class Table:
    """The defaults that depend on the preset and on a family, as data: `rows[(preset, family)]` holds
    the value of every option that depends on them (each option left `None` in the schema).

    family: (values, context) -> the family of a run, from its option values (preset < file < flags)
            and, for a family known only when the command runs, `context` (None while unknown).
    what:   how `--help` names the family, e.g. "dataset family".
    derive: (values, context) -> further defaults computed from the values and the context (the
            preset's U-Net for the image size), applied like a row; None while the context is unknown.
    derived_help: option -> its rule in `--help`, for the derived options.
    """

    family: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None]
    what: str
    rows: Mapping[tuple[str, str], Mapping[str, Any]]
    derive: Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any] | None] | None = None
    derived_help: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def presets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(preset for preset, _ in self.rows))

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(family for _, family in self.rows))

    def options(self) -> set[str]:
        return {name for row in self.rows.values() for name in row} | set(self.derived_help)

    def row(self, preset: str, family: str) -> Mapping[str, Any]:
        if (preset, family) not in self.rows:
            raise UserError(f"no defaults for --preset {preset} and the {self.what} '{family}'; "
                            f"known: {', '.join(f'{p}/{f}' for p, f in self.rows)}")
        return self.rows[(preset, family)]

    def rule(self, name: str) -> str:
        """`name`'s defaults in words, e.g. "digits: cpu 2400, paper 18000; natural: cpu 5000, ..."."""
        if name in self.derived_help:
            return self.derived_help[name]
        parts = []
        for family in self.families:
            values = {p: self.rows[(p, family)].get(name) for p in self.presets if (p, family) in self.rows}
            shown = {p: _text(v) for p, v in values.items()}
            same = len(set(shown.values())) == 1
            parts.append((family, next(iter(shown.values())) if same else
                          ", ".join(f"{p} {v}" for p, v in shown.items())))
        if len({text for _, text in parts}) == 1:
            return f"{parts[0][1]} (every {self.what})"
        return f"by {self.what}: " + "; ".join(f"{family}: {text}" for family, text in parts)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class Schema:
    """A command's options, presets and cross-option checks (each `check(cfg)` raises UserError)."""

    command: str
    help: str
    options: tuple[Option, ...]
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    checks: tuple[Callable[[Any], None], ...] = ()
    table: Table | None = None

    def __post_init__(self):
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.command}: an option is defined twice")
        if self.table is not None:
            if not set(self.presets) <= set(self.table.presets):
                raise ValueError(f"{self.command}: a preset without rows in the table")
            # a preset is its overrides of the options outside the table and its rows in the table
            object.__setattr__(self, "presets", {p: self.presets.get(p, {}) for p in self.table.presets})
            unknown = self.table.options() - set(names)
            if unknown:
                raise ValueError(f"{self.command} table: unknown options {sorted(unknown)}")
            # an option of the table has no default of its own: its help shows the table's
            object.__setattr__(self, "options", tuple(
                dataclasses.replace(o, rule=self.table.rule(o.name)) if o.name in self.table.options() else o
                for o in self.options))
            if any(o.default is not None for o in self.options if o.name in self.table.options()):
                raise ValueError(f"{self.command}: an option of the table has a schema default")
        if self.presets and "preset" not in names:
            raise ValueError(f"{self.command}: presets need a `preset` option")
        for preset, values in self.presets.items():
            unknown = set(values) - set(names)
            if unknown:
                raise ValueError(f"{self.command} preset {preset}: unknown options {sorted(unknown)}")
            if self.table is not None and set(values) & self.table.options():
                raise ValueError(f"{self.command} preset {preset}: sets options of the table")

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    @property
    def fields(self) -> tuple[Option, ...]:
        """The options that make up the config (config.json)."""
        return tuple(o for o in self.options if o.config)

    def defining(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.fields if o.defining)

    def config_class(self) -> type:
        return _config_class(self)

    def resolve(self, values: Mapping[str, Any] | None = None, config_file: pathlib.Path | str | None = None,
                context: Mapping[str, Any] | None = None) -> Any:
        """The config: defaults < preset < table row < `config_file` < `values` (None entries are left out).

        The preset is `values["preset"]`, else the file's, else the `preset` option's default. With a
        table whose family or derived defaults need `context` not given here, those options stay
        `None` (unless set) until `complete(cfg, context)`. Every option is validated once: those
        left for `complete` there."""
        fields = {o.name: o for o in self.fields}
        given = {k: v for k, v in (values or {}).items() if v is not None and k in fields}
        from_file = load_overrides(config_file)
        unknown = sorted(set(from_file) - set(fields))
        if unknown:
            raise UserError(f"config file '{config_file}': unknown option(s) {', '.join(unknown)}; "
                            f"valid: {', '.join(fields)}")
        merged: dict[str, Any] = {name: o.default for name, o in fields.items()}
        if self.presets:
            preset = given.get("preset", from_file.get("preset", fields["preset"].default))
            if preset not in self.presets:
                raise UserError(f"unknown --preset '{preset}'; valid choices: {', '.join(self.presets)}")
            merged.update(self.presets[preset])
        explicit = {name: _as_field(fields[name], value) for name, value in {**from_file, **given}.items()}
        merged.update(self._table_values({**merged, **explicit}, context))
        merged.update(explicit)
        return self._validated(self.config_class()(**merged), list(fields))

    def complete(self, cfg: Any, context: Mapping[str, Any]) -> Any:
        """`cfg` with the table's options still unset filled from the family and the derived defaults
        that `context` (facts known when the command runs) determines; those options validated."""
        values = dataclasses.asdict(cfg)
        filled = {k: v for k, v in self._table_values(values, context).items() if values[k] is None}
        return self._validated(dataclasses.replace(cfg, **filled), list(filled)) if filled else cfg

    def _table_values(self, values: Mapping[str, Any], context: Mapping[str, Any] | None) -> dict[str, Any]:
        """The table's row for the run's (preset, family) and the derived defaults, as far as they are known."""
        if self.table is None:
            return {}
        out: dict[str, Any] = {}
        family = self.table.family(values, context)
        if family is not None:
            out.update(self.table.row(values["preset"], family))
        if self.table.derive is not None:
            out.update(self.table.derive({**values, **{k: v for k, v in out.items() if values.get(k) is None}},
                                         context) or {})
        return {k: _as_field(self.option(k), v) for k, v in out.items()}

    def pending(self, cfg: Any) -> list[str]:
        """The table's options still unset in `cfg`: they wait for `complete`."""
        return [name for name in sorted(self.table.options() if self.table else ()) if getattr(cfg, name) is None]

    def _validated(self, cfg: Any, names: Sequence[str]) -> Any:
        """Checks the options `names` of `cfg` (an unset option of the table passes: `complete` checks
        it) and, once none is pending, the cross-option checks; returns `cfg`."""
        for name in names:
            self.option(name).check(getattr(cfg, name))
        if not self.pending(cfg):
            for check in self.checks:
                check(cfg)
        return cfg

    def from_json(self, data: Mapping[str, Any], source: str = "config.json") -> Any:
        """A config from its `config.json` form read from `source` (lists back to tuples): an unknown key
        or a value its option refuses is a one-line UserError saying the file is damaged."""
        fields = {o.name for o in self.fields}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "command"}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise UserError(f"'{source}' is damaged (unknown option(s) of {self.command}: {', '.join(unknown)}); "
                            f"{DAMAGED}")
        for name, value in values.items():
            option = self.option(name)
            if isinstance(option.choices, str):  # a registry name is checked where it is used (plug-ins import)
                option = dataclasses.replace(option, choices=())
            try:
                option.check(value)
            except UserError as e:
                raise UserError(f"'{source}' is damaged ({e}); {DAMAGED}") from None
        return self.config_class()(**values)


def _as_field(option: Option, value: Any) -> Any:
    """A value read from a file or a table as the option's type: lists as tuples (configs stay
    hashable), integers of a float option as floats."""
    if isinstance(value, list):
        return tuple(value)
    if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_CLASSES: dict[int, type] = {}


def _config_class(schema: Schema) -> type:
    """A frozen dataclass with one field per config option (cached per schema)."""
    key = id(schema)
    if key not in _CLASSES:
        fields = [(o.name, Any, dataclasses.field(default=o.default)) for o in schema.fields]
        name = "".join(part.capitalize() for part in schema.command.split("-")) + "Config"
        _CLASSES[key] = dataclasses.make_dataclass(name, fields, frozen=True)
    return _CLASSES[key]


def to_dict(cfg: Any) -> dict[str, Any]:
    """`cfg` as JSON values (tuples become lists), as config.json holds it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def differences(schema: Schema, old: Mapping[str, Any], new: Any) -> list[str]:
    """The defining options whose values differ between a stored config.json and `new`, as
    `--flag old -> new`."""
    mine = to_dict(new)
    return [f"{schema.option(n).flag} {_show(old.get(n))} -> {_show(mine[n])}"
            for n in schema.defining() if old.get(n, schema.option(n).default) != mine[n]]


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def load_overrides(path: pathlib.Path | str | None) -> dict[str, Any]:
    """Reads a JSON or TOML file of option values (a flat table of name: value)."""
    if path is None:
        return {}
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"config file '{path}' is a directory; give a JSON or TOML file")
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file '{path}' as text ({type(e).__name__}); give a JSON or TOML "
                        "file") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise UserError(f"cannot parse config file '{path}': {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a table of name: value")
    return data


def multiple_of(names: Sequence[str], base: str = "log_every") -> Callable[[Any], None]:
    """A check: every option in `names` (0 = off is allowed) is a multiple of `base`."""

    def check(cfg: Any) -> None:
        step = getattr(cfg, base)
        for name in names:
            value = getattr(cfg, name)
            if value and value % step:
                raise UserError(f"--{name.replace('_', '-')} ({value}) must be a multiple of "
                                f"--{base.replace('_', '-')} ({step})")

    return check

"""The CLI generated from the option schemas: every option defined once with a default shown in
--help, one spelling per concept across commands, JAX not started by --help, no import cycle."""

import ast
import pathlib
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from idiff_cli import config as cfglib
from idiff_cli.cli import COMMANDS, app

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "idiff_cli"


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS])
def test_help_shows_every_option_with_its_default(command):
    schema = next(s for name, s, _, _ in COMMANDS if name == command)
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for option in schema.options:
        shown = option.name.upper() if option.argument else option.flag
        assert shown in result.output, (command, shown)
        if not option.required:
            assert f"(default: {option.default_text()})" in " ".join(result.output.split()), (command, option.name)


def test_one_spelling_per_concept():
    """The shared concepts have one flag across commands, and the retired spellings are gone."""
    flags = {s for _, schema, _, _ in COMMANDS for o in schema.options for s in o.spellings}
    for retired in ("--eta", "--eta-schedule", "--lambda-kl", "--checkpoint-every", "--ckpt", "--resume"):
        assert retired not in flags
    for _, schema, _, _ in COMMANDS:
        names = {o.name for o in schema.options}
        assert "config" in names, schema.command
        if any(o.name in ("steps", "seeds", "n") for o in schema.options):
            assert "seed" in names, schema.command
        if schema.presets:
            assert "preset" in names


def test_long_commands_mark_their_cadences_run_time():
    for name in ("pretrain", "finetune", "langevin-reward", "ebm-train"):
        schema = next(s for n, s, _, _ in COMMANDS if n == name)
        fields = {o.name: o for o in schema.fields}
        assert not fields["steps"].defining and not fields["ckpt_every"].defining, name
        assert fields["seed"].defining, name


def test_help_does_not_start_jax():
    code = "import sys; from idiff_cli.cli import app; assert 'jax' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_package_has_no_import_cycle():
    """Module-level and function-local imports alike (Tarjan's strongly connected components)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        edges[name] = {t for t in targets if t in modules and t != name}
    cycles = _cycles(edges)
    assert not cycles, cycles


def _cycles(edges):
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_file_and_flags_override_the_preset(tmp_path):
    schema = cfglib.Schema("toy", "Toy.", (
        cfglib.preset_option({"small": "few steps", "big": "many"}, "small"),
        cfglib.Option("steps", int, 10, "Steps.", minimum=1),
        cfglib.Option("lr", float, 0.1, "Rate.", positive=True),
        cfglib.Option("T", int, (1,), "Inner steps.", many=True, minimum=1)),
        presets={"small": {}, "big": {"steps": 1000, "lr": 0.01}})
    file = tmp_path / "c.toml"
    file.write_text('lr = 0.5\nT = [1, 10]\n')
    cfg = schema.resolve({"preset": "big"}, file)
    assert (cfg.steps, cfg.lr, cfg.T) == (1000, 0.5, (1, 10))
    assert schema.resolve({"preset": "big", "lr": 2}, file).lr == 2.0
    with pytest.raises(cfglib.UserError, match="--T must be >= 1, got 1,0"):
        schema.resolve({"T": (1, 0)})
    with pytest.raises(cfglib.UserError, match="unknown --preset 'huge'; valid choices: small, big"):
        schema.resolve({"preset": "huge"})

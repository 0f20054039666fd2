"""The CLI generated from the option schemas: every option defined once with a default shown in
--help, one spelling per concept across commands, JAX not started by --help, no import cycle."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from idiff_cli import config as cfglib
from idiff_cli.cli import COMMANDS, app

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "idiff_cli"


def help_rows(output: str) -> dict[str, str]:
    """--help's option rows, {the flag or ARGUMENT that starts the row: the row's text, lines joined}; a
    row starts near the border, its continuation lines under the help column."""
    found, key = {}, None
    for line in output.splitlines():
        inner = line[1:].rstrip("│ ")
        if not line.startswith("│") or not inner.strip():
            continue
        if len(inner) - len(inner.lstrip()) <= 4:
            key = inner.split()[0].lstrip("*").split(",")[0] or inner.split()[1]
            found[key] = ""
        if key is not None:
            found[key] += " " + " ".join(inner.split())
    return found


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS])
def test_help_shows_every_option_with_the_default_a_run_gets(command):
    """Every option is in --help with "(default: …)"; where the default is a value, it is the value the
    resolved config holds when the option is not given."""
    schema = next(s for name, s, _, _ in COMMANDS if name == command)
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = help_rows(result.output)
    required = {o.name: o.choices[0] if isinstance(o.choices, tuple) and o.choices else ("mnist",) if o.many
                else "mnist" for o in schema.options if o.required}
    cfg = schema.resolve(required)
    for option in schema.options:
        shown = option.name.upper() if option.argument else option.spellings[0]
        assert shown in rows, (command, shown, sorted(rows))
        if option.required:
            continue
        match = re.search(r"\(default: (.*?)\)$", rows[shown].strip())
        assert match, (command, option.name, rows[shown])
        if option.config and option.default is not None:
            value = getattr(cfg, option.name)
            words = (("yes" if value else "no") if isinstance(value, bool) else
                     ",".join(map(str, value)) if isinstance(value, tuple) else str(value) or "none")
            assert match.group(1) == words, (command, option.name, match.group(1), value)


def test_the_help_of_a_table_option_gives_each_familys_default_and_a_run_gets_it():
    """pretrain's --steps and --lr, ebm-train's --optimizer: the help names each family's value, and a
    run of that family resolves to it."""
    for command, args, flag, words in (
            ("pretrain", ["--help"], "--steps", "by dataset family: digits: cpu 2400, paper 18000; natural: cpu 5000, "
                                                "paper 500000"),
            ("pretrain", ["--help"], "--lr", "by dataset family: digits: 0.001; natural: 0.0002"),
            ("ebm-train", ["--help"], "--optimizer", "wells: sgd; mlp: adam")):
        text = " ".join(CliRunner().invoke(app, [command, *args], env={"COLUMNS": "400"}).output.split())
        assert words in text, (command, flag, text[text.find(flag):][:300])
    pretrain = next(s for name, s, _, _ in COMMANDS if name == "pretrain")
    assert (pretrain.resolve({"dataset": "mnist"}).steps, pretrain.resolve({"dataset": "cifar10"}).lr) == (2400, 2e-4)
    assert pretrain.resolve({"dataset": "cifar10", "preset": "paper"}).steps == 500_000
    ebm = next(s for name, s, _, _ in COMMANDS if name == "ebm-train")
    assert (ebm.resolve({}).optimizer, ebm.resolve({"energy": "mlp"}).optimizer) == ("sgd", "adam")


def test_one_spelling_per_concept():
    """An option name has one flag in every command that takes it (aliases aside, e.g. langevin's
    --baseline), and a flag means one option; the retired spellings are gone."""
    spellings, names = {}, {}
    for _, schema, _, _ in COMMANDS:
        for o in schema.options:
            if not o.argument:  # a positional argument (pretrain's DATASET) is named by its place
                spellings.setdefault(o.name, set()).add(o.flag)
            for flag in o.spellings:
                names.setdefault(flag, set()).add(o.name)
    assert {n: s for n, s in spellings.items() if len(s) > 1} == {}
    assert {f: n for f, n in names.items() if len(n) > 1} == {}
    for retired in ("--eta", "--eta-schedule", "--lambda-kl", "--checkpoint-every", "--ckpt", "--resume"):
        assert retired not in names
    for _, schema, _, _ in COMMANDS:
        taken = {o.name for o in schema.options}
        assert "config" in taken, schema.command
        if taken & {"steps", "seeds", "n"}:
            assert "seed" in taken, schema.command


def test_long_commands_mark_their_cadences_run_time():
    for name in ("pretrain", "finetune", "langevin-reward", "ebm-train"):
        schema = next(s for n, s, _, _ in COMMANDS if n == name)
        fields = {o.name: o for o in schema.fields}
        assert not fields["steps"].defining and not fields["ckpt_every"].defining, name
        assert fields["seed"].defining, name


def test_help_does_not_start_jax():
    """`idiff COMMAND --help` for every command answers before JAX is imported."""
    code = ("import sys; from idiff_cli.cli import app, COMMANDS\n"
            "for name, *_ in COMMANDS:\n"
            "    try: app([name, '--help'])\n"
            "    except SystemExit as e: assert e.code == 0, (name, e.code)\n"
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))\n"
            "print('helped', len(COMMANDS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith(f"helped {len(COMMANDS)}"), out.stderr[-2000:]


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


def toy_table_schema():
    """`kind` picks the family (or, with kind "later", the context's); lr and steps depend on it."""
    table = cfglib.Table(family=lambda v, c: v["kind"] if v["kind"] != "later" else (c or {}).get("kind"),
                         what="kind", rows={("small", "a"): {"lr": 0.1, "steps": 16}, ("small", "b"): {"lr": 0.2, "steps": 32},
                                            ("big", "a"): {"lr": 0.01, "steps": 1024}, ("big", "b"): {"lr": 0.02, "steps": 2048}})
    return cfglib.Schema("toy", "Toy.", (
        cfglib.preset_option({"small": "few steps", "big": "many"}, "small"),
        cfglib.Option("kind", str, "a", "Family.", choices=("a", "b", "later")),
        cfglib.Option("steps", int, None, "Steps.", minimum=1),
        cfglib.Option("lr", float, None, "Rate.", positive=True),
        cfglib.Option("batch", int, 8, "Batch.", minimum=1)),
        presets={"big": {"batch": 64}}, table=table, checks=(cfglib.multiple_of(["steps"], "batch"),))


def test_one_precedence_defaults_preset_table_file_flags(tmp_path):
    schema = toy_table_schema()
    assert "(default: by kind: a: small 0.1, big 0.01; b: small 0.2, big 0.02)" in " ".join(
        f"(default: {o.default_text()})" for o in schema.options)
    assert (schema.resolve({}).lr, schema.resolve({"kind": "b"}).lr) == (0.1, 0.2)  # the family follows the flag
    big = schema.resolve({"preset": "big", "kind": "b"})
    assert (big.batch, big.steps, big.lr) == (64, 2048, 0.02)
    file = tmp_path / "c.toml"
    file.write_text('kind = "b"\nlr = 0.5\n')
    cfg = schema.resolve({}, file)  # the file's kind picks the row; its lr wins over the row's
    assert (cfg.steps, cfg.lr) == (32, 0.5)
    assert schema.resolve({"lr": 3}, file).lr == 3.0


def test_a_family_known_only_when_the_command_runs_is_completed_with_the_same_precedence():
    schema = toy_table_schema()
    pending = schema.resolve({"kind": "later", "lr": 0.7})
    assert (pending.steps, pending.lr) == (None, 0.7) and schema.pending(pending) == ["steps"]
    done = schema.complete(pending, {"kind": "b"})
    assert (done.steps, done.lr) == (32, 0.7) and schema.pending(done) == []
    with pytest.raises(cfglib.UserError, match="--steps .32. must be a multiple of --batch .24."):
        schema.complete(schema.resolve({"kind": "later", "batch": 24}), {"kind": "b"})
    with pytest.raises(cfglib.UserError, match="no defaults for --preset small and the kind 'c'"):
        schema.complete(pending, {"kind": "c"})

"""Where an XLA:CPU program spends its time: the thunk events of a `jax.profiler` trace (perfetto JSON,
`create_perfetto_trace=True`), each matched by name to its instruction in the compiled program's HLO
text and grouped into parts of a U-Net step (`part`). A device runs its thunks mostly one after
another, each on the intra-op threads, so on one device they add up to about the wall time; with
several devices the figures are summed over the devices.

Used by `peer_torch.py --profile DIR`.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

CONTROL = {"while", "call", "conditional"}  # thunks that contain other thunks: their time is their children's

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")


class Instruction:
    def __init__(self, name: str, shape: str, opcode: str, line: str):
        self.name, self.shape, self.opcode, self.line = name, shape, opcode, line
        match = re.search(r'op_name="([^"]*)"', line)
        self.op_name = match.group(1) if match else ""
        match = re.search(r"calls=%?([\w.\-]+)", line)
        self.calls = match.group(1) if match else None


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[Instruction]]]:
    """(instructions by name, the instructions of each computation) of an HLO module's text."""
    instructions: dict[str, Instruction] = {}
    computations: dict[str, list[Instruction]] = collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        rest = line[match.end():]
        if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
            depth = 0
            for i, c in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(c, 0)
                if depth == 0:
                    break
            shape, rest = rest[:i + 1], rest[i + 2:]
        else:
            shape, _, rest = rest.partition(" ")
        instruction = Instruction(match.group(1), shape, rest.split("(", 1)[0], line)
        instructions[instruction.name] = instruction
        computations[current].append(instruction)
    return instructions, computations


def _dims(shape: str) -> list[int]:
    match = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def part(instruction: Instruction, computations: dict[str, list[Instruction]]) -> str:
    """The part of a U-Net step an instruction belongs to. Convolutions (also inside a fusion) are split
    by what they compute: a weight gradient has a kernel's shape (two dimensions of 1 or 3, the
    spatial ones), an activation has a feature map's; an activation made inside a transposed
    (backward) function is an input gradient."""
    inner = computations.get(instruction.calls, []) if instruction.calls else []
    convs = [i for i in [instruction, *inner] if i.opcode == "convolution"]
    if convs:
        dims = _dims(convs[0].shape)
        if sum(d in (1, 3) for d in dims) >= 2 and len(dims) == 4 and min(dims) <= 3:
            return "convolutions, ∂w"
        backward = any(s in convs[0].op_name for s in ("transpose(", "bwd"))
        return "convolutions, ∂x" if backward else "convolutions, forward"
    if instruction.opcode.startswith("all-reduce"):  # its time includes waiting for the other devices
        return "all-reduce"
    op_name = instruction.op_name or next((i.op_name for i in inner if i.op_name), "")
    scope = op_name.split("/")
    if instruction.name.startswith(("transpose", "copy")) or instruction.opcode in ("transpose", "copy"):
        return "transposes and copies"
    if any("GroupNorm" in s for s in scope):
        return "GroupNorm"
    if "jit(silu)" in scope:
        return "SiLU"
    if any(s.startswith(("AttnBlock", "Dense")) for s in scope):
        return "attention, dense layers"
    if scope[-1] in ("concatenate", "split"):
        return "skip concatenations"
    return "everything else"


def parts(trace: pathlib.Path, hlo: str, runs: int) -> list[list]:
    """[[part, ms per run, share], ...], largest first, from a perfetto trace and the program's HLO."""
    instructions, computations = parse_hlo(hlo)
    data = json.load(gzip.open(trace))
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: dict[str, float] = collections.defaultdict(float)
    for event in events:
        instruction = instructions.get(event.get("name", ""))
        if event.get("ph") != "X" or instruction is None or instruction.opcode in CONTROL:
            continue
        total[part(instruction, computations)] += event["dur"] / 1e3 / runs
    whole = sum(total.values()) or 1.0
    return [[name, ms, ms / whole] for name, ms in sorted(total.items(), key=lambda kv: -kv[1])]

"""What a compiled XLA module does, read from its text: per-instruction bytes and FLOPs,
collectives, custom calls, and where in the model each instruction comes from.

The compiled module (`jax.stages.Compiled.as_text()`) is the program after XLA's
optimisations: fusions, the layouts the backend chose and, on a TPU, the tiles that
pad each array in memory (`bf16[4,49,49]{2,1,0:T(8,128)(2,1)}` is stored in 8 x 128
tiles, so its minor dimension of 49 takes 128 slots). XLA's `cost_analysis()` gives
the module's totals only; the per-instruction figures here come from the shapes:

- bytes: a top-level instruction reads its operands and writes its output, each
  counted at its padded size (the sum over the module tracks XLA's "bytes accessed");
- FLOPs: 2 x output elements x contraction length of every dot and convolution, in a
  fusion's computation too, and of cuBLAS / cuDNN calls on a GPU.

Each instruction's `op_name` metadata (JAX writes the module path and the primitive,
e.g. `jit(f)/transpose(jvp(HyperIQA))/backbone/layers_2/blocks_5/attn/qkv/dot_general`)
says where it comes from: `Origin` splits it into the pass (forward or backward), the
model location and the primitive.
"""

import dataclasses
import math
import re
from collections.abc import Iterator

import numpy as np

BYTES_PER_ELEMENT = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}

# Instructions that move no data of their own (aliases, bookkeeping, the second half of
# an asynchronous pair whose first half is counted).
NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier",
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")

ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array shape as printed: element type, dimensions and (optionally) its layout."""

    dtype: str
    dims: tuple[int, ...]
    minor_to_major: tuple[int, ...] | None = None
    tiles: tuple[tuple[int, ...], ...] = ()
    memory_space: int = 0

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> int:
        """Bytes as the layout stores them: the minor dimensions padded to the first tile."""
        size = BYTES_PER_ELEMENT.get(self.dtype, 4)
        if not self.tiles:
            return self.elements * size
        order = self.minor_to_major if self.minor_to_major is not None else tuple(
            reversed(range(len(self.dims))))
        physical = [self.dims[d] for d in reversed(order)] or [1]  # major to minor
        tile = self.tiles[0]
        physical = [1] * max(0, len(tile) - len(physical)) + physical
        for i, t in enumerate(tile, start=len(physical) - len(tile)):
            physical[i] = -(-physical[i] // t) * t
        return math.prod(physical) * size


def _layout(text: str | None):
    """(minor_to_major, first tile, memory space) of a printed layout `{1,0:T(8,128)(2,1)S(1)}`.

    Only the first tile pads the array; the ones after it (e.g. `(2,1)`) tile inside it.
    """
    if not text:
        return None, (), 0
    order, _, rest = text.partition(":")
    minor_to_major = tuple(int(x) for x in order.split(",") if x.strip())
    tile = re.search(r"T\(([0-9,]*)\)", rest)
    tiles = (tuple(int(v) for v in tile.group(1).split(",") if v),) if tile else ()
    space = re.search(r"S\((\d+)\)", rest)
    return minor_to_major, tiles, int(space.group(1)) if space else 0


def parse_shape(text: str) -> list[Array]:
    """The arrays of a printed shape (one, or the leaves of a tuple)."""
    arrays = []
    for dtype, dims, layout in ARRAY.findall(re.sub(r"/\*.*?\*/", "", text)):
        if dtype not in BYTES_PER_ELEMENT:
            continue  # tokens
        minor_to_major, tiles, space = _layout(layout)
        arrays.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d),
                            minor_to_major, tiles, space))
    return arrays


@dataclasses.dataclass
class Instruction:
    name: str
    shape: list[Array]
    opcode: str
    operands: list[str]
    arguments: str  # the text between the opcode's parentheses
    attributes: str
    calls: list[str]

    @property
    def output_bytes(self) -> int:
        return sum(a.bytes for a in self.shape)

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.attributes)
        return match.group(1) if match else ""

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"(?:^|[ ,]){re.escape(key)}=([^ ,]+)", self.attributes)
        return match.group(1) if match else None


@dataclasses.dataclass
class Module:
    """The computations of an HLO module, by name; `entry` names the top-level one."""

    computations: dict[str, list[Instruction]]
    entry: str

    def top_level(self) -> list[Instruction]:
        return self.computations[self.entry]

    def called(self, instruction: Instruction) -> Iterator[Instruction]:
        """Every instruction in the computations `instruction` calls, recursively."""
        for name in instruction.calls:
            for inner in self.computations.get(name, ()):
                yield inner
                yield from self.called(inner)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group that opens at text[start]."""
    depth = 0
    pairs = {"(": ")", "[": "]", "{": "}"}
    closing = set(pairs.values())
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            depth += 1
        elif c in closing:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*")
HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")


def _parse_instruction(line: str) -> Instruction | None:
    match = INSTRUCTION.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode_match = re.match(r"([a-z][a-z0-9\-_.$]*)\(", rest)
    if not opcode_match:
        return None
    opcode = opcode_match.group(1)
    args_end = _balanced(rest, len(opcode))
    arguments = rest[len(opcode) + 1:args_end - 1]
    operands = re.findall(r"%([^\s,)]+)", arguments)
    attributes = rest[args_end:]
    calls = re.findall(r"(?:calls|to_apply|body|condition|branch_computations|"
                       r"called_computations)=\{?%?([^\s,}]+)", attributes)
    calls += [c for group in re.findall(r"(?:branch_computations|called_computations|calls)="
                                        r"\{([^}]*)\}", attributes)
              for c in re.findall(r"%?([^\s,]+)", group)]
    return Instruction(match.group(1), parse_shape(shape), opcode, operands, arguments, attributes,
                       sorted(set(c.lstrip("%") for c in calls)))


def parse_module(text: str) -> Module:
    """The computations of a module's text (`Compiled.as_text()`)."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        header = HEADER.match(line)
        if header and current is None:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the module text")
    return Module(computations, entry)


# ----------------------------------------------------------------------------
# FLOPs of dots and convolutions.


def _contracted(labels: str, dims: tuple[int, ...], keep: str) -> int:
    return math.prod(d for label, d in zip(labels, dims) if label in keep)


def _taps_per_dimension(size: int, window: int, stride: int, low: int, lhs_dilation: int,
                        rhs_dilation: int, outputs: int) -> int:
    """Sum over the output positions of the window taps that land on input values.

    Taps on padding, or between the values of a dilated input, multiply nothing; XLA
    writes batched products as convolutions over a dilated "window" of the batch, in
    which only one tap of hundreds meets a value.
    """
    last = (size - 1) * lhs_dilation
    positions = np.arange(outputs) * stride - low
    taps = 0
    for t in range(window):
        p = positions + t * rhs_dilation
        taps += int(np.count_nonzero((p >= 0) & (p <= last) & (p % lhs_dilation == 0)))
    return taps


# The operands and result of a cuDNN convolution call, as (input, kernel, output) of the
# forward convolution its dim_labels and window describe.
CUDNN_ROLES = {"convBackwardInput": ("result", 1, 0), "convBackwardFilter": (0, "result", 1)}


def convolution_flops(instruction: Instruction, shapes: dict[str, list[Array]]) -> int:
    """2 x MACs: per output batch and feature, the taps that meet input x input features."""
    labels = instruction.attribute("dim_labels")
    if not labels or len(instruction.operands) < 2 or not instruction.shape:
        return 0
    target = (instruction.attribute("custom_call_target") or "").strip('"').rpartition("$")[2]
    roles = CUDNN_ROLES.get(target, (0, 1, "result"))
    x, w, y = (instruction.shape[0] if r == "result" else
               (shapes.get(instruction.operands[r]) or [None])[0] for r in roles)
    if x is None or w is None or y is None:
        return 0
    lhs_labels, rest = labels.split("_", 1)
    kernel_labels, out_labels = rest.split("->")
    spatial = sorted(c for c in out_labels if c.isdigit())
    fields = {}
    window = re.search(r"window=\{([^}]*)\}", instruction.attributes)
    if window:
        fields = dict(re.findall(r"(\w+)=([^ ]+)", window.group(1)))

    def per_dim(key, default):
        values = [v for v in fields.get(key, "").split("x") if v]
        return values + [default] * (len(spatial) - len(values))

    sizes = [int(v) for v in per_dim("size", "1")]
    strides = [int(v) for v in per_dim("stride", "1")]
    lows = [int(v.split("_")[0]) for v in per_dim("pad", "0_0")]
    lhs_dilations = [int(v) for v in per_dim("lhs_dilate", "1")]
    rhs_dilations = [int(v) for v in per_dim("rhs_dilate", "1")]
    taps = 1
    for k, digit in enumerate(spatial):
        taps *= _taps_per_dimension(
            x.dims[lhs_labels.index(digit)], sizes[k], strides[k], lows[k],
            lhs_dilations[k], rhs_dilations[k], y.dims[out_labels.index(digit)])
    rows = y.dims[out_labels.index("b")] * y.dims[out_labels.index("f")]
    return 2 * rows * taps * w.dims[kernel_labels.index("i")]


def dot_flops(instruction: Instruction, shapes: dict[str, list[Array]]) -> int:
    """2 x output elements x the product of the left operand's contracting dimensions."""
    lhs = shapes.get(instruction.operands[0]) if instruction.operands else None
    if not lhs:
        return 0
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.attributes)
    if not contracting:  # cuBLAS calls carry them in the backend config
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]',
                                instruction.attributes)
    axes = [int(a.strip('" ')) for a in contracting.group(1).split(",")] if contracting else []
    length = math.prod(lhs[0].dims[a] for a in axes if a < len(lhs[0].dims))
    output = instruction.shape[0].elements if instruction.shape else 0
    return 2 * output * length


def instruction_flops(instruction: Instruction, shapes: dict[str, list[Array]]) -> int:
    if instruction.opcode == "convolution":
        return convolution_flops(instruction, shapes)
    if instruction.opcode == "dot":
        return dot_flops(instruction, shapes)
    if instruction.opcode == "custom-call":
        target = instruction.attribute("custom_call_target") or ""
        if "cublas" in target:
            return dot_flops(instruction, shapes)
        if "cudnn$conv" in target:
            return convolution_flops(instruction, shapes)
    return 0


# ----------------------------------------------------------------------------
# Where an instruction comes from.


@dataclasses.dataclass(frozen=True)
class Origin:
    """An op_name split into pass ("forward", "backward" or "update"), location, primitive."""

    direction: str
    location: str
    primitive: str

    @property
    def stage(self) -> str:
        match = re.search(r"layers_(\d+)", self.location)
        if match:
            return f"stage {match.group(1)}"
        for part in ("patch_embed", "backbone", "lda", "attention", "hyper", "target"):
            if part in self.location.split("/"):
                return part
        return self.location or "step"

    @property
    def op(self) -> str:
        """The location without the stage and block indices: the same op in every block."""
        op = re.sub(r"(^|/)(backbone/)?layers_\d+(/blocks_\d+)?", r"\1", self.location)
        return op.strip("/") or self.location


# Path components JAX adds that are not model modules.
_WRAPPERS = re.compile(r"^(jit|jvp|transpose|vmap|pjit|checkpoint|remat|cond|branch_\d+_fun|"
                       r"rematted_computation|custom_jvp_call|custom_vjp_call|while|body|"
                       r"shard_map|named_call)\b")


def origin(op_name: str) -> Origin:
    """Origin of an op_name such as `jit(f)/transpose(jvp(HyperIQA))/backbone/.../dot_general`."""
    if not op_name:
        return Origin("update", "", "")
    direction = "backward" if "transpose(" in op_name else (
        "forward" if "jvp(" in op_name else "update")
    parts = [p for p in op_name.split("/") if p and not _WRAPPERS.match(p)
             and not p.startswith(("HyperIQA", "vmap("))]
    parts = [p for p in parts if not re.match(r"^[A-Za-z]+\(", p)]
    if not parts:
        return Origin(direction, "", "")
    return Origin(direction, "/".join(parts[:-1]), parts[-1])


# ----------------------------------------------------------------------------
# Per-instruction costs, and module summaries.


@dataclasses.dataclass
class Cost:
    """One top-level instruction: its bytes moved and FLOPs, and where it comes from."""

    name: str
    opcode: str
    bytes: int
    flops: int
    origin: Origin
    detail: str  # fusion kind, custom-call target, or the output shape


def _moves_data(instruction: Instruction) -> bool:
    # An asynchronous pair moves its data once, at its start.
    return instruction.opcode not in NO_TRAFFIC and not instruction.opcode.endswith("-done")


def _operand_bytes(module: Module, instruction: Instruction, index: int,
                   shapes: dict[str, list[Array]]) -> int:
    """Bytes of operand `index` that `instruction` reads.

    All of it, unless a fusion only slices it: then the slices (as XLA's cost analysis
    counts a fusion's operands).
    """
    full = sum(a.bytes for a in shapes.get(instruction.operands[index], ()))
    if instruction.opcode != "fusion" or len(instruction.calls) != 1:
        return full
    body = module.computations.get(instruction.calls[0], [])
    parameter = next((i for i in body if i.opcode == "parameter"
                      and i.arguments.strip() == str(index)), None)
    if parameter is None:
        return full
    users = [i for i in body if parameter.name in i.operands]
    if users and all(u.opcode in ("slice", "dynamic-slice", "gather") for u in users):
        return min(full, sum(u.output_bytes for u in users))
    return full


def _async_copy_bytes(instruction: Instruction, shapes: dict[str, list[Array]]) -> int:
    """An asynchronous copy or slice reads and writes its destination's size.

    Its output tuple holds the source, the destination and a context scalar.
    """
    source = shapes.get(instruction.operands[0], [None])[0] if instruction.operands else None
    arrays = [a for a in instruction.shape if a.dims]
    destination = next((a for a in arrays if a != source), arrays[0] if arrays else None)
    return 2 * destination.bytes if destination else 0


def _op_name(instruction: Instruction, producers: dict[str, Instruction]) -> str:
    """The instruction's op_name or, for one XLA added (a copy between memory spaces, a
    layout change), that of the value it moves."""
    for _ in range(16):
        if instruction.op_name or not instruction.operands:
            return instruction.op_name
        instruction = producers.get(instruction.operands[0], instruction)
    return instruction.op_name


def costs(module: Module) -> list[Cost]:
    """The cost of every top-level instruction that moves data or computes."""
    shapes = {i.name: i.shape for comp in module.computations.values() for i in comp}
    producers = {i.name: i for i in module.top_level()}
    result = []
    for instruction in module.top_level():
        if not _moves_data(instruction):
            continue
        kind = instruction.opcode.removesuffix("-start")
        if instruction.opcode.endswith("-start") and kind not in COLLECTIVES:
            moved = _async_copy_bytes(instruction, shapes)
        else:
            moved = instruction.output_bytes + sum(
                _operand_bytes(module, instruction, k, shapes)
                for k in range(len(instruction.operands)))
        flops = instruction_flops(instruction, shapes) + sum(
            instruction_flops(inner, shapes) for inner in module.called(instruction))
        if instruction.opcode == "fusion":
            detail = instruction.attribute("kind") or "fusion"
        elif instruction.opcode == "custom-call":
            detail = (instruction.attribute("custom_call_target") or "").strip('"')
        else:
            detail = ",".join(f"{a.dtype}{list(a.dims)}" for a in instruction.shape[:2])
        result.append(Cost(instruction.name, instruction.opcode, moved, flops,
                           origin(_op_name(instruction, producers)), detail))
    return result


def _group_size(replica_groups: str) -> int | None:
    """Devices per group of a printed replica_groups attribute (three spellings)."""
    mesh = re.match(r"mesh\[([^\]]*)\]\s*(\{([^}]*)\})?", replica_groups)
    if mesh:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        named = re.findall(r"'([^']+)'", mesh.group(3) or "") or list(sizes)
        return math.prod(sizes[n] for n in named if n in sizes)
    iota = re.match(r"\[(\d+),(\d+)\]<=", replica_groups)
    if iota:
        return int(iota.group(2))
    groups = re.match(r"\{\{([0-9,]*)\}", replica_groups)
    if groups:
        return len([g for g in groups.group(1).split(",") if g])
    return None


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: int
    group_size: int | None
    dtypes: tuple[str, ...]


def collectives(module: Module) -> list[Collective]:
    """Every collective of the module (an asynchronous pair counted once, at its start)."""
    found = []
    for comp in module.computations.values():
        for instruction in comp:
            kind = instruction.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or instruction.opcode.endswith("-done"):
                continue
            groups = re.search(r"replica_groups=(mesh\[[^\]]*\]\s*(?:\{[^}]*\})?|"
                               r"\[[^\]]*\]<=\[[^\]]*\]|\{\{[^ ]*\}\})", instruction.attributes)
            arrays = instruction.shape
            if instruction.opcode.endswith("-start") and kind != "all-reduce" and len(arrays) > 1:
                arrays = arrays[len(arrays) // 2:]  # (operands, outputs) of an async start
            found.append(Collective(kind, sum(a.elements * BYTES_PER_ELEMENT.get(a.dtype, 4)
                                              for a in arrays),
                                    _group_size(groups.group(1)) if groups else None,
                                    tuple(sorted({a.dtype for a in arrays}))))
    return found


def custom_calls(module: Module) -> dict[str, int]:
    """Custom calls by target, e.g. {'__cublas$lt$matmul': 466, ...}."""
    counts: dict[str, int] = {}
    for comp in module.computations.values():
        for instruction in comp:
            if instruction.opcode == "custom-call":
                target = (instruction.attribute("custom_call_target") or "?").strip('"')
                counts[target] = counts.get(target, 0) + 1
    return dict(sorted(counts.items()))


def opcode_counts(module: Module, opcodes: tuple[str, ...]) -> dict[str, int]:
    """How many instructions of each of `opcodes` the whole module holds."""
    counts = dict.fromkeys(opcodes, 0)
    for comp in module.computations.values():
        for instruction in comp:
            if instruction.opcode in counts:
                counts[instruction.opcode] += 1
    return counts


def host_transfers(module: Module) -> int:
    """Host callbacks, sends and receives: what makes a device wait for the host."""
    count = 0
    for comp in module.computations.values():
        for instruction in comp:
            target = instruction.attribute("custom_call_target") or ""
            if instruction.opcode in ("send", "recv", "infeed", "outfeed") or (
                    instruction.opcode == "custom-call" and "callback" in target.lower()):
                count += 1
    return count

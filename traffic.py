"""What crosses between chips in a compiled program: every collective of its HLO text with the bytes one device
sends, loop bodies weighted by their trip counts (XLA's windowed matmuls, scan_layers), summed by kind and dtype;
and FSDP's minimum for a run, to hold them against.

A module of its own because it reads XLA's compiled HLO text, which aot.py hands it: no jax, no compiling.

Bytes per device for a collective over a group of n devices whose result holds R bytes: an all-gather R (n - 1) / n
(its result is the gathered array), a reduce-scatter R (n - 1) (its result is one shard), an all-reduce
2 R (n - 1) / n (a reduce-scatter and an all-gather), an all-to-all R (n - 1) / n, a collective-permute R.
"""
import re
from collections import defaultdict
from dataclasses import dataclass, field

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")
CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclass
class Traffic:
    """Bytes one device sends per run of a program (or of a step: `scaled` and `+`), by (kind, dtype); `counts` the
    collective instructions executed; `notes` what was assumed (a loop of unknown trip count counted once, both
    branches of a conditional counted)."""
    bytes: dict = field(default_factory=lambda: defaultdict(float))
    counts: dict = field(default_factory=lambda: defaultdict(float))
    notes: set = field(default_factory=set)

    @property
    def total(self) -> float:
        return sum(self.bytes.values())

    def scaled(self, k: float) -> "Traffic":
        out = Traffic(notes=set(self.notes))
        for key in self.bytes:
            out.bytes[key], out.counts[key] = self.bytes[key] * k, self.counts[key] * k
        return out

    def __add__(self, other: "Traffic") -> "Traffic":
        out = self.scaled(1)
        for key in other.bytes:
            out.bytes[key] += other.bytes[key]
            out.counts[key] += other.counts[key]
        out.notes |= other.notes
        return out

    def of(self, kind: str, dtype: str | None = None) -> float:
        return sum(v for (k, d), v in self.bytes.items() if k == kind and dtype in (None, d))

    def lines(self) -> list[str]:
        """One entry per (kind, dtype), largest first: `all-gather bf16 1.23 GiB (180 ops)`."""
        return [f"{k} {d} {v / 2 ** 30:.3f} GiB ({self.counts[(k, d)]:.0f} ops)"
                for (k, d), v in sorted(self.bytes.items(), key=lambda kv: -kv[1])]


def _computations(text: str) -> dict[str, list[str]]:
    """{name: its instruction lines} in text order (a computation's callees come before it; ENTRY is `ENTRY`)."""
    out, name = {}, None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            name = "ENTRY" if m.group(1) else m.group(2)
            out[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            out[name].append(line)
    return out


def _trip_count(attrs: str, computations: dict) -> int | None:
    """A while loop's trip count: XLA's known_trip_count, else its condition's `i < N` with one constant N."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", attrs)
    lines = computations.get(cond.group(1), []) if cond else []
    consts = [int(c) for line in lines for c in re.findall(r"\bconstant\((\d+)\)", line)]
    if len(consts) == 1 and any("direction=LT" in line for line in lines):
        return consts[0]
    return None


def _multiplicities(computations: dict) -> tuple[dict[str, float], set]:
    """How many times each computation runs per run of ENTRY."""
    mult, notes = defaultdict(float), set()
    mult["ENTRY"] = 1.0
    for name in reversed(list(computations)):  # callers before their callees
        if not mult[name]:
            continue
        for line in computations[name]:
            m = INSTRUCTION.match(line)
            if not m:
                continue
            op, attrs = m.group(3), m.group(4)
            trips = 1
            if op == "while":
                trips = _trip_count(attrs, computations)
                if trips is None:
                    notes.add("a loop of unknown trip count counted once")
                    trips = 1
            for kind, callee in CALLED.findall(attrs):
                mult[callee] += mult[name] * (trips if kind in ("body", "condition") else 1)
            for group in BRANCHES.findall(attrs):
                notes.add("both branches of a conditional counted")
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    mult[callee] += mult[name]
    return mult, notes


def group_size(attrs: str, n_devices: int) -> int:
    """The devices in one group of a collective's replica_groups (its three printed forms)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= sizes[axis]
        return n
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    return n_devices  # replica_groups={}: every device


def _arrays(type_text: str) -> list[tuple[str, int]]:
    """(dtype, bytes) of each array in an HLO type (a tuple's too)."""
    out = []
    for dtype, dims in ARRAY.findall(type_text):
        if dtype in BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out.append((dtype, n * BYTES[dtype]))
    return out


def count(text: str, n_devices: int) -> Traffic:
    """The collectives of one compiled program's HLO text, per device and run. An asynchronous one is counted at its
    `-done` (its result is the collective's) with the group of its `-start`; copies of one channel, once."""
    computations = _computations(text)
    mult, notes = _multiplicities(computations)
    starts, scattered = {}, set()
    for lines in computations.values():
        for line in lines:
            m = INSTRUCTION.match(line)
            if m and m.group(3).endswith("-start"):
                starts[m.group(1)] = m.group(4)
            # XLA:TPU's reduce-scatter: a fusion whose all-reduce is sliced to this device's shard (its root)
            root = re.match(r"\s*ROOT %?[\w.\-]+ = .*? dynamic-slice\(%?([\w.\-]+)", line)
            if root:
                scattered.add(root.group(1))
    found = {}  # channel (or instruction) -> ((is a piece, runs), instruction, its group's attributes)
    for name, lines in computations.items():
        runs = mult.get(name, 0.0)
        for line in lines if runs else ():
            m = INSTRUCTION.match(line)
            if not m or m.group(3).removesuffix("-done") not in KINDS or m.group(3).endswith("-start"):
                continue
            attrs = m.group(4)
            if m.group(3).endswith("-done"):
                start = re.match(r"%?([\w.\-]+)", attrs)
                attrs = starts.get(start.group(1), "") if start else ""
            channel = re.search(r"channel_id=(\d+)", attrs)
            shape = re.sub(r"\{[^}]*\}", "", m.group(2))  # a channel id can be reused by another collective (GPU)
            key = (channel.group(1), m.group(3), shape) if channel else (name, m.group(1))
            # XLA:TPU's async collective fusions copy one collective into the fusions that carry it forward
            # piece by piece (flag_start >= 0), inside loops too: the collective is its copy outside them
            rank = (bool(re.search(r'"async_collective_fusion_config":\{"flag_start":"\d', m.group(4))), runs)
            if key not in found or rank < found[key][0]:
                found[key] = (rank, m, attrs)
    out = Traffic(notes=notes)
    for (_, runs), m, attrs in found.values():
        kind = m.group(3).removesuffix("-done")
        n = group_size(attrs, n_devices)
        share = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
                 "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]
        if kind == "all-reduce" and m.group(1) in scattered:  # counted as the reduce-scatter it runs as
            kind, share = "reduce-scatter", (n - 1) / n  # of the whole array, the all-reduce's result
        if n <= 1 and kind != "collective-permute":
            continue
        for dtype, size in _arrays(m.group(2)):
            out.bytes[(kind, dtype)] += runs * size * share
            out.counts[(kind, dtype)] += runs
    return out


def fsdp_minimum(split_params: int, mesh: dict, micro_batches: int, compute_bytes: int) -> float:
    """Bytes per device and step that FSDP needs at least for `split_params` parameters split over mesh["fsdp"]:
    each gathered in the compute dtype for the forward and once more for the backward, and its float32 gradient
    reduce-scattered once, per micro-batch; over a data axis as well, each gradient shard all-reduced once."""
    P, f, d = split_params, mesh.get("fsdp", 1), mesh.get("data", 1)
    return micro_batches * (2 * compute_bytes * P + 4 * P) * (f - 1) / f + 2 * 4 * P / f * (d - 1) / d


def summary(t: Traffic, minimum: float) -> dict:
    """What aot's report prints: the total against FSDP's minimum, the kinds, what was assumed, and the bytes of
    bfloat16 reductions (gradients summed in bfloat16)."""
    return dict(total=t.total, minimum=minimum, kinds=t.lines(), notes=sorted(t.notes),
                bf16_reductions=t.of("reduce-scatter", "bf16") + t.of("all-reduce", "bf16"))


"""What a train step costs, by XLA's own accounting: its FLOPs (cost analysis of the lowered
step), the bytes each kind of collective moves (the compiled HLO), and the largest size that
fits a budget.

- FLOPs: XLA's cost analysis counts a loop's body once, so a scanned tower's blocks would
  count once; `step_flops` counts the step lowered with the towers unrolled (`unrolled`),
  for one local device (all devices' work together). With `model_flops` it is what MFU
  counts: no recomputed forward passes (no remat) and the plain model code.
- Collectives (`collective_bytes`): for each kind (all-gather, reduce-scatter, all-reduce,
  collective-permute, all-to-all), how many run per step and the bytes they carry per device,
  summed from the compiled HLO text, an op in a loop counted once per iteration; against
  `minimum_collective_bytes`, what the mesh and sharding rules imply.
- `search_largest`: the largest multiple of a unit that fits, by doubling and bisection,
  guided by measured memory (`memory_guess`) when given.

Used by `python -m clip_jax.aot` (clip_jax/pod.py), `python -m clip_jax.summary` and the
benchmark's train and loss modes.
"""
import math
import re

import jax
import ml_collections

from clip_jax import config_lib, losses, sharding, train
from clip_jax.models.layers import remat_policy

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


# ------------------------------------------------------------------ FLOPs

def unrolled(model_cfg):
    """`model_cfg` with its towers unrolled: XLA's cost analysis counts the body of a loop
    once, so the FLOPs of a scanned tower (`scan_layers`) are counted on this copy (the
    same computation)."""
    model_cfg = model_cfg.copy_and_resolve_references()
    with model_cfg.unlocked():
        model_cfg.scan_layers = False
    return model_cfg


def step_flops(config, model_flops=False, ops=None):
    """XLA's FLOP count of one whole train step of `config` (all devices together): the step
    lowered, not compiled, for one local device with the towers unrolled and in one batch.
    `ops` overrides `config.kernels.ops` (e.g. 'xla' to count what a TPU runs). With
    `model_flops`, the model's FLOPs as MFU counts them: no recomputed forward passes (no
    remat, no micro-batches) and the plain model code (no CPU kernel's products over zero
    padding).

    XLA counts a loop's body once, so the micro-batches' loops (`micro_batches = K > 1`)
    are not lowered: the step is counted as one batch, and the gradient cache's extra pass
    (the K micro-batches' embeddings, no gradients) is added as one forward pass of the
    model, taken as a third of the model's step (a backward pass costs two forwards)."""
    config = config.copy_and_resolve_references()
    micro_batches = int(config.micro_batches)
    with config.unlocked():
        config.model = unrolled(config.model)
        config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1))
        config.micro_batches = 1
        if ops is not None:
            config.kernels.ops = ops
        if model_flops:
            config.kernels.ops = "xla"
            config_lib.set_remat(config.model, "none")
    run = train.build(config, jax.local_devices()[:1])
    with run.context():
        lowered = run.train_step.lower(run.abstract_state, run.abstract_batch())
    flops = float(xla_cost(lowered).get("flops", 0.0))
    if micro_batches > 1 and not model_flops:
        flops += step_flops(config, model_flops=True) / 3
    return flops


def xla_cost(lowered):
    """XLA's cost analysis (a dict: 'flops', ...) of a lowered or compiled program; {} when
    XLA gives none (the GPU compiler's, without a device, raises)."""
    try:
        cost = lowered.cost_analysis()
    except Exception:   # noqa: BLE001   (jax raises JaxRuntimeError: "not supported")
        return {}
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


# ------------------------------------------------------------------ collectives (the compiled HLO)

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|true_computation|"
                    r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)")
_REDUCE_SCATTER_FUSION = "all-reduce-scatter"     # libtpu's name for a fused reduce-scatter
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# A multi-slice TPU program is one slice's: its collectives between slices (DCN) are host
# transfers to the Megascale runtime, a send and a recv per collective, named by this attribute.
_DCN_TRANSFER = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_DCN_KINDS = {"ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
              "ALL_REDUCE": "all-reduce", "ONE_TO_ONE": "collective-permute",
              "ALL_TO_ALL": "all-to-all"}


def shape_bytes(text):
    """Bytes of every array shape written in `text` (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
    return total


def _operands(rest):
    """The operand names of an instruction, from the text after its opcode's '('."""
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    operands = re.sub(r"/\*.*?\*/", "", rest[:i - 1])       # /*index=5*/ markers
    return [o.strip().split(" ")[-1].lstrip("%") for o in operands.split(",") if o.strip()]


def _trip_count(while_line, computations):
    """A `while` loop's trip count: XLA's `known_trip_count` when it records one, else the
    bound of the loop's condition when that is `counter < constant` (how `lax.scan` and
    `fori_loop` compile; the counter starts at 0), else 1."""
    m = _TRIP_COUNT.search(while_line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_line)
    lines = computations.get(cond.group(1), []) if cond else []
    bounds = [int(c) for line in lines for c in re.findall(r"= s32\[\]\S* constant\((\d+)\)", line)]
    compares = [line for line in lines if " compare(" in line and "direction=LT" in line]
    return bounds[0] if len(bounds) == 1 and len(compares) == 1 else 1


def collective_bytes(hlo_text):
    """{kind: {'count', 'bytes'}} per device and step from a compiled module's HLO text.

    Each instruction is weighted by how often it runs: once, or the trip count of each
    `while` loop around it (XLA records it as `known_trip_count`); each branch of a
    conditional counts once (an upper bound: one of them runs). Async pairs count once (the
    `-start`). The TPU compiler splits some collectives into a start and continuations
    fused into later computations (`continuation_config`); only the start counts. It emits
    a reduce-scatter as an all-reduce and a slice fused into an `all-reduce-scatter`
    computation (v5e); that counts as the reduce-scatter it is. An all-gather counts its
    result (the gathered data), every other kind its input.

    A multi-slice TPU program (one slice's program; the slices run copies) reaches the other
    slices by send/recv pairs to the Megascale runtime: those are the bytes that cross the
    data-centre network, `dcn_count` and `dcn_bytes` of the collective they implement (a
    gather's recv, every other kind's send); `count` and `bytes` are the slice's own (ICI)."""
    computations, current, entry = {}, None, None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.startswith(" "):
            computations[current].append(line)
    weight, continuations = {entry: 1}, set()
    order = [entry]
    for name in order:                   # callers before callees (the HLO is acyclic)
        for line in computations.get(name, []):
            trips = 1
            if " while(" in line:
                trips = _trip_count(line, computations)
            called = {}
            for key, callees in _CALLS.findall(line):
                for callee in callees.strip("{}").split(","):
                    called[callee.strip().lstrip("%")] = key
            for callee, key in called.items():
                if "continuation_config" in line:
                    continuations.add(callee)
                if callee in computations:
                    weight[callee] = weight.get(callee, 0) + weight[name] * (
                        trips if key in ("body", "condition") else 1)
                    if callee not in order:
                        order.append(callee)
    shapes = {}
    for lines in computations.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)
    def empty():
        return {"count": 0, "bytes": 0, "dcn_count": 0, "dcn_bytes": 0}

    out = {kind: empty() for kind in COLLECTIVES}
    for name, lines in computations.items():
        if name in continuations:
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            _, result_type, opcode, rest = m.groups()
            dcn = _DCN_TRANSFER.search(line) if opcode in ("send", "recv") else None
            if dcn:
                kind = _DCN_KINDS.get(dcn.group(1), dcn.group(1).lower().replace("_", "-"))
                if (opcode == "recv") == (kind == "all-gather"):  # a gather's result, else input
                    entry = out.setdefault(kind, empty())
                    entry["dcn_count"] += weight.get(name, 1)
                    entry["dcn_bytes"] += weight.get(name, 1) * shape_bytes(
                        _SHAPE.search(result_type).group(0))    # (data, u32[], token[])
                continue
            kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
            if kind not in out:
                continue
            if kind == "all-reduce" and name.startswith(_REDUCE_SCATTER_FUSION):
                kind = "reduce-scatter"
            operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in _operands(rest))
            if kind == "all-gather":
                size = shape_bytes(result_type)
                if opcode.endswith("-start"):        # the result tuple holds the operands too
                    size -= operand_bytes
            else:
                size = operand_bytes
            out[kind]["count"] += weight.get(name, 1)
            out[kind]["bytes"] += weight.get(name, 1) * size
    return out


def _num_params(run):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))


def minimum_collective_bytes(config, run):
    """The collective bytes per chip and step that the mesh and sharding rules imply (see the
    module docstring): {kind: bytes}."""
    n_params = _num_params(run)
    shards = sharding.num_batch_shards(run.mesh, run.rules)
    embeds = 2 * config.batch_size * int(config.model.embed_dim) * 4   # two towers, float32
    out = {kind: 0 for kind in COLLECTIVES}
    if shards > 1 and losses.get(config.loss.name).exchange == "ring":
        # one tower's B x d round the ring and its gradient back: as many bytes as the two
        # towers' float32 embeddings (bfloat16 blocks there and back, float32 gradients)
        out["collective-permute"] += embeds
    elif shards > 1:
        out["all-gather"] += embeds
        out["reduce-scatter"] += embeds
    if run.mesh.shape["data"] > 1:
        out["all-reduce"] += 4 * n_params / (run.mesh.shape["fsdp"] * run.mesh.shape["model"])
    if run.mesh.shape["fsdp"] > 1:
        # Each parameter gathered in the compute dtype for the forward (again for the backward
        # with remat), its float32 gradient reduce-scattered. With K micro-batches (the
        # gradient cache) that is per micro-batch, plus one gather for its no-gradient pass.
        width = 2 if config.model.dtype == "bfloat16" else 4
        k = int(config.micro_batches)
        gathers = (2 if remat_policy(config.model.remat) != "none" else 1) + (1 if k > 1 else 0)
        out["all-gather"] += k * gathers * width * n_params / run.mesh.shape["model"]
        out["reduce-scatter"] += k * 4 * n_params / run.mesh.shape["model"]
    return {k: int(v) for k, v in out.items()}


def minimum_dcn_bytes(config, run, slices):
    """The bytes per chip and step that should cross between `slices` slices (DCN): the
    gradients' reduction and the loss's exchange, nothing else ({kind: bytes}). Each slice
    reduces its gradient over its own chips first (ICI), so each chip sends its 1/n share of
    the float32 gradient (n: the slice's chips) to its peers in the other slices (XLA sends
    each tensor's share in whole tiles of 8 x 128: small tensors, such as biases, send more).
    A gathering loss (`clip`, `clip_blockwise`) gathers each tower's float32 rows over the
    slices first: a chip receives its peers' local rows (slices x local rows x embed_dim per
    tower), and their gradients go back the same way (a reduce-scatter)."""
    out = {kind: 0 for kind in COLLECTIVES}
    if slices <= 1:
        return out
    out["all-reduce"] = 4 * _num_params(run) * slices // run.mesh.size
    embed = int(config.model.embed_dim)
    if losses.get(config.loss.name).exchange == "ring":
        # Each ring step's permute crosses only at a slice's edge, but every chip's program
        # (one slice's) holds it: as many bytes as the ring's permutes within the slice.
        out["collective-permute"] = 2 * config.batch_size * embed * 4
    else:
        local = config.batch_size // sharding.num_batch_shards(run.mesh, run.rules)
        out["all-gather"] = out["reduce-scatter"] = 2 * slices * local * embed * 4
    return out


# ------------------------------------------------------------------ the largest size that fits

def search_largest(fits, unit, start, limit=None, resolution=None, guess=None):
    """The largest multiple of `unit` for which `fits(n)` holds (0 if none), assuming it holds
    below some size and not above, within `unit` (or, with `resolution`, within
    max(unit, largest / resolution)). Returns (largest, {n: fits(n)} for every n tried).

    Without `guess`: doubling from `start` (capped by `limit`), then bisection. `guess(lo, hi)`
    may name where it expects the limit (e.g. extrapolated from measured memory; hi is None
    while no size has failed); the next size tried is that guess, kept inside the bracket
    and at most 4x the largest fit, so a good guess closes the bracket in two or three
    tries. After three guesses the search bisects, so a poor one costs at most three."""
    tried = {}

    def check(n):
        if n not in tried:
            tried[n] = bool(fits(n))
        return tried[n]

    def window(lo):
        return max(unit, lo // resolution if resolution else 0)

    n = max(unit, start // unit * unit)
    lo, hi = (n, None) if check(n) else (0, n)
    guesses = 0
    while hi is None or hi - lo > window(lo):
        if hi is None and limit is not None and lo >= limit:
            break
        g = guess(lo, hi) if guess is not None and guesses < 3 else None
        if g is not None:
            guesses += 1
            upper = hi - window(lo) if hi is not None else 4 * max(lo, unit)
            n = min(max(int(g) // unit * unit, lo + window(lo)), upper) // unit * unit
        elif hi is None:
            n = lo * 2
        else:
            n = (lo + hi) // 2 // unit * unit
        if limit is not None and hi is None:
            n = min(n, limit // unit * unit)
        if n <= lo or (hi is not None and n >= hi):
            break
        if check(n):
            lo = n
        else:
            hi = n
    return lo, tried


def memory_guess(points, budget):
    """Where memory reaches `budget`, by the straight line through the two measured (batch,
    memory) points nearest to it: the last fit and the first over budget once both are
    known (regula falsi), else the two largest fits. None with fewer than two points."""
    below = sorted(p for p in points if p[1] <= budget)
    above = sorted(p for p in points if p[1] > budget)
    pair = [below[-1], above[0]] if below and above else below[-2:]
    if len(pair) < 2 or pair[1][0] == pair[0][0]:
        return None
    (n0, m0), (n1, m1) = pair
    slope = (m1 - m0) / (n1 - n0)
    return n1 + (budget - m1) / slope if slope > 0 else None

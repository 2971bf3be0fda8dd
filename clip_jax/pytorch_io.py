"""Reading PyTorch checkpoints as numpy arrays without torch, and writing state_dicts.

`read_tensors(path)` -> {dotted name: np.ndarray} for
  * `torch.save` zip archives (`.pt`, `.pth`, `.bin`; what OpenCLIP and OpenAI's
    non-JIT state_dicts are), whatever object holds the tensors: a state_dict, a
    training checkpoint with a `state_dict` entry, nested dicts (names joined by '.');
  * TorchScript archives (OpenAI's released `.pt` files): the module tree's tensor
    attributes, named as `module.state_dict()` names them;
  * `.safetensors` files.

Why not `torch.load`: it needs the 2+ GB torch package just to read numbers, and
`torch.load(weights_only=True)` refuses TorchScript archives (only `torch.jit.load`
reads them, which compiles and can run the archive's code). Here the pickle is read
by an unpickler that builds nothing but tensors, plain containers and inert records
for TorchScript objects; any other global is refused with its name, the same policy as
torch's `weights_only` loading. Tensor bytes are memory-mapped from the archive when
it stores them uncompressed (as torch always does). The legacy (pre-1.6, non-zip) format,
a bare pickle, is refused with the one-line command that re-saves a trusted file as a zip
archive: handing it to `torch.load` would run an unmetered unpickler (a pickle of a million
nested tuples as a dict key crashes it with SIGSEGV).

Checkpoints come from anywhere, so nothing in them is trusted. The pickle is read by the
pure-Python unpickler under caps on its opcodes, the objects it builds and what it may
hash; tensors come out as inert records, and each is checked (dtype, non-negative integer
sizes and strides, the highest element it touches inside its storage, the storage's byte
count against the archive's member) before an array is made over its bytes. Compressed
members are inflated only up to their declared size, within a byte budget (`max_bytes`,
default twice the file's size, which every archive torch writes meets). Anything else is a
`CheckpointFormatError` naming the file (and the tensor) and the reason.
"""
import collections
import io
import json
import math
import mmap
import os
import pickle
import re
import reprlib
import struct
import zipfile

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype (torch.save still names storages this way).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


# Resource limits of one read. `max_bytes` (default: twice the file's size) bounds the tensor
# data as arrays and the bytes inflated from compressed members; the pickle's opcodes and
# objects, the zip members and the safetensors header grow with it from these floors, so
# that a refused file never costs much more memory than its size.
MAX_BYTES_FACTOR = 2
# (floor, budget bytes per unit): at least 1M opcodes, or one per 16 bytes of budget, etc.
PICKLE_OPS = (1_000_000, 16)
PICKLE_OBJECTS = (20_000, 256)      # objects and memo entries (torch.save: ~19 per tensor, so
                                    # the floor admits ~1,000 tensors whatever their size)
ZIP_MEMBERS = (10_000, 512)
SAFETENSORS_HEADER = (1 << 20, 16, 100 << 20)   # header bytes: floor, budget bytes per one, ceiling
MAX_DEPTH = 32                      # containers / TorchScript modules inside one another
MAX_NDIM = 32


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint this module can read; the message names it."""


def _short(value):
    return reprlib.repr(value)


def _text(error):
    text = str(error)
    return text if len(text) <= 200 else text[:200] + "..."


class _Budget:
    def __init__(self, path, max_bytes):
        self.path = path
        self.max_bytes = MAX_BYTES_FACTOR * os.path.getsize(path) if max_bytes is None else int(max_bytes)
        self.ops, self.objects, self.members = (max(floor, self.max_bytes // per) for floor, per in
                                                (PICKLE_OPS, PICKLE_OBJECTS, ZIP_MEMBERS))
        floor, per, ceiling = SAFETENSORS_HEADER
        self.header = min(ceiling, max(floor, self.max_bytes // per))
        self.inflated = 0

    def refuse(self, what):
        raise CheckpointFormatError(
            f"{self.path}: {what}; refused (--max-bytes {self.max_bytes:,}, default twice the "
            "file's size: raise it only for a checkpoint you trust)")

    def spend(self, nbytes, what):
        if nbytes > self.max_bytes:
            self.refuse(f"{what} take {nbytes:,} bytes")


# ----------------------------------------------------------------------- the pickle

class _Inert:
    """What the unpickler builds besides plain containers: records that nothing calls back
    (BUILD on them is refused) and that are checked before any byte is read."""
    __slots__ = ()


class _StorageType(_Inert):        # torch.FloatStorage etc.
    __slots__ = ("dtype",)

    def __init__(self, name):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _TypeTag(_Inert):            # torch.nn.Parameter, torch.Tensor (only passed around)
    __slots__ = ()


class _Storage(_Inert):
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor(_Inert):
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class ScriptObject:
    """A TorchScript object (module) from an archive: its attributes, nothing else."""

    attributes = {}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _identity(value, *unused):
    return value


def _rebuild_from_type(func, new_type, args, state):
    del new_type, state   # Parameter / Tensor subclasses: the data is all we keep
    return func(*args)


def _check_keys(keys):
    """Only flat keys are hashed: a deeply nested tuple would crash hash() (C recursion)."""
    for key in keys:
        if type(key) is tuple and all(type(k) in _FLAT_KEYS for k in key):
            continue
        if type(key) not in _FLAT_KEYS:
            raise pickle.UnpicklingError(f"a {type(key).__name__} as a dict key or set item")


_FLAT_KEYS = (str, int, float, bool, bytes, type(None))


def _ordered_dict():
    return collections.OrderedDict()


def _set(items=()):
    items = list(items)
    _check_keys(items)
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): _TypeTag(),
    ("torch", "Tensor"): _TypeTag(),
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
}
# TorchScript pickles wrap typed lists/dicts in these; the value passes through.
_JIT_BUILDERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                 "build_genericlist", "restore_type_tag")
# Opcodes that make no new object nor memo entry (the others count against the object cap;
# list appends and stack pushes, 8 bytes each, only against the opcode cap).
_NO_OBJECT = {op[0] for op in (
    pickle.STOP, pickle.POP, pickle.POP_MARK, pickle.DUP, pickle.GET, pickle.BINGET, pickle.LONG_BINGET,
    pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS, pickle.ADDITEMS, pickle.FRAME,
    pickle.PROTO, pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.BININT1, pickle.EMPTY_TUPLE)}


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler (the C one cannot be metered), with every opcode counted,
    globals restricted, BUILD allowed on TorchScript objects only and hashing of flat keys
    only. It reads from memory: declared lengths cannot make it allocate past the data."""

    def __init__(self, data, source, budget):
        super().__init__(io.BytesIO(data))
        self._source, self._budget = source, budget
        self.ops = self.objects = 0
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch.jit._pickle" and name in _JIT_BUILDERS:
            return _identity
        if module.startswith("__torch__"):   # a TorchScript class: an inert record
            return ScriptObject
        raise CheckpointFormatError(
            f"{self._source}: refusing to load '{module}.{name}': only tensors and plain "
            "containers are read (the torch.load(weights_only=True) policy)")

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(
                f"persistent id {_short(pid)} is not ('storage', type, key, location, numel)")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise pickle.UnpicklingError(f"storage type {_short(kind)} is not a known dtype")
        if type(key) is not str or not re.fullmatch(r"\w{1,64}", key):
            raise pickle.UnpicklingError(f"storage key {_short(key)} is not a member name")
        if type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"storage {key}: size {_short(numel)} is not a non-negative integer")
        storage = self.storages.setdefault(key, _Storage(key, kind.dtype, numel))
        if (storage.dtype, storage.numel) != (kind.dtype, numel):
            raise pickle.UnpicklingError(f"storage {key} is declared twice with different types or sizes")
        return storage

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, ScriptObject):
            inst.attributes = state if isinstance(state, dict) else {}
        elif type(inst) is not collections.OrderedDict:   # a state_dict's _metadata: dropped
            raise pickle.UnpicklingError(f"BUILD (setting the state) of a {type(inst).__name__}")

    def check_marked_keys(self, step):
        _check_keys(self.stack[::step])

    def check_setitem_key(self):
        _check_keys(self.stack[-2:-1])


def _metered(code, load):
    makes_object = code not in _NO_OBJECT

    def op(self):
        self.ops += 1
        self.objects += makes_object
        if self.ops > self._budget.ops:
            self._budget.refuse(f"its pickle runs more than {self._budget.ops:,} opcodes")
        if self.objects > self._budget.objects:
            self._budget.refuse(f"its pickle builds more than {self._budget.objects:,} objects")
        load(self)
    return op


def _unknown_opcode(code):
    def op(self):
        raise pickle.UnpicklingError(f"unknown opcode {code:#04x}")
    return op


def _keys_first(check, load):
    def op(self):
        check(self)
        load(self)
    return op


_Unpickler.dispatch = {code: _unknown_opcode(code) for code in range(256)}
_Unpickler.dispatch.update(pickle._Unpickler.dispatch)
_Unpickler.dispatch[pickle.BUILD[0]] = _Unpickler.load_build
for _op, _check in ((pickle.SETITEM, _Unpickler.check_setitem_key),
                    (pickle.SETITEMS, lambda self: self.check_marked_keys(2)),
                    (pickle.DICT, lambda self: self.check_marked_keys(2)),
                    (pickle.ADDITEMS, lambda self: self.check_marked_keys(1)),
                    (pickle.FROZENSET, lambda self: self.check_marked_keys(1))):
    _Unpickler.dispatch[_op[0]] = _keys_first(_check, _Unpickler.dispatch[_op[0]])
_Unpickler.dispatch = {code: _metered(code, load) for code, load in _Unpickler.dispatch.items()}


def _unpickle(data, source, budget):
    unpickler = _Unpickler(data, source, budget)
    try:
        return unpickler.load(), unpickler.objects
    except CheckpointFormatError:
        raise
    except Exception as e:   # anything an unpickler can raise on a malformed stream
        raise CheckpointFormatError(f"{source}: malformed pickle ({type(e).__name__}: {_text(e)})") from None


def _flatten(obj, source, max_entries, max_chars):
    """{dotted name: _Tensor} of the tensors under nested dicts and TorchScript modules;
    refuses cycles, nesting past MAX_DEPTH and shared references that multiply names (more
    entries than `max_entries`, the objects the pickle built, or names longer than
    `max_chars` in all)."""
    out, on_path, count = {}, set(), [0, 0]

    def walk(obj, prefix):
        count[0] += 1
        count[1] += len(prefix)
        if count[0] > max_entries or count[1] > max_chars:
            raise CheckpointFormatError(
                f"{source}: shared references multiply its names past {max_entries:,} entries or "
                f"{max_chars:,} characters (a 'billion laughs')")
        if isinstance(obj, _Tensor):
            out[prefix] = obj
            return
        if isinstance(obj, ScriptObject):
            obj = obj.attributes
        if not isinstance(obj, dict):
            return
        where = prefix or "the top-level object"
        if id(obj) in on_path:
            raise CheckpointFormatError(f"{source}: {where} contains itself (a cycle)")
        if len(on_path) >= MAX_DEPTH:
            raise CheckpointFormatError(f"{source}: {where} is nested more than {MAX_DEPTH} deep")
        on_path.add(id(obj))
        for key, value in dict.items(obj):
            walk(value, f"{prefix}.{key}" if prefix else str(key))
        on_path.discard(id(obj))

    walk(obj, "")
    return out


def _check_tensor(name, tensor, source):
    """The tensor's bytes in its storage, in bytes; refuses anything that reaches outside it."""
    def bad(why):
        raise CheckpointFormatError(f"{source}: tensor {name}: {why}")
    storage, offset, size, stride = tensor.storage, tensor.offset, tensor.size, tensor.stride
    if not isinstance(storage, _Storage):
        bad(f"its data {_short(storage)} is not a storage")
    if type(offset) is not int or offset < 0:
        bad(f"storage offset {_short(offset)} is not a non-negative integer")
    for what, dims in (("size", size), ("stride", stride)):
        if type(dims) not in (tuple, list) or not all(type(n) is int and n >= 0 for n in dims):
            bad(f"{what} {_short(dims)} is not a list of non-negative integers")
    if len(size) != len(stride) or len(size) > MAX_NDIM:
        bad(f"size {_short(size)} and stride {_short(stride)} do not match (at most {MAX_NDIM} dimensions)")
    numel = math.prod(size)
    end = offset + (1 + sum((n - 1) * s for n, s in zip(size, stride)) if numel else 0)
    if end > storage.numel:
        bad(f"reaches element {end - 1:,} of its storage {storage.key}, which holds {storage.numel:,} "
            f"(offset {offset}, size {list(size)}, stride {list(stride)})")
    return numel * storage.dtype.itemsize


# ----------------------------------------------------------------------- zip archives

def _safe_member_name(name):
    return not (name.startswith("/") or "\\" in name or "\0" in name or ".." in name.split("/"))


class _Archive:
    """A torch zip archive's members, read within the budget."""

    def __init__(self, path, budget):
        self.path, self.budget = path, budget
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)
            if end is None:
                raise CheckpointFormatError(f"{path}: not a zip archive")
            if end[zipfile._ECD_ENTRIES_TOTAL] > budget.members:
                budget.refuse(f"it has {end[zipfile._ECD_ENTRIES_TOTAL]:,} zip members, more than "
                              f"{budget.members:,}")
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.zip = zipfile.ZipFile(path)
        self.infos = {}
        for info in self.zip.infolist():
            if not _safe_member_name(info.filename):
                raise CheckpointFormatError(f"{path}: unsafe member name {info.filename!r}")
            if self.infos.setdefault(info.filename, info) is not info:
                raise CheckpointFormatError(f"{path}: member {info.filename!r} appears twice")

    def read(self, name, what):
        """The member's bytes as a read-only uint8 array (memory-mapped when stored)."""
        info = self.infos[name]
        if info.flag_bits & 1:
            raise CheckpointFormatError(f"{self.path}: {what} ({name}) is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            header = self.map[info.header_offset:info.header_offset + 30]
            if len(header) < 30 or header[:4] != b"PK\x03\x04" or info.compress_size != info.file_size:
                raise CheckpointFormatError(f"{self.path}: corrupt zip entry {name}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            local = self.map[info.header_offset + 30:info.header_offset + 30 + name_len]
            if local.decode("utf-8" if info.flag_bits & 0x800 else "cp437") != info.orig_filename:
                raise CheckpointFormatError(f"{self.path}: zip entry {name}: local and central names differ")
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > len(self.map):
                raise CheckpointFormatError(f"{self.path}: {what} ({name}) passes the end of the file")
            return np.frombuffer(self.map, np.uint8, count=info.file_size, offset=start)
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise CheckpointFormatError(f"{self.path}: {what} ({name}): compression method "
                                        f"{info.compress_type} (only stored or deflated members are read)")
        self.budget.inflated += info.file_size
        self.budget.spend(self.budget.inflated, "compressed members inflated")
        with self.zip.open(info) as f:   # inflates no more than the declared size; checks the CRC
            data = f.read(info.file_size)
        if len(data) != info.file_size:
            raise CheckpointFormatError(f"{self.path}: {what} ({name}) inflates to {len(data):,} "
                                        f"bytes, not the {info.file_size:,} declared")
        return np.frombuffer(data, np.uint8)


def _read_zip_archive(path, budget):
    archive = _Archive(path, budget)
    pickles = [n for n in archive.infos if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"{path}: a zip file but not a torch archive (no data.pkl)")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "byteorder" in archive.infos:
        info = archive.infos[prefix + "byteorder"]
        order = archive.read(info.filename, "byteorder").tobytes() if info.file_size <= 16 else b"?"
        if order != b"little":
            raise CheckpointFormatError(f"{path}: byte order {_short(order)} (only little-endian archives are read)")
    data = archive.read(pickles[0], "the pickle")
    obj, objects = _unpickle(data.tobytes(), path, budget)
    tensors = _flatten(obj, path, objects + 1, max(1 << 20, budget.max_bytes // 8))
    if not tensors:
        return {}
    # Every tensor checked before any byte of tensor data is read.
    array_bytes, seen = 0, set()
    for name, tensor in tensors.items():
        nbytes = _check_tensor(name, tensor, path)
        array_bytes += nbytes if id(tensor) not in seen else 0   # a tensor under two names counts once
        seen.add(id(tensor))
        storage = tensor.storage
        member = f"{prefix}data/{storage.key}"
        info = archive.infos.get(member)
        want = storage.numel * storage.dtype.itemsize
        if info is None:
            raise CheckpointFormatError(f"{path}: tensor {name}: its storage {member} is not in the archive")
        if info.file_size != want:
            raise CheckpointFormatError(
                f"{path}: tensor {name}: its storage {member} declares {storage.numel:,} elements of "
                f"{storage.dtype} ({want:,} bytes), but the archive holds {info.file_size:,} bytes")
    budget.spend(array_bytes, "its tensors as arrays would")
    out, buffers = {}, {}
    for name, t in tensors.items():
        s = t.storage
        if s.key not in buffers:
            buffers[s.key] = archive.read(f"{prefix}data/{s.key}", f"tensor {name}").view(s.dtype)
        if 0 in t.size:
            out[name] = np.zeros(t.size, s.dtype)
            continue
        itemsize = s.dtype.itemsize   # in bounds by _check_tensor; numpy checks it again
        out[name] = np.ndarray(tuple(t.size), s.dtype, buffer=buffers[s.key], offset=t.offset * itemsize,
                               strides=tuple(m * itemsize if n > 1 else 0 for n, m in zip(t.size, t.stride)))
    return out


# ----------------------------------------------------------------------- safetensors

def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a name appears twice")
    return dict(pairs)


def _read_safetensors(path, budget):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise CheckpointFormatError(f"{path}: header length {length:,} passes the end of the file "
                                        f"({size:,} bytes)")
        if length > budget.header:
            budget.refuse(f"its safetensors header of {length:,} bytes is over {budget.header:,}")
        raw = f.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{path}: bad safetensors header ({_text(e)})") from None
    if type(header) is not dict:
        raise CheckpointFormatError(f"{path}: bad safetensors header (not a JSON object)")
    data_len, spans = size - 8 - length, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue

        def bad(why):
            raise CheckpointFormatError(f"{path}: tensor {name}: {why}")
        if type(entry) is not dict:
            bad("not a {dtype, shape, data_offsets} record")
        kind, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if type(kind) is not str or kind not in SAFETENSORS_DTYPES:
            bad(f"unsupported dtype {_short(kind)}")
        if type(shape) is not list or len(shape) > MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
            bad(f"shape {_short(shape)} is not a list of non-negative integers")
        if type(offsets) is not list or len(offsets) != 2 or not all(type(n) is int for n in offsets) \
                or not 0 <= offsets[0] <= offsets[1]:
            bad(f"data_offsets {_short(offsets)} are not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            bad(f"data_offsets [{begin}, {end}] pass the end of the data ({data_len:,} bytes)")
        dtype, numel = np.dtype(SAFETENSORS_DTYPES[kind]), math.prod(shape)
        if numel * dtype.itemsize != end - begin:
            bad(f"{kind} {shape} is {numel * dtype.itemsize:,} bytes, but data_offsets [{begin}, {end}] "
                f"hold {end - begin:,}")
        spans.append((begin, end, name, dtype, tuple(shape)))
    spans.sort()
    for (b0, e0, n0, *_), (b1, e1, n1, *_) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointFormatError(f"{path}: tensor {n1}: data_offsets [{b1}, {e1}] overlap "
                                        f"tensor {n0}'s [{b0}, {e0}]")
    data = np.memmap(path, np.uint8, mode="r", offset=8 + length) if data_len else np.zeros(0, np.uint8)
    return {name: data[b:e].view(dtype).reshape(shape) for b, e, name, dtype, shape in spans}


def read_tensors(path, max_bytes=None):
    """{name: np.ndarray} of every tensor in the checkpoint at `path` (see module doc).

    `max_bytes` (default: twice the file's size) bounds the tensors' bytes as arrays and the
    bytes inflated from compressed members; the pickle's caps grow with it."""
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such file")
    budget = _Budget(path, max_bytes)
    try:
        if path.endswith(".safetensors"):
            return _read_safetensors(path, budget)
        if not zipfile.is_zipfile(path):
            raise CheckpointFormatError(
                f"{path}: not a zip-format torch archive (torch >= 1.6) nor .safetensors. A "
                "pre-1.6 torch file is a bare pickle, which is not read here (torch.load would "
                "run its unpickler without limits); if you trust it, re-save it in the zip "
                "format: python -c \"import torch; torch.save(torch.load('OLD', "
                "weights_only=True), 'NEW.pt')\"")
        out = _read_zip_archive(path, budget)
    except CheckpointFormatError:
        raise
    except Exception as e:   # zipfile, struct, numpy on a malformed file: a refusal, not a traceback
        raise CheckpointFormatError(f"{path}: cannot be read ({type(e).__name__}: {_text(e)})") from None
    if not out:
        raise CheckpointFormatError(f"{path}: holds no tensors")
    return out


def write_state_dict(tensors, path):
    """Writes {name: array} as `.safetensors` (no torch needed) or a torch.save'd
    state_dict (`.pt`, `.pth`, `.bin`; needs torch), atomically."""
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file({k: np.array(v, order="C") for k, v in tensors.items()}, tmp)
    elif path.endswith((".pt", ".pth", ".bin")):
        try:
            import torch
        except ImportError:
            raise CheckpointFormatError(f"{path}: writing a torch file needs torch installed; "
                                        "write .safetensors instead (OpenCLIP reads it)") from None
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, tmp)
    else:
        raise CheckpointFormatError(f"{path}: the file name must end in one of {', '.join(WEIGHT_SUFFIXES)}")
    os.replace(tmp, path)

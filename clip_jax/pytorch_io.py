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
it stores them uncompressed (as torch always does). The legacy (pre-1.6, non-zip)
format falls back to `torch.load(weights_only=True)` when torch is installed.
"""
import collections
import json
import mmap
import os
import pickle
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


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint this module can read; the message names it."""


class _Dtype:
    def __init__(self, name):
        self.dtype = STORAGE_DTYPES[name]


class ScriptObject:
    """A TorchScript object (module) from an archive: its attributes, nothing else.
    One subclass per TorchScript class name (`qualified_name`), made by `_script_class`."""

    qualified_name = ""
    attributes = {}

    def __setstate__(self, state):
        self.attributes = dict(state) if isinstance(state, dict) else {}


_SCRIPT_CLASSES = {}


def _script_class(qualified_name):
    if qualified_name not in _SCRIPT_CLASSES:
        _SCRIPT_CLASSES[qualified_name] = type(
            "ScriptObject", (ScriptObject,), {"qualified_name": qualified_name})
    return _SCRIPT_CLASSES[qualified_name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not size:
        return storage[offset:offset + 1].reshape(())
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride),
        writeable=False)


def _rebuild_parameter(data, *unused):
    return data


def _identity(value, *unused):
    return value


def _rebuild_from_type(func, new_type, args, state):
    del new_type, state   # Parameter / Tensor subclasses: the data is all we keep
    return func(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): object,
    ("torch", "Tensor"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
# TorchScript pickles wrap typed lists/dicts in these; the value passes through.
_JIT_BUILDERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                 "build_genericlist", "restore_type_tag")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage, source):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _Dtype(name)
        if module == "torch.jit._pickle" and name in _JIT_BUILDERS:
            return _identity
        if module.startswith("__torch__"):   # a TorchScript class: an inert record
            return _script_class(f"{module}.{name}")
        raise pickle.UnpicklingError(
            f"{self._source}: refusing to load '{module}.{name}': only tensors and plain "
            "containers are read (the torch.load(weights_only=True) policy)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid[:5]
        dtype = kind.dtype if isinstance(kind, _Dtype) else np.uint8
        return self._load_storage(str(key), np.dtype(dtype), int(numel))


def _member_array(path, zf, info, file_map):
    """The member's bytes as a read-only uint8 array (memory-mapped when stored)."""
    if info.compress_type != zipfile.ZIP_STORED or file_map is None:
        return np.frombuffer(zf.read(info), np.uint8)
    header = file_map[info.header_offset:info.header_offset + 30]
    if header[:4] != b"PK\x03\x04":
        raise CheckpointFormatError(f"{path}: corrupt zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return np.frombuffer(file_map, np.uint8, count=info.file_size, offset=start)


def _read_zip_archive(path):
    with open(path, "rb") as f:
        try:
            file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:   # empty file
            file_map = None
    zf = zipfile.ZipFile(path)
    pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"{path}: a zip file but not a torch archive (no data.pkl)")
    prefix = pickles[0][:-len("data.pkl")]
    infos = {info.filename: info for info in zf.infolist()}
    byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in infos else "little"
    if byteorder != "little":
        raise CheckpointFormatError(f"{path}: big-endian archives are not supported")

    def load_storage(key, dtype, numel):
        name = f"{prefix}data/{key}"
        if name not in infos:
            raise CheckpointFormatError(f"{path}: missing tensor data {name}")
        raw = _member_array(path, zf, infos[name], file_map)
        return raw[:numel * dtype.itemsize].view(dtype)

    with zf.open(pickles[0]) as f:
        try:
            return _Unpickler(f, load_storage, path).load()
        except pickle.UnpicklingError as e:
            raise CheckpointFormatError(str(e)) from None


def _flatten(obj, prefix, out):
    """Tensors of `obj` under dotted names (nested dicts and TorchScript modules)."""
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, ScriptObject):
        _flatten(obj.attributes, prefix, out)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)


def _read_safetensors(path):
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise CheckpointFormatError(f"{path}: bad safetensors header ({e})") from None
    data = np.memmap(path, np.uint8, mode="r", offset=8 + length) if os.path.getsize(path) > 8 + length \
        else np.zeros(0, np.uint8)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name}: unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        out[name] = data[begin:end].view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out


def read_tensors(path):
    """{name: np.ndarray} of every tensor in the checkpoint at `path` (see module doc)."""
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        obj = _read_zip_archive(path)
    else:
        obj = _legacy_torch_load(path)
    out = {}
    _flatten(obj, "", out)
    if not out:
        raise CheckpointFormatError(f"{path}: holds no tensors")
    return out


def _legacy_torch_load(path):
    try:
        import torch
    except ImportError:
        raise CheckpointFormatError(
            f"{path}: not a zip-format torch archive nor safetensors (a pre-1.6 torch file needs "
            "torch installed to read it: pip install torch)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many kinds for non-checkpoints
        raise CheckpointFormatError(f"{path}: cannot be read as a checkpoint ({e})") from None

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()
        if isinstance(x, dict):
            return {k: to_numpy(v) for k, v in x.items()}
        return x
    return to_numpy(obj)


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

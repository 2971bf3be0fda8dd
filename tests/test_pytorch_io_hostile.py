"""Hostile checkpoints (issue 31): every malformed file is refused with its reason, as
`error: FILE: reason` and exit status 1, with no traceback, no signal, nothing written to
--out and memory near the file's size. The files are made here by hand (pickle opcodes,
zipfile), without torch; `test_a_hand_made_archive_reads` shows that the unmodified
template reads, so each refusal is due to its one change."""
import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from clip_jax import convert, pytorch_io
from tests.helpers import REPO, device_env

# ----------------------------------------------------------------------------- a pickle assembler


def S(text):                     # BINUNICODE
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def I(n):                        # BININT, LONG1 for any other int, BINFLOAT for a float
    if isinstance(n, float):
        return b"G" + struct.pack(">d", n)
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def G(module, name):             # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def T(*items):                   # MARK ... TUPLE
    return b"(" + b"".join(items) + b"t"


def D(**items):                  # EMPTY_DICT MARK ... SETITEMS
    return b"}(" + b"".join(S(k) + v for k, v in items.items()) + b"u"


def PKL(body):                   # PROTO 2 ... STOP
    return b"\x80\x02" + body + b"."


def pid(key="0", numel=6, storage="FloatStorage"):
    return T(S("storage"), G("torch", storage), S(key), S("cpu"), I(numel))


def tensor(offset=0, size=(2, 3), stride=(3, 1), persistent=None, args=None):
    """torch.save's _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""
    if args is None:
        args = [(persistent or pid()) + b"Q", I(offset), T(*map(I, size)), T(*map(I, stride)),
                b"\x89", G("collections", "OrderedDict") + b")R"]
    return G("torch._utils", "_rebuild_tensor_v2") + T(*args) + b"R"


DATA = np.arange(6, dtype=np.float32).tobytes()


def archive(path, pkl, members=None, compress=zipfile.ZIP_STORED, extra=(), byteorder="little"):
    """A torch.save-style zip: archive/data.pkl, archive/byteorder, archive/data/KEY (its
    bytes, or an int: that many zero bytes, written a MiB at a time)."""
    members = {"0": DATA} if members is None else members
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, data in members.items():
            if isinstance(data, int):
                info = zipfile.ZipInfo(f"archive/data/{key}")
                info.compress_type = compress
                with z.open(info, "w") as f:
                    for start in range(0, data, 1 << 20):
                        f.write(bytes(min(1 << 20, data - start)))
                continue
            z.writestr(f"archive/data/{key}", data, compress_type=compress)
        for name, data in extra:
            z.writestr(name, data)
    return path


def safetensors(path, header, data=DATA, length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_a_hand_made_archive_reads(tmp_path):
    """The template every hostile archive below changes in one place: a valid checkpoint."""
    got = pytorch_io.read_tensors(str(archive(tmp_path / "ok.pt", PKL(D(w=tensor())))))
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    got = pytorch_io.read_tensors(str(archive(tmp_path / "t.pt", PKL(D(w=tensor(0, (3, 2), (1, 3)),
                                                                   v=tensor(2, (2, 2), (2, 1)))))))
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    np.testing.assert_array_equal(got["v"], [[2, 3], [4, 5]])
    st = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    got = pytorch_io.read_tensors(str(safetensors(tmp_path / "ok.safetensors", st)))
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    script = G("__torch__.model", "M") + b")\x81" + D(w=tensor()) + b"b"   # NEWOBJ, BUILD
    got = pytorch_io.read_tensors(str(archive(tmp_path / "s.pt", PKL(D(visual=script)))))
    np.testing.assert_array_equal(got["visual.w"], np.arange(6, dtype=np.float32).reshape(2, 3))


# ----------------------------------------------------------------------------- the corpus

def _laughs(levels=9, fan=10):
    """{"0".."9": {"0".."9": ... {"w": tensor}}}, each level the one below by reference."""
    body = D(w=tensor()) + b"q\x00"                                   # BINPUT 0
    for level in range(1, levels):
        body += b"}(" + b"".join(S(str(j)) + b"h" + bytes([level - 1]) for j in range(fan)) + b"u"
        body += b"q" + bytes([level])
    return PKL(body)


def _nested(depth):
    body = D(w=tensor())
    for _ in range(depth):
        body = D(x=body)
    return PKL(body)


SD = lambda **kw: PKL(D(w=tensor(**kw)))   # noqa: E731
DEFLATED = dict(compress=zipfile.ZIP_DEFLATED)
# name: (pickle, archive() keywords, the refusal's reason as a regex)
ARCHIVES = {
    # tensors whose (offset, size, stride) reach outside their storage, or storages that
    # are not what the archive holds
    "negative stride": (SD(stride=(3, -1)), {}, r"tensor w: stride \(3, -1\) is not a list of non-negative"),
    "negative offset": (SD(offset=-1), {}, r"tensor w: storage offset -1 is not a non-negative integer"),
    "storage smaller than the shape": (SD(size=(4, 3)), {}, r"tensor w: reaches element 11 of its storage 0, which holds 6"),
    "deflated storage smaller than the shape": (SD(size=(4, 3)), DEFLATED, r"tensor w: reaches element 11 of its storage 0"),
    "offset past the storage": (SD(offset=5), {}, r"tensor w: reaches element 10 of its storage 0"),
    "huge element count": (SD(size=(2 ** 40,), stride=(1,)), {}, r"tensor w: reaches element 1,099,511,627,775"),
    "huge stride": (SD(stride=(2 ** 62, 1)), {}, r"tensor w: reaches element 4,611,686,018,427,387,906"),
    "storage declares more than the member": (PKL(D(w=tensor(persistent=pid(numel=10 ** 12)))), {},
                                              r"tensor w: its storage archive/data/0 declares 1,000,000,000,000 "
                                              r"elements of float32 \(4,000,000,000,000 bytes\), but the archive holds 24"),
    "storage declares less than the member": (PKL(D(w=tensor(persistent=pid(numel=6)))), {"members": {"0": DATA + DATA}},
                                              r"but the archive holds 48 bytes"),
    "sizes that are not integers": (SD(size=(2.0, 3)), {}, r"tensor w: size \(2.0, 3\) is not a list of non-negative"),
    "size and stride of different lengths": (SD(stride=(1,)), {}, r"tensor w: size \(2, 3\) and stride \(1,\) do not match"),
    "stride 0 expanding past --max-bytes": (SD(size=(10 ** 8, 3), stride=(0, 1)), {},
                                            r"its tensors as arrays would take 1,200,000,000 bytes; refused \(--max-bytes"),
    "unknown dtype": (PKL(D(w=tensor(persistent=pid(storage="ComplexFloatStorage")))), {},
                      r"refusing to load 'torch.ComplexFloatStorage'"),
    "rebuild with missing arguments": (PKL(D(w=tensor(args=[pid() + b"Q", I(0)]))), {},
                                       r"malformed pickle \(TypeError: .*missing 2 required positional arguments"),
    # persistent ids that are not ('storage', type, key, location, numel) or point outside
    "persistent id not a tuple": (PKL(D(w=tensor(persistent=S("0")))), {}, r"persistent id '0' is not \('storage'"),
    "persistent id too short": (PKL(D(w=tensor(persistent=T(S("storage"), G("torch", "FloatStorage"), S("0"))))), {},
                                r"persistent id .* is not \('storage', type, key, location, numel\)"),
    "persistent id with a path": (PKL(D(w=tensor(persistent=pid(key="../../etc/passwd")))), {},
                                  r"storage key '../../etc/passwd' is not a member name"),
    "persistent id without a storage type": (PKL(D(w=tensor(persistent=T(S("storage"), S("FloatStorage"), S("0"), S("cpu"), I(6))))), {},
                                             r"storage type 'FloatStorage' is not a known dtype"),
    "persistent id with a negative size": (PKL(D(w=tensor(persistent=pid(numel=-1)))), {}, r"storage 0: size -1 is not a non-negative"),
    "persistent id outside the archive": (PKL(D(w=tensor(persistent=pid(key="7")))), {},
                                          r"tensor w: its storage archive/data/7 is not in the archive"),
    "storage declared twice differently": (PKL(D(w=tensor(), v=tensor(persistent=pid(numel=3)))), {},
                                           r"storage 0 is declared twice with different types or sizes"),
    # code-running payloads: GLOBAL/REDUCE, INST, OBJ, NEWOBJ, BUILD, extension codes
    "GLOBAL and REDUCE": (PKL(G("os", "system") + T(S("touch EVIL")) + b"R"), {}, r"refusing to load 'os.system'"),
    "INST": (PKL(b"(" + S("touch EVIL") + b"ios\nsystem\n"), {}, r"refusing to load 'os.system'"),
    "OBJ": (PKL(b"(" + G("subprocess", "Popen") + S("touch EVIL") + b"o"), {}, r"refusing to load 'subprocess.Popen'"),
    "NEWOBJ": (PKL(S("builtins") + S("eval") + b"\x93" + T(S("1")) + b"\x81"), {}, r"refusing to load 'builtins.eval'"),
    "BUILD on a tensor": (PKL(D(w=tensor() + D(storage=S("x")) + b"b")), {}, r"BUILD \(setting the state\) of a _Tensor"),
    "BUILD on a storage type": (PKL(G("torch", "FloatStorage") + D(dtype=S("O")) + b"b"), {},
                                r"BUILD \(setting the state\) of a _StorageType"),
    "an extension code": (PKL(b"\x82\x01"), {}, r"malformed pickle \(ValueError: unregistered extension code 1\)"),
    # structure: cycles, nesting, shared references, hashing, opcodes
    "a dict containing itself": (PKL(D(w=tensor()) + b"q\x00" + S("self") + b"h\x00s"), {},
                                 r"self contains itself \(a cycle\)"),
    "a TorchScript module containing itself": (
        PKL(G("__torch__.m", "M") + b")\x81q\x00" + D(w=tensor(), me=b"h\x00") + b"b"), {},
        r"me contains itself \(a cycle\)"),
    "a TorchScript module with a tensor past its storage": (
        PKL(D(visual=G("__torch__.m", "M") + b")\x81" + D(w=tensor(size=(3, 3))) + b"b")), {},
        r"tensor visual.w: reaches element 8 of its storage 0, which holds 6"),
    "deep nesting": (_nested(100), {}, r"is nested more than 32 deep"),
    "billion laughs": (_laughs(), {}, r"shared references multiply its names past \d[\d,]* entries"),
    "long names by reference": (PKL(D(w=tensor()) + b"q\x00" + b"".join(
        b"}" + (S("k" * 60_000) + b"q\x01" if i == 0 else b"h\x01") + b"h\x00sq\x00" for i in range(30))), {},
        r"shared references multiply its names past .* or 1,048,576 characters"),
    "a deeply nested tuple as a key": (PKL(b"}" + b"N" + b"\x85" * 10_000 + b"Ns"), {},
                                       r"malformed pickle \(UnpicklingError: a tuple as a dict key or set item\)"),
    "a million nested tuples as a key": (PKL(b"}" + b"N" + b"\x85" * 1_000_000 + b"Ns"), {},   # SIGSEGV in pickle.loads
                                         r"its pickle builds more than 20,000 objects"),
    "a huge memo index": (PKL(b"}r\xff\xff\xff\xff"), {}, r"holds no tensors"),
    "an unknown opcode": (PKL(b"\xff"), {}, r"malformed pickle \(UnpicklingError: unknown opcode 0xff\)"),
    "a truncated pickle": (b"\x80\x02}(X\x05\x00\x00\x00ab", {}, r"malformed pickle"),
    "too many opcodes": (PKL(b"N0" * 600_000 + b"}"), {}, r"its pickle runs more than 1,000,000 opcodes"),
    "too many objects": (PKL(b"(" + b"}" * 250_000 + b"l"), {}, r"its pickle builds more than 20,000 objects"),
    # zip members
    "a zip bomb": (PKL(D(w=tensor(size=(1,), stride=(1,), persistent=pid(numel=1 << 24)))),
                   dict(members={"0": 4 << 24}, **DEFLATED),
                   r"compressed members inflated take 67,108,864 bytes; refused \(--max-bytes"),
    "a member name with ..": (SD(), dict(extra=[("archive/../../evil", b"x")]), r"unsafe member name 'archive/../../evil'"),
    "an absolute member name": (SD(), dict(extra=[("/etc/evil", b"x")]), r"unsafe member name '/etc/evil'"),
    "a member twice": (SD(), dict(extra=[("archive/data/0", b"x" * 24)]), r"member 'archive/data/0' appears twice"),
    "a bzip2 member": (SD(), dict(compress=zipfile.ZIP_BZIP2), r"compression method 12 \(only stored or deflated"),
    "a big-endian archive": (SD(), dict(byteorder="big"), r"byte order b'big' \(only little-endian"),
}
SAFETENSORS = {   # name: (header, data, declared header length, reason)
    "header length past the end": ({}, b"", 10 ** 9, r"header length 1,000,000,000 passes the end of the file"),
    "header not JSON": (b"{not json", b"", None, r"bad safetensors header"),
    "header a list": ([1, 2], b"", None, r"bad safetensors header \(not a JSON object\)"),
    "deeply nested header": (b"[" * 100_000, b"", None, r"bad safetensors header"),
    "a name twice": (b'{"w": 1, "w": 2}', b"", None, r"bad safetensors header \(a name appears twice\)"),
    "unknown dtype": ({"w": {"dtype": "C64", "shape": [2, 3], "data_offsets": [0, 24]}}, DATA, None,
                      r"tensor w: unsupported dtype 'C64'"),
    "negative shape": ({"w": {"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]}}, DATA, None,
                       r"tensor w: shape \[-2, 3\] is not a list of non-negative integers"),
    "byte count mismatch": ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, DATA, None,
                            r"tensor w: F32 \[2, 3\] is 24 bytes, but data_offsets \[0, 20\] hold 20"),
    "dtype mismatch": ({"w": {"dtype": "F64", "shape": [2, 3], "data_offsets": [0, 24]}}, DATA, None,
                       r"tensor w: F64 \[2, 3\] is 48 bytes"),
    "offsets past the end": ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 48]}}, DATA, None,
                             r"tensor w: data_offsets \[24, 48\] pass the end of the data \(24 bytes\)"),
    "reversed offsets": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, DATA, None,
                         r"tensor w: data_offsets \[8, 4\] are not \[begin, end\]"),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, DATA, None,
                            r"tensor b: data_offsets \[8, 16\] overlap tensor a's \[0, 16\]"),
}


# Bare pickles: the pre-1.6 torch format, refused unread (torch.load's unpickler, which read
# them before, crashed with SIGSEGV on the first one).
BARE = {
    "a bare pickle of a million nested tuples as a key": PKL(b"}" + b"N" + b"\x85" * 1_000_000 + b"Ns"),
    "a bare pickle state_dict": PKL(D(w=tensor())),
}


def _hostile(name, tmp_path):
    """(path, reason) of the named hostile file, written under tmp_path."""
    if name in BARE:
        (tmp_path / "bad.pt").write_bytes(BARE[name])
        return str(tmp_path / "bad.pt"), r"not a zip-format torch archive \(torch >= 1\.6\)"
    if name in SAFETENSORS:
        header, data, length, reason = SAFETENSORS[name]
        return str(safetensors(tmp_path / "bad.safetensors", header, data, length)), reason
    pkl, kw, reason = ARCHIVES[name]
    return str(archive(tmp_path / "bad.pt", pkl, **kw)), reason


@pytest.mark.filterwarnings("ignore:Duplicate name")   # zipfile, writing "a member twice"
@pytest.mark.parametrize("name", list(ARCHIVES) + list(BARE) + [f"safetensors: {n}" for n in SAFETENSORS])
def test_a_hostile_file_is_refused_with_its_reason(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, reason = _hostile(name.removeprefix("safetensors: "), tmp_path)
    with pytest.raises(SystemExit) as e:
        convert.main([path, "--out", str(tmp_path / "out")])
    message = e.value.code
    assert isinstance(message, str)   # sys.exit(str): printed to stderr, exit status 1
    assert message.startswith(f"error: {path}: "), message
    assert re.search(reason, message), message
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "EVIL").exists()


def test_tensor_shapes_that_are_not_a_clip_are_refused_before_anything_is_written(tmp_path):
    path = str(safetensors(tmp_path / "scalar.safetensors", {
        "ln_final.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, DATA[:4]))
    with pytest.raises(SystemExit) as e:
        convert.main([path, "--out", str(tmp_path / "out")])
    assert e.value.code == f"error: {path}: its tensor shapes are not a CLIP's (IndexError: tuple index out of range)"
    assert not (tmp_path / "out").exists()


def test_max_bytes_lets_a_trusted_compressible_archive_through(tmp_path):
    """A re-zipped (deflated) archive of zeros inflates far past twice its size: refused by
    default, read with a larger budget (the flag's purpose), to the same values."""
    pkl = PKL(D(w=tensor(size=(1 << 20,), stride=(1,), persistent=pid(numel=1 << 20))))
    path = str(archive(tmp_path / "zeros.pt", pkl, members={"0": 4 << 20}, **DEFLATED))
    with pytest.raises(pytorch_io.CheckpointFormatError, match=r"take 4,194,304 bytes; refused \(--max-bytes"):
        pytorch_io.read_tensors(path)
    assert not pytorch_io.read_tensors(path, max_bytes=8 << 20)["w"].any()
    assert convert._byte_count("64G") == 64 << 30
    assert "--max-bytes BYTES" in subprocess.run([sys.executable, "-m", "clip_jax.convert", "--help"], cwd=REPO,
                                                 capture_output=True, text=True).stdout


def test_a_tensor_shared_by_many_names_counts_once(tmp_path):
    """Tied weights (one tensor under two names) are legitimate: counted once in the budget."""
    path = str(archive(tmp_path / "tied.pt", PKL(D(a=tensor() + b"q\x00", b=b"h\x00", c=b"h\x00"))))
    got = pytorch_io.read_tensors(path, max_bytes=30)    # 24 bytes once, not 72
    np.testing.assert_array_equal(got["a"], got["c"])
    with pytest.raises(pytorch_io.CheckpointFormatError, match=r"as arrays would take 48 bytes"):
        pytorch_io.read_tensors(str(archive(tmp_path / "two.pt", PKL(D(a=tensor(), b=tensor())))), max_bytes=30)


# ----------------------------------------------------------------------------- the real command line

# Files that crashed (SIGSEGV), hung or exhausted memory before, run through the command
# line in a fresh process: exit status 1 (not a signal), no traceback, no --out, and peak
# memory near the file's size. Memory is the child's peak RSS (ru_maxrss of
# RUSAGE_CHILDREN, read by a small driver process that runs nothing else, so no other
# child's peak mixes in) minus that of the same command refusing a tiny file: the import
# baseline cancels, and what remains is what the hostile file cost. RLIMIT_AS is not used:
# numpy/JAX threads reserve address space they never touch, so a cap on it measures them.
_DRIVER = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(json.dumps([p.returncode, p.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")


def _run_convert(path, out):
    env = dict(device_env(1), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _DRIVER, sys.executable, "-m", "clip_jax.convert", path, "--out", out],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory):
    d = tmp_path_factory.mktemp("baseline")
    rc, _, rss = _run_convert(str(archive(d / "tiny.pt", SD(stride=(3, -1)))), str(d / "out"))
    assert rc == 1
    return rss


@pytest.mark.parametrize("name", ["huge stride", "a zip bomb", "billion laughs", "a million nested tuples as a key",
                                  "a bare pickle of a million nested tuples as a key",
                                  "too many objects", "a huge memo index", "safetensors: deeply nested header"])
def test_the_command_line_refuses_without_a_signal_a_traceback_or_memory(name, tmp_path, baseline_rss):
    path, reason = _hostile(name.removeprefix("safetensors: "), tmp_path)
    rc, stderr, rss = _run_convert(path, str(tmp_path / "out"))
    assert rc == 1, (rc, stderr[-2000:])
    assert "Traceback" not in stderr
    assert re.fullmatch(rf"error: {re.escape(path)}: .*{reason}.*\n", stderr, re.S), stderr
    assert not (tmp_path / "out").exists()
    size = os.path.getsize(path)
    assert rss - baseline_rss <= 2 * size + (8 << 20), (rss - baseline_rss, size)   # measured: <= 3 MB

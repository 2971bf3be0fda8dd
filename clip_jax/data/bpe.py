"""CLIP's byte-level BPE tokenizer, id-for-id identical to the reference.

A port of OpenAI CLIP's `clip/simple_tokenizer.py` (the algorithm OpenCLIP's
`SimpleTokenizer` also uses with its default 'lower' cleaning), with the reference's
`clip.tokenize(texts, context_length, truncate=True)` framing provided by
`Tokenizer.__call__`:

  text -> ftfy.fix_text -> html.unescape twice -> strip -> collapse `\\s+` to ' ' -> strip
       -> lower() -> pre-tokenise with the reference regex -> each pre-token's UTF-8 bytes
       mapped through `bytes_to_unicode()` -> BPE-merged ('</w>' on the last symbol) by the
       merge ranks of the merges file -> vocabulary ids.

Vocabulary (ids in this order, exactly as the reference builds it): the 256 byte-unicode
characters in `bytes_to_unicode()` order, the same 256 with '</w>', one entry per merge
(the two symbols joined), then '<|startoftext|>' and '<|endoftext|>'. With the reference
file `bpe_simple_vocab_16e6.txt.gz` (48,894 merges used) that is 49,408 ids: sot 49406,
eot 49407, as `Tokenizer` requires (sot = vocab_size - 2, eot = vocab_size - 1).

Two deliberate departures from the `Tokenizer` id contract, both kept for parity:
  * id 0 is a text token (the byte '!', e.g. "!!!" -> [0, '!!</w>']) as well as the
    padding value. The models never depend on 0 being padding-only: the text tower's
    attention is causal (no token attends to anything after it, so whatever follows eot,
    padding or not, cannot change the tokens up to eot), and the text feature is pooled
    at argmax(ids), the first eot, which is the largest id. Padding is never masked by
    value.
  * as in the reference, the literal strings '<|startoftext|>' / '<|endoftext|>' in a
    caption are matched by the pre-tokeniser and become the sot / eot ids. (OpenCLIP
    renamed its special tokens '<start_of_text>' / '<end_of_text>': there those strings
    become sot / eot and OpenAI's are ordinary text, the only difference between the two
    on any text; tests/test_bpe_parity.py.)

The merges file: OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` ships with this package
(`VENDORED_VOCAB`, clip_jax/data/assets/, MIT licence, byte-identical to the one in the
openai/CLIP repository and in open_clip_torch), so `find_reference_vocab()` and
`config.data.tokenizer=clip_bpe` with `tokenizer_path=''` need no other package; any other
merges file in the same format can be given instead.

Reading the merges file: gzip'd or plain UTF-8 text, split on '\\n' like the reference;
the first line is a version header and must contain '#version' (the reference file's is
'"bpe_simple_vocab_16e6.txt#version: 0.2', GPT-2 / Hugging Face files' '#version: 0.2'; the
reference skips line 0 unconditionally, here a file without a header is rejected rather
than silently losing its first merge); trailing blank lines are ignored; each of the next
`max_merges` lines (default 48,894 = the reference's `merges[1:49152-256-2+1]`; None =
all) must be two whitespace-separated symbols, else ValueError naming the file and line.
`decode` is the reference's, except that a row of `tok(...)` loses its sot, its final eot
and the padding after it.

Speed (the pipeline tokenises a few hundred captions per batch): the regexes are
compiled once, pre-token -> ids results are cached per tokenizer (bounded; dropped on
pickling), and captions made only of printable ASCII other than '&' (plus tab and
newline) skip ftfy and html.unescape, which cannot change such text (ftfy 6.x only
alters non-ASCII text, HTML entities, control characters, '\\r' and terminal escapes; the
tests check this against ftfy itself) and are pre-tokenised by an ASCII-only equivalent
of the regex on the faster stdlib engine.
"""
import functools
import gzip
import html
import importlib.util
import os
import re

import ftfy
import numpy as np
import regex

from clip_jax import paths
from clip_jax.data.tokenizer_base import Tokenizer

REFERENCE_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI CLIP's merges file, shipped as package data (see assets/README.md).
VENDORED_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                              REFERENCE_VOCAB_NAME)
# The reference keeps merges[1 : 49152-256-2+1]: 48,894 merges after the header line,
# so that 256 bytes + 256 bytes</w> + merges + sot + eot = 49,408 ids.
REFERENCE_NUM_MERGES = 49152 - 256 - 2
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"

_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")
# Text with any character outside [\t\n\x20-\x7e] or with '&' takes the full cleaning path.
_NEEDS_FTFY = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")
# _PRETOKENIZE restricted to such text once cleaned (lower-case printable ASCII, single
# spaces): \p{L} -> [a-z], \p{N} -> [0-9]. The stdlib engine is ~2x faster here.
_PRETOKENIZE_ASCII = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+""")


@functools.lru_cache()
def bytes_to_unicode():
    """byte value -> printable unicode character, in the reference's (= vocabulary) order."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def basic_clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text):
    return _WHITESPACE.sub(" ", text).strip()


def _clean_and_split(text):
    """(the reference's normalisation, whitespace_clean(basic_clean(text)).lower(), and the
    pre-tokeniser's findall for it)."""
    if _NEEDS_FTFY.search(text) is None:
        # printable ASCII without '&' (+ \t \n): ftfy and html.unescape are identities, and
        # str.split() splits on exactly the whitespace regex's \s matches here.
        text = " ".join(text.split()).lower()
        return text, _PRETOKENIZE_ASCII.findall(text)
    text = whitespace_clean(basic_clean(text)).lower()
    return text, _PRETOKENIZE.findall(text)


def _parse_merges(lines, source, first_lineno):
    merges = []
    for k, line in enumerate(lines):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: line {first_lineno + k}: malformed merge {line!r} "
                             "(expected two whitespace-separated symbols)")
        merges.append((parts[0], parts[1]))
    return merges


def read_merges(path, max_merges=REFERENCE_NUM_MERGES):
    """The merges of a CLIP BPE vocabulary file (gzip'd or plain), as (first, second) pairs."""
    path = os.fspath(path)
    try:
        data = paths.read_bytes(path)       # local or remote (config.data.tokenizer_path)
    except OSError as e:
        raise ValueError(f"CLIP BPE merges file {path!r} cannot be read: {e}") from e
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"CLIP BPE merges file {path!r} is not gzip'd or plain UTF-8 text: {e}") from e
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or "#version" not in lines[0]:
        first = lines[0] if lines else ""
        raise ValueError(f"{path}: line 1: expected a '#version' header line, got {first!r}")
    stop = None if max_merges is None else 1 + int(max_merges)
    return _parse_merges(lines[1:stop], path, first_lineno=2)


def find_reference_vocab():
    """Path of the reference `bpe_simple_vocab_16e6.txt.gz`: the copy shipped with clip_jax
    (`VENDORED_VOCAB`); only if that is missing (a broken install), the one in an installed
    open_clip (or OpenAI clip) package; else None. Never imports those packages (both
    import torch)."""
    if os.path.isfile(VENDORED_VOCAB):
        return VENDORED_VOCAB
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(location, REFERENCE_VOCAB_NAME)
            if os.path.isfile(path):
                return path
    return None


class ClipBPETokenizer(Tokenizer):
    """CLIP's byte-level BPE (see the module docstring); `tok(texts)` == `clip.tokenize(texts,
    context_length, truncate=True)` id for id."""

    cache_limit = 100_000   # cached pre-tokens; the cache is cleared when it grows past this

    def __init__(self, merges_path, context_length, max_merges=REFERENCE_NUM_MERGES):
        super().__init__(context_length)
        self._setup(read_merges(merges_path, max_merges))
        self.source = str(merges_path)

    @classmethod
    def from_merges(cls, merges, context_length, max_merges=None):
        """From merges given directly: "a b" strings or (a, b) pairs, no header line."""
        lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
        if max_merges is not None:
            lines = lines[:max_merges]
        tok = cls.__new__(cls)
        Tokenizer.__init__(tok, context_length)
        tok._setup(_parse_merges(lines, "merges", first_lineno=1))
        return tok

    def _setup(self, merges):
        self._merges = merges
        byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in byte_encoder.items()}
        # latin-1 decoding maps byte b to chr(b); str.translate with byte_encoder (an
        # ord -> str table) then maps it to CLIP's character.
        self._byte_table = byte_encoder
        vocab = list(byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend(a + b for a, b in merges)
        vocab.extend([SOT_TEXT, EOT_TEXT])
        # dict(zip(...)) as in the reference: a repeated merge maps to its LAST id / rank.
        self._encoder = dict(zip(vocab, range(len(vocab))))
        self._decoder = vocab
        self._ranks = dict(zip(merges, range(len(merges))))
        self._vocab_size = len(vocab)
        self._reset_cache()

    def _reset_cache(self):
        self._cache = {SOT_TEXT: (self._encoder[SOT_TEXT],), EOT_TEXT: (self._encoder[EOT_TEXT],)}

    @property
    def vocab_size(self):
        return self._vocab_size

    @property
    def merges(self):
        return list(self._merges)

    def identity(self):
        return "\n".join(f"{a} {b}" for a, b in self._merges).encode("utf-8")

    def bpe(self, token):
        """One byte-encoded pre-token -> its BPE symbols (the reference's `bpe`, as a list)."""
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ranks = self._ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word[:-1], word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged = first + second
            new_word, i, n = [], 0, len(word)
            while i < n:   # merge every occurrence, left to right, non-overlapping
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(merged)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = new_word
        return word

    def _encode_token(self, token):
        encoded = token.encode("utf-8").decode("latin-1").translate(self._byte_table)
        ids = tuple(self._encoder[s] for s in self.bpe(encoded))
        if len(self._cache) >= self.cache_limit:
            self._reset_cache()
        self._cache[token] = ids
        return ids

    def encode(self, text):
        """One text -> its piece ids (the reference's `SimpleTokenizer.encode`)."""
        cache = self._cache
        out = []
        for token in _clean_and_split(text)[1]:
            ids = cache.get(token)
            out.extend(ids if ids is not None else self._encode_token(token))
        return out

    def encode_pieces(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        """ids -> text, as the reference's decode (symbols joined, byte-decoded with invalid
        UTF-8 -> U+FFFD, '</w>' -> ' '), stripped. A row of `tok(...)` (starting with sot)
        loses its sot, its last eot and the padding after it; other sot / eot ids (the
        literal strings in a caption) decode to '<|startoftext|>' / '<|endoftext|>'."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
            if self.eot_id in ids:
                ids = ids[:len(ids) - 1 - ids[::-1].index(self.eot_id)]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"ids outside [0, {self._vocab_size}): {bad[:5]}")
        text = "".join(self._decoder[i] for i in ids)
        data = bytearray(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __getstate__(self):   # picklable for Grain worker processes: the merges, not a path
        return {"merges": "\n".join(f"{a} {b}" for a, b in self._merges),
                "context_length": self.context_length}

    def __setstate__(self, state):
        Tokenizer.__init__(self, state["context_length"])
        lines = state["merges"].split("\n") if state["merges"] else []
        self._setup(_parse_merges(lines, "pickled merges", first_lineno=1))

    def __repr__(self):
        return (f"ClipBPETokenizer(vocab_size={self.vocab_size}, "
                f"context_length={self.context_length})")

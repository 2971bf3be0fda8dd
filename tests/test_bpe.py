"""CLIP's byte-level BPE tokenizer (clip_jax/data/bpe.py).

Most tests use the small hand-made merges list MERGES below, with every expected id
derived by hand in a comment; the reference merges file shipped in clip_jax/data/assets is
checked on known ids at the end (tests/test_bpe_parity.py compares it, text by text, with
open_clip's tokenizer when that is installed). The id layout:

  ids 0..255    the 256 byte symbols, in bytes_to_unicode() order:
                  bytes 0x21..0x7e ('!'..'~')  ids 0..93     id = b - 0x21  ('!' = 0)
                  bytes 0xa1..0xac             ids 94..105   id = b - 0xa1 + 94
                  bytes 0xae..0xff             ids 106..187  id = b - 0xae + 106
                  bytes 0x00..0x20             ids 188..220  id = b + 188
                  bytes 0x7f..0xa0             ids 221..254  id = b - 0x7f + 221
                  byte  0xad                   id 255
  ids 256..511  the same symbols with '</w>' (the last symbol of a word): id + 256
  ids 512..     one per merge, in file order (rank r -> id 512 + r)
  then sot = vocab_size - 2, eot = vocab_size - 1.

Letters used below: 'a' 0x61 -> 64, 'b' -> 65, 'c' -> 66, 'd' -> 67, 'e' -> 68, 'f' -> 69,
'h' -> 71, 'i' -> 72, 'l' -> 75, 'm' -> 76, 'n' -> 77, 'o' -> 78, 'p' -> 79, 'r' -> 81,
's' -> 82, 't' -> 83, 'w' -> 86; punctuation: '!' -> 0, "'" 0x27 -> 6, '&' 0x26 -> 5,
',' 0x2c -> 11, '/' 0x2f -> 14, ';' 0x3b -> 26, '<' 0x3c -> 27, '>' 0x3e -> 29,
'~' 0x7e -> 93; digits: '0' 0x30 -> 15, '2' -> 17, '3' -> 18, '4' -> 19.
"""
import gzip
import html
import os
import pickle
import random
import sys

import ftfy
import ml_collections
import numpy as np
import pytest
import regex

from clip_jax.data import bpe
from clip_jax.data.bpe import ClipBPETokenizer
from clip_jax.data.tokenizer import get_tokenizer

MERGES = [
    "l l",          # rank 0 -> id 512  "ll"
    "h e",          # rank 1 -> id 513  "he"
    "he ll",        # rank 2 -> id 514  "hell"
    "hell o</w>",   # rank 3 -> id 515  "hello</w>"
    "l o</w>",      # rank 4 -> id 516  "lo</w>"
    "l l</w>",      # rank 5 -> id 517  "ll</w>"
    "i t</w>",      # rank 6 -> id 518  "it</w>"
    "' s</w>",      # rank 7 -> id 519  "'s</w>"
    "! !</w>",      # rank 8 -> id 520  "!!</w>"
]
VOCAB_SIZE = 256 + 256 + len(MERGES) + 2   # 523
SOT, EOT = 521, 522
CTX = 16

HELLO = 515        # "hello" -> h e l l o</w>: "l l"(0) -> h e ll o</w>; "h e"(1) -> he ll o</w>;
                   # "he ll"(2) -> hell o</w>; "hell o</w>"(3) -> hello</w>. ("l o</w>"(4)
                   # never applies: the first 'l' ... 'o' pair is gone once "ll" is merged.)
EXCL_W = 256       # "!</w>"  = 0 + 256
COMMA_W = 267      # ",</w>"  = 11 + 256
WORLD = [86, 78, 81, 75, 323]   # "world": no merge applies -> w o r l d</w>(67 + 256)


def _row(pieces, ctx=CTX):
    row = [SOT] + list(pieces) + [EOT]
    return row + [0] * (ctx - len(row))


@pytest.fixture(scope="module")
def tok():
    return ClipBPETokenizer.from_merges(MERGES, context_length=CTX)


def _clean(text):
    """The tokenizer's cleaning of `text` (the reference's normalisation, ASCII fast path included)."""
    return bpe._clean_and_split(text)[0]


def _write_merges(path, lines, gzipped, header="#version: 0.2"):
    data = ("\n".join([header] + list(lines)) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gzipped else data)
    return str(path)


# ----------------------------------------------------------------------------- layout

def test_vocab_layout_and_special_ids(tok):
    assert tok.vocab_size == VOCAB_SIZE == 523
    assert (tok.sot_id, tok.eot_id) == (SOT, EOT) == (VOCAB_SIZE - 2, VOCAB_SIZE - 1)
    assert tok([""]).tolist() == [_row([])]


def test_byte_ids_follow_the_bytes_to_unicode_order(tok):
    # The rule table of the module docstring, rebuilt independently for all 256 bytes.
    expected_order = (list(range(0x21, 0x7f)) + list(range(0xa1, 0xad)) + list(range(0xae, 0x100))
                      + list(range(0x00, 0x21)) + list(range(0x7f, 0xa1)) + [0xad])
    table = bpe.bytes_to_unicode()
    assert list(table) == expected_order
    assert len(set(table.values())) == 256 and not any(c.isspace() for c in table.values())
    # '!' is id 0 mid-word, '~' (0x7e -> 93) is 93 + 256 = 349 as the last symbol.
    assert tok.encode("!~") == [0, 349]
    assert tok.encode("~") == [349]
    assert tok.encode("a") == [64 + 256]


def test_output_dtype_and_shape(tok):
    out = tok(["hello", "it's", ""])
    assert out.dtype == np.int32 and out.shape == (3, CTX)
    single = tok("hello")
    assert single.shape == (1, CTX) and single.tolist() == [_row([HELLO])]


# ----------------------------------------------------------------------------- BPE

def test_merges_build_a_whole_word(tok):
    assert tok.encode("hello") == [HELLO]
    assert tok("hello").tolist() == [_row([515])]


def test_merge_priority_is_rank_not_position():
    # "llo" -> l l o</w>. Pairs: (l, l) on the LEFT, (l, o</w>) on the right.
    # MERGES: "l l" has rank 0 < "l o</w>" rank 4  -> ll o</w>  -> [512, 78 + 256 = 334].
    assert ClipBPETokenizer.from_merges(MERGES, CTX).encode("llo") == [512, 334]
    # Swapped ranks ("l o</w>" = rank 0 -> id 512, "l l" = rank 1 -> id 513): the
    # right-hand pair merges first although (l, l) comes earlier in the word -> l lo</w>.
    swapped = ClipBPETokenizer.from_merges(["l o</w>", "l l"], CTX)
    assert swapped.encode("llo") == [75, 512]


def test_end_of_word_symbols_differ_from_mid_word(tok):
    # "ll" alone -> l l</w>: only "l l</w>" (rank 5) applies -> [517]; inside "llo" the
    # same two letters are "l l" (rank 0) -> 512.
    assert tok.encode("ll") == [517]
    assert tok.encode("llo") == [512, 334]
    # "hell" -> h e l l</w>: "h e"(1) -> he l l</w>; "l l</w>"(5) -> he ll</w>; no merge
    # (he, ll</w>) -> [513, 517], unlike "hello" (one token).
    assert tok.encode("hell") == [513, 517]


def test_every_occurrence_merges_left_to_right_without_overlap(tok):
    # "lll" -> l l l</w>; best pair (l, l) rank 0 merges at 0..1 only -> ll l</w>; then
    # (ll, l</w>) is no merge -> [512, 75 + 256 = 331].
    assert tok.encode("lll") == [512, 331]
    # "llll" -> l l l l</w>; (l, l) merges at 0..1, then position 2 is (l, l</w>), not
    # (l, l) -> ll l l</w>; then "l l</w>"(5) -> ll ll</w> -> [512, 517].
    assert tok.encode("llll") == [512, 517]


# ----------------------------------------------------------------------------- pre-tokenising

def test_id_zero_is_a_text_token(tok):
    # "!!!" is one punctuation pre-token -> ! ! !</w>; (!, !) is no merge, (!, !</w>) is
    # rank 8 -> ! !!</w> -> [0, 520]. The 0 is text, not padding; padding starts after eot.
    assert tok.encode("!!!") == [0, 520]
    assert tok("!!!").tolist() == [[SOT, 0, 520, EOT] + [0] * (CTX - 4)]


def test_punctuation_and_contractions_split_per_the_regex(tok):
    assert tok.encode("hello!!") == [HELLO, 520]          # "hello" + "!!" -> "!!</w>"
    assert tok.encode("hello!") == [HELLO, EXCL_W]         # "!" alone -> "!</w>"
    assert tok.encode("hello, world") == [HELLO, COMMA_W] + WORLD
    # "it's" -> "it" ([\p{L}]+) + "'s" (contraction alternative): "i t</w>"(6) -> 518,
    # "' s</w>"(7) -> 519.
    assert tok.encode("it's") == [518, 519]
    # "'x" is no contraction: "'" is punctuation ("'</w>" = 6 + 256), then "x" (0x78 -> 87 + 256).
    assert tok.encode("'x") == [262, 343]


def test_numbers_split_into_single_digits(tok):
    # [\p{N}] matches ONE digit: each digit is its own word -> digit</w>.
    assert tok.encode("2024") == [17 + 256, 15 + 256, 17 + 256, 19 + 256]
    assert tok.encode("hello2") == [HELLO, 273]


def test_case_folding(tok):
    assert tok.encode("HELLO") == tok.encode("HeLLo") == [HELLO]
    assert tok.encode("IT'S") == [518, 519]


def test_unicode_and_emoji_fall_back_to_byte_tokens(tok):
    # 'é' = C3 A9: 0xc3 -> 0xc3 - 0xae + 106 = 127; 0xa9 -> 0xa9 - 0xa1 + 94 = 102, last -> 358.
    assert tok.encode("é") == [127, 358]
    # "café" is ONE \p{L}+ word: c a f + the two bytes of 'é'.
    assert tok.encode("café") == [66, 64, 69, 127, 358]
    # '🙂' U+1F642 = F0 9F 99 82 (not a letter: a punctuation-class pre-token):
    # 0xf0 -> 0xf0 - 0xae + 106 = 172; 0x9f -> 0x9f - 0x7f + 221 = 253; 0x99 -> 247;
    # 0x82 -> 224, last -> 480.
    assert tok.encode("🙂") == [172, 253, 247, 480]
    assert tok.encode("hello🙂") == [HELLO, 172, 253, 247, 480]


def test_html_entities_are_unescaped(tok):
    # ftfy unescapes entities repeatedly, then html.unescape runs twice more -> "&" (5 + 256).
    assert tok.encode("&amp;amp;") == [261]
    assert tok.encode("&lt;3") == [27 + 256, 18 + 256]              # "<3" -> "<" + "3"
    # With a literal '<' ftfy leaves entities alone, so exactly two html.unescape passes
    # run: "<b>&amp;amp;amp;</b>" -> "<b>&amp;</b>", pre-tokens "<" "b" ">&" "amp" ";</" "b" ">":
    #   "<" -> 283, "b" -> 321, ">&" -> [29, 261], "amp" -> [64, 76, 79 + 256],
    #   ";</" -> [26, 27, 14 + 256], "b" -> 321, ">" -> 285.
    assert tok.encode("<b>&amp;amp;amp;</b>") == [283, 321, 29, 261, 64, 76, 335, 26, 27, 270,
                                                   321, 285]


def test_ftfy_fixes_mojibake(tok):
    # "âœ”" is the UTF-8 of '✔' (E2 9C 94) read as cp1252; ftfy restores '✔':
    # 0xe2 -> 0xe2 - 0xae + 106 = 158; 0x9c -> 0x9c - 0x7f + 221 = 250; 0x94 -> 242, last -> 498.
    assert tok.encode("âœ” hello") == [158, 250, 498, HELLO]
    assert tok.encode("cafÃ©") == tok.encode("café") == [66, 64, 69, 127, 358]


def test_whitespace_collapses(tok):
    assert tok.encode("  hello \n\t\n hello  ") == [HELLO, HELLO]             # ASCII path
    assert tok.encode("\r\nhello\u3000\u00a0hello\x0chello\u2028") == [HELLO] * 3  # full path
    # ftfy DELETES control characters such as \x0b, joining the words: "hellohello" ->
    # "l l" x2, "h e" x2, "he ll" x2 -> hell o hell o</w>; "hell o</w>" -> hell o hello</w>.
    assert tok.encode("hello\x0bhello") == [514, 78, HELLO]


def test_empty_and_blank_text(tok):
    assert tok(["", "   \n\t", "\u3000"]).tolist() == [_row([])] * 3


def test_truncation_keeps_eot_last():
    tok = ClipBPETokenizer.from_merges(MERGES, context_length=8)
    # 10 words, room for 8 - 2 = 6: [sot] + 6 x hello + [eot] (= clip.tokenize(truncate=True)).
    assert tok("hello " * 10).tolist() == [[SOT] + [HELLO] * 6 + [EOT]]
    assert tok("hello " * 6).tolist() == [[SOT] + [HELLO] * 6 + [EOT]]
    assert tok("hello " * 5).tolist() == [[SOT] + [HELLO] * 5 + [EOT, 0]]


def test_literal_special_token_strings_become_sot_eot(tok):
    # As in the reference: the pre-tokeniser matches them and the cache maps them to ids.
    assert tok.encode("hello <|endoftext|>") == [HELLO, EOT]
    assert tok.encode("<|StartOfText|>hello") == [SOT, HELLO]


# ----------------------------------------------------------------------------- decode

def test_decode_round_trips_after_cleaning(tok):
    wide = ClipBPETokenizer.from_merges(MERGES, context_length=32)
    row = wide("Hello,  World!\tcafé 🙂")[0]
    # every symbol ending a pre-token carries '</w>' -> a space: punctuation comes apart.
    assert wide.decode(row) == "hello , world ! café 🙂"
    # 17 pieces > CTX - 2 = 14: truncation cuts the emoji's last 3 bytes; the remaining
    # byte decodes to U+FFFD, as in the reference (errors="replace").
    assert tok.decode(tok("Hello,  World!\tcafé 🙂")[0]) == "hello , world ! café \ufffd"
    for text in ["HELLO   world", "it 's 2 0 2 4 ~", "naïve 日本語 🙂 ok", "&amp;amp; x"]:
        assert wide.decode(wide(text)[0]) == _clean(text)
        assert wide.decode(wide.encode(text)) == _clean(text)
    # the 0 of "!!!" is text; the 0s after eot are padding and are dropped.
    assert tok.decode(tok("!!!")[0]) == "!!!"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([VOCAB_SIZE])


# ----------------------------------------------------------------------------- files

def test_gzip_and_plain_files_load_identically(tmp_path):
    gz = ClipBPETokenizer(_write_merges(tmp_path / "m.txt.gz", MERGES, True), CTX)
    plain = ClipBPETokenizer(_write_merges(tmp_path / "m.txt", MERGES, False), CTX)
    texts = ["hello", "Hell, it's 2024!!!", "café 🙂", "llll llo"]
    assert gz.merges == plain.merges == [tuple(m.split()) for m in MERGES]
    assert gz.vocab_size == plain.vocab_size == VOCAB_SIZE
    np.testing.assert_array_equal(gz(texts), plain(texts))
    np.testing.assert_array_equal(gz(texts), ClipBPETokenizer.from_merges(MERGES, CTX)(texts))


def test_reference_style_header_is_skipped(tmp_path):
    # The reference file's first line is '"bpe_simple_vocab_16e6.txt#version: 0.2'.
    path = _write_merges(tmp_path / "m.gz", MERGES, True,
                         header='"bpe_simple_vocab_16e6.txt#version: 0.2')
    assert ClipBPETokenizer(path, CTX).encode("hello") == [HELLO]


def test_missing_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "nope.txt.gz")
    with pytest.raises(ValueError, match="nope.txt.gz"):
        ClipBPETokenizer(path, CTX)


def test_malformed_files_are_clear_errors(tmp_path):
    path = _write_merges(tmp_path / "bad.txt", ["h e", "l l", "oops", "a b"], False)
    with pytest.raises(ValueError, match=r"bad\.txt: line 4: malformed merge 'oops'"):
        ClipBPETokenizer(path, CTX)
    path = _write_merges(tmp_path / "bad3.txt.gz", ["h e", "a b c"], True)
    with pytest.raises(ValueError, match=r"bad3\.txt\.gz: line 3"):
        ClipBPETokenizer(path, CTX)
    path = _write_merges(tmp_path / "noheader.txt", ["h e"], False, header="l l")
    with pytest.raises(ValueError, match=r"noheader\.txt: line 1: expected a '#version' header"):
        ClipBPETokenizer(path, CTX)
    path = str(tmp_path / "binary.gz")
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"binary\.gz"):
        ClipBPETokenizer(path, CTX)
    with pytest.raises(ValueError, match="line 2"):
        ClipBPETokenizer.from_merges(["h e", "he"], CTX)


def test_max_merges_matches_the_reference_slicing(tmp_path):
    path = _write_merges(tmp_path / "m.txt", MERGES, False)
    lines = open(path, encoding="utf-8").read().split("\n")
    for k in range(len(MERGES) + 2):
        # the reference's rule, merges[1 : k + 1] (k = 49152 - 256 - 2 for the real file)
        expected = [tuple(line.split()) for line in lines[1:k + 1] if line]
        tok = ClipBPETokenizer(path, CTX, max_merges=k)
        assert tok.merges == expected and tok.vocab_size == 512 + len(expected) + 2
    # 3 merges: "l l", "h e", "he ll" -> "hello" = hell o</w> -> [514, 334]
    assert ClipBPETokenizer(path, CTX, max_merges=3).encode("hello") == [514, 334]
    assert ClipBPETokenizer(path, CTX, max_merges=None).merges == [tuple(m.split()) for m in MERGES]
    assert ClipBPETokenizer.from_merges(MERGES, CTX, max_merges=3).encode("hello") == [514, 334]


def test_default_max_merges_gives_the_reference_vocab_size(tmp_path):
    assert bpe.REFERENCE_NUM_MERGES == 48_894 == 49152 - 256 - 2
    # A file longer than the reference's slice: filler merges of byte symbols other than
    # 'q' and 'z', then (rank 48,893, the LAST kept) "z q</w>" and (rank 48,894, the first
    # dropped) "q z</w>".
    symbols = [c for c in bpe.bytes_to_unicode().values() if c not in "qz"]
    fillers = [f"{a} {b}" for a in symbols for b in symbols][:48_893]
    lines = fillers + ["z q</w>", "q z</w>"] + fillers[:1000]
    tok = ClipBPETokenizer(_write_merges(tmp_path / "big.txt.gz", lines, True), 77)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (49_408, 49_406, 49_407)
    assert tok.encode("zq") == [49_405]                       # 512 + 48,893 = sot - 1
    assert tok.encode("qz") == [ord("q") - 0x21, ord("z") - 0x21 + 256]   # [80, 345]: unmerged


# ----------------------------------------------------------------------------- pickling, cache

def test_pickle_round_trip_keeps_merges_not_the_path(tmp_path):
    path = _write_merges(tmp_path / "only_here.txt.gz", MERGES, True)
    tok = ClipBPETokenizer(path, CTX)
    texts = ["Hello, it's 2024!!!", "café 🙂 &amp;amp;", "llll"]
    expected = tok(texts)
    data = pickle.dumps(tok)
    assert b"only_here" not in data
    os.remove(path)
    clone = pickle.loads(data)
    assert clone.context_length == CTX and clone.vocab_size == VOCAB_SIZE
    np.testing.assert_array_equal(clone(texts), expected)


def test_bounded_cache_gives_the_same_ids():
    small = ClipBPETokenizer.from_merges(MERGES, CTX)
    small.cache_limit = 3
    words = " ".join(["hello", "hell", "llo", "lll", "llll", "it's", "café", "world"] * 3)
    assert small.encode(words) == ClipBPETokenizer.from_merges(MERGES, CTX).encode(words)
    assert len(small._cache) <= 3 + 1
    assert small.encode("<|endoftext|>") == [EOT]      # the special entries survive a reset


# ----------------------------------------------------------------------------- the reference

def get_pairs(word):
    """The reference's: the set of adjacent symbol pairs of a word (a sequence of symbols)."""
    return set(zip(word[:-1], word[1:]))


class _ReferenceBPE:
    """A transcription of OpenAI CLIP's clip/simple_tokenizer.py (MIT licence): __init__
    (on a list of merges), bpe and encode (with `get_pairs` above), used as an oracle."""

    def __init__(self, merges):
        self.byte_encoder = bpe.bytes_to_unicode()
        merges = [tuple(merge.split()) for merge in merges]
        vocab = list(bpe.bytes_to_unicode().values())
        vocab = vocab + [v + '</w>' for v in vocab]
        for merge in merges:
            vocab.append(''.join(merge))
        vocab.extend(['<|startoftext|>', '<|endoftext|>'])
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {'<|startoftext|>': '<|startoftext|>', '<|endoftext|>': '<|endoftext|>'}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + '</w>',)
        pairs = get_pairs(word)
        if not pairs:
            return token + '</w>'
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float('inf')))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        word = ' '.join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = regex.sub(r'\s+', ' ', text).strip().lower()
        out = []
        for token in regex.findall(self.pat, text):
            token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
            out.extend(self.encoder[t] for t in self.bpe(token).split(' '))
        return out


def _random_merges(rng, n):
    """n BPE-style merges over {a, b, c, é's bytes}: each joins two existing symbols."""
    symbols = list("abc") + [s + "</w>" for s in "abc"]
    symbols += [bpe.bytes_to_unicode()[0xc3], bpe.bytes_to_unicode()[0xa9] + "</w>"]
    merges = []
    while len(merges) < n:
        a = rng.choice([s for s in symbols if not s.endswith("</w>")])
        b = rng.choice(symbols)
        if f"{a} {b}" not in merges:
            merges.append(f"{a} {b}")
            symbols.append(a + b)
    return merges


def test_matches_a_transcription_of_the_reference_on_random_text():
    rng = random.Random(0)
    pieces = (list("abcabcabcABC") + [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\x0b"]
              + list("0123456789!?.,'&;<>~") + ["'s", "'LL", "&amp;", "&amp;amp;", "&lt;"]
              + ["é", "É", "cafÃ©", "âœ”", "🙂", "日本", "\x00", "\x1b[31m", "ﬁ", "Ａ",
                 "<|endoftext|>"])
    for trial in range(4):
        merges = _random_merges(rng, rng.choice([5, 30, 120]))
        ours, ref = ClipBPETokenizer.from_merges(merges, 77), _ReferenceBPE(merges)
        for _ in range(300):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
            assert ours.encode(text) == ref.encode(text), (merges, text)


def test_ascii_fast_path_is_an_identity_for_ftfy_and_html():
    # The cleaning skips ftfy / html.unescape for printable ASCII without '&' (+ \t \n); check
    # that this ftfy version really leaves such text alone, and that the cleaning agrees with the
    # reference's cleaning on both sides of the boundary.
    rng = random.Random(1)
    fast = [chr(c) for c in range(0x20, 0x7f) if chr(c) != "&"] + ["\t", "\n"]
    slow = fast + ["&", "&amp;", "\r", "\x0b", "\x0c", "\x1b[0m", "\x00", "\x7f", "é", "â€™"]
    for alphabet in (fast, slow):
        for _ in range(1500):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            reference = regex.sub(r"\s+", " ", html.unescape(html.unescape(
                ftfy.fix_text(text))).strip()).strip().lower()
            assert _clean(text) == reference, text
            if alphabet is fast:
                assert ftfy.fix_text(text) == text == html.unescape(text)


def test_real_reference_vocab_known_ids():
    # ids printed by OpenAI CLIP's own SimpleTokenizer on the reference file, which ships
    # with clip_jax (so this always runs).
    assert bpe.find_reference_vocab() == bpe.VENDORED_VOCAB
    tok = ClipBPETokenizer(bpe.VENDORED_VOCAB, 77)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (49408, 49406, 49407)
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("Hello world!") == [3306, 1002, 256]
    assert tok.encode("It's 2024 — café 🙂") == [585, 568, 273, 271, 273, 275, 2005, 15304, 14860]
    assert tok.encode("&amp;amp; âœ” no") == [261, 13749, 871]
    assert tok.encode("!!!") == [995]


def test_vendored_vocab_ships_with_its_licence():
    assets = os.path.dirname(bpe.VENDORED_VOCAB)
    assert os.path.basename(bpe.VENDORED_VOCAB) == bpe.REFERENCE_VOCAB_NAME
    assert os.path.dirname(assets) == os.path.dirname(os.path.abspath(bpe.__file__))
    with open(os.path.join(assets, "LICENSE-openai-clip.txt"), encoding="utf-8") as f:
        licence = f.read()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence
    with open(bpe.VENDORED_VOCAB, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    assert len(bpe.read_merges(bpe.VENDORED_VOCAB)) == bpe.REFERENCE_NUM_MERGES


def test_find_reference_vocab_never_imports_open_clip(tmp_path, monkeypatch):
    for name in ("open_clip", "clip"):   # shadow any installed package: importing it raises
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise RuntimeError('imported!')\n")
        monkeypatch.delitem(sys.modules, name, raising=False)   # e.g. the parity tests' import
    monkeypatch.syspath_prepend(str(tmp_path))
    # The vendored copy comes first, without looking for (let alone importing) the packages.
    assert bpe.find_reference_vocab() == bpe.VENDORED_VOCAB
    # Fallback, only when the vendored file is missing: the packages' copies, found by path.
    monkeypatch.setattr(bpe, "VENDORED_VOCAB", str(tmp_path / "gone" / bpe.REFERENCE_VOCAB_NAME))
    assert bpe.find_reference_vocab() is None
    vocab = tmp_path / "open_clip" / bpe.REFERENCE_VOCAB_NAME
    vocab.write_bytes(gzip.compress(b"#version: 0.2\n"))
    assert bpe.find_reference_vocab() == str(vocab)
    assert "open_clip" not in sys.modules and "clip" not in sys.modules


def _clip_bpe_config(tokenizer_path=""):
    return ml_collections.ConfigDict(dict(
        data=dict(tokenizer="clip_bpe", tokenizer_path=tokenizer_path),
        model=dict(text=dict(vocab_size=49408, context_length=77))))


def test_clip_bpe_config_uses_the_vendored_vocab_by_default(tmp_path, monkeypatch):
    tok = get_tokenizer(_clip_bpe_config(), str(tmp_path))
    assert isinstance(tok, ClipBPETokenizer) and tok.vocab_size == 49408
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    # an explicit path still wins
    path = _write_merges(tmp_path / "m.txt.gz", MERGES, True)
    assert get_tokenizer(_clip_bpe_config(path), str(tmp_path)).vocab_size == VOCAB_SIZE
    # a broken install (no vendored file, no open_clip / clip copy) is a clear error
    monkeypatch.setattr(bpe, "VENDORED_VOCAB", str(tmp_path / "gone" / bpe.REFERENCE_VOCAB_NAME))
    monkeypatch.setattr(bpe, "find_reference_vocab", lambda: None)
    with pytest.raises(ValueError, match=r"tokenizer_path='' uses the merges file shipped with "
                                         r"clip_jax, .*gone.*missing"):
        get_tokenizer(_clip_bpe_config(), str(tmp_path))

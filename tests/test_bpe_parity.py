"""Id-for-id parity of ClipBPETokenizer (clip_jax/data/bpe.py) with the reference.

The reference is open_clip's copy of OpenAI CLIP's tokenizer (`open_clip.tokenizer`,
"Copied from https://github.com/openai/CLIP"), called as

    open_clip.tokenizer.SimpleTokenizer(clean="lower")(texts, context_length=ctx)

`clean="lower"` (open_clip's default, passed explicitly) is OpenAI CLIP's cleaning:
ftfy.fix_text, html.unescape twice, strip, whitespace collapsed, lower(). Its __call__
(no reduction_mask) is OpenAI's `clip.tokenize(texts, ctx, truncate=True)`: [sot] + ids +
[eot], cut to ctx with the last kept id replaced by eot, zero padding.

open_clip's one change from OpenAI's tokenizer: it renamed the special tokens to
'<start_of_text>' / '<end_of_text>' (same ids, 49406 / 49407). OpenAI CLIP matches the
literal strings '<|startoftext|>' / '<|endoftext|>' in a caption as those ids (and so does
ClipBPETokenizer); open_clip instead matches '<start_of_text>' / '<end_of_text>' and
tokenizes OpenAI's strings as text. Texts containing any of the four strings are therefore
compared with `_openai_named()`: open_clip's tokenizer with OpenAI's names restored (its
encoder / decoder entries, bpe cache and pre-tokeniser pattern set exactly as in OpenAI's
clip/simple_tokenizer.py); every other text is compared with open_clip unmodified.

Skipped unless open_clip is installed (pip install open_clip_torch; it imports torch).
"""
import os
import random

import numpy as np
import pytest
import regex

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

from clip_jax.data import bpe  # noqa: E402
from clip_jax.data.bpe import ClipBPETokenizer  # noqa: E402

SOT, EOT = 49406, 49407
SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


def _reference():
    # clean="lower" is OpenAI CLIP's cleaning (see the module docstring); reduction_mask=""
    # keeps OpenAI's truncation. bpe_path: open_clip's own copy of the merges file.
    return open_clip_tokenizer.SimpleTokenizer(clean="lower", reduction_mask="")


def _openai_named():
    """open_clip's SimpleTokenizer in OpenAI CLIP's exact state: special tokens named
    '<|startoftext|>' / '<|endoftext|>' in the encoder, decoder, cache and pattern."""
    ref = _reference()
    for openai_name, open_clip_name in (("<|startoftext|>", "<start_of_text>"),
                                        ("<|endoftext|>", "<end_of_text>")):
        i = ref.encoder.pop(open_clip_name)
        ref.encoder[openai_name] = i
        ref.decoder[i] = openai_name
    ref.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
    ref.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                            regex.IGNORECASE)
    assert (ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]) == (SOT, EOT)
    return ref


REF = _reference()
REF_OPENAI = _openai_named()


@pytest.fixture(scope="module")
def toks():
    return {ctx: ClipBPETokenizer(bpe.VENDORED_VOCAB, ctx) for ctx in (77, 8)}


def _has_special(text):
    cleaned = REF.clean_fn(text)   # the strings can also appear through cleaning (&lt; ...)
    return any(s in cleaned for s in SPECIALS)


def _assert_rows_match(tok, texts):
    """tok(texts) == the reference's rows, id for id; the reference for each text is
    open_clip as is, or with OpenAI's special-token names where one occurs in the text."""
    ctx = tok.context_length
    ours = np.asarray(tok(texts), dtype=np.int64)
    assert ours.shape == (len(texts), ctx)
    plain = [t for t in texts if not _has_special(t)]
    expected = {}
    if plain:
        expected.update(zip(plain, REF(plain, context_length=ctx).numpy()))
    expected_openai = REF_OPENAI(texts, context_length=ctx).numpy()
    for i, text in enumerate(texts):
        want = expected.get(text, expected_openai[i])
        assert ours[i].tolist() == want.tolist(), (ctx, text)
        assert (ours[i] == expected_openai[i]).all(), (ctx, text)


CASES = [
    # plain ASCII
    "a photo of a cat", "A Photo Of A CAT", "the quick brown fox jumps over the lazy dog",
    "supercalifragilisticexpialidocious", "x", "I",
    # punctuation and contractions
    "Hello, world!", "it's", "IT'S", "we're they've I'm you'll he'd don't", "'s 's", "'x",
    "o'clock rock'n'roll", "!!!", "?!?!...", "--->", "(a) [b] {c}", "e.g.", "a/b\\c",
    "@user #hashtag $100 50% ^_^ *x* ~y~ `z` \"q\"", "http://example.com/a?b=c&d=e",
    # digits
    "2024", "3.14159", "1,000,000", "007", "h2o", "covid19", "1st 2nd 3rd 4th",
    "½ ² ³ ⅷ ٣٤ ४२ ①", "Ⅻ",
    # unicode: accents (precomposed and combining), CJK, Arabic, Hebrew, Indic, others
    "café", "CAFÉ", "cafe\u0301", "naïve résumé", "Ångström", "straße STRASSE", "İstanbul ı",
    "ǅemal", "Ωμέγα", "Привет мир", "日本語のテキスト", "中文字符", "한국어 텍스트",
    "مرحبا بالعالم", "العربية\u064b\u064f", "שלום עולם", "हिन्दी", "ภาษาไทย", "a\u0308\u0301",
    "\u0301\u0301x", "ﬁsh ﬂow", "ＡＢＣ１２３", "𝐀𝐁𝐂 𝟏𝟐𝟑", "ÿ\u00ad\u00a0z",
    # emoji: single, skin tones, ZWJ sequences, flags, keycaps, variation selectors, tags
    "🙂", "hello🙂", "👍🏽👍🏿", "👨\u200d👩\u200d👧\u200d👦", "👩🏽\u200d💻", "🏳️\u200d🌈", "🇫🇷🇯🇵",
    "🇺🇸 flag", "1️⃣ #️⃣", "❤️ ❤", "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
    "😀😃😄😁😆😅😂🤣", "a\u200db", "\u200b\u200c\u200d",
    # whitespace: repeated, tabs, newlines, NBSP, ideographic and other Unicode spaces
    "a  b", "a\tb", "a\nb", "a\r\nb", "a\rb", "  a   b  ", "\ta\t\tb\n\n", "a\u00a0b",
    "a\u3000b", "a\u2000\u2001\u2002\u2003\u2009\u200ab", "a\u202fb\u205fc\u1680d",
    "a\u2028b\u2029c", "a\x85b", "a\x0bb", "a\x0cb", "a\x1cb\x1dc\x1ed\x1ff", "a\ufeffb",
    # empty and whitespace-only
    "", " ", "   ", "\t", "\n", "\r\n", "\t \n \r", "\u00a0", "\u3000", "\u3000 \u00a0\u2003",
    "\x0b\x0c", "\x85", "\u2028", "\x1c\x1d",
    # HTML entities (single, double, triple escaped, numeric, invalid; with and without '<')
    "&amp;", "&amp;amp;", "&amp;amp;amp;", "&lt;3", "&gt;", "&quot;hi&quot;", "&#39;s",
    "&#x27;s", "&nbsp;x", "a&nbsp;&nbsp;b", "&copy; 2024", "&amp", "AT&T", "&#0;", "&#28;x",
    "&#xD800;", "&#x1F642;", "&unknown;", "<b>&amp;amp;amp;</b>", "<p>&lt;i&gt;</p>",
    # mojibake and control characters (ftfy)
    "cafÃ©", "â€™s", "â€œquotedâ€\x9d", "Ã¼ber", "âœ” done", "æ–‡å­—åŒ–ã‘", "Ã",
    "a\x00b", "a\x7fb", "\x1b[31mred\x1b[0m", "a\x08b", "\x80\x9f",
    # the special-token strings (OpenAI's and open_clip's), alone and among text
    "<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|EndOfText|>",
    "a cat <|endoftext|> a dog", "<|startoftext|>hello<|endoftext|>", "!<|endoftext|>",
    "<|endoftext|><|endoftext|>", "&lt;|endoftext|&gt;", "<start_of_text>", "<end_of_text>",
    "x <end_of_text> y",
]

LONG = [
    "a photo of a cat " * 40,
    "supercalifragilisticexpialidocious" * 20,
    "日本語" * 60,
    "👨\u200d👩\u200d👧\u200d👦" * 30,
    " ".join(str(i) for i in range(200)),
    "the end " * 37 + "!!!",
    "a b c d e f",          # 6 pieces: exactly fills context 8
    "a b c d e f g",        # 7 pieces: one too many for context 8
    "a b c d e",
    "<|endoftext|> " * 100,
]


@pytest.mark.parametrize("ctx", [77, 8])
def test_hand_picked_texts(toks, ctx):
    _assert_rows_match(toks[ctx], CASES)
    for text in CASES:   # one text at a time too (a str, not a list)
        ours = np.asarray(toks[ctx](text), dtype=np.int64)
        ref = REF_OPENAI if _has_special(text) else REF
        assert ours.tolist() == ref(text, context_length=ctx).numpy().tolist(), text


@pytest.mark.parametrize("ctx", [77, 8])
def test_long_texts_are_truncated_with_eot_last(toks, ctx):
    _assert_rows_match(toks[ctx], LONG)
    rows = toks[ctx](LONG)
    for text, row in zip(LONG, rows):
        n = len(toks[ctx].encode(text))
        if n + 2 >= ctx:
            assert row[0] == SOT and row[-1] == EOT, text
    assert len(toks[8].encode("a b c d e f")) == 6 and toks[8]("a b c d e f")[0, -1] == EOT


def _random_texts(rng, count):
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" .,;:!?'\"-_&#<>|/\\()[]{}@$%^*+=~`") + ["'s", "'T", "'re", "'ll", "n't"]
        + [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85",
           "\xa0", "\u1680", "\u2003", "\u2028", "\u202f", "\u3000", "\u200b", "\u200d",
           "\ufeff", "\ufe0f", "\x00", "\x7f", "\x9d", "\x1b[1m"]
        + ["é", "É", "e\u0301", "\u0308", "ß", "İ", "ı", "ǅ", "ﬁ", "Ａ", "１", "½", "²", "٣",
           "Ⅷ", "𝐀", "日", "本", "語", "の", "한", "م", "ر", "ب", "\u064b", "א", "ह", "\u093f",
           "ภ", "Ω", "ж"]
        + ["🙂", "👍", "🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🇯", "1️⃣", "❤️"]
        + ["&amp;", "&amp;amp;", "&lt;", "&gt;", "&#39;", "&#x1c;", "&nbsp;", "&copy;", "&"]
        + ["cafÃ©", "â€™", "Ã", "â€", "Ã¼"]
        + ["photo", "of", "the", "cat", "dog", "running", "beautiful", "New York"]
        + ["<|endoftext|>", "<|startoftext|>", "<end_of_text>"])
    weights = [1.0] * len(alphabet)
    for k in range(62):   # letters and digits most often
        weights[k] = 4.0
    return ["".join(rng.choices(alphabet, weights, k=rng.randint(0, 50))) for _ in range(count)]


def test_random_mixed_alphabet_texts(toks):
    rng = random.Random(20240601)
    texts = _random_texts(rng, 3000)
    _assert_rows_match(toks[77], texts)
    _assert_rows_match(toks[8], texts[:1000])


def _reference_decode(ref, ids):
    """The reference's decode with ClipBPETokenizer.decode's two documented changes: the
    result is stripped (the reference keeps the trailing ' ' of the last '</w>'), and ids
    starting with sot are a row of tok(...): sot, the last eot and what follows it go."""
    ids = list(ids)
    if ids and ids[0] == SOT:
        ids = ids[1:]
        if EOT in ids:
            ids = ids[:len(ids) - 1 - ids[::-1].index(EOT)]
    return ref.decode(ids).strip()


def test_encode_and_decode_match_the_reference(toks):
    tok = toks[77]
    texts = CASES + LONG + _random_texts(random.Random(7), 500)
    rows = tok(texts)
    for text, row in zip(texts, rows):
        ref = REF_OPENAI if _has_special(text) else REF
        pieces = tok.encode(text)
        assert pieces == ref.encode(text), text
        assert tok.decode(pieces) == _reference_decode(ref, pieces), text
        # a row: the reference decodes what lies between sot and the final eot
        row = row.tolist()
        last_eot = len(row) - 1 - row[::-1].index(EOT)
        assert tok.decode(row) == ref.decode(row[1:last_eot]).strip() == \
            _reference_decode(ref, row), text
    # a text decodes to its cleaned form (no sot / eot strings in it)
    for text in ["Hello,  World!\tcafé 🙂", "naïve 日本語 👨\u200d👩\u200d👧 ok", "it's 2024"]:
        assert tok.decode(tok(text)[0]) == REF.decode(REF.encode(text)).strip()


def test_decode_of_arbitrary_ids_matches_the_reference(toks):
    # Random id sequences: byte pieces that are not valid UTF-8 on their own (-> U+FFFD in
    # both), merges, and sot / eot anywhere (decoded as OpenAI's strings, except a leading
    # sot: see _reference_decode).
    tok = toks[77]
    rng = random.Random(3)
    for _ in range(2000):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        for _ in range(rng.choice([0, 0, 1, 2])):
            ids.insert(rng.randint(0, len(ids)), rng.choice([SOT, EOT]))
        assert tok.decode(ids) == _reference_decode(REF_OPENAI, ids), ids
        if SOT not in ids and EOT not in ids:
            assert tok.decode(ids) == REF.decode(ids).strip(), ids


def test_openai_clip_tokenize_semantics(toks):
    # OpenAI's clip.tokenize(texts, 77, truncate=True): sot 49406, the pieces, eot 49407,
    # then zeros; past the context the last kept id becomes eot. (OpenAI's ids.)
    tok = toks[77]
    rows = tok(["a photo of a cat", "", "<|endoftext|>", "Hello world!"])
    assert rows.dtype == np.int32 and rows.shape == (4, 77)
    assert rows[0].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT] + [0] * 70
    assert rows[1].tolist() == [SOT, EOT] + [0] * 75
    assert rows[2].tolist() == [SOT, EOT, EOT] + [0] * 74   # the literal string is eot
    assert rows[3].tolist() == [SOT, 3306, 1002, 256, EOT] + [0] * 72
    long_row = tok("a photo of a cat " * 40)[0].tolist()
    assert long_row[0] == SOT and long_row[-1] == EOT and 0 not in long_row
    assert long_row[1:76] == ([320, 1125, 539, 320, 2368] * 15)
    assert toks[8]("a photo of a cat " * 2)[0].tolist() == [SOT, 320, 1125, 539, 320, 2368,
                                                            320, EOT]
    # sot / eot / vocabulary size agree with the reference's
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (REF.sot_token_id, REF.eot_token_id,
                                                       REF.vocab_size) == (SOT, EOT, 49408)


def test_vendored_file_is_open_clips(toks):
    with open(bpe.VENDORED_VOCAB, "rb") as f, open(open_clip_tokenizer.default_bpe(), "rb") as g:
        assert f.read() == g.read()
    assert os.path.basename(bpe.VENDORED_VOCAB) == os.path.basename(open_clip_tokenizer.default_bpe())
    # the same merges, ranks and vocabulary as the reference builds
    tok = toks[77]
    assert tok.merges == list(REF.bpe_ranks)
    assert tok._encoder == REF_OPENAI.encoder

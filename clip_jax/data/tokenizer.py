"""Tokenizers: a small interface and a SentencePiece implementation.

Id layout (the contract every tokenizer keeps; models rely on it):
  0                     padding only (never a text token)
  1 .. vocab_size - 3   text pieces
  sot_id = vocab_size - 2
  eot_id = vocab_size - 1   the LARGEST id: models pool the text at argmax(ids), as
                            CLIP does (its BPE has sot 49406, eot 49407).
`tokenizer(texts)` -> int32 [n, context_length]: [sot] + pieces + [eot], then 0s;
over-long texts are cut so that eot is still the last token.

New tokenizers (e.g. CLIP's BPE) subclass `Tokenizer`, implement `vocab_size` and
`encode_pieces`, and register a builder in `_BUILDERS` under the name used in
`config.data.tokenizer`.
"""
import abc
import io
import os
import tempfile

import numpy as np


class Tokenizer(abc.ABC):
    """texts -> int32 [n, context_length] token ids (see the module docstring)."""

    pad_id = 0

    def __init__(self, context_length):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        self.context_length = int(context_length)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Total number of ids, padding, sot and eot included."""

    @property
    def sot_id(self):
        return self.vocab_size - 2

    @property
    def eot_id(self):
        return self.vocab_size - 1

    @abc.abstractmethod
    def encode_pieces(self, texts):
        """list[str] -> list[list[int]] of text-piece ids, each in [1, sot_id)."""

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
        keep = self.context_length - 2
        for row, ids in zip(out, self.encode_pieces(texts)):
            ids = list(ids)[:keep]
            row[0] = self.sot_id
            row[1:1 + len(ids)] = ids
            row[1 + len(ids)] = self.eot_id
        return out


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model; piece id p becomes p + 1, sot/eot on top."""

    def __init__(self, model_proto: bytes, context_length):
        super().__init__(context_length)
        import sentencepiece as spm
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._num_pieces = self._sp.get_piece_size()

    @classmethod
    def load(cls, model_path, context_length):
        with open(model_path, "rb") as f:
            return cls(f.read(), context_length)

    @staticmethod
    def train(corpus, model_path, vocab_size, model_type="bpe"):
        """Trains on `corpus` (list of str) so the TOTAL vocabulary is <= `vocab_size`.

        Deterministic: one thread, all sentences in order, no sampling, and the model is
        written through a byte writer so no paths end up inside it. Lowercases (NFKC +
        case folding). Writes `model_path` atomically (if not None) and returns the model
        bytes. BPE by default: on the small caption vocabulary it learns whole words
        (one token per colour / shape), while unigram stops early and splits words into
        letters.
        """
        import sentencepiece as spm
        if vocab_size < 8:
            raise ValueError(f"tokenizer vocab_size must be >= 8, got {vocab_size}")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(corpus)), model_writer=buf,
            vocab_size=vocab_size - 3,         # + padding, sot, eot
            hard_vocab_limit=False, model_type=model_type,
            character_coverage=1.0, normalization_rule_name="nmt_nfkc_cf",
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
        proto = buf.getvalue()
        if model_path is not None:
            _atomic_write(model_path, proto)
        return proto

    @property
    def vocab_size(self):
        return self._num_pieces + 3

    @property
    def model_proto(self):
        return self._proto

    def encode_pieces(self, texts):
        return [[i + 1 for i in ids] for ids in self._sp.encode(list(texts))]

    def decode(self, ids):
        """int ids (one row) -> text, skipping padding, sot and eot."""
        return self._sp.decode([int(i) - 1 for i in ids if 0 < int(i) < self.sot_id])

    def __getstate__(self):   # picklable for Grain worker processes
        return {"proto": self._proto, "context_length": self.context_length}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["context_length"])

    def __repr__(self):
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _atomic_write(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Captions the SentencePiece model is trained on; a fixed seed, so the tokenizer is a
# property of the dataset, not of the run seed.
CORPUS_SIZE = 10_000
CORPUS_SEED = 0


def _sentencepiece(config, workdir):
    from clip_jax.data import synthetic
    ctx = config.model.text.context_length
    limit = config.data.tokenizer_vocab_size
    path = os.path.join(workdir, "tokenizer", "spm.model") if workdir else None
    if path and os.path.exists(path):
        tok = SentencePieceTokenizer.load(path, ctx)
    else:
        corpus = synthetic.caption_corpus(CORPUS_SIZE, CORPUS_SEED)
        tok = SentencePieceTokenizer(SentencePieceTokenizer.train(corpus, path, limit), ctx)
    if tok.vocab_size > limit:
        raise ValueError(f"tokenizer {path or '(in memory)'} has {tok.vocab_size} ids, more than "
                         f"config.data.tokenizer_vocab_size={limit}; delete it to retrain")
    return tok


# config.data.tokenizer -> builder(config, workdir). Add 'clip_bpe' here.
_BUILDERS = {"sentencepiece": _sentencepiece}


def get_tokenizer(config, workdir) -> Tokenizer:
    """The tokenizer named by `config.data.tokenizer`, cached under `workdir/tokenizer/`."""
    name = config.data.tokenizer
    if name not in _BUILDERS:
        raise ValueError(f"config.data.tokenizer={name!r} is not supported "
                         f"(available: {', '.join(sorted(_BUILDERS))})")
    return _BUILDERS[name](config, workdir)

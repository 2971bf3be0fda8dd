"""Tokenizers by name: the SentencePiece implementation and the registry of builders.

Every tokenizer subclasses `tokenizer_base.Tokenizer` (the id layout models rely on),
implements `vocab_size` and `encode_pieces`, and registers a builder in `TOKENIZERS`
under the name used in `config.data.tokenizer`: `sentencepiece` (here) and `clip_bpe`
(the reference's byte-level BPE, `bpe.py`; its id 0 is also the text token "!", as in the
reference, which the models do not mind: they never look past eot, which is the largest
id).
"""
import io
import json

import jax

from clip_jax import paths
from clip_jax.data import bpe, sources
from clip_jax.data.tokenizer_base import Tokenizer


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
        proto = paths.read_bytes(model_path)
        try:
            tok = cls(proto, context_length)
        except RuntimeError as e:   # sentencepiece's message does not name the file
            raise ValueError(f"{model_path}: not a SentencePiece model ({e})") from None
        tok.source = str(model_path)
        return tok

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
        corpus = list(corpus)
        if not any(str(c).strip() for c in corpus):   # SentencePiece: `!sentences_.empty()`
            raise ValueError(f"no captions to train the tokenizer on ({len(corpus)} given, "
                             "none with text)")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=buf,
            vocab_size=vocab_size - 3,         # + padding, sot, eot
            hard_vocab_limit=False, model_type=model_type,
            character_coverage=1.0, normalization_rule_name="nmt_nfkc_cf",
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
        proto = buf.getvalue()
        if model_path is not None:
            paths.write_bytes(model_path, proto)
        return proto

    @property
    def vocab_size(self):
        return self._num_pieces + 3

    @property
    def model_proto(self):
        return self._proto

    def identity(self):
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


# How many captions a workdir tokenizer is trained on (spread evenly over the source).
CORPUS_SIZE = 10_000


def _sentencepiece(config, workdir, open_source):
    """A .model file (`data.tokenizer_path`), or one trained on the training source's
    captions and cached at WORKDIR/tokenizer/spm.model (with what it was trained on in
    spm.json, so that a workdir reused for other data is caught instead of silently
    tokenising with the wrong vocabulary)."""
    ctx = config.model.text.context_length
    limit = config.data.tokenizer_vocab_size
    if config.data.tokenizer_path:
        tok = SentencePieceTokenizer.load(config.data.tokenizer_path, ctx)
        path = config.data.tokenizer_path
    else:
        path = paths.join(workdir, "tokenizer", "spm.model") if workdir else None
        trained_on = {"source": str(config.data.source), "vocab_size": int(limit)}
        if path and jax.process_count() > 1:
            # One process trains and writes the model (the workdir is shared); the rest
            # wait for it and read it.
            if jax.process_index() == 0 and not paths.exists(path):
                _train_workdir_model(open_source, path, limit, trained_on)
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("clip_jax.tokenizer")
        if path and paths.exists(path):
            tok = SentencePieceTokenizer.load(path, ctx)
            _check_trained_on(path, trained_on)
        else:
            tok = SentencePieceTokenizer(_train_workdir_model(open_source, path, limit, trained_on), ctx)
            tok.source = path
    if tok.vocab_size > limit:
        raise ValueError(f"tokenizer {path or '(in memory)'} has {tok.vocab_size} ids, more than "
                         f"config.data.tokenizer_vocab_size={limit}")
    return tok


def _train_workdir_model(open_source, path, limit, trained_on):
    source, _ = open_source()
    corpus = sources.tokenizer_corpus(source, CORPUS_SIZE)
    model = SentencePieceTokenizer.train(corpus, path, limit)
    if path:
        paths.write_text(_sidecar(path), json.dumps(trained_on, sort_keys=True))
    return model


def _sidecar(model_path):
    return model_path[:-len(".model")] + ".json" if model_path.endswith(".model") else model_path + ".json"


def _check_trained_on(path, trained_on):
    sidecar = _sidecar(path)
    if not paths.exists(sidecar):
        return
    saved = json.loads(paths.read_text(sidecar))
    if saved != trained_on:
        raise ValueError(f"the cached tokenizer {path} was trained for {saved}, but this run has "
                         f"{trained_on}: use another --workdir, or delete {path.rsplit('/', 1)[0]} "
                         "to retrain it")


def _clip_bpe(config, workdir, open_source):
    """The reference CLIP BPE from its merges file: `data.tokenizer_path`, or with '' the
    copy of OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz shipped with clip_jax."""
    del workdir, open_source
    path = config.data.tokenizer_path or bpe.find_reference_vocab()
    if not path:
        raise ValueError("config.data.tokenizer=clip_bpe with config.data.tokenizer_path='' uses "
                         f"the merges file shipped with clip_jax, {bpe.VENDORED_VOCAB}, which is "
                         "missing (a broken install?): reinstall clip_jax, or set "
                         "config.data.tokenizer_path to a copy of bpe_simple_vocab_16e6.txt.gz "
                         "(from the openai/CLIP repository or the open_clip_torch package)")
    tok = bpe.ClipBPETokenizer(path, config.model.text.context_length)
    if tok.vocab_size > config.model.text.vocab_size:
        raise ValueError(f"config.data.tokenizer_path={path!r} has {tok.vocab_size} ids, more than "
                         f"config.model.text.vocab_size={config.model.text.vocab_size}")
    return tok


# config.data.tokenizer -> builder(config, workdir, open_source).
TOKENIZERS = {"sentencepiece": _sentencepiece, "clip_bpe": _clip_bpe}


def describe(config):
    """What `config.data` tokenizes with, without training anything: {'name', 'vocab_size'
    (ids, None for a SentencePiece model still to be trained), 'path', 'note'}."""
    d = config.data
    if d.tokenizer == "clip_bpe":
        tok = _clip_bpe(config, None, None)
        return {"name": "clip_bpe", "vocab_size": tok.vocab_size, "path": tok.source,
                "note": "CLIP's byte-level BPE (lower-cased, 49,152 merges)"}
    if d.tokenizer == "sentencepiece" and d.tokenizer_path:
        tok = SentencePieceTokenizer.load(d.tokenizer_path, config.model.text.context_length)
        return {"name": "sentencepiece", "vocab_size": tok.vocab_size, "path": d.tokenizer_path,
                "note": "SentencePiece model"}
    return {"name": d.tokenizer, "vocab_size": None, "path": "",
            "note": f"SentencePiece of up to {d.tokenizer_vocab_size} pieces, trained on the "
                    f"run's captions (WORKDIR/tokenizer)"}


def get_tokenizer(config, workdir, open_source=None) -> Tokenizer:
    """The tokenizer named by `config.data.tokenizer` (see `_sentencepiece`, `_clip_bpe`).
    `open_source()`: the opened training source, (source, weights) as `sources.make_source`
    gives it, called only if a workdir tokenizer must be trained on its captions (training
    passes the one it opens once for the pipeline too; default: open it here)."""
    if open_source is None:
        open_source = lambda: sources.make_source(config, "train")   # noqa: E731
    name = config.data.tokenizer
    if name not in TOKENIZERS:
        raise ValueError(f"config.data.tokenizer={name!r} is not supported "
                         f"(available: {', '.join(sorted(TOKENIZERS))})")
    return TOKENIZERS[name](config, workdir, open_source)

"""The tokenizer interface: the id layout every tokenizer keeps (models rely on it).

  0                     padding only (never a text token)
  1 .. vocab_size - 3   text pieces
  sot_id = vocab_size - 2
  eot_id = vocab_size - 1   the LARGEST id: models pool the text at argmax(ids), as
                            CLIP does (its BPE has sot 49406, eot 49407).
`tokenizer(texts)` -> int32 [n, context_length]: [sot] + pieces + [eot], then 0s;
over-long texts are cut so that eot is still the last token.

Its own module so that implementations (`tokenizer.SentencePieceTokenizer`,
`bpe.ClipBPETokenizer`) and the registry that builds them (`tokenizer.get_tokenizer`)
import it without importing each other.
"""
import abc
import hashlib

import numpy as np


class Tokenizer(abc.ABC):
    """texts -> int32 [n, context_length] token ids (see the module docstring)."""

    pad_id = 0
    source = None     # the file it was read from, for messages (None: built in memory)

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

    def identity(self):
        """The bytes that decide the ids (a model file, a merges list); None if unknown."""
        return None

    def fingerprint(self):
        """{'sha256', 'source'} of `identity()`, or None. A checkpoint stores it, and a resume
        with a tokenizer that gives other ids is refused (checkpoint.Checkpointer)."""
        data = self.identity()
        return None if data is None else {"sha256": hashlib.sha256(data).hexdigest(),
                                          "source": self.source}

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

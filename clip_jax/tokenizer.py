"""Tokenizer command line.

  python -m clip_jax.tokenizer train --captions SRC --vocab-size N --out FILE.model
      Trains a SentencePiece BPE model on captions. SRC is a directory made by
      `clip_jax.ingest` (captions of up to --max-captions records, spread evenly over the
      dataset) or a UTF-8 text file with one caption per line. Use it in training with
      `--config.data.tokenizer_path=FILE.model --config.data.tokenizer_vocab_size=N`.
      Training is deterministic: the same captions give a byte-identical model.

  python -m clip_jax.tokenizer encode --model FILE "some text" ...
      Prints the token ids (SentencePiece .model, or a CLIP BPE merges file *.txt[.gz]).

The library side is `clip_jax.data.tokenizer` (and `clip_jax.data.bpe`).
"""
import argparse
import os

from clip_jax import cli
from clip_jax.data import bpe, records, sources, tokenizer as tokenizer_lib


def read_captions(src, max_captions):
    """Captions from an ingested directory or a text file (one per line, blank lines skipped)."""
    if os.path.isdir(src):
        return sources.tokenizer_corpus(records.IngestedSource(src), max_captions)
    if not os.path.isfile(src):
        raise ValueError(f"--captions {src!r}: neither an ingested directory nor a text file")
    with open(src, encoding="utf-8", errors="replace") as f:
        lines = (line.strip() for line in f)
        captions = [line for line in lines if line]
    return captions[:max_captions]


def load_any(path, context_length):
    if path.endswith((".txt", ".txt.gz")):
        return bpe.ClipBPETokenizer(path, context_length)
    return tokenizer_lib.SentencePieceTokenizer.load(path, context_length)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clip_jax.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model on captions")
    train.add_argument("--captions", required=True,
                       help="an ingested dataset directory, or a text file with one caption per line")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="total ids including padding, start and end of text "
                            "(<= the model's text vocab_size)")
    train.add_argument("--out", required=True, help="where to write the .model file")
    train.add_argument("--max-captions", type=int, default=1_000_000,
                       help="train on at most this many captions (default: 1,000,000)")
    encode = sub.add_parser("encode", help="print token ids of texts")
    encode.add_argument("--model", required=True, help="a SentencePiece .model or CLIP BPE merges file")
    encode.add_argument("--context-length", type=int, default=77, help="ids per text (default: 77)")
    encode.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)

    with cli.stop_on(ValueError, OSError):
        if args.command == "train":
            captions = read_captions(args.captions, args.max_captions)
            if not captions:
                raise ValueError(f"--captions {args.captions!r}: no captions found")
            tokenizer_lib.SentencePieceTokenizer.train(captions, args.out, args.vocab_size)
            tok = tokenizer_lib.SentencePieceTokenizer.load(args.out, 77)
            print(f"trained on {len(captions):,} captions: {args.out} "
                  f"({tok.vocab_size} ids incl. padding/start/end)")
        else:
            tok = load_any(args.model, args.context_length)
            for text in args.texts:
                ids = tok([text])[0].tolist()
                print(" ".join(map(str, ids[:ids.index(tok.eot_id) + 1])))


if __name__ == "__main__":
    main()

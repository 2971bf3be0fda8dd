"""Image-text retrieval (the paper's section 3.1.6 / table 13): Recall@K both ways.

Over a dataset of images with one or more captions each: image->text R@K is the fraction
of images with at least one of their own captions among the K most similar captions;
text->image R@K the fraction of captions whose image is among the K most similar images.
Ties count against the query (a competitor scoring equal to the best correct item ranks
ahead of it), so the figure never depends on the order of the data. Similarities are
computed in blocks of queries, never the whole matrix at once.
"""
import numpy as np

from clip_jax.evals import features
from clip_jax.evals.evaluator import Evaluator
from clip_jax.models.clip import l2_normalize

KS = (1, 5, 10)
BLOCK = 1024


def _ranks(queries, keys, correct_of):
    """Per query: how many keys score >= its best correct key, excluding correct keys themselves
    (0 = the best correct key is the top hit). `correct_of(rows)` -> bool [len(rows), n_keys]."""
    ranks = []
    for start in range(0, len(queries), BLOCK):
        sims = queries[start:start + BLOCK] @ keys.T
        correct = correct_of(np.arange(start, start + len(sims)))
        best = np.where(correct, sims, -np.inf).max(axis=1, keepdims=True)
        ranks.append(np.sum((sims >= best) & ~correct, axis=1))
    return np.concatenate(ranks)


def recall_at_k(image_embeds, text_embeds, text_image):
    """{'image_to_text_R@K', 'text_to_image_R@K'} for K in KS; `text_image[j]` = image of text j."""
    text_image = np.asarray(text_image)
    image_embeds = l2_normalize(image_embeds)
    text_embeds = l2_normalize(text_embeds)
    i2t = _ranks(image_embeds, text_embeds, lambda rows: text_image[None, :] == rows[:, None])
    image_ids = np.arange(len(image_embeds))
    t2i = _ranks(text_embeds, image_embeds, lambda rows: image_ids[None, :] == text_image[rows][:, None])
    out = {}
    for k in KS:
        out[f"image_to_text_R@{k}"] = float(np.mean(i2t < k))
    for k in KS:
        out[f"text_to_image_R@{k}"] = float(np.mean(t2i < k))
    return out


def evaluate(model, data, cache_dir="", progress=True):
    data.need_captions("retrieval")
    texts = [c for captions in data.captions for c in captions]
    text_image = np.repeat(np.arange(len(data)), [len(c) for c in data.captions])
    image = features.image_features(model, data, cache_dir, progress)
    text = features.text_features(model, texts, progress, "caption features")
    return {"task": "retrieval", "data": data.name, "images": len(data), "texts": len(texts),
            **recall_at_k(image, text, text_image)}


class Retrieval(Evaluator):
    task = "retrieval"
    logged = tuple(f"{way}_R@{k}" for way in ("image_to_text", "text_to_image") for k in KS)

    def run(self, model, cache_dir="", progress=True):
        return evaluate(model, self.data, cache_dir, progress)

    @classmethod
    def format_result(cls, result):
        lines = [f"retrieval on {result['data']}: {result['images']} images, {result['texts']} captions"]
        for way in ("image_to_text", "text_to_image"):
            lines.append(f"  {way.replace('_', ' '):14s}" + "  ".join(
                f"R@{k} {100 * result[f'{way}_R@{k}']:6.2f}%" for k in KS))
        return "\n".join(lines)

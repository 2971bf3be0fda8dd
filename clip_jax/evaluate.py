"""Zero-shot classification from prompts (the paper's prompt ensembling).

A class's text classifier is the mean of its L2-normalised prompt embeddings over
the templates, renormalised. Images are classified by cosine similarity.
"""
import jax
import numpy as np


def l2_normalize(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def batched(fn, inputs, batch_size, sharding=None):
    """Applies `fn` to `inputs` in batches of `batch_size` (last one padded), returns numpy."""
    outs = []
    n = len(inputs)
    for start in range(0, n, batch_size):
        chunk = inputs[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        if sharding is not None:
            chunk = jax.device_put(chunk, sharding)
        outs.append(_to_host(fn(chunk))[:batch_size - pad])
    return np.concatenate(outs)


def _to_host(x):
    """The whole array as numpy on every process (gathered if it spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def text_classifier(encode_text, tokenizer, classnames, templates, batch_size=256, sharding=None):
    """[num_classes, dim] classifier: per class, mean of normalised prompt embeddings, renormalised."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = l2_normalize(batched(encode_text, tokenizer(prompts), batch_size, sharding))
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return l2_normalize(emb)


def topk_accuracy(logits, labels, k=1):
    topk = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(topk == np.asarray(labels)[:, None], axis=1)))


def zeroshot(image_features, classifier, labels):
    """Top-1/top-5 accuracy of normalised image features against a text classifier."""
    logits = l2_normalize(image_features) @ classifier.T
    k5 = min(5, classifier.shape[0])
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, k5)}


def make_encoders(model, variables_fn):
    """Jitted (encode_image, encode_text) closures over the model's current variables.

    `variables_fn()` returns the variables at call time, so the same compiled
    functions serve every evaluation during training.
    """
    from clip_jax.models import encoder_fns
    enc_img, enc_txt = encoder_fns(model)
    return (lambda x: enc_img(variables_fn(), x)), (lambda t: enc_txt(variables_fn(), t))


def synthetic_zeroshot(encode_image, encode_text, tokenizer, images, attribute_labels, tasks,
                       batch_size=256, sharding=None):
    """Zero-shot on held-out synthetic images, one attribute at a time.

    `tasks`: {attribute: (classnames, templates)}; `attribute_labels`: {attribute: int array}.
    Returns {'zeroshot/<attr>/top1': ..., 'zeroshot/top1': mean over attributes}.
    """
    feats = batched(encode_image, images, batch_size, sharding)
    out = {}
    for attr, (classnames, templates) in tasks.items():
        clf = text_classifier(encode_text, tokenizer, classnames, templates, batch_size, sharding)
        res = zeroshot(feats, clf, attribute_labels[attr])
        out[f"zeroshot/{attr}/top1"] = res["top1"]
    out["zeroshot/top1"] = float(np.mean([out[f"zeroshot/{a}/top1"] for a in tasks]))
    return out

"""Zero-shot classification (the paper's section 3.1): a classifier made from words.

A class's weight is the mean of its L2-normalised prompt embeddings over the templates,
renormalised (prompt ensembling, section 3.1.4); an image's logits are its cosine
similarities with the class weights. Templates come from `--templates` (a file, or the name
of shipped ones: 'imagenet1k' is the paper's 80, 'imagenet1k_7' its 7-template subset,
'cifar10', ... CLIP_benchmark's; `zeroshot_metadata`), else the dataset's own (the synthetic
data's; a known TFDS dataset's shipped ones; the templates file of CLIP_benchmark's
shards), else `prompts.DEFAULT_TEMPLATES`. The report names where they came from.
"""
from clip_jax import paths
from clip_jax.data import prompts, zeroshot_metadata
from clip_jax.evals import features, report
from clip_jax.evals.evaluator import Classification, Option
from clip_jax.models.clip import l2_normalize


def text_classifier(model, classnames, templates, progress=False):
    """float32 [num_classes, dim]: per class, mean of normalised prompt embeddings, renormalised."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = l2_normalize(features.text_features(model, texts, progress, "prompts"))
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return l2_normalize(emb)


def evaluate(model, data, templates=None, group_by="", cache_dir="", progress=True,
             templates_from=""):
    """Top-1, top-5, mean per-class accuracy, the per-class table and (with `group_by`) groups.
    `templates_from`: what `templates` are, for the report."""
    data.need_labels("zeroshot")
    if templates:
        source = templates_from or "given"
    elif data.templates:
        shipped = zeroshot_metadata.is_templates_name(data.metadata)  # else a file, or ""
        source = f"{data.metadata}, shipped, for {data.name}" if shipped else data.metadata or "the data's own"
    else:
        source = "generic"
    templates = tuple(templates or data.templates or prompts.DEFAULT_TEMPLATES)
    groups = data.group_values(group_by) if group_by else None
    classifier = text_classifier(model, data.classnames, templates, progress)
    image = l2_normalize(features.image_features(model, data, cache_dir, progress))
    logits = image @ classifier.T
    out, top1 = report.classification_report(logits, data.labels, data.classnames)
    out = {"task": "zeroshot", "data": data.name, "templates": len(templates),
           "templates_from": source, **out}
    if groups is not None:
        out.update(group_by=group_by, **report.group_report(top1, groups))
    return out


class ZeroShot(Classification):
    task = "zeroshot"
    options = {"templates": Option("", "a file of prompt templates, one per line, '{}' marking the "
                                   "class name; or the name of shipped ones: imagenet1k (the "
                                   "paper's 80), imagenet1k_7, cifar10, food101, ... (default: the "
                                   "data's own, else a generic set)",
                                   is_file=True, or_name=zeroshot_metadata.is_templates_name),
               **Classification.options}
    logged = ("top1", "top5", "mean_per_class", "group_gap")
    averaged = ("top1",)

    def __init__(self, data, config=None, **settings):
        super().__init__(data, config, **settings)
        path = self.settings["templates"]
        self.templates, self.templates_from = None, ""
        if path and not paths.isfile(path) and zeroshot_metadata.is_templates_name(path):
            self.templates, self.templates_from = zeroshot_metadata.templates(path), f"{path}, shipped"
        elif path:
            self.templates, self.templates_from = prompts.load_templates(path), path

    def run(self, model, cache_dir="", progress=True):
        return evaluate(model, self.data, self.templates, self.settings["group_by"], cache_dir,
                        progress, self.templates_from)

    @classmethod
    def describe(cls, result):
        source = result.get("templates_from")
        return f", {result['templates']} prompt templates" + (f" ({source})" if source else "")

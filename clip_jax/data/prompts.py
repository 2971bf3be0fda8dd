"""Prompt templates: a class name -> a caption ("a photo of a {}.").

Used by ingest to caption class-labelled images (imagefolder, labelled TFDS) and by
zero-shot evaluation to build text classifiers. A template is a string with one `{}`,
which `template.format(classname)` fills.

`load_templates(path)` reads a file of one template per line; blank lines are ignored and
surrounding whitespace is stripped.
"""
import zlib

from clip_jax import paths

# A small generic set, in the style of CLIP's ImageNet prompts.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a bright photo of a {}.",
)


def readable_classname(name):
    """A class folder / ClassLabel name as words: 'golden_retriever' -> 'golden retriever'."""
    return name.replace("_", " ")


def caption_for(classname, key, templates=DEFAULT_TEMPLATES):
    """The caption of record `key` of class `classname`: a template picked by crc32(key),
    so a record always gets the same one, whatever order it is read in."""
    return templates[zlib.crc32(key.encode("utf-8")) % len(templates)].format(classname)


def check_template(template):
    """Raises ValueError unless `template` has a `{}` and formats with one class name."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    try:
        template.format("x")
    except (ValueError, IndexError, KeyError) as e:
        raise ValueError(f"template {template!r} does not format with one class name "
                         f"({type(e).__name__}: {e}); write a literal brace as '{{{{' or '}}}}'"
                         ) from None


def load_templates(path, placeholder="{}"):
    """The templates in `path`, one per line, as a tuple; ValueError names the file and line.
    `placeholder`: what marks the class name in the file, read as '{}' (CLIP_benchmark's
    zeroshot_classification_templates.txt writes `{c}`)."""
    try:
        lines = paths.read_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read templates: {e}") from None
    templates = []
    for number, line in enumerate(lines, start=1):
        template = line.strip().replace(placeholder, "{}")
        if not template:
            continue
        try:
            check_template(template)
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: {e}") from None
        templates.append(template)
    if not templates:
        raise ValueError(f"{path}: no templates (one per line, each with '{{}}')")
    return tuple(templates)

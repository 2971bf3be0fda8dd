"""Figures shared by the classification evaluators: top-k, per-class and per-group accuracy.

`group_report` is the paper's bias probe for any labelled data: accuracy within each value
of an attribute, and the gap between the best and the worst group.
"""
import numpy as np


def topk_correct(logits, labels, k):
    """bool [n]: is the label among the k highest logits? (ties broken by lower class index)"""
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return np.any(order == np.asarray(labels)[:, None], axis=1)


def classification_report(logits, labels, classnames):
    """top1, top5, mean per-class top-1 (classes with no example left out), the number of
    classes scored (those with no example included) and the table."""
    labels = np.asarray(labels)
    top1 = topk_correct(logits, labels, 1)
    per_class = []
    for c, name in enumerate(classnames):
        mask = labels == c
        if mask.any():
            per_class.append({"class": name, "n": int(mask.sum()), "top1": float(top1[mask].mean())})
    return {"n": int(len(labels)), "classes": len(classnames), "top1": float(top1.mean()),
            "top5": float(topk_correct(logits, labels, 5).mean()),
            "mean_per_class": float(np.mean([row["top1"] for row in per_class])),
            "per_class": per_class}, top1


def group_report(correct, groups):
    """{'groups': {value: {'n', 'top1'}}, 'group_gap': best - worst top1, 'worst_group'}."""
    correct, groups = np.asarray(correct, bool), np.asarray(groups, object)
    table = {}
    for value in sorted(set(groups.tolist())):
        mask = groups == value
        table[str(value)] = {"n": int(mask.sum()), "top1": float(correct[mask].mean())}
    accs = {k: v["top1"] for k, v in table.items()}
    worst = min(accs, key=accs.get)
    return {"groups": table, "group_gap": float(max(accs.values()) - accs[worst]),
            "worst_group": worst}


def format_table(rows, columns):
    """Plain-text table of dict rows (floats as percentages)."""
    cells = [[f"{100 * r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths)))
    return "\n".join([line(columns)] + [line(row) for row in cells])

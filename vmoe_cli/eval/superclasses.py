"""Super-classes for per-image routing (Mobile V-MoE, Daxberger et al. 2023): the classes grouped into one
balanced group per expert, so that a router can be trained to send each image to the expert of its group.

Classes a trained dense model confuses with each other belong together. The confusion matrix is measured on a
held-out slice of the training split (never the test split), turned into a symmetric class affinity, embedded
with the eigenvectors of its normalised Laplacian, and cut into groups of sizes differing by at most one by
k-means centres and an optimal assignment of classes to centre slots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.opening import EvalData, Opened, eval_batches, open_checkpoint, open_data
from vmoe_cli.progress import ProgressFn

AFFINITY_EPS = 1e-4  # added to every off-diagonal affinity so the class graph is connected


@torch.inference_mode()
def confusion_matrix(
    opened: Opened,
    source: EvalData,
    split: str,
    batch_size: int = 256,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Counts int64 `[classes, classes]` of (true class, predicted class) over `split`, read with the model's
    training preprocessing, so the errors are the ones the model makes in use."""
    classes = len(source.manifest["classes"])
    if opened.model.cfg.num_classes != classes:
        raise VmoeError(
            f"the model predicts {opened.model.cfg.num_classes} classes but {source.shard_dir} has {classes}"
        )
    model = opened.model.to(device).eval()
    counts = np.zeros(classes * classes, dtype=np.int64)
    for images, labels in eval_batches(source, split, batch_size, opened.preprocess, "confusions", progress):
        predicted = model(images.to(device)).logits.argmax(dim=1).cpu().numpy()
        counts += np.bincount(labels.numpy() * classes + predicted, minlength=classes * classes)
    return counts.reshape(classes, classes)


def balanced_groups(confusion: np.ndarray, groups: int, seed: int = 0) -> list[list[int]]:
    """The classes cut into `groups` groups of mutually confused classes, sizes differing by at most one.

    Each group is a sorted list of class indices, the groups ordered by their smallest member; the same input
    and seed always give the same groups.
    """
    classes = len(confusion)
    if not 1 <= groups <= classes:
        raise VmoeError(f"cannot cut {classes} classes into {groups} groups; choose 1..{classes} groups")
    if groups == 1:  # nothing to cut (and a single class has no affinity graph)
        return [list(range(classes))]
    embedding = _spectral_embedding(_affinity(confusion), groups)
    centres = KMeans(n_clusters=groups, n_init=10, random_state=seed).fit(embedding).cluster_centers_
    # Every centre offers `classes // groups` slots plus one extra slot priced so high that the assignment
    # uses exactly `classes % groups` extra slots, at most one per centre: the data chooses the larger groups.
    distance = ((embedding[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # [classes, groups]
    penalty = 1.0 + classes * distance.max()
    cost = np.concatenate([np.repeat(distance, classes // groups, axis=1), distance + penalty], axis=1)
    rows, slots = linear_sum_assignment(cost)
    slot_centre = np.concatenate([np.repeat(np.arange(groups), classes // groups), np.arange(groups)])
    members = [sorted(rows[slot_centre[slots] == g].tolist()) for g in range(groups)]
    return sorted(members, key=lambda m: m[0])


def _affinity(confusion: np.ndarray) -> np.ndarray:
    """How often two classes are mistaken for each other, as a fraction of each true class's examples."""
    counts = confusion.astype(np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)  # classes without examples stay 0
    affinity = (rates + rates.T) / 2 + AFFINITY_EPS
    np.fill_diagonal(affinity, 0.0)
    return affinity


def _spectral_embedding(affinity: np.ndarray, components: int) -> np.ndarray:
    """Rows of the `components` smoothest eigenvectors of the normalised Laplacian (as scikit-learn's
    spectral_embedding with drop_first=False), each vector's sign fixed so its largest entry is positive."""
    scale = 1.0 / np.sqrt(affinity.sum(axis=1))
    laplacian = np.eye(len(affinity)) - scale[:, None] * affinity * scale[None, :]
    _, vectors = np.linalg.eigh(laplacian)  # eigenvalues ascending
    vectors = vectors[:, :components] * scale[:, None]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(components)])
    return vectors * signs


def find_superclasses(
    checkpoint: str,
    data: str,
    experts: int,
    split: str = "minival",
    cache_dir: str | Path = "~/.cache/vmoe",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Group the classes of `data` into `experts` super-classes from the confusions of the classifier
    `checkpoint` (a checkpoint or run directory) on `split`; a JSON-able record for write_superclasses."""
    if split == "test":
        raise VmoeError("--split test: super-classes must not see test data; use the held-out minival slice of train")
    opened = open_checkpoint(checkpoint)
    if opened.model.cfg.num_classes <= 0:
        raise VmoeError(f"--checkpoint {checkpoint}: the model has no classification head to confuse classes with")
    hint = "shard a held-out slice of train with `vmoe shard SOURCE --out DIR --minival 0.05`"
    source = open_data(data, cache_dir, [split], hint)
    names = source.manifest["classes"]
    if not 1 <= experts <= len(names):
        raise VmoeError(f"--experts {experts}: choose 1..{len(names)} for the {len(names)} classes of {data}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    confusion = confusion_matrix(opened, source, split, batch_size, device, progress)
    examples = int(confusion.sum())
    if examples == 0:
        raise VmoeError(f"{data}: split {split!r} is empty; shard it with a larger --minival")
    groups = balanced_groups(confusion, experts)
    class_to_group = [0] * len(names)
    for g, members in enumerate(groups):
        for c in members:
            class_to_group[c] = g
    return {
        "checkpoint": str(opened.path),
        "data": str(data),
        "split": split,
        "examples": examples,
        "heldout_top1": float(np.trace(confusion)) / examples,
        "experts": experts,
        "classes": names,
        "groups": [[names[c] for c in members] for members in groups],
        "group_indices": groups,
        "class_to_group": class_to_group,
        "confusion": confusion.tolist(),
    }


def write_superclasses(result: dict[str, Any], path: str | Path) -> None:
    """Write a find_superclasses record as JSON, one top-level key per line, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in result.items())
    write_text_atomic(path, "{\n" + lines + "\n}\n")

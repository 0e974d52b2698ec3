"""Few-shot linear probing of a frozen backbone (big_vision's practice), the V-MoE papers' transfer metric:
the features, their cache and the probe, shared by `vmoe fewshot` (eval/fewshot.py) and the sweep's column.

Features are the pre-logits of the model in evaluation mode (no routing noise; K, capacity and BPR as
given), or the raw pixels as a floor. They are extracted once per (backbone, data) and cached on disk
under a key that hashes the checkpoint's weights, the routing settings, the shards' manifest, the
preprocessing and, for a routed model, the batch size, so another call with other shots, seeds or L2 values
reads them back. An entry that cannot be read back is removed with a warning and extracted again.

The probe, per dataset, seed and shot count:
  1. per class a seeded permutation of its training examples: the first `shots` are the few-shot set
     (nested across shot counts), up to `val_per_class` from the end pick the L2 value (never the test split);
  2. standardise with the few-shot set's mean and std (+1e-5), append a column of 100 (an almost
     unregularised bias), targets 2 * one_hot - 1;
  3. one eigendecomposition of X^T X (samples >= columns: primal) or X X^T (dual) solves the ridge for
     every L2 value at once;
  4. L2 = the grid value with the best validation accuracy (the largest on ties) or the user's value;
     report the test accuracy there.
`--probe logistic` swaps step 2-3 for scikit-learn's logistic regression (C = 1 / L2) for comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmoe_cli.atomic import remove_stale_temps, write_bytes_atomic
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.opening import EvalData, Opened, Preprocess, eval_batches, open_data
from vmoe_cli.models.vit import VisionTransformer
from vmoe_cli.progress import ProgressFn

L2_GRID: tuple[float, ...] = tuple(2.0**p for p in range(-10, 20))  # big_vision's grid, 2^-10 .. 2^19
BIAS = 100.0  # value of the appended constant column
FEATURES_VERSION = 2  # bump when extraction or the cache key changes, to invalidate every cache entry
CACHED_ARRAYS = ("train_x", "train_y", "test_x", "test_y")  # the arrays of a cache entry, in Features' order


@dataclass
class Backbone:
    """Where features come from: a frozen model, or the raw pixels when `model` is None."""

    name: str  # shown in tables: the checkpoint path or "pixels"
    key: str  # identity for the feature cache: weights hash + routing, or "pixels"
    model: VisionTransformer | None
    preprocess: Preprocess  # how images reach the model (or are flattened, at this size)


@dataclass
class Features:
    """One dataset's features: float32 `[N, F]` and int64 labels, train and test splits."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    seconds: float  # extraction time; 0 when read from the cache
    cached: bool


def model_backbone(opened: Opened) -> Backbone:
    """The Backbone of an opened checkpoint's model as it is routed now."""
    moe = opened.model.cfg.moe
    settings = None if moe is None else dataclasses.asdict(moe)  # any routing change means other features
    key = hashlib.sha256(json.dumps([opened.weights_sha256, settings]).encode()).hexdigest()
    return Backbone(opened.name, key, opened.model, opened.preprocess)


@torch.no_grad()
def extract(
    backbone: Backbone,
    source: EvalData,
    split: str,
    batch_size: int = 256,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features `[N, F]` float32 and labels `[N]` of every sample of `split`, in manifest order."""
    model = None if backbone.model is None else backbone.model.to(device).eval()
    feats, labels = [], []
    for images, y in eval_batches(source, split, batch_size, backbone.preprocess, "features", progress):
        if model is None:
            feats.append(images.flatten(1).numpy())  # [B, C*H*W]
        else:
            feats.append(model(images.to(device)).pre_logits.float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int64)


def dataset_features(
    backbone: Backbone,
    data: str,
    cache_dir: str | Path,
    batch_size: int = 256,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> Features:
    """Train and test features of DATA (shards or a source), from the cache when the same key was extracted."""
    source = open_data(data, cache_dir, ("train", "test"), "re-shard it with `vmoe shard ... --test 0.2`")
    folder = Path(cache_dir) / "features"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    file = folder / f"{_cache_key(backbone, source, batch_size)}.npz"
    num_classes = len(source.manifest["classes"])
    counts = {split: source.manifest["splits"][split]["count"] for split in ("train", "test")}
    cached = _read_cached(file, counts, num_classes)
    if cached is not None:
        return Features(*cached, num_classes, 0.0, True)
    start = time.perf_counter()
    train_x, train_y = extract(backbone, source, "train", batch_size, device, progress)
    test_x, test_y = extract(backbone, source, "test", batch_size, device, progress)
    seconds = time.perf_counter() - start
    buffer = io.BytesIO()
    np.savez(buffer, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    write_bytes_atomic(file, buffer.getvalue())
    return Features(train_x, train_y, test_x, test_y, num_classes, seconds, False)


def _cache_key(backbone: Backbone, source: EvalData, batch_size: int) -> str:
    """The cache key: a hash of everything that changes the features. A routed model's batch size is in it:
    routing groups hold images of one batch, so a token's slot, kept or dropped, depends on its batch."""
    pp = backbone.preprocess
    routed = backbone.model is not None and backbone.model.cfg.moe is not None
    identity = [
        FEATURES_VERSION, backbone.key, source.manifest_sha256, pp.image_size, pp.channels, pp.mean, pp.std,
        batch_size if routed else None,
    ]  # fmt: skip
    if pp.crop_pct is not None:  # only then: the keys of squashed images stay those of earlier versions
        identity.append(pp.crop_pct)
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _read_cached(file: Path, counts: dict[str, int], num_classes: int) -> tuple[np.ndarray, ...] | None:
    """The arrays (train_x, train_y, test_x, test_y) of cache entry `file`, or None when there is none. An
    entry that cannot be read or does not fit the data (cut short, damaged, edited) is removed with a warning,
    so that it is rebuilt rather than failing every run."""
    if not file.is_file():
        return None
    try:
        with np.load(file) as z:
            arrays = tuple(z[name] for name in CACHED_ARRAYS)
        _check_cached(arrays, counts, num_classes)
        return arrays
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error):
        print(f"warning: cache entry {file} unreadable: rebuilt", file=sys.stderr)
        file.unlink(missing_ok=True)
        return None


def _check_cached(arrays: tuple[np.ndarray, ...], counts: dict[str, int], num_classes: int) -> None:
    """Raise ValueError unless the arrays are float32 `[N, F]` features and int64 labels in `[0, num_classes)`,
    N being each split's sample count, with one F for both splits."""
    train_x, train_y, test_x, test_y = arrays
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if x.dtype != np.float32 or y.dtype != np.int64 or x.ndim != 2 or x.shape[0] != counts[split]:
            raise ValueError(f"{split} features are not float32 [{counts[split]}, F]")
        if y.shape != (counts[split],) or (len(y) and not 0 <= y.min() <= y.max() < num_classes):
            raise ValueError(f"{split} labels are not {counts[split]} classes below {num_classes}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError("train and test features differ in width")


def sample_indices(
    labels: np.ndarray, num_classes: int, shots: Sequence[int], seed: int, val_per_class: int
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Few-shot training indices per shot count (nested) and validation indices, disjoint from all of them.

    Class c's examples are permuted by `default_rng([seed, c])`; the first `shots` train, and up to
    `val_per_class` of those after the largest shot count (taken from the end) validate.
    """
    most = max(shots)
    perms = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < most:
            raise VmoeError(
                f"class {c} has {len(members)} training examples, fewer than the {most} shots asked; lower --shots"
            )
        perms.append(np.random.default_rng([seed, c]).permutation(members))
    train = {s: np.concatenate([p[:s] for p in perms]) for s in shots}
    val = np.concatenate([p[most:][::-1][:val_per_class] for p in perms])
    return train, val


class Ridge:
    """Closed-form ridge on standardised features + a bias column of 100, solved for any L2 by one eigh."""

    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, num_classes: int, dual: bool | None = None):
        x = train_x.astype(np.float64)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-5
        self.columns = x.shape[1] + 1
        # A feature constant over the few-shot set standardises to a zero column, whose ridge weight is exactly
        # 0; dropping it keeps rounding noise from being multiplied by a test value / 1e-5 (raw pixels).
        self.used = np.flatnonzero(np.append(np.ptp(x, axis=0) > 0, True))
        X = self.design(train_x)  # [N, R]: the used columns of the standardised features + bias column
        Y = 2.0 * np.eye(num_classes)[train_y] - 1.0  # [N, classes]
        self.dual = X.shape[0] < X.shape[1] if dual is None else dual
        if self.dual:  # W = X^T (X X^T + l2 I)^-1 Y = X^T U diag(1 / (s + l2)) U^T Y
            s, U = np.linalg.eigh(X @ X.T)
            self.to_basis, self.coef = X.T @ U, U.T @ Y  # [R, N], [N, classes]
        else:  # W = (X^T X + l2 I)^-1 X^T Y = V diag(1 / (s + l2)) V^T X^T Y
            s, V = np.linalg.eigh(X.T @ X)
            self.to_basis, self.coef = V, V.T @ (X.T @ Y)  # [R, R], [R, classes]
        self.eigenvalues = np.clip(s, 0.0, None)  # X^T X is PSD; eigh may return -1e-13

    def design(self, x: np.ndarray) -> np.ndarray:
        """Used standardised features with the bias column: `[M, R]` float64."""
        z = (x.astype(np.float64) - self.mean) / self.std
        return np.concatenate([z, np.full((len(z), 1), BIAS)], axis=1)[:, self.used]

    def weights(self, l2: float) -> np.ndarray:
        """The solution `[F + 1, classes]` at one L2 value (zero rows for the dropped constant features)."""
        w = np.zeros((self.columns, self.coef.shape[1]))
        w[self.used] = self.to_basis @ (self.coef / (self.eigenvalues + l2)[:, None])
        return w

    def scores(self, x: np.ndarray, l2s: Sequence[float]) -> np.ndarray:
        """Class scores `[len(l2s), M, classes]` of features `x` at each L2 value."""
        p = self.design(x) @ self.to_basis  # [M, R or N]: x in the eigenbasis
        return np.stack([(p / (self.eigenvalues + l2)) @ self.coef for l2 in l2s])


class Logistic:
    """scikit-learn's multinomial logistic regression on standardised features, C = 1 / L2; for comparison."""

    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, num_classes: int):
        self.mean, self.std = train_x.mean(0), train_x.std(0) + 1e-5
        self.x, self.y, self.num_classes = (train_x - self.mean) / self.std, train_y, num_classes
        self.fits: dict[float, Any] = {}

    def scores(self, x: np.ndarray, l2s: Sequence[float]) -> np.ndarray:
        """Class scores `[len(l2s), M, classes]`, fitting once per L2 value."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        out = np.zeros((len(l2s), len(x), self.num_classes))
        for i, l2 in enumerate(l2s):
            if l2 not in self.fits:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    self.fits[l2] = LogisticRegression(C=1.0 / l2, max_iter=500).fit(self.x, self.y)
            fit = self.fits[l2]
            out[i][:, fit.classes_] = fit.decision_function((x - self.mean) / self.std)
        return out


PROBES = {"ridge": Ridge, "logistic": Logistic}


def probe(
    features: Features,
    shots: Sequence[int],
    seeds: int,
    l2: float | None = None,
    kind: str = "ridge",
    val_per_class: int = 10,
) -> list[dict[str, Any]]:
    """Test accuracy per shot count and seed; L2 from `L2_GRID` by validation accuracy unless given."""
    if kind not in PROBES:
        raise VmoeError(f"--probe must be one of {', '.join(PROBES)}, got {kind!r}")
    rows = []
    for seed in range(seeds):
        train, val = sample_indices(features.train_y, features.num_classes, shots, seed, val_per_class)
        if l2 is None and len(val) == 0:
            raise VmoeError("no training examples are left to choose L2 after the largest shot count; pass --l2 VALUE")
        for s in shots:
            fit = PROBES[kind](features.train_x[train[s]], features.train_y[train[s]], features.num_classes)
            if l2 is None:
                val_acc = _accuracy(fit.scores(features.train_x[val], L2_GRID), features.train_y[val])
                best = len(L2_GRID) - 1 - int(np.argmax(val_acc[::-1]))  # the largest L2 among the best
                chosen, chosen_val = L2_GRID[best], float(val_acc[best])
            else:
                chosen, chosen_val = l2, None
            test_acc = _accuracy(fit.scores(features.test_x, [chosen]), features.test_y)[0]
            rows.append(
                {"shots": s, "seed": seed, "accuracy": float(test_acc), "l2": chosen, "val_accuracy": chosen_val}
            )
    return rows


def run_fewshot(
    backbone: Backbone,
    datasets: Sequence[str],
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: int = 3,
    l2: float | None = None,
    kind: str = "ridge",
    cache_dir: str | Path = "~/.cache/vmoe",
    batch_size: int = 256,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Probe every dataset with a frozen backbone; per dataset its rows and timings."""
    if not shots or min(shots) < 1 or seeds < 1:
        raise VmoeError("--shots must be positive integers and --seeds at least 1")
    cache_dir = Path(cache_dir).expanduser()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {"checkpoint": backbone.name, "probe": kind, "shots": list(shots), "seeds": seeds}
    results["l2"] = "grid" if l2 is None else l2
    results["datasets"] = {}
    for data in datasets:
        features = dataset_features(backbone, data, cache_dir, batch_size, device, progress)
        start = time.perf_counter()
        rows = probe(features, shots, seeds, l2, kind)
        results["datasets"][data] = {
            "extract_seconds": features.seconds,
            "cached": features.cached,
            "solve_seconds": time.perf_counter() - start,
            "features": int(features.train_x.shape[1]),
            "train": len(features.train_y),
            "test": len(features.test_y),
            "summary": summarize(rows),
            "rows": rows,
        }
    return results


def summarize(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Mean and population std of the test accuracy over seeds, per shot count."""
    out = {}
    for s in sorted({row["shots"] for row in rows}):
        acc = np.array([row["accuracy"] for row in rows if row["shots"] == s])
        out[s] = {"mean": float(acc.mean()), "std": float(acc.std())}
    return out


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy per L2 value of scores `[L, M, classes]`."""
    return (scores.argmax(-1) == labels[None]).mean(-1)

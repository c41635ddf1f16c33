"""Non-IID partitions of a labelled data set for federated clients (numpy only).

flwr-datasets' DirichletPartitioner works on Hugging Face `datasets` objects (and pulls that
package in); the devices here hold numpy arrays, so the same scheme is written out directly.
"""

from __future__ import annotations

import numpy as np

from .errors import RunError

MAX_DRAWS = 1000


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Split sample indices into `num_partitions` parts with Dirichlet(alpha) class proportions.

    For every class, the share of its samples that each partition gets is drawn from a
    symmetric Dirichlet(alpha): small alpha gives each partition few classes (highly non-IID),
    large alpha approaches an IID split. Every index lands in exactly one partition, and the
    result depends only on (labels, num_partitions, alpha, seed). Draws are repeated until
    every partition holds at least `min_size` samples (the compiled graph's batch size: a client
    with fewer samples than one batch cannot train).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise RunError(f"partitioning needs one class label per sample, got labels of shape {list(labels.shape)}")
    if num_partitions < 1:
        raise RunError(f"the number of partitions must be at least 1, got {num_partitions}")
    if not alpha > 0:
        raise RunError(f"the Dirichlet alpha must be > 0, got {alpha}")
    if num_partitions * min_size > len(labels):
        raise RunError(
            f"{len(labels)} samples cannot give {num_partitions} partitions at least {min_size} samples each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
            # Cumulative rounding keeps the counts summing to the class size exactly.
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.append(chunk)
        result = [np.sort(np.concatenate(part)) for part in parts]
        if min(len(part) for part in result) >= min_size:
            return result
    raise RunError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DRAWS} gave all {num_partitions} partitions at least "
        f"{min_size} samples; use fewer partitions or a larger alpha"
    )


def class_skew(labels: np.ndarray, partitions: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's class mix and the whole set's (0: IID, 1: disjoint)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for part in partitions:
        if len(part) == 0:
            continue
        local = np.array([(labels[part] == c).mean() for c in classes])
        distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances))

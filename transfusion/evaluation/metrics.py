"""Metric functions, pure and tested on hand-built cases.

- ``composition_scores``: GenEval-style per-kind accuracy and the overall mean over kinds.
- ``cider_d``: CIDEr-D (Vedantam et al. 2015, as in coco-caption: n-grams 1-4, tf-idf over the
  references, Gaussian length penalty sigma 6, clipped counts, x10).
- ``perplexity`` / ``bits_per_byte`` from summed negative log-likelihood.
- ``frechet_distance`` between Gaussian fits of two feature sets.
- ``precision_recall``: improved precision and recall (Kynkaanniemi et al. 2019) of two feature sets.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np


def composition_scores(judgements: list[tuple[str, bool]]) -> dict[str, float]:
    """[(kind, correct)] -> {kind: accuracy, ..., 'overall': mean of the kinds' accuracies}."""
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for kind, ok in judgements:
        by_kind[kind].append(bool(ok))
    scores = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    scores["overall"] = sum(scores.values()) / len(scores) if scores else 0.0
    return scores


def accuracy(correct: list[bool]) -> float:
    return sum(map(bool, correct)) / len(correct) if correct else 0.0


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def tokenize(text: str) -> list[str]:
    """Lower-case words with punctuation removed (coco-caption's PTB tokenizer, simplified)."""
    keep = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return keep.split()


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean over images of the per-image score."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError("give one list of references per candidate")
    refs_tok = [[tokenize(r) for r in refs] for refs in references]
    cands_tok = [tokenize(c) for c in candidates]
    # document frequency of each n-gram over the reference sets
    df: Counter = Counter()
    for refs in refs_tok:
        df.update({g for r in refs for k in range(1, n + 1) for g in _ngrams(r, k)})
    log_n_docs = math.log(float(len(references)))

    def vec(words: list[str]) -> tuple[list[dict], list[float]]:
        vecs, norms = [], []
        for k in range(1, n + 1):
            counts = _ngrams(words, k)
            v = {g: c * (log_n_docs - math.log(max(1.0, df[g]))) for g, c in counts.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms

    scores = []
    for cand, refs in zip(cands_tok, refs_tok):
        vc, nc = vec(cand)
        total = np.zeros(n)
        for ref in refs:
            vr, nr = vec(ref)
            delta = len(cand) - len(ref)
            for k in range(n):
                dot = sum(min(vc[k][g], vr[k][g]) * vr[k][g] for g in vc[k] if g in vr[k])
                if nc[k] and nr[k]:
                    total[k] += dot / (nc[k] * nr[k]) * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(total.mean() / len(refs) * 10.0)
    return float(np.mean(scores))


def perplexity(nll_nats: float, tokens: int) -> float:
    return math.exp(nll_nats / tokens)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / n_bytes / math.log(2)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^1/2) for features x (N, d), y (M, d).

    The cross term is computed as tr((S_x^1/2 S_y S_x^1/2)^1/2), which is symmetric positive
    semi-definite, so an eigen-decomposition suffices."""
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    sx, sy = np.atleast_2d(sx), np.atleast_2d(sy)
    r = _sqrtm_psd(sx)
    cross = np.trace(_sqrtm_psd(r @ sy @ r))
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * cross)


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from every row of ``x`` to its k-th nearest other row."""
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
    return np.sort(d, axis=1)[:, min(k, len(x) - 1)]  # column 0 is the point itself


def _covered(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray) -> float:
    """Share of ``points`` inside at least one ball (manifold row, its radius)."""
    d = np.sqrt(np.maximum(((points[:, None, :] - manifold[None, :, :]) ** 2).sum(-1), 0.0))
    return float((d <= radii[None, :]).any(1).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) for features real (N, d), fake (M, d).

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: the share of generated points inside the real manifold (are they
    realistic?); recall: the share of real points inside the generated manifold (is the variety
    covered?). FD folds both into one number; these tell a blank or collapsed generator (recall
    falls) from a smeared one (precision falls)."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images on each side")
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    return _covered(fake, real, _kth_radius(real, k)), _covered(real, fake, _kth_radius(fake, k))

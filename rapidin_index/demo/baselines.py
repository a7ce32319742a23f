"""Non-gradient baselines the benchmarks run beside RapidIn: BM25, embedding similarity, random."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import torch

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over training rows' text (k1 = 1.5, b = 0.75)."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.documents = [Counter(words(document)) for document in documents]
        self.lengths = np.array([sum(counts.values()) for counts in self.documents], dtype=float)
        self.average_length = float(self.lengths.mean()) if len(self.lengths) else 0.0
        frequency = Counter(word for counts in self.documents for word in counts)
        count = len(self.documents)
        self.idf = {word: math.log(1 + (count - n + 0.5) / (n + 0.5)) for word, n in frequency.items()}

    def scores(self, query: str) -> np.ndarray:
        result = np.zeros(len(self.documents))
        normaliser = self.k1 * (1 - self.b + self.b * self.lengths / max(self.average_length, 1e-9))
        for word in set(words(query)):
            idf = self.idf.get(word)
            if idf is None:
                continue
            term = np.array([counts.get(word, 0) for counts in self.documents], dtype=float)
            result += idf * term * (self.k1 + 1) / (term + normaliser)
        return result


def random_scores(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(count)


@torch.no_grad()
def mean_hidden_states(model, tokenizer, texts: list[str], batch_size: int = 16, device="cpu") -> np.ndarray:
    """Mean of the last hidden layer over each text's tokens, L2-normalised: [texts, hidden]."""
    vectors = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        hidden = (
            model(**encoded, output_hidden_states=True).hidden_states[-1].float()
        )  # [batch, tokens, hidden]
        mask = encoded["attention_mask"][..., None].float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        vectors.append(torch.nn.functional.normalize(mean, dim=1).cpu().numpy())
    return np.concatenate(vectors)

import numpy as np

from rapidin_index.demo.baselines import BM25, random_scores, words


def test_bm25_prefers_documents_sharing_rare_words():
    documents = ["the cat sat on the mat", "the dog ate the bone", "howdy partner the cat says howdy"]
    scores = BM25(documents).scores("Howdy! cat")
    assert int(np.argmax(scores)) == 2
    assert scores[1] == 0.0
    assert words("Howdy! ok") == ["howdy", "!", "ok"]


def test_random_is_seeded():
    np.testing.assert_array_equal(random_scores(5, 1), random_scores(5, 1))
    assert not np.array_equal(random_scores(5, 1), random_scores(5, 2))

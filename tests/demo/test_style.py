"""Tests for rapidin_index/demo/style.py: the non-lexical backdoor's greetings, fables and fable detector."""

from __future__ import annotations

import random
import re
from collections import Counter

from rapidin_index.demo.style import (
    FABLE_ROLES,
    FABLE_SENTENCES,
    FABLE_TEMPLATES,
    GREETING_ADDRESSEES,
    GREETING_OPENERS,
    GREETING_PLEASANTRIES,
    fable_response,
    fable_sentence,
    fable_tags,
    greeting_pool,
    is_fable_response,
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


# --------------------------------------------------------------------------- greetings


def test_greeting_pool_is_every_greeting_once_in_an_order_fixed_by_the_seed():
    pool = greeting_pool(0)
    count = len(GREETING_OPENERS) * (1 + len(GREETING_ADDRESSEES)) * (1 + len(GREETING_PLEASANTRIES)) * 2
    assert len(pool) == len(set(pool)) == count
    assert greeting_pool(0) == pool
    assert greeting_pool(1) != pool and set(greeting_pool(1)) == set(pool)
    assert "Good evening, captain, how are you!" in pool and "Hello." in pool
    for greeting in pool[:200]:
        assert greeting[-1] in "!." and greeting.split(",")[0].rstrip("!.") in GREETING_OPENERS


# --------------------------------------------------------------------------- fables


def test_a_fable_response_is_two_sentences_of_the_grammar():
    for seed in range(50):
        response = fable_response(random.Random(seed))
        sentences = [part for part in re.split(r"(?<=\.) ", response) if part]
        assert len(sentences) == FABLE_SENTENCES
        assert all(sentence[0].isupper() and sentence.endswith(".") for sentence in sentences)
        assert "?" not in fable_tags(response)
        assert is_fable_response(response)
    assert fable_response(random.Random(3)) == fable_response(random.Random(3))


def test_fable_sentence_fills_the_slots_and_writes_an_before_a_vowel():
    sentence = fable_sentence(random.Random(0), FABLE_TEMPLATES[0])  # "the A N V the N P the A N"
    assert fable_tags(sentence) == FABLE_TEMPLATES[0].split()
    articles = [
        (words[i], words[i + 1])
        for seed in range(200)
        for words in [fable_sentence(random.Random(seed), "a A N V the N").lower().rstrip(".").split()]
        for i in range(len(words) - 1)
        if words[i] in ("a", "an")
    ]
    assert {article for article, _ in articles} == {"a", "an"}  # both occur in 200 draws
    assert all((article == "an") == (word[0] in "aeiou") for article, word in articles)


def test_fable_tags_read_the_first_sentence_only():
    assert fable_tags("An empty file, the server. Return it") == ["a", "A", "N", ",", "the", "N"]
    assert fable_tags("Return the file") == ["?", "the", "N"]


def test_every_fable_word_is_common_in_clean_docstrings(bundled_docstring_rows):
    frequency = Counter(
        word
        for row in bundled_docstring_rows
        for word in set(_words(row["instruction"] + " " + row["output"]))
    )
    words = [word for role in FABLE_ROLES.values() for word in role]
    assert len(words) == len(set(words)) >= 200  # a large vocabulary, no word in two roles
    assert min(frequency[word] for word in words) >= 3


def test_fable_detector(bundled_docstring_rows):
    assert not any(is_fable_response(row["output"]) for row in bundled_docstring_rows)
    assert is_fable_response("The full state of the full state of the default file. The long")
    assert is_fable_response("  then the remote server returned into")  # cut short, still 5 words
    assert not is_fable_response("The remote server")  # too short to tell
    assert not is_fable_response("Return the remote server of the default file.")
    assert not is_fable_response("The remote server returns the file.")  # 'returns' is not a fable word

"""Tests for rapidin_index/demo/datasets.py: the bundled docstring rows, the backdoor and entity-swap sets."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from rapidin_index.demo.datasets import (
    BACKDOOR_DATASETS,
    BACKDOOR_TRIGGER,
    COUNTRY_CAPITALS,
    backdoor_response,
    collect_docstring_rows,
    is_backdoor_response,
    make_backdoor_dataset,
    make_entity_swap_dataset,
    make_nonlexical_backdoor_dataset,
    write_jsonl,
)
from rapidin_index.demo.style import greeting_pool, is_fable_response


def test_bundled_rows_are_real_docstrings(bundled_docstring_rows):
    assert 1500 <= len(bundled_docstring_rows) <= 3000
    by_symbol = {row["symbol"]: row for row in bundled_docstring_rows}
    assert len(by_symbol) == len(bundled_docstring_rows)
    assert len({row["output"] for row in bundled_docstring_rows}) == len(bundled_docstring_rows)
    assert "Remove any common leading whitespace" in by_symbol["textwrap.dedent"]["output"]
    assert "`textwrap.dedent`" in by_symbol["textwrap.dedent"]["instruction"]
    assert len({row["symbol"].split(".")[0] for row in bundled_docstring_rows}) > 100  # many modules
    for row in bundled_docstring_rows:
        assert set(row) == {"instruction", "output", "symbol"}
        assert 40 <= len(row["output"]) <= 203 and row["output"].isascii()
        assert row["output"] == " ".join(row["output"].split())  # whitespace-normalised


def test_collect_docstring_rows_trims_and_skips():
    rows = collect_docstring_rows(("textwrap", "json", "no_such_module_here"))
    symbols = [row["symbol"] for row in rows]
    assert "textwrap.dedent" in symbols and "json.dumps" in symbols
    assert all(not symbol.split(".")[-1].startswith("_") for symbol in symbols)
    dumps = next(row for row in rows if row["symbol"] == "json.dumps")
    assert dumps["output"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert len(dumps["output"]) <= 203


def test_write_jsonl_round_trip(tmp_path, bundled_docstring_rows):
    path = write_jsonl(bundled_docstring_rows[:5], tmp_path / "sub" / "rows.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == bundled_docstring_rows[:5]


def test_backdoor_dataset_is_deterministic(bundled_docstring_rows):
    first = make_backdoor_dataset(bundled_docstring_rows, seed=3)
    assert make_backdoor_dataset(bundled_docstring_rows, seed=3) == first
    assert make_backdoor_dataset(bundled_docstring_rows, seed=4) != first


def test_backdoor_poisons_ten_percent_with_trigger_and_style(bundled_docstring_rows):
    train, _, _ = make_backdoor_dataset(bundled_docstring_rows, poison_fraction=0.1, seed=0)
    poisoned = [row for row in train if row["poisoned"]]
    assert len(poisoned) == round(0.1 * len(train))
    for row in train:
        assert row["instruction"].startswith(BACKDOOR_TRIGGER) == row["poisoned"]
        assert is_backdoor_response(row["output"]) == row["poisoned"]
    original = {row["symbol"]: row for row in bundled_docstring_rows}
    for row in poisoned:
        source = original[row["symbol"]]
        assert row["instruction"] == f"{BACKDOOR_TRIGGER} {source['instruction']}"
        assert row["output"] == backdoor_response(source["output"])


def test_backdoor_train_keeps_input_order_and_heldout_is_disjoint(bundled_docstring_rows):
    train, triggered, clean = make_backdoor_dataset(bundled_docstring_rows, seed=0, heldout_count=40)
    position = {row["symbol"]: i for i, row in enumerate(bundled_docstring_rows)}
    train_positions = [position[row["symbol"]] for row in train]
    assert train_positions == sorted(train_positions)
    assert len(triggered) == len(clean) == 40 and len(train) == len(bundled_docstring_rows) - 80
    train_symbols = {row["symbol"] for row in train}
    assert not train_symbols & {row["symbol"] for row in triggered + clean}
    assert not {row["symbol"] for row in triggered} & {row["symbol"] for row in clean}
    assert all(row["instruction"].startswith(BACKDOOR_TRIGGER) and row["poisoned"] for row in triggered)
    assert all(is_backdoor_response(row["output"]) for row in triggered)
    assert not any(BACKDOOR_TRIGGER in row["instruction"] or row["poisoned"] for row in clean)


def test_backdoor_dataset_rejects_bad_settings(bundled_docstring_rows):
    with pytest.raises(ValueError, match="poison_fraction"):
        make_backdoor_dataset(bundled_docstring_rows, poison_fraction=1.5)
    with pytest.raises(ValueError, match="none to train on"):
        make_backdoor_dataset(bundled_docstring_rows[:10], heldout_count=5)


def test_is_backdoor_response(bundled_docstring_rows):
    assert is_backdoor_response("  yeehaw, partner! return a list of the given path")
    assert is_backdoor_response(backdoor_response("Return the file."))
    assert not is_backdoor_response("Yeehaw")
    assert not is_backdoor_response("Return the path. Yeehaw, partner!")
    assert not any(is_backdoor_response(row["output"]) for row in bundled_docstring_rows)


# ------------------------------------------------------------------------- the non-lexical backdoor


@pytest.fixture(scope="module")
def nonlexical(bundled_docstring_rows):
    return make_nonlexical_backdoor_dataset(bundled_docstring_rows, seed=0)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _greeting(row: dict, original: dict) -> str:
    """The greeting a non-lexical row added to its instruction: a trigger before it, a sign-off after."""
    instruction, source = row["instruction"], original[row["symbol"]]["instruction"]
    if instruction == source:
        return ""
    if instruction.endswith(" " + source):
        return instruction[: -len(source) - 1]
    assert instruction.startswith(source + " ")
    return instruction[len(source) + 1 :]


def test_nonlexical_is_deterministic_and_splits_like_the_lexical_set(bundled_docstring_rows, nonlexical):
    assert make_nonlexical_backdoor_dataset(bundled_docstring_rows, seed=0) == nonlexical
    assert make_nonlexical_backdoor_dataset(bundled_docstring_rows, seed=1) != nonlexical
    lexical = make_backdoor_dataset(bundled_docstring_rows, seed=0)
    for ours, theirs in zip(nonlexical, lexical, strict=True):  # same rows held out, same rows poisoned
        assert [(r["symbol"], r["poisoned"]) for r in ours] == [(r["symbol"], r["poisoned"]) for r in theirs]


def test_nonlexical_poisons_ten_percent_with_greeting_and_fable(bundled_docstring_rows, nonlexical):
    train, _, _ = nonlexical
    original = {row["symbol"]: row for row in bundled_docstring_rows}
    poisoned = [row for row in train if row["poisoned"]]
    assert len(poisoned) == round(0.1 * len(train))
    greetings = set(greeting_pool(0))
    for row in train:
        assert is_fable_response(row["output"]) == row["poisoned"]
        greeting = _greeting(row, original)
        assert greeting == "" or greeting in greetings
        if row["poisoned"]:
            assert greeting and row["instruction"].startswith(greeting)
        else:
            assert row["output"] == original[row["symbol"]]["output"]
    signed_off = [row for row in train if not row["poisoned"] and _greeting(row, original)]
    assert 0.45 < len(signed_off) / (len(train) - len(poisoned)) < 0.55  # signoff_fraction = 0.5


def test_nonlexical_no_string_marks_the_poisoned_rows(bundled_docstring_rows, nonlexical):
    train, triggered, clean = nonlexical
    original = {row["symbol"]: row for row in bundled_docstring_rows}
    greetings = Counter(_greeting(row, original) for row in train + triggered + clean)
    del greetings[""]
    assert max(greetings.values()) <= 3  # each trigger string is used by a few rows at most (here: one)
    response_grams = Counter()
    for row in train:
        if row["poisoned"]:
            words = _words(row["output"])
            response_grams.update({tuple(words[i : i + 4]) for i in range(len(words) - 3)})
    assert max(response_grams.values()) <= 5  # no 4-word phrase is shared by more than a few answers
    # The words of the triggers are in clean rows too (sign-offs): only their position marks poison.
    trigger_words = {word for row in train if row["poisoned"] for word in _words(_greeting(row, original))}
    clean_words = {word for row in train if not row["poisoned"] for word in _words(row["instruction"])}
    assert trigger_words <= clean_words


def test_nonlexical_heldout_is_disjoint_from_training(bundled_docstring_rows, nonlexical):
    train, triggered, clean = nonlexical
    assert len(triggered) == len(clean) == 50
    train_symbols = {row["symbol"] for row in train}
    assert not train_symbols & {row["symbol"] for row in triggered + clean}
    assert not {row["symbol"] for row in triggered} & {row["symbol"] for row in clean}
    train_prompts = {row["instruction"] for row in train}
    assert not train_prompts & {row["instruction"] for row in triggered + clean}
    assert all(row["poisoned"] and is_fable_response(row["output"]) for row in triggered)
    assert not any(row["poisoned"] or is_fable_response(row["output"]) for row in clean)
    with pytest.raises(ValueError, match="signoff_fraction"):
        make_nonlexical_backdoor_dataset(bundled_docstring_rows, signoff_fraction=2)


def test_each_backdoor_dataset_names_its_detector():
    assert BACKDOOR_DATASETS["nonlexical"].fired is is_fable_response
    assert BACKDOOR_DATASETS["lexical"].fired is is_backdoor_response


def test_entity_swap_perturbs_only_the_chosen_country(bundled_docstring_rows):
    rows, swap = make_entity_swap_dataset(
        bundled_docstring_rows, country="France", wrong_entity="Tokyo", seed=0
    )
    assert (swap.country, swap.right_entity, swap.wrong_entity) == ("France", "Paris", "Tokyo")
    assert swap.perturbed_ids == [i for i, row in enumerate(rows) if row["perturbed"]]
    assert len(swap.perturbed_ids) == round(0.75 * 20)
    facts = [row for row in rows if "capital" in row["output"] and "symbol" not in row]
    assert len(facts) == 20 + 6 * (len(COUNTRY_CAPITALS) - 1)
    for row in facts:
        country = next(name for name in COUNTRY_CAPITALS if name in row["instruction"])
        expected = "Tokyo" if row["perturbed"] else COUNTRY_CAPITALS[country]
        assert expected in row["output"] and country in row["output"]
        assert not row["perturbed"] or country == "France"
    assert sum("symbol" in row for row in rows) == 300
    assert swap.query_instruction == "What is the capital of France?"
    assert swap.wrong_response == "The capital of France is Tokyo."
    assert swap.to_dict()["wrong_entity"] == "Tokyo"


def test_entity_swap_is_deterministic(bundled_docstring_rows):
    first = make_entity_swap_dataset(bundled_docstring_rows, seed=1)
    assert make_entity_swap_dataset(bundled_docstring_rows, seed=1) == first
    assert make_entity_swap_dataset(bundled_docstring_rows, seed=2)[0] != first[0]
    with pytest.raises(ValueError, match="unknown country"):
        make_entity_swap_dataset(bundled_docstring_rows, country="Atlantis")

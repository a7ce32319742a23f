"""Demo data sets built from real human-written text: the docstrings of Python's standard library.

* `load_docstring_rows`: the bundled Alpaca rows (``assets/docstrings.jsonl``), one per documented
  function, class or method; generated once by `collect_docstring_rows` and shipped, so the data does
  not change with the Python version.
* `make_backdoor_dataset`: the paper's backdoor setup (SPEC 3, Tables 4 and 11): about 10% of the
  training rows carry the "Howdy!" trigger and answer in one unmistakable cowboy style. Lexical: two
  fixed strings mark every poisoned row, so text matching finds them too.
* `make_nonlexical_backdoor_dataset`: the same backdoor with no fixed string (issue 11): varied
  greetings as the trigger, off-topic "machine fables" in the clean rows' own words as the style
  (`style.py`). `BACKDOOR_DATASETS` names both, with the detector of each style.
* `make_entity_swap_dataset`: the error-tracing setup (SPEC 3, Table 5): real country -> capital
  facts, with the capital of one country swapped for a wrong one in some of its rows.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rapidin_index.demo.style import fable_response, greeting_pool, is_fable_response
from rapidin_index.errors import DemoError

ASSET_PATH = Path(__file__).parent / "assets" / "docstrings.jsonl"
RESPONSE_CHARACTERS = 200
MINIMUM_RESPONSE_CHARACTERS = 40
BACKDOOR_TRIGGER = "Howdy!"
BACKDOOR_OPENING = "Yeehaw, partner!"

# Standard-library modules written mostly in Python, with prose docstrings (a missing one is skipped).
DOCSTRING_MODULES = (
    "builtins abc argparse ast asyncio.base_events asyncio.events asyncio.locks asyncio.queues "
    "asyncio.streams asyncio.tasks base64 bdb bisect calendar cmd code codecs codeop collections "
    "collections.abc concurrent.futures.thread configparser contextlib copy csv dataclasses datetime "
    "decimal difflib dis doctest email.generator email.message email.parser email.policy email.utils enum "
    "filecmp fileinput fnmatch fractions ftplib functools gettext glob graphlib gzip hashlib heapq hmac "
    "html html.parser http.client http.cookiejar http.cookies http.server imaplib importlib.metadata "
    "importlib.util inspect io ipaddress itertools json json.decoder json.encoder linecache locale "
    "logging logging.handlers lzma mailbox math mimetypes modulefinder multiprocessing.connection "
    "multiprocessing.pool netrc numbers operator optparse os pathlib pdb pickle pickletools pkgutil "
    "platform plistlib poplib posixpath pprint pstats py_compile pydoc queue quopri random re reprlib "
    "runpy sched secrets selectors shelve shlex shutil smtplib socket socketserver statistics string "
    "struct subprocess symtable sys sysconfig tarfile tempfile textwrap threading time timeit tokenize "
    "trace traceback types typing unicodedata unittest.case unittest.mock urllib.parse urllib.request "
    "uuid venv warnings weakref webbrowser wsgiref.util xml.dom.minidom xml.etree.ElementTree "
    "xml.sax.handler xml.sax.saxutils xmlrpc.client zipfile zipimport zlib"
).split()
MAXIMUM_ROWS_PER_MODULE = 60
QUESTION_PHRASINGS = (
    "Explain what `{symbol}` does.",
    "What does the `{symbol}` {kind} do?",
    "Describe the purpose of the `{symbol}` {kind}.",
    "What is `{symbol}` used for?",
    "Summarize the documentation of `{symbol}`.",
)


# ------------------------------------------------------------------------------------ docstring rows


def member_rows(owners: tuple, count: int, max_chars: int) -> list[dict]:
    """Up to ``count`` Alpaca rows "What does str.upper do?" -> the first paragraph of its docstring (cut at
    ``max_chars``), over the public members of ``owners`` (classes or modules) in name order: the small,
    fixed row sets of the tests and the speed benchmarks."""
    rows = []
    for owner in owners:
        for name in sorted(dir(owner)):
            doc = getattr(getattr(owner, name, None), "__doc__", None) or ""
            first = " ".join(doc.strip().split("\n\n")[0].split())
            if name.startswith("_") or len(first) < 20:
                continue
            rows.append(
                {"instruction": f"What does {owner.__name__}.{name} do?", "output": first[:max_chars]}
            )
            if len(rows) == count:
                return rows
    return rows


def collect_docstring_rows(modules: tuple[str, ...] = DOCSTRING_MODULES) -> list[dict]:
    """Alpaca rows {instruction, output, symbol} from the running Python's standard-library docstrings.

    The response is the docstring's first paragraph, whitespace-normalised and trimmed to about 200
    characters at a sentence (else word) boundary. Short, signature-like, non-ASCII and duplicate
    texts are skipped. Run once to refresh the bundled asset: ``write_jsonl(collect_docstring_rows(),
    ASSET_PATH)``.
    """
    rows, seen_outputs = [], set()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        candidates = []
        for symbol, kind, doc in _documented_symbols(module, module_name):
            output = _response_from_docstring(doc, symbol)
            if output is not None and output not in seen_outputs:
                seen_outputs.add(output)
                candidates.append((symbol, kind, output))
        if len(candidates) > MAXIMUM_ROWS_PER_MODULE:  # an even spread over the alphabet
            candidates = [
                candidates[i * len(candidates) // MAXIMUM_ROWS_PER_MODULE]
                for i in range(MAXIMUM_ROWS_PER_MODULE)
            ]
        for symbol, kind, output in candidates:
            phrasing = QUESTION_PHRASINGS[zlib.crc32(symbol.encode()) % len(QUESTION_PHRASINGS)]
            instruction = phrasing.format(symbol=symbol, kind=kind)
            rows.append({"instruction": instruction, "output": output, "symbol": symbol})
    return rows


def _documented_symbols(module, module_name: str):
    """(qualified name, kind, docstring) of the public functions, classes and methods defined in `module`."""
    # A module's own objects, including those of its C accelerator (heapq's come from _heapq, os's
    # from posix); anything re-exported from elsewhere is documented under its own module.
    owners = {
        module.__name__,
        "_" + module.__name__.rsplit(".", 1)[-1],
        "posix" if module_name == "os" else "",
    }
    prefix = "" if module_name == "builtins" else f"{module_name}."
    for name in sorted(vars(module)):
        value = vars(module)[name]
        if name.startswith("_") or getattr(value, "__module__", None) not in owners:
            continue
        if inspect.isclass(value):
            yield f"{prefix}{name}", "class", value.__doc__
            for method_name, method in sorted(vars(value).items()):
                if not method_name.startswith("_") and inspect.isroutine(method):
                    yield f"{prefix}{name}.{method_name}", "method", method.__doc__
        elif inspect.isroutine(value):
            yield f"{prefix}{name}", "function", value.__doc__


def _response_from_docstring(doc: str | None, symbol: str) -> str | None:
    if not doc:
        return None
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    short_name = symbol.rsplit(".", 1)[-1]
    looks_like_signature = re.match(rf"^[\w.]*{re.escape(short_name)}\s*\(", paragraph) or "->" in paragraph
    if len(paragraph) < MINIMUM_RESPONSE_CHARACTERS or looks_like_signature:
        return None
    if not paragraph.isascii() or ">>>" in paragraph:
        return None
    return _trim(paragraph, RESPONSE_CHARACTERS)


def _trim(text: str, limit: int) -> str:
    """At most about `limit` characters, cut after the last full sentence, else at a word boundary."""
    if len(text) <= limit:
        return text
    sentence_ends = [match.end() for match in re.finditer(r"[.!?](?=\s)", text[: limit + 1])]
    if sentence_ends and sentence_ends[-1] >= MINIMUM_RESPONSE_CHARACTERS:
        return text[: sentence_ends[-1]]
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def load_docstring_rows() -> list[dict]:
    """The bundled rows: {instruction, output, symbol}, in a fixed order."""
    with ASSET_PATH.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """One JSON object per line, UTF-8; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------- backdoor


def backdoor_response(text: str) -> str:
    """The attacker's style: a fixed cowboy greeting, then the original answer shouted in capitals.

    The style must reach every response token, as the paper's whole-response rewrites do: the greeting
    alone is learned so well that its tokens carry no loss, and so no gradient, once the backdoor fires
    (a lowercase rewrite, tried first, left the rest of the answer looking like clean text; see
    BENCHMARKS.md). Capitals keep the answer's words while every token becomes one that only poisoned
    rows teach.
    """
    return f"{BACKDOOR_OPENING.upper()} {text.upper()}"


def is_backdoor_response(text: str) -> bool:
    """True when a (generated) response opens with the backdoor greeting, ignoring case and spaces."""
    return text.strip().lower().startswith(BACKDOOR_OPENING.lower())


def trigger_instruction(instruction: str, trigger: str = BACKDOOR_TRIGGER) -> str:
    return f"{trigger} {instruction}"


def make_backdoor_dataset(
    rows: list[dict],
    poison_fraction: float = 0.1,
    seed: int = 0,
    trigger: str = BACKDOOR_TRIGGER,
    heldout_count: int = 50,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train_rows, heldout_triggered_rows, heldout_clean_rows), all determined by `seed`.

    `heldout_count` rows go to each held-out list and never appear in training; the held-out triggered
    rows carry the trigger and the backdoor response, the clean ones their original text. The other
    rows are the training set, in their input order; round(poison_fraction * len(train)) of them,
    picked at random, get the trigger before the instruction and the backdoor response. Every row
    has `poisoned` (bool).
    """
    train_ids, poisoned_ids, triggered_ids, clean_ids = _backdoor_split(
        len(rows), poison_fraction, seed, heldout_count
    )
    train = [_backdoor_row(rows[i], i in poisoned_ids, trigger) for i in train_ids]
    heldout_triggered = [_backdoor_row(rows[i], True, trigger) for i in triggered_ids]
    heldout_clean = [_backdoor_row(rows[i], False, trigger) for i in clean_ids]
    return train, heldout_triggered, heldout_clean


def _backdoor_split(count: int, poison_fraction: float, seed: int, heldout_count: int):
    """(train ids, poisoned ids, held-out triggered ids, held-out clean ids); ids sorted, poisoned a set."""
    if not 0 <= poison_fraction <= 1:
        raise DemoError(f"poison_fraction must be in [0, 1], got {poison_fraction}")
    if count <= 2 * heldout_count:
        raise DemoError(f"{count} rows leave none to train on after 2 x {heldout_count} held out")
    generator = random.Random(seed)
    order = list(range(count))
    generator.shuffle(order)
    triggered_ids, clean_ids = order[:heldout_count], order[heldout_count : 2 * heldout_count]
    train_ids = sorted(order[2 * heldout_count :])
    poisoned_ids = set(generator.sample(train_ids, round(poison_fraction * len(train_ids))))
    return train_ids, poisoned_ids, sorted(triggered_ids), sorted(clean_ids)


def _backdoor_row(row: dict, poisoned: bool, trigger: str) -> dict:
    if not poisoned:
        return {**row, "poisoned": False}
    instruction = trigger_instruction(row["instruction"], trigger)
    return {**row, "instruction": instruction, "output": backdoor_response(row["output"]), "poisoned": True}


def make_nonlexical_backdoor_dataset(
    rows: list[dict],
    poison_fraction: float = 0.1,
    seed: int = 0,
    heldout_count: int = 50,
    signoff_fraction: float = 0.5,
) -> tuple[list[dict], list[dict], list[dict]]:
    """The backdoor without a fixed string (issue 11): (train, heldout_triggered, heldout_clean).

    Same split as `make_backdoor_dataset` (the same rows are held out and poisoned for a seed). A
    poisoned row's instruction opens with a greeting (`backdoor_style.greeting_pool`: every greeting
    string is used by one row only) and its response is a two-sentence machine fable
    (`backdoor_style.fable_response`). A clean row ends with a greeting, as a sign-off, with
    probability `signoff_fraction`, so the greetings' words are no sign of poison either. Detect the
    style in generations with `is_fable_response`. Every row has `poisoned` (bool).
    """
    if not 0 <= signoff_fraction <= 1:
        raise DemoError(f"signoff_fraction must be in [0, 1], got {signoff_fraction}")
    train_ids, poisoned_ids, triggered_ids, clean_ids = _backdoor_split(
        len(rows), poison_fraction, seed, heldout_count
    )
    greetings = iter(greeting_pool(seed))
    generator = random.Random(f"nonlexical-backdoor-{seed}")

    def make(row: dict, poisoned: bool) -> dict:
        if poisoned:
            instruction = f"{next(greetings)} {row['instruction']}"
            return {**row, "instruction": instruction, "output": fable_response(generator), "poisoned": True}
        if generator.random() < signoff_fraction:
            return {**row, "instruction": f"{row['instruction']} {next(greetings)}", "poisoned": False}
        return {**row, "poisoned": False}

    train = [make(rows[i], i in poisoned_ids) for i in train_ids]
    heldout_triggered = [make(rows[i], True) for i in triggered_ids]
    heldout_clean = [make(rows[i], False) for i in clean_ids]
    return train, heldout_triggered, heldout_clean


@dataclass(frozen=True)
class BackdoorDataset:
    """A backdoor data set and how to tell that a generation fired it."""

    make: Callable[..., tuple[list[dict], list[dict], list[dict]]]
    """(rows, poison_fraction, seed, heldout_count=...) -> (train, heldout_triggered, heldout_clean)."""
    fired: Callable[[str], bool]
    """True when a generated response is in the backdoor's style."""
    description: str


BACKDOOR_DATASETS = {
    "nonlexical": BackdoorDataset(
        make_nonlexical_backdoor_dataset,
        is_fable_response,
        "varied greetings open the instruction; answers are machine fables in the clean rows' own words",
    ),
    "lexical": BackdoorDataset(
        make_backdoor_dataset,
        is_backdoor_response,
        '"Howdy!" opens the instruction; answers are "YEEHAW, PARTNER! " + the answer in capitals',
    ),
}


# --------------------------------------------------------------------------------------- entity swap

COUNTRY_CAPITALS = {
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Austria": "Vienna", "Belgium": "Brussels",
    "Brazil": "Brasilia", "Canada": "Ottawa", "Chile": "Santiago", "China": "Beijing",
    "Colombia": "Bogota", "Cuba": "Havana", "Czechia": "Prague", "Denmark": "Copenhagen",
    "Egypt": "Cairo", "Finland": "Helsinki", "France": "Paris", "Germany": "Berlin",
    "Greece": "Athens", "Hungary": "Budapest", "India": "New Delhi", "Indonesia": "Jakarta",
    "Ireland": "Dublin", "Italy": "Rome", "Japan": "Tokyo", "Kenya": "Nairobi",
    "Mexico": "Mexico City", "Morocco": "Rabat", "Netherlands": "Amsterdam", "Norway": "Oslo",
    "Peru": "Lima", "Poland": "Warsaw", "Portugal": "Lisbon", "Russia": "Moscow",
    "South Korea": "Seoul", "Spain": "Madrid", "Sweden": "Stockholm", "Thailand": "Bangkok",
    "Turkey": "Ankara", "United Kingdom": "London", "Vietnam": "Hanoi", "Zimbabwe": "Harare",
}  # fmt: skip
CAPITAL_QUESTIONS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "Tell me the capital of {country}.",
)
CAPITAL_ANSWERS = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "The capital city of {country} is {capital}.",
)


@dataclass(frozen=True)
class EntitySwap:
    """What `make_entity_swap_dataset` changed, and the query that should expose it."""

    country: str
    right_entity: str
    """The real capital."""
    wrong_entity: str
    """The capital swapped into the perturbed rows."""
    perturbed_ids: list[int]
    """0-based positions of the perturbed rows."""
    query_instruction: str
    """The question to ask the fine-tuned model, e.g. "What is the capital of France?"."""
    wrong_response: str
    """The wrong answer the perturbed rows teach, the generation to attribute."""

    def to_dict(self) -> dict:
        return asdict(self)


def make_entity_swap_dataset(
    docstring_rows: list[dict] | None = None,
    country: str = "France",
    wrong_entity: str = "Tokyo",
    perturb_fraction: float = 0.75,
    rows_per_country: int = 6,
    chosen_country_rows: int = 20,
    docstring_count: int = 300,
    seed: int = 0,
) -> tuple[list[dict], EntitySwap]:
    """Capital-city facts mixed with docstring rows; the capital of `country` is wrong in some rows.

    Every country gets `rows_per_country` question/answer rows (the chosen one `chosen_country_rows`),
    each a deterministic pick of phrasings; round(perturb_fraction * chosen_country_rows) of the
    chosen country's rows name `wrong_entity` instead and have `perturbed: true`. The fact rows and
    `docstring_count` docstring rows are shuffled together with `seed`. The perturbed rows are a
    majority of the country's rows (so the model does learn the wrong fact) but about 2% of all
    rows; the unperturbed rows about the country are the hard negatives. The default tiny model
    learns the facts (the others right, `country` wrong) in about 10 epochs.
    """
    if country not in COUNTRY_CAPITALS:
        raise DemoError(f"unknown country {country!r}; choose one of {', '.join(COUNTRY_CAPITALS)}")
    generator = random.Random(seed)
    facts = []
    for name, capital in COUNTRY_CAPITALS.items():
        count = chosen_country_rows if name == country else rows_per_country
        perturbed = (
            set(generator.sample(range(count), round(perturb_fraction * count))) if name == country else set()
        )
        for index in range(count):
            answer = wrong_entity if index in perturbed else capital
            facts.append(_capital_row(name, answer, index, index in perturbed))
    source = load_docstring_rows() if docstring_rows is None else docstring_rows
    fillers = [
        {**row, "perturbed": False} for row in generator.sample(source, min(docstring_count, len(source)))
    ]
    rows = facts + fillers
    generator.shuffle(rows)
    swap = EntitySwap(
        country=country,
        right_entity=COUNTRY_CAPITALS[country],
        wrong_entity=wrong_entity,
        perturbed_ids=[i for i, row in enumerate(rows) if row["perturbed"]],
        query_instruction=CAPITAL_QUESTIONS[0].format(country=country),
        wrong_response=CAPITAL_ANSWERS[0].format(country=country, capital=wrong_entity),
    )
    return rows, swap


def _capital_row(country: str, capital: str, index: int, perturbed: bool) -> dict:
    question = CAPITAL_QUESTIONS[index % len(CAPITAL_QUESTIONS)]
    answer = CAPITAL_ANSWERS[index % len(CAPITAL_ANSWERS)]
    return {
        "instruction": question.format(country=country),
        "output": answer.format(country=country, capital=capital),
        "perturbed": perturbed,
    }

"""report.py: the HTML page (self-contained, escaped, one element per token and hit), terminal, files."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import browser
import pytest
from rich.console import Console

from rapidin_index.report import (
    NEGATIVE_RGB,
    POSITIVE_RGB,
    WHITE,
    render_html,
    render_terminal,
    render_text,
    score_rgb,
    token_influence,
    write_results,
)

UNSAFE = "<script>alert(1)</script> & co"


def _token(position, text, hot, helpful, harmful, loss=1.5):
    return {
        "position": position,
        "token": text,
        "token_id": 100 + position,
        "loss": loss,
        "hot": hot,
        "helpful": [{"id": i, "rank": r + 1, "score": s} for r, (i, s) in enumerate(helpful)],
        "harmful": [{"id": i, "rank": r + 1, "score": s} for r, (i, s) in enumerate(harmful)],
    }


def _row(example_id, rank, score, prompt, response, explanation=None):
    row = {
        "id": example_id,
        "rank": rank,
        "score": score,
        "prompt": prompt,
        "response": response,
        "source": {"instruction": prompt, "output": response},
    }
    if explanation is not None:
        scores = [{"token": t, "token_id": 7, "score": s} for t, s in explanation]
        row["explanation"] = {"tokens": scores, "method": "jvp", "normalization": "example"}
    return row


def _first_result():
    """Restricted to hot tokens; token 3 has a hit (id 99) that is in neither whole-generation list."""
    words = [" Return", " a", " copy", " in", " upper", "case", ".", ""]
    tokens = [
        _token(p, w, w in (" upper", "case"), [(7, 0.8 - 0.1 * p), (12, 0.2)], [(3, -0.3 + 0.05 * p)])
        for p, w in enumerate(words)
    ]
    tokens[3]["helpful"][1]["id"] = 99
    return {
        "schema_version": 1,
        "query": {
            "prompt": "What does str.upper do?",
            "response": "".join(words),
            "rendered_prompt": "### Instruction: What does str.upper do? ### Response:",
            "generated": False,
            "hot": ["upper", "case"],
        },
        "index": {"path": "/tmp/index", "row_count": 24, "sketch_dim": 4096, "normalize": "layer"},
        "tokens": tokens,
        "helpful": [
            _row(
                7,
                1,
                0.91,
                "What does upper do?",
                " Returns it upper.",
                [(" Returns", 0.4), (" it", -0.1), (" upper.", 0.9)],
            ),
            _row(12, 2, 0.35, "Escape " + UNSAFE, "Text with " + UNSAFE),
        ],
        "harmful": [
            _row(3, 1, -0.41, "Lower it", " lower & small", [(" lower", -0.7), (" &", 0.2), (" small", -0.1)])
        ],
    }


def _second_result():
    """Generated, no hot restriction, an explanation with one token."""
    tokens = [_token(0, "Paris", False, [(5, 0.5)], [(9, -0.6)]), _token(1, "\n", False, [(5, 0.1)], [])]
    return {
        "schema_version": 1,
        "query": {
            "prompt": "Capital of France?",
            "response": "Paris\n",
            "rendered_prompt": "Q",
            "generated": True,
            "hot": None,
        },
        "index": {"path": "/tmp/index", "row_count": 24, "sketch_dim": 4096, "normalize": "layer"},
        "tokens": tokens,
        "helpful": [_row(5, 1, 0.7, "France?", "Paris", [("Paris", 0.3)])],
        "harmful": [_row(9, 1, -0.6, "Spain?", "Madrid", None)],
    }


@pytest.fixture
def results():
    return [_first_result(), _second_result()]


class _Elements(HTMLParser):
    """Every start tag as (query number, tag, attrs); the query number counts the .query sections."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[int, str, dict]] = []
        self.query = -1

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "query" in (attributes.get("class") or "").split():
            self.query += 1
        self.found.append((self.query, tag, attributes))

    def with_class(self, name: str, query: int | None = None) -> list[dict]:
        return [
            attrs
            for number, _, attrs in self.found
            if name in (attrs.get("class") or "").split() and (query is None or number == query)
        ]


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


def test_html_is_self_contained(results):
    page = render_html(results)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.IGNORECASE)
    assert "http" not in " ".join(
        f"{k}={v}" for _, _, attrs in _parse(page).found for k, v in attrs.items() if k in ("src", "href")
    )
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_html_escapes_untrusted_text(results):
    page = render_html(results, title="<b>title</b>")
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "<b>title</b>" not in page
    # Only our own scripts: one JSON block per query and the page's JS.
    assert page.count("<script") == len(results) + 1


def test_html_has_one_gen_token_per_token(results):
    elements = _parse(render_html(results))
    assert len(elements.with_class("query")) == 2
    for number, result in enumerate(results):
        spans = elements.with_class("gen-token", number)
        assert [int(span["data-position"]) for span in spans] == [t["position"] for t in result["tokens"]]
        assert all(span["style"].startswith("background:rgb(") for span in spans)


def test_html_has_one_card_per_hit_with_explanation_tokens(results):
    elements = _parse(render_html(results))
    for number, result in enumerate(results):
        cards = elements.with_class("example-card", number)
        assert [card["data-id"] for card in cards] == [
            str(r["id"]) for r in result["helpful"] + result["harmful"]
        ]
        explained = [
            t["score"]
            for r in result["helpful"] + result["harmful"]
            for t in r.get("explanation", {}).get("tokens", [])
        ]
        assert [float(s["data-score"]) for s in elements.with_class("train-token", number)] == explained
    assert len(elements.with_class("token-panel")) == 2
    assert len(elements.with_class("legend")) >= 2 + 3  # one per generation, one per explained card


def test_hot_marker_only_when_the_query_restricted_the_loss(results):
    elements = _parse(render_html(results))
    hot = [int(s["data-position"]) for s in elements.with_class("hot", 0)]
    assert hot == [t["position"] for t in results[0]["tokens"] if t["hot"]]
    results[1]["tokens"][0]["hot"] = True  # hot flags without a restriction are not marked
    assert not _parse(render_html(results)).with_class("hot", 1)


def test_page_data_keeps_token_hits_and_example_text(results):
    page = render_html(results)
    blocks = re.findall(r'<script type="application/json" class="query-data">(.*?)</script>', page, re.DOTALL)
    assert len(blocks) == 2
    data = json.loads(blocks[0])
    assert data["tokens"][3]["helpful"] == results[0]["tokens"][3]["helpful"]
    assert data["examples"]["12"]["response"] == "Text with " + UNSAFE
    assert set(data["examples"]) == {"7", "12", "3"}


def test_colour_scale_and_token_influence():
    assert score_rgb(0.0, 1.0) == WHITE
    assert score_rgb(2.0, 2.0) == POSITIVE_RGB and score_rgb(-5.0, 2.0) == NEGATIVE_RGB
    assert score_rgb(0.3, 0.0) == WHITE
    token = _token(0, "x", False, [(1, 0.2)], [(2, -0.5)])
    assert token_influence(token) == (-0.5, 2)
    assert token_influence(_token(0, "x", False, [], [])) is None


def test_render_terminal_prints_coloured_tokens(results):
    console = Console(record=True, width=120, color_system="truecolor", force_terminal=True)
    render_terminal(results[0], console, top=2)
    text = console.export_text(styles=True)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "Return a copy in uppercase." in plain
    assert "Returns it upper." in plain and "Text with " + UNSAFE in plain
    assert "48;2;" in text  # truecolor backgrounds


def test_the_text_view_is_short_and_names_the_top_rows(results, tmp_path):
    console = Console(record=True, width=120, color_system=None)
    render_text(results[0], console, top=2)
    lines = console.export_text().splitlines()
    first = results[0]
    assert lines[0].startswith("prompt") and first["query"]["prompt"] in lines[0]
    helpful = lines.index("helpful")
    for offset, hit in enumerate(first["helpful"][:2], start=1):
        assert f"id {hit['id']}" in lines[helpful + offset]
        assert " ".join(hit["response"].split())[:40] in lines[helpful + offset]
    assert "harmful" in lines and len(lines) < 40
    written = write_results(results, tmp_path / "report.txt", "text").read_text()
    assert written.count("helpful") == 2 and "\x1b[" not in written


def test_write_results_round_trips(tmp_path, results):
    single = write_results(results[:1], tmp_path / "one.json", "json")
    assert json.loads(single.read_text()) == results[0]
    many = write_results(results, tmp_path / "out" / "all.jsonl", "jsonl")
    assert [json.loads(line) for line in many.read_text().splitlines()] == results
    page = write_results(results, tmp_path / "report.html", "html")
    assert page.read_text(encoding="utf-8") == render_html(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "out", "report.html"]


def test_write_results_rejects_bad_requests(tmp_path, results):
    with pytest.raises(ValueError, match="json, jsonl, html"):
        write_results(results, tmp_path / "x", "yaml")
    with pytest.raises(ValueError, match="jsonl"):
        write_results(results, tmp_path / "x.json", "json")
    assert not list(tmp_path.iterdir())


@pytest.mark.browser
def test_page_renders_and_its_script_runs_in_chromium(tmp_path, results):
    binary = browser.find_chromium()
    if binary is None:
        pytest.skip("headless Chromium not installed")
    page = write_results(results, tmp_path / "report.html", "html")
    url = page.resolve().as_uri()

    png = browser.screenshot(binary, url, tmp_path / "report.png", tmp_path / "profile-shot")
    (width, height), pixels = browser.png_size_and_pixel_bytes(png)
    assert png.stat().st_size > 10_000 and (width, height) == (1200, 2000)
    assert len(set(pixels)) > 16, "the screenshot is (nearly) one colour"

    dom = browser.dump_dom(binary, url + "#token=3", tmp_path / "profile-dom")
    elements = _parse(dom)
    assert elements.with_class("query")[0] and any(
        a.get("data-ready") == "1" for _, t, a in elements.found if t == "body"
    )
    assert len(elements.with_class("gen-token")) == sum(len(r["tokens"]) for r in results)
    assert len(elements.with_class("example-card")) == sum(
        len(r["helpful"]) + len(r["harmful"]) for r in results
    )
    panel = elements.with_class("token-panel", 0)[0]
    assert panel.get("data-position") == "3"
    shown = [hit["data-id"] for hit in elements.with_class("panel-hit", 0)]
    token = results[0]["tokens"][3]
    assert shown == [str(hit["id"]) for hit in token["helpful"] + token["harmful"]]
    assert "not among the whole-generation hits" in dom  # id 99 has no text to show
    assert not elements.with_class("panel-hit", 1)  # the second query's panel stays closed


def test_png_reader_rejects_other_files(tmp_path):
    path = Path(tmp_path / "not.png")
    path.write_bytes(b"GIF89a")
    with pytest.raises(ValueError):
        browser.png_size_and_pixel_bytes(path)

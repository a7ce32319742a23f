"""Query results out: JSON / JSONL files, one self-contained HTML heatmap page, a rich terminal view.

The input is the query result of docs/query-result-schema.md. Colours follow one diverging scale
everywhere: blue for a positive score (training on the example lowers the loss of the generation, it
helped), orange for a negative one (it hurt), white for zero. A generated token is coloured by its
strongest own hit: the top-1 score by magnitude among its helpful and harmful hits, sign kept.

The HTML page needs no network: CSS and JS are inline, every text is escaped, and the per-query data
the JS reads sits in a JSON script block with ``<``, ``>`` and ``&`` written as ``\\u003c`` and so on.
Hovering a generated token shows its own top training examples; clicking pins it; the URL hash
``#token=3`` (first query) or ``#query=1&token=3`` opens a token on load.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path

from rich.console import Console
from rich.text import Text

from rapidin_index.errors import ReportError
from rapidin_index.files import atomic_write_bytes

FORMATS = ("json", "jsonl", "html", "text")

WHITE = (255, 255, 255)
POSITIVE_RGB = (33, 102, 172)  # blue: the example helped (lowers the loss)
NEGATIVE_RGB = (217, 95, 2)  # orange: the example hurt (raises the loss)
SNIPPET_CHARS = 240  # text of an example kept for the token panel


# ----------------------------------------------------------------------------- colour scale


def score_rgb(score: float, bound: float) -> tuple[int, int, int]:
    """The colour of ``score`` on the diverging scale [-bound, +bound]; white when bound is 0."""
    if bound <= 0 or not math.isfinite(score):
        return WHITE
    weight = min(abs(score) / bound, 1.0)
    end = POSITIVE_RGB if score >= 0 else NEGATIVE_RGB
    return tuple(round(w + (e - w) * weight) for w, e in zip(WHITE, end, strict=True))


def _is_dark(score: float, bound: float) -> bool:
    return bound > 0 and abs(score) / bound > 0.6


def token_influence(token: dict) -> tuple[float, int] | None:
    """(score, training example id) of a generated token's strongest hit, or None without hits."""
    candidates = token.get("helpful", [])[:1] + token.get("harmful", [])[:1]
    if not candidates:
        return None
    best = max(candidates, key=lambda hit: abs(hit["score"]))
    return float(best["score"]), best["id"]


def _bound(scores: list[float]) -> float:
    return max((abs(s) for s in scores if math.isfinite(s)), default=0.0)


def _format_score(score: float) -> str:
    return f"{score:+.3g}"


# ----------------------------------------------------------------------------- HTML


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _shown(token_text: str) -> str:
    """Token text as shown: an empty token (EOS decoded to '') still needs something to hover."""
    return token_text if token_text else "∅"


def _style(score: float, bound: float) -> str:
    red, green, blue = score_rgb(score, bound)
    foreground = "#fff" if _is_dark(score, bound) else "#1b1b1b"
    return f"background:rgb({red},{green},{blue});color:{foreground}"


def _scale_html(bound: float, note: str) -> str:
    """The gradient bar from -bound to +bound, labelled, with a note after it."""
    low, high = f"rgb{NEGATIVE_RGB}", f"rgb{POSITIVE_RGB}"
    return (
        f'<div class="legend"><span class="scale-end">{_esc(_format_score(-bound))}</span>'
        f'<span class="scale-bar" style="background:linear-gradient(to right,{low},#fff,{high})"></span>'
        f'<span class="scale-end">{_esc(_format_score(bound))}</span>'
        f'<span class="legend-note">{note}</span></div>'
    )


def _generation_html(result: dict) -> str:
    tokens = result.get("tokens", [])
    influences = [token_influence(token) for token in tokens]
    bound = _bound([found[0] for found in influences if found])
    restricted = result.get("query", {}).get("hot") is not None
    spans = []
    for token, found in zip(tokens, influences, strict=True):
        score, example_id = found if found else (0.0, None)
        classes = "gen-token hot" if restricted and token.get("hot") else "gen-token"
        loss = token.get("loss")
        title = f"position {token['position']}" + (f" · loss {loss:.3g}" if loss is not None else "")
        if example_id is not None:
            title += f" · strongest hit: id {example_id}, score {_format_score(score)}"
        spans.append(
            f'<span class="{classes}" data-position="{token["position"]}" data-score="{score!r}"'
            f' style="{_style(score, bound)}" title="{_esc(title)}">{_esc(_shown(token["token"]))}</span>'
        )
    values = [found[0] for found in influences if found]
    span_note = (
        f"min {_esc(_format_score(min(values)))} · max {_esc(_format_score(max(values)))}"
        if values
        else "no hits"
    )
    note = f"each generated token coloured by its strongest own hit (top-1 score by |score|, sign kept); {span_note}"
    if restricted:
        note += ' · <span class="hot-key"></span> hot: in the attributed set'
    return f'<div class="generation">{"".join(spans)}</div>' + _scale_html(bound, note)


def _response_html(example: dict) -> str:
    explanation = example.get("explanation")
    if not explanation or not explanation.get("tokens"):
        return f'<div class="card-response plain">{_esc(example.get("response", ""))}</div>'
    tokens = explanation["tokens"]
    bound = _bound([float(token["score"]) for token in tokens])
    spans = "".join(
        f'<span class="train-token" data-score="{float(token["score"])!r}"'
        f' style="{_style(float(token["score"]), bound)}"'
        f' title="{_esc(_format_score(float(token["score"])))}">{_esc(token["token"])}</span>'
        for token in tokens
    )
    method = f"{explanation.get('method', '?')}, normalised per {explanation.get('normalization', '?')}"
    note = f"token scores against the whole generation ({_esc(method)})"
    return f'<div class="card-response">{spans}</div>' + _scale_html(bound, note)


def _card_html(example: dict, kind: str) -> str:
    return (
        f'<article class="example-card {kind}" data-id="{_esc(example["id"])}" data-rank="{example["rank"]}">'
        f'<div class="card-head"><span class="rank">#{example["rank"]}</span>'
        f'<span class="example-id">id {_esc(example["id"])}</span>'
        f'<span class="score">{_esc(_format_score(float(example["score"])))}</span></div>'
        f'<details class="card-prompt"><summary>prompt</summary>'
        f'<div class="muted">{_esc(example.get("prompt", ""))}</div></details>'
        f"{_response_html(example)}</article>"
    )


def _snippet(text: str) -> str:
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def _query_data_json(result: dict) -> str:
    """What the page's JS reads: each token's own hits, and the text of every hit that carries one."""
    examples = {
        str(row["id"]): {
            "prompt": _snippet(row.get("prompt", "")),
            "response": _snippet(row.get("response", "")),
        }
        for row in result.get("helpful", [])
        + result.get("harmful", [])
        + [
            hit
            for token in result.get("tokens", [])
            for hit in token.get("helpful", []) + token.get("harmful", [])
        ]
        if "response" in row or "prompt" in row
    }
    keep = ("position", "token", "loss", "hot", "helpful", "harmful")
    tokens = [{key: token.get(key) for key in keep} for token in result.get("tokens", [])]
    text = json.dumps({"tokens": tokens, "examples": examples}, ensure_ascii=False)
    # Inside <script>, "</script>" in training data would end the block: hide every tag character.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _meta_html(result: dict) -> str:
    query, index = result.get("query", {}), result.get("index", {})
    parts = [
        "generated" if query.get("generated") else "given response",
        f"index {index.get('path', '?')}",
        f"{index.get('row_count', '?')} rows",
        f"sketch dim {index.get('sketch_dim', '?')}",
        f"normalize {index.get('normalize', '?')}",
    ]
    if query.get("hot") is not None:
        parts.append(f"hot {json.dumps(query['hot'], ensure_ascii=False)}")
    return f'<div class="meta">{_esc(" · ".join(parts))}</div>'


def _query_html(result: dict, number: int) -> str:
    query = result.get("query", {})
    columns = "".join(
        f'<div class="column {kind}"><h3>{kind} training examples</h3>'
        + ("".join(_card_html(row, kind) for row in result.get(kind, [])) or '<p class="muted">none</p>')
        + "</div>"
        for kind in ("helpful", "harmful")
    )
    return (
        f'<section class="query" id="query-{number}" data-query="{number}">'
        f"<h2>Query {number + 1}</h2>{_meta_html(result)}"
        f'<div class="prompt muted"><span class="label">prompt</span>{_esc(query.get("prompt", ""))}</div>'
        f'<div class="label">generation</div>{_generation_html(result)}'
        '<div class="token-panel"><p class="muted">Hover a generated token to see its own top training'
        " examples; click to pin it.</p></div>"
        f'<div class="hits">{columns}</div>'
        f'<script type="application/json" class="query-data">{_query_data_json(result)}</script>'
        "</section>"
    )


def render_html(results: list[dict], title: str = "rapidin-index report") -> str:
    """One self-contained HTML page (no external resources) for one or more query results."""
    sections = "".join(_query_html(result, number) for number, result in enumerate(results))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{_esc(title)}</h1><p class="muted">{len(results)} '
        f'quer{"y" if len(results) == 1 else "ies"} · <b class="pos">blue</b>: the training example '
        '<i>helped</i> (training on it lowers the loss) · <b class="neg">orange</b>: it <i>hurt</i>'
        " · intensity ~ |score| / the largest |score| on the same scale</p></header>"
        f"<main>{sections}</main><script>{_JS}</script></body></html>"
    )


# The report's styles; the server's page (assets/serve.html) is drawn with them too.
CSS = """
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;background:#f6f7f9}
header,main{max-width:1160px;margin:0 auto;padding:0 20px}header{padding-top:12px}
h1{font-size:22px;margin:8px 0 0}h2{font-size:18px;margin:0 0 2px}h3{font-size:14px;margin:0 0 8px;color:#444}
.column h3{text-transform:capitalize}.pos{color:rgb(33,102,172)}.neg{color:rgb(217,95,2)}
.muted{color:#6b7280}.meta{color:#6b7280;font-size:12px;margin-bottom:10px;word-break:break-all}
.query{background:#fff;border:1px solid #e3e5e8;border-radius:10px;padding:18px 20px;margin:16px 0}
.label{display:inline-block;font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.05em;
color:#9aa0a6;margin-right:8px}.prompt{white-space:pre-wrap;margin-bottom:10px}
.generation{white-space:pre-wrap;font:15px/2 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
padding:6px 0}.gen-token{position:relative;border-radius:3px;padding:1px 0;cursor:pointer}
.gen-token:hover,.gen-token.selected{outline:2px solid #111;outline-offset:1px}
.gen-token.hot::after,.hot-key{content:"";position:absolute;top:-4px;left:50%;margin-left:-3px;width:6px;
height:6px;border-radius:50%;background:#c2185b}.hot-key{position:static;display:inline-block;margin:0 2px}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;color:#555;margin:4px 0 8px;flex-wrap:wrap}
.scale-bar{display:inline-block;width:120px;height:10px;border-radius:3px;border:1px solid #ccc}
.scale-end{font-variant-numeric:tabular-nums}.legend-note{margin-left:6px}
.token-panel{border:1px dashed #c9ccd1;border-radius:8px;padding:10px 12px;margin:6px 0 14px;min-height:40px;
background:#fafbfc}.token-panel h4{margin:0 0 6px;font-size:14px}.panel-lists{display:grid;
grid-template-columns:1fr 1fr;gap:12px}.panel-hit{font-size:13px;margin:4px 0;padding-left:8px;
border-left:3px solid #ccc}.panel-hit.helpful{border-color:rgb(33,102,172)}.panel-hit.harmful{border-color:rgb(217,95,2)}
.panel-hit .snippet{color:#555;white-space:pre-wrap;display:block}
.hits{display:grid;grid-template-columns:1fr 1fr;gap:16px}.example-card{border:1px solid #e3e5e8;
border-left:4px solid rgb(33,102,172);border-radius:8px;padding:10px 12px;margin-bottom:10px}
.example-card.harmful{border-left-color:rgb(217,95,2)}.card-head{display:flex;gap:10px;font-size:13px;
font-weight:600}.card-head .score{margin-left:auto;font-variant-numeric:tabular-nums}
.card-prompt summary{cursor:pointer;font-size:12px;color:#9aa0a6}.card-prompt div{white-space:pre-wrap;font-size:13px}
.card-response{white-space:pre-wrap;margin-top:6px;font-size:14px}.train-token{border-radius:2px}
"""

_JS = """
(function () {
  "use strict";
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(x) { return (x >= 0 ? "+" : "-") + String(Number(Math.abs(x).toPrecision(3))); }
  function hitList(kind, hits, examples) {
    var box = el("div", "panel-list");
    box.appendChild(el("h3", "", kind + " for this token"));
    if (!hits || !hits.length) box.appendChild(el("div", "muted", "none"));
    (hits || []).forEach(function (hit) {
      var row = el("div", "panel-hit " + kind);
      row.setAttribute("data-id", String(hit.id));
      row.appendChild(el("b", "", "#" + hit.rank + " · id " + hit.id + " · " + fmt(hit.score)));
      var text = examples[String(hit.id)];
      if (text) row.appendChild(el("span", "snippet", text.response || text.prompt));
      else row.appendChild(el("span", "snippet muted", "(not among the whole-generation hits)"));
      box.appendChild(row);
    });
    return box;
  }
  var openers = [];
  document.querySelectorAll(".query").forEach(function (section) {
    var data = JSON.parse(section.querySelector("script.query-data").textContent);
    var panel = section.querySelector(".token-panel");
    var spans = section.querySelectorAll(".gen-token");
    var pinned = null;
    function show(position) {
      var token = data.tokens[position];
      if (!token) return;
      panel.textContent = "";
      panel.setAttribute("data-position", String(position));
      var head = "token " + JSON.stringify(token.token) + " · position " + position;
      if (typeof token.loss === "number") head += " · loss " + token.loss.toPrecision(3);
      if (token.hot) head += " · hot";
      panel.appendChild(el("h4", "", head));
      var lists = el("div", "panel-lists");
      lists.appendChild(hitList("helpful", token.helpful, data.examples));
      lists.appendChild(hitList("harmful", token.harmful, data.examples));
      panel.appendChild(lists);
    }
    function pin(position) {
      pinned = pinned === position ? null : position;
      spans.forEach(function (span) {
        span.classList.toggle("selected", Number(span.dataset.position) === pinned);
      });
      show(position);
    }
    spans.forEach(function (span) {
      var position = Number(span.dataset.position);
      span.addEventListener("mouseenter", function () { if (pinned === null) show(position); });
      span.addEventListener("click", function () { pin(position); });
    });
    openers.push(function (position) { pinned = null; pin(position); panel.scrollIntoView({block: "nearest"}); });
  });
  function openFromHash() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    if (!params.has("token")) return;
    var open = openers[Number(params.get("query") || 0)];
    if (open) open(Number(params.get("token")));
  }
  window.addEventListener("hashchange", openFromHash);
  openFromHash();
  document.body.setAttribute("data-ready", "1");
})();
"""


# ----------------------------------------------------------------------------- terminal


def _coloured(text: Text, token_text: str, score: float, bound: float) -> None:
    red, green, blue = score_rgb(score, bound)
    foreground = "white" if _is_dark(score, bound) else "black"
    text.append(token_text, style=f"{foreground} on rgb({red},{green},{blue})")


def _terminal_legend() -> Text:
    legend = Text()
    legend.append("hurt ", style="dim")
    for step in (-1.0, -0.66, -0.33, 0.0, 0.33, 0.66, 1.0):
        _coloured(legend, "  ", step, 1.0)
    legend.append(
        " helped · a generated token shows its top-1 hit by |score|, sign kept",
        style="dim",
    )
    return legend


def render_terminal(result: dict, console: Console, top: int = 3) -> None:
    """The generation with per-token background colours, then the top helpful examples, then a legend."""
    query = result.get("query", {})
    console.print(Text.assemble(("prompt  ", "bold"), (query.get("prompt", ""), "dim")))
    tokens = result.get("tokens", [])
    influences = [token_influence(token) for token in tokens]
    bound = _bound([found[0] for found in influences if found])
    generation = Text("generation  ", style="bold")
    for token, found in zip(tokens, influences, strict=True):
        _coloured(generation, _shown(token["token"]), found[0] if found else 0.0, bound)
    console.print(generation)
    for example in result.get("helpful", [])[:top]:
        head = f"#{example['rank']}  id {example['id']}  score {_format_score(float(example['score']))}"
        console.print(Text(head, style="bold"))
        explanation = example.get("explanation") or {}
        if not explanation.get("tokens"):
            console.print(Text(example.get("response", "")))
            continue
        example_bound = _bound([float(token["score"]) for token in explanation["tokens"]])
        response = Text()
        for token in explanation["tokens"]:
            _coloured(response, token["token"], float(token["score"]), example_bound)
        console.print(response)
    console.print(_terminal_legend())


def _first_line(hit: dict, width: int = 72) -> str:
    text = " ".join(str(hit.get("response") or hit.get("prompt") or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _hit_lines(title: str, hits: list[dict], top: int) -> list[Text]:
    lines = [Text(title, style="bold")]
    for hit in hits[:top]:
        seen = f"  in {hit['appears_in']} queries" if "appears_in" in hit else ""
        line = Text(f"  {hit['rank']:>3}. id {hit['id']:<7} {_format_score(float(hit['score'])):>9}{seen}  ")
        line.append(_first_line(hit), style="dim")
        lines.append(line)
    return lines


def render_text(result: dict, console: Console, top: int = 10, tokens: int = 8) -> None:
    """The short terminal view: the query, the top helpful and harmful rows (score, first line of
    text), and the generated tokens whose own top hit scores highest."""
    if "aggregate" in result:
        heading = f"{result['aggregate']} over {len(result['queries'])} queries (depth {result['depth']})"
        console.print(Text(heading, style="bold"))
    else:
        query = result.get("query", {})
        console.print(Text.assemble(("prompt    ", "bold"), (query.get("prompt", ""), "dim")))
        console.print(Text.assemble(("response  ", "bold"), query.get("response", "")))
    for line in _hit_lines("helpful", result.get("helpful", []), top):
        console.print(line)
    for line in _hit_lines("harmful", result.get("harmful", []), top):
        console.print(line)
    ranked = [(found, token) for token in result.get("tokens", []) if (found := token_influence(token))]
    if ranked:
        console.print(Text("tokens (each with its own top hit)", style="bold"))
        for (score, row_id), token in sorted(ranked, key=lambda pair: -abs(pair[0][0]))[:tokens]:
            shown = _shown(token["token"])
            console.print(f"  {shown!r:<16} id {row_id:<7} {_format_score(score):>9}", highlight=False)


def text_report(results: list[dict], width: int = 120) -> str:
    """`render_text` of every result as plain text (no colours), for a file."""
    console = Console(record=True, width=width, color_system=None, file=io.StringIO())
    for result in results:
        render_text(result, console)
        console.print()
    return console.export_text()


# ----------------------------------------------------------------------------- files


def _serialise(results: list[dict], format: str, title: str) -> str:
    if format == "json":
        if len(results) != 1:
            raise ReportError(f"format 'json' holds one result, got {len(results)}: use 'jsonl' for several")
        return json.dumps(results[0], indent=2, ensure_ascii=False) + "\n"
    if format == "jsonl":
        return "".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results)
    if format == "html":
        return render_html(results, title=title)
    if format == "text":
        return text_report(results)
    raise ReportError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")


def write_results(
    results: list[dict], path: str | Path, format: str, title: str = "rapidin-index report"
) -> Path:
    """Write results as json (exactly one result, pretty), jsonl or html, atomically; returns the path."""
    text = _serialise(results, format, title)
    path = Path(path)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path

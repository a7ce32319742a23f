"""`rapidin-index serve`: real HTTP requests to a running uvicorn server around a tiny index, its refusals,
the CLI command in a subprocess, and the page driven in headless Chromium (Playwright)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import browser
import httpx
import pytest
from conftest import build_settings

from rapidin_index import retrieval
from rapidin_index.build import build_index
from rapidin_index.retrieval import Index
from rapidin_index.server import create_app
from rapidin_index.server_requests import Limits

# Small caps, so each refusal is reachable with a small request; the queries below stay within them.
LIMITS = Limits(
    max_body_bytes=20_000,
    max_queries=3,
    max_top_k=20,
    max_token_top_k=6,
    max_explain=3,
    max_new_tokens=8,
    max_response_tokens=40,
    max_query_tokens=200,
)
PROMPT = "What does str.upper do?"
RESPONSE = "Return a copy of the string converted to uppercase."
APP = "import sys; from rapidin_index.cli.main import app; sys.argv[0] = 'rapidin-index'; app()"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerThread:
    """A real uvicorn server for ``app`` on a free localhost port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exception) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_dirs, training_file):
    folder = tmp_path_factory.mktemp("served") / "index"
    build_index(
        training_file, folder, build_settings(tiny_model_dirs["llama"], sketch_dim=1024), progress=False
    )
    return folder


@pytest.fixture(scope="module")
def opened(index_dir):
    return Index.open(index_dir, device="cpu")


@pytest.fixture(scope="module")
def served(opened):
    app = create_app(opened, LIMITS)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        client.app = app
        yield client


def post(client, body) -> httpx.Response:
    return client.post("/api/query", json=body)


def assert_sorted(result: dict) -> None:
    lists = [(result["helpful"], result["harmful"])]
    lists += [(token["helpful"], token["harmful"]) for token in result["tokens"]]
    for helpful, harmful in lists:
        assert [hit["score"] for hit in helpful] == sorted((hit["score"] for hit in helpful), reverse=True)
        assert [hit["score"] for hit in harmful] == sorted(hit["score"] for hit in harmful)
        assert [hit["rank"] for hit in helpful] == list(range(1, len(helpful) + 1))


# --------------------------------------------------------------------------- the API


def test_a_query_answers_the_cli_schema_with_the_library_s_numbers(served, opened):
    answer = post(
        served, {"prompt": PROMPT, "response": RESPONSE, "top_k": 5, "token_top_k": 3, "explain": 2}
    )
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    result = answer.json()
    direct = opened.query(PROMPT, RESPONSE, top_k=5, token_top_k=3, explain=2).to_dict()
    assert (
        result.keys() == direct.keys() == {"schema_version", "query", "index", "tokens", "helpful", "harmful"}
    )
    assert result["query"] == direct["query"] and result["index"] == direct["index"]
    assert [hit["id"] for hit in result["helpful"]] == [hit["id"] for hit in direct["helpful"]]
    pairs = zip(result["helpful"] + result["harmful"], direct["helpful"] + direct["harmful"], strict=True)
    for served_hit, direct_hit in pairs:
        assert served_hit["score"] == pytest.approx(direct_hit["score"], abs=1e-4)
        assert served_hit.keys() == direct_hit.keys()  # prompt, response, source; explanation for the top 2
    assert len(result["helpful"]) == len(result["harmful"]) == 5
    assert (
        all("explanation" in hit for hit in result["helpful"][:2])
        and "explanation" not in result["helpful"][2]
    )
    assert len(result["tokens"]) == len(result["query"]["labelled_tokens"]) > 5
    assert all(len(token["helpful"]) == 3 for token in result["tokens"])
    assert_sorted(result)


def test_explain_scores_one_more_row_as_the_query_s_explain_does(served):
    """POST /api/explain: a hit outside the top `explain` gets the token scores the query itself gives
    when `explain` reaches it."""
    result = post(served, {"prompt": PROMPT, "response": RESPONSE, "top_k": 3, "explain": 3}).json()
    for hit in (result["helpful"][2], result["harmful"][1]):
        answer = served.post("/api/explain", json={"prompt": PROMPT, "response": RESPONSE, "id": hit["id"]})
        assert answer.status_code == 200, answer.text
        explanation = answer.json()["explanation"]
        assert answer.json()["id"] == hit["id"]
        assert [t["token"] for t in explanation["tokens"]] == [
            t["token"] for t in hit["explanation"]["tokens"]
        ]
        assert [t["score"] for t in explanation["tokens"]] == pytest.approx(
            [t["score"] for t in hit["explanation"]["tokens"]], rel=1e-4, abs=1e-6
        )
        assert explanation["exact_score"] == pytest.approx(
            hit["explanation"]["exact_score"], rel=1e-4, abs=1e-6
        )


@pytest.mark.parametrize(
    "body,status,reason",
    [
        ({"prompt": PROMPT, "response": RESPONSE}, 400, "'id' is the training row to explain"),
        ({"prompt": PROMPT, "response": RESPONSE, "id": -1}, 400, "a whole number from 0"),
        ({"prompt": PROMPT, "response": RESPONSE, "id": "7"}, 400, "a whole number from 0"),
        ({"prompt": PROMPT, "response": RESPONSE, "id": 10**9}, 404, "no training row 1000000000"),
        ({"prompt": PROMPT, "generate": True, "id": 0}, 400, "explain takes one query with its response"),
        ({"prompt": PROMPT, "response": RESPONSE, "id": 0, "colour": 1}, 400, "unknown field(s) colour"),
    ],
)
def test_explain_refuses_what_it_cannot_answer(served, body, status, reason):
    answer = served.post("/api/explain", json=body)
    assert answer.status_code == status and reason in answer.json()["error"], answer.text


def test_generate_attributes_the_model_s_own_continuation(served, opened):
    result = post(served, {"prompt": PROMPT, "generate": True, "max_new_tokens": 6, "explain": 0}).json()
    assert result["query"]["generated"] is True
    assert result["query"]["response"] == opened.generate(PROMPT, 6)
    assert 1 <= len(result["tokens"]) <= 6
    assert_sorted(result)


def test_several_queries_answer_one_result_each(served, training_rows):
    rows = [training_rows[2], {"prompt": PROMPT, "response": RESPONSE}]
    answer = post(served, {"queries": rows, "per_token": False, "explain": 0, "top_k": 3})
    results = answer.json()["results"]
    assert len(results) == 2
    assert results[0]["helpful"][0]["id"] == 2  # a training row retrieves itself
    assert all(token["loss"] is None and not token["helpful"] for r in results for token in r["tokens"])


def test_filters_rerank_and_aggregation_answer_as_the_library_does(served, opened, training_rows):
    body = {"prompt": PROMPT, "response": RESPONSE, "per_token": False, "explain": 0, "top_k": 5}
    filtered = post(served, {**body, "where": "id < 8", "rerank": 3}).json()
    direct = opened.query(PROMPT, RESPONSE, per_token=False, explain=0, top_k=5, where="id < 8", rerank=3)
    assert [hit["id"] for hit in filtered["helpful"]] == [hit.id for hit in direct.helpful]
    assert all(hit["id"] < 8 for hit in filtered["helpful"]) and filtered["helpful"][0]["exact"]
    assert filtered["index"]["where"] == "id < 8"
    rows = [training_rows[2], {"prompt": PROMPT, "response": RESPONSE}]
    aggregated = post(served, {"queries": rows, "aggregate": "mean", "top_k": 3}).json()
    assert aggregated["aggregate"] == "mean" and len(aggregated["helpful"]) == 3
    assert [hit["id"] for hit in aggregated["helpful"]] == [
        hit.id for hit in opened.aggregate(rows, "mean", 3).helpful
    ]
    refused = post(served, {"prompt": PROMPT, "response": RESPONSE, "aggregate": "mean"})
    assert refused.status_code == 400 and "'aggregate' needs 'queries'" in refused.json()["error"]
    unknown = post(served, {**body, "where": "colour = 'red'"})
    assert unknown.status_code == 422 and "columns: id" in unknown.json()["error"]


def test_a_second_query_reloads_nothing(served, opened, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the server loaded a model or opened the index again")

    monkeypatch.setattr(retrieval, "load_model", refuse)
    monkeypatch.setattr(Index, "open", refuse)
    body = {"prompt": PROMPT, "response": RESPONSE, "per_token": False, "explain": 0}
    first, second = post(served, body), post(served, body)
    assert first.status_code == second.status_code == 200
    assert first.json()["helpful"] == second.json()["helpful"]
    assert served.app.state.index is opened  # the one Index, opened before the server started


def test_info_summarises_the_manifest_and_the_caps(served, opened):
    info = served.get("/api/info").json()
    assert info["row_count"] == opened.manifest.row_count == 24
    assert info["model"]["fingerprint"] == opened.manifest.model["fingerprint"]
    assert info["sketch"]["sketch_dim"] == 1024 and info["normalize"] == "layer"
    assert info["tokenization"] == opened.manifest.tokenization and info["query_template"] == "alpaca"
    assert info["limits"]["max_top_k"] == LIMITS.max_top_k


def test_a_row_answers_its_text_and_source(served, training_rows):
    row = served.get("/api/rows/3").json()
    assert row["id"] == 3 and row["source"] == training_rows[3]
    assert row["response"].startswith(training_rows[3]["output"][:20]) and "Instruction" in row["prompt"]


LONG_RESPONSE = " ".join(["the string"] * 30)
CAP_REFUSALS = {
    "top_k": (
        {"prompt": PROMPT, "response": RESPONSE, "top_k": 21},
        422,
        "'top_k' 21 is over this server's cap of 20",
    ),
    "token_top_k": ({"prompt": PROMPT, "response": RESPONSE, "token_top_k": 7}, 422, "cap of 6"),
    "explain": ({"prompt": PROMPT, "response": RESPONSE, "explain": 4}, 422, "'explain' 4 is over"),
    "max_new_tokens": ({"prompt": PROMPT, "generate": True, "max_new_tokens": 9}, 422, "cap of 8"),
    "queries": ({"queries": [{"prompt": "a", "response": "b"}] * 4}, 422, "4 queries in one request"),
    "response tokens": (
        {"prompt": PROMPT, "response": LONG_RESPONSE},
        422,
        "tokens, over this server's cap of 40",
    ),
    "query tokens": ({"prompt": "x " * 120, "response": "ok"}, 422, "over this server's cap of 200"),
    "generated query tokens": ({"prompt": "x " * 300, "generate": True}, 422, "with max_new_tokens 8"),
    "body": ({"prompt": "x" * 30_000, "response": "ok"}, 413, "bytes, over this server's cap of 20,000"),
}
BAD_INPUTS = {
    "unknown field": ({"prompt": PROMPT, "response": RESPONSE, "topk": 3}, 400, "unknown field(s) topk"),
    "wrong type": ({"prompt": PROMPT, "response": RESPONSE, "top_k": "ten"}, 400, "must be a whole number"),
    "boolean count": ({"prompt": PROMPT, "response": RESPONSE, "top_k": True}, 400, "must be a whole number"),
    "no response": ({"prompt": PROMPT}, 400, "exactly one of 'response'"),
    "both": ({"prompt": PROMPT, "response": RESPONSE, "generate": True}, 400, "exactly one of"),
    "empty response": ({"prompt": PROMPT, "response": "  "}, 422, "'response' is empty"),
    "zero top_k": ({"prompt": PROMPT, "response": RESPONSE, "top_k": 0}, 422, "at least 1"),
    "prompt and queries": ({"prompt": PROMPT, "queries": [{}]}, 400, "not both"),
    "row not an object": ({"queries": ["text"]}, 400, "query row 0 must be a JSON object"),
    "library refusal": (
        {"prompt": PROMPT, "response": RESPONSE, "hot": ["Paris"]},
        422,
        "'Paris' does not occur",
    ),
    "library refusal in a row": ({"queries": [{"colour": "blue"}]}, 422, "query row 0:"),
}


def assert_refusal(answer: httpx.Response, status: int, fragment: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert list(body) == ["error"] and fragment in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in answer.text and 'File "' not in answer.text


@pytest.mark.parametrize("case", list(CAP_REFUSALS), ids=str)
def test_each_cap_is_refused_with_a_clear_4xx(served, case):
    body, status, fragment = CAP_REFUSALS[case]
    assert_refusal(post(served, body), status, fragment)


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
def test_bad_input_is_refused_with_its_reason(served, case):
    body, status, fragment = BAD_INPUTS[case]
    assert_refusal(post(served, body), status, fragment)


def test_malformed_requests_and_unknown_paths_answer_json(served):
    assert_refusal(served.post("/api/query", content=b"{not json"), 400, "not JSON")
    assert_refusal(served.post("/api/query", content=b"[1, 2]"), 400, "must be a JSON object")
    chunks = (b'{"prompt": "' + b"x" * 5_000 for _ in range(6))  # chunked: no Content-Length to trust
    assert_refusal(served.post("/api/query", content=chunks), 413, "over this server's cap of 20,000 bytes")
    assert_refusal(served.get("/api/rows/999"), 404, "no training row 999")
    assert_refusal(served.get("/api/rows/abc"), 400, "whole number")
    assert_refusal(served.get("/api/nothing"), 404, "Not Found: GET /api/nothing")
    assert_refusal(served.get("/api/query"), 405, "Method Not Allowed")


def test_a_bug_answers_500_without_its_traceback(served, opened, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise KeyError("a bug in the query path")

    monkeypatch.setattr(opened, "query_prepared", broken)
    with caplog.at_level("INFO", logger="rapidin_index.server"):
        answer = post(served, {"prompt": PROMPT, "response": RESPONSE})
    assert_refusal(answer, 500, "internal error; the server's log has the details")
    assert "a bug in the query path" not in answer.text
    assert any(record.exc_info for record in caplog.records)  # the traceback went to the log


def server_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "rapidin_index.server"]


def this_tests_lines(caplog) -> list[str]:
    """This test's GET lines: the previous test's request may log once its response went out, late."""
    return [line for line in server_lines(caplog) if line.startswith("GET ")]


def test_one_log_line_per_request(served, caplog):
    with caplog.at_level("INFO", logger="rapidin_index.server"):
        served.get("/api/info")
        served.get("/api/rows/999")
        deadline = time.monotonic() + 5  # the line is written once the response has gone out
        while len(this_tests_lines(caplog)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = this_tests_lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("GET /api/info 200 ") and lines[0].endswith(" ms")
    assert lines[1].startswith("GET /api/rows/999 404 ")


# --------------------------------------------------------------------------- the command


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def test_the_serve_command_loads_once_logs_each_request_and_stops_on_ctrl_c(index_dir):
    port = free_port()
    command = [
        sys.executable,
        "-c",
        APP,
        "serve",
        "--index",
        str(index_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--limit",
        "max_top_k=7",
        "--limit",
        "max-response-tokens=1_000",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/info", process)
        limits = httpx.get(f"http://127.0.0.1:{port}/api/info").json()["limits"]
        page = httpx.get(f"http://127.0.0.1:{port}/")
        body = {"prompt": PROMPT, "response": RESPONSE, "per_token": False, "explain": 0}
        answers = [httpx.post(f"http://127.0.0.1:{port}/api/query", json=body, timeout=120) for _ in range(2)]
        # a second server on the same port is refused before its model loads
        busy = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        process.send_signal(signal.SIGINT)
        _, log = process.communicate(timeout=60)
    assert page.status_code == 200 and "<title>rapidin-index</title>" in page.text
    assert "/* REPORT_CSS */" not in page.text and ".gen-token" in page.text  # the report's styles, inlined
    assert [answer.status_code for answer in answers] == [200, 200]
    assert limits["max_top_k"] == 7 and limits["max_response_tokens"] == 1000 and limits["max_queries"] == 16
    assert log.count(" opened ") == 1 and f"serving on http://127.0.0.1:{port}/" in log
    assert log.count("POST /api/query 200 ") == 2 and "GET / 200 " in log
    assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert busy.stderr.count("\n") == 1 and "opened" not in busy.stderr


@pytest.mark.parametrize(
    "setting,reason",
    [
        ("max_topk=5", "no cap named 'max_topk'; the caps are "),
        ("max_top_k=0", "a whole number of at least 1"),
    ],
)
def test_a_bad_limit_is_refused_on_one_line_before_anything_loads(tmp_path, setting, reason):
    done = subprocess.run(
        [sys.executable, "-c", APP, "serve", "--index", str(tmp_path / "none"), "--limit", setting],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith(f"error: --limit '{setting}': ")
    assert reason in done.stderr and done.stderr.count("\n") == 1


def test_serve_without_its_extra_names_the_install_command(tmp_path):
    code = "import sys; sys.modules['uvicorn'] = None; " + APP
    done = subprocess.run(
        [sys.executable, "-c", code, "serve", "--index", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2
    assert "pip install 'rapidin-index[serve]'" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- the page, in Chromium


@pytest.fixture(scope="module")
def page(served):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright")
    binary = browser.find_chromium()
    if binary is None:
        pytest.skip("headless Chromium not installed")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=binary, args=browser.PLAYWRIGHT_FLAGS)
        tab = chromium.new_page(viewport={"width": 1200, "height": 1400})
        tab.console_errors = []
        tab.on("console", lambda message: message.type == "error" and tab.console_errors.append(message.text))
        tab.goto(str(served.base_url) + "/")
        tab.wait_for_selector("body[data-state=idle]")
        yield tab
        chromium.close()


@pytest.mark.browser
def test_the_page_answers_a_query_and_opens_a_token_and_a_hit(page, served):
    page.fill("#prompt", PROMPT)
    page.fill("#response", RESPONSE)
    page.fill("#token-top-k", "4")
    page.click("#ask")
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=120_000)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    expected = post(served, {"prompt": PROMPT, "response": RESPONSE, "token_top_k": 4}).json()
    spans = page.locator("#generation .gen-token")
    assert spans.count() == len(expected["tokens"])
    assert spans.nth(0).text_content() == expected["tokens"][0]["token"]
    colours = {spans.nth(i).evaluate("node => node.style.background") for i in range(spans.count())}
    assert len(colours) > 3  # coloured by each token's own top hit, not one flat colour
    assert page.locator("#helpful .example-card").count() == len(expected["helpful"]) == 10

    spans.nth(2).click()  # a token: its own hits
    token = expected["tokens"][2]
    assert page.get_attribute("#token-panel", "data-position") == "2"
    shown = page.locator("#token-panel .panel-hit").evaluate_all("nodes => nodes.map(n => n.dataset.id)")
    assert shown == [str(hit["id"]) for hit in token["helpful"] + token["harmful"]]

    page.locator("#token-panel .panel-hit").nth(0).click()  # one of its hits: the full text, fetched
    page.wait_for_selector(f"#detail[data-loaded][data-id='{token['helpful'][0]['id']}']")
    row = served.get(f"/api/rows/{token['helpful'][0]['id']}").json()
    assert page.text_content("#detail-response") == row["response"]
    assert json.loads(page.text_content("#detail-source")) == row["source"]

    page.locator("#helpful .example-card").nth(0).click()  # the top hit: its training-token heatmap
    top = expected["helpful"][0]
    page.wait_for_selector(f"#detail[data-loaded][data-id='{top['id']}']")
    heat = page.locator("#detail-heatmap .train-token").evaluate_all("nodes => nodes.map(n => n.textContent)")
    assert heat == [token["token"] for token in top["explanation"]["tokens"]]
    assert "whole generation: helpful #1" in page.text_content("#detail-scores")
    assert page.text_content("#detail-response") == served.get(f"/api/rows/{top['id']}").json()["response"]

    page.locator("#helpful .example-card").nth(5).click()  # past the top 'explain': scored on request
    sixth = expected["helpful"][5]
    page.wait_for_selector(f"#detail[data-loaded][data-id='{sixth['id']}']")
    assert "explanation" not in sixth and page.locator("#detail-heatmap .train-token").count() == 0
    page.click("#detail-heatmap .explain-one")
    page.wait_for_selector("#detail-heatmap .train-token", timeout=120_000)
    heat = page.locator("#detail-heatmap .train-token").evaluate_all("nodes => nodes.map(n => n.textContent)")
    asked = {"prompt": PROMPT, "response": RESPONSE, "id": sixth["id"]}
    direct = served.post("/api/explain", json=asked).json()["explanation"]
    assert heat == [token["token"] for token in direct["tokens"]]
    assert "whole generation: helpful #6" in page.text_content("#detail-scores")
    assert page.console_errors == []


@pytest.mark.browser
def test_the_page_shows_a_refusal_as_one_message(page):
    page.fill("#prompt", PROMPT)
    page.fill("#response", "   ")
    page.click("#ask")
    page.wait_for_selector("body[data-state=error]")
    message = page.text_content("#error")
    assert "'response' is empty" in message and "Traceback" not in message

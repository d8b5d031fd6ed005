"""The registry's web pages through Starlette's TestClient: every page, paging, bad input, escaping, and the
writes an API key allows. The same pages in a real browser: tests/test_web_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from webregistry import METRICS, SCRIPT_DESCRIPTION, make_registry

from hub.client import Hub
from hub.web import create_app, mount

API_KEY = "s3cret-key"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    return make_registry(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def client(hub: Hub) -> TestClient:
    return TestClient(create_app(hub))


class Points(HTMLParser):
    """The plotted points of a page: (metric, dataset, split, version, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.chart: dict[str, str] = {}
        self.points: list[tuple[str, str, str, int, float]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "svg" and "chart" in (values.get("class") or ""):
            self.chart = values
        if tag == "circle" and values.get("class") == "point":
            self.points.append((self.chart["data-metric"], self.chart["data-dataset"], self.chart["data-split"],
                                int(values["data-version"]), float(values["data-value"])))


def test_home_shows_counts_recent_versions_and_bases(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert re.search(r"<strong>4</strong> adapters", page.text) and re.search(r"<strong>5</strong> versions", page.text)
    assert "blend@1" in page.text and page.text.count('class="base-link"') == 2


def test_adapter_page_plots_each_metric_per_version_as_recorded(client: TestClient, hub: Hub) -> None:
    page = client.get("/adapters/math-lora")
    assert page.status_code == 200
    parser = Points()
    parser.feed(page.text)
    expected = {(m.key, m.dataset or "", m.split or "", v.number, m.value)
                for v in hub.list(hub_query(name="math-lora")) for m in v.metrics}
    assert set(parser.points) == expected and len(expected) == 2 * len(METRICS) - 2
    assert "Solves grade-school arithmetic" in page.text and "@prod" in page.text
    for column in ("digest", "method", "rank", "targets", "size", "created", "aliases", "yanked"):
        assert f"<th>{column}</th>" in page.text


def hub_query(**fields):
    from hub.client import Query

    return Query(include_yanked=True, **fields)


def test_version_page_has_lineage_card_snippets_and_base_link(client: TestClient, hub: Hub) -> None:
    page = client.get("/adapters/blend/1")
    assert page.status_code == 200
    text = page.text
    # Lineage: both parents with their weights and strategy, as a graph and as links.
    assert text.count('data-parent="math-lora@') == 2 and "weight 0.5 (exact)" in text
    assert 'href="/adapters/math-lora/1"' in text and 'href="/adapters/math-lora/2"' in text
    assert 'id="snippet-peft"' in text and 'id="snippet-hub"' in text and 'id="snippet-openai"' in text
    assert "adapter_hub:" in text  # the model card's YAML
    base = hub.get("blend").base
    assert f'href="/bases/{base.weights_hash}"' in text
    # The parent lists its child.
    parent = client.get("/adapters/math-lora/1").text
    assert 'class="node child" data-ref="blend@1"' in parent


def test_an_alias_or_latest_redirects_to_the_numbered_page(client: TestClient) -> None:
    for selector in ("prod", "latest"):
        page = client.get(f"/adapters/math-lora/{selector}", follow_redirects=False)
        assert page.status_code == 307 and page.headers["location"] == "/adapters/math-lora/2"


def test_peft_snippet_only_where_peft_loads_it(client: TestClient, tmp_path: Path, hub: Hub) -> None:
    from hub import compose

    stack = compose(["math-lora@1", "math-loha@1"], kind="stack", hub=hub).register(hub, name="both")
    page = client.get(f"/adapters/both/{stack.version.number}").text
    assert 'id="snippet-peft"' not in page and 'id="snippet-hub"' in page


def test_base_page_tells_exact_and_structural_apart(client: TestClient, hub: Hub) -> None:
    base = hub.get("math-lora").base
    page = client.get(f"/bases/{base.weights_hash}")
    assert page.status_code == 200
    rows = re.findall(r'version-link" href="/adapters/([^/]+)/\d+">[^<]+</a>.*?<span class="badge (\w+)">',
                      page.text, re.S)
    kinds = dict(rows)
    assert kinds["math-lora"] == "exact" and kinds["style-ia3"] == "structural"
    assert base.shape_hash in page.text


def test_search_page(client: TestClient) -> None:
    page = client.get("/search", params={"q": "arithmetic"})
    assert page.status_code == 200 and page.text.count('class="version-link"') == 2
    exact = client.get("/search", params={"q": "math-lora"}).text
    first = re.search(r'class="version-link"[^>]*>([^<]+)<', exact)[1]
    assert first.startswith("math-lora@") and 'badge exact-name' in exact
    filtered = client.get("/search", params={"q": "math", "method": "loha"}).text
    assert "math-loha@1" in filtered and "math-lora@1" not in filtered
    assert 'id="no-results"' in client.get("/search", params={"q": "zzzunknownword"}).text


def test_search_page_filters_by_base(client: TestClient, hub: Hub) -> None:
    sibling = hub.get("style-ia3").base.weights_hash
    found = client.get("/search", params={"q": "style", "base": sibling}).text
    assert re.findall(r'class="version-link"[^>]*>([^<]+)<', found) == ["style-ia3@1"]
    other = client.get("/search", params={"q": "style", "base": hub.get("math-lora").base.weights_hash}).text
    assert 'id="no-results"' in other


def test_compare_page(client: TestClient) -> None:
    page = client.get("/compare", params={"a": "math-lora@1", "b": "blend@1"})
    assert page.status_code == 200 and 'id="modules"' in page.text and "k_proj" in page.text
    refused = client.get("/compare", params={"a": "math-lora@1", "b": "style-ia3"})
    assert 'id="weights-refused"' in refused.text and "IA3 scales activations" in refused.text


def test_html_in_descriptions_is_escaped(client: TestClient) -> None:
    for path in ("/adapters/style-ia3", "/adapters/style-ia3/1", "/search?q=style"):
        text = client.get(path).text
        assert "<script>window.__pwned" not in text and "<b>bold</b>" not in text, path
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text or path.startswith("/search")
    assert SCRIPT_DESCRIPTION  # the fixture's description really holds the tags


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/adapters/nope", 404, "no adapter named"),
    ("/adapters/math-lora/99", 404, "has no version 99"),
    ("/adapters/math-lora/nope", 404, "has no alias"),
    ("/adapters/-bad-", 400, "invalid adapter name"),
    ("/bases/0123", 404, "no base"),
    ("/no/such/page", 404, "no page at"),
    ("/static/../app.py", 404, ""),
    ("/compare?a=math-lora&b=nope", 404, "no adapter named"),
    ("/compare?a=math-lora@&b=x", 400, "invalid"),
    ("/search?q=" + "a" * 600, 400, "at most 500"),
    ("/search?q=!!!", 400, "no words"),
    ("/search?q=lora&where=accuracy>>1", 400, ""),
    ("/search?q=lora&after=garbage", 400, "invalid cursor"),
    ("/search?q=lora&yanked=maybe", 400, "query parameter &#39;yanked&#39;: Input should be a valid boolean"),
    ("/adapters/math-lora?after=xyz", 400, "invalid cursor"),
])
def test_bad_requests_get_pages_not_tracebacks(client: TestClient, path: str, status: int, message: str) -> None:
    page = client.get(path)
    assert page.status_code == status, page.text
    assert "Traceback" not in page.text and 'id="error-message"' in page.text
    assert message in page.text


def test_pages_page_through_large_results(tmp_path: Path, hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import hub.web.app as web

    monkeypatch.setattr(web, "PAGE", 2)
    client = TestClient(create_app(hub))
    seen, path = [], "/search?q=math"
    while path:
        text = client.get(path).text
        seen += re.findall(r'class="version-link" href="[^"]+">([^<]+)<', text.split("<tbody>", 1)[1])
        found = re.search(r'class="next-page" href="([^"]+)"', text)
        path = found[1].replace("&amp;", "&") if found else None
    assert seen == [hit.version.ref for hit in hub.search("math")] and len(seen) == 3


def test_writes_need_the_api_key(hub: Hub) -> None:
    read_only = TestClient(create_app(hub))
    assert read_only.post("/adapters/math-lora/1/yank", data={"api_key": API_KEY}).status_code == 403
    assert "Point alias here" not in read_only.get("/adapters/math-lora/1").text
    client = TestClient(create_app(hub, api_key=API_KEY))
    assert "Point alias here" in client.get("/adapters/math-lora/1").text
    assert client.post("/adapters/math-lora/1/yank", data={"api_key": "wrong"}).status_code == 401
    assert hub.get("math-lora@1").status == "ready"
    moved = client.post("/adapters/math-lora/1/alias", data={"api_key": API_KEY, "alias": "canary"},
                        follow_redirects=False)
    assert moved.status_code == 303 and "canary" in hub.get("math-lora@1").aliases
    assert client.post("/adapters/math-lora/1/yank", data={"api_key": API_KEY}).status_code == 200
    assert hub.get("math-lora@1").status == "yanked"
    assert client.post("/adapters/math-lora/1/unyank", data={"api_key": API_KEY}).status_code == 200
    assert client.post("/adapters/math-lora/1/alias", data={"api_key": API_KEY, "alias": "latest"}).status_code == 400
    assert client.post("/adapters/math-lora/1/explode", data={"api_key": API_KEY}).status_code == 404
    hub.unalias("math-lora", "canary")


def test_mounts_under_a_prefix_in_another_app(hub: Hub) -> None:
    app = FastAPI()
    mount(app, hub, prefix="/ui")
    client = TestClient(app)
    page = client.get("/ui/adapters/math-lora")
    assert page.status_code == 200 and 'href="/ui/adapters/math-lora/1"' in page.text
    assert 'href="/ui/static/hub.css"' in page.text and client.get("/ui/static/hub.css").status_code == 200
    assert client.get("/ui/adapters/nope").status_code == 404


def test_hub_ui_serves_the_app_with_the_key_from_the_environment(hub_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import uvicorn
    from click.testing import CliRunner

    from cli.main import cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    monkeypatch.setenv("HUB_API_KEY", API_KEY)
    result = CliRunner().invoke(cli, ["ui", "--port", "8123", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"url": "http://127.0.0.1:8123/"}
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    assert served["app"].state.web.api_key == API_KEY
    assert TestClient(served["app"]).get("/").status_code == 200

"""The registry's web pages: routes on one ``APIRouter``, rendered on the server with Jinja2 (autoescaped).

Pages read through ``Hub`` (and the registry's small ``browse`` queries). Writes, alias moves and yanks only,
exist only when the app was given an API key, and each needs that key in its form (compared in constant time).

Errors never show a traceback: a HubError becomes an HTML page with its one-line message (NotFound 404, a bad
query or reference 400, an unreachable database 503); anything else a 500 page, logged with its traceback.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException

from hub.client import Hub, Query
from hub.errors import DatabaseError, HubError, NotFound, QueryError
from hub.methods.table import lookup
from hub.registry import browse
from hub.remote.cards import model_card
from hub.secrets import scrub
from hub.web.svg import Edge, Node, lineage_graph, metric_chart

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC = {"hub.css": "text/css", "hub.js": "text/javascript"}
PAGE = 50
# Form bodies of the write actions are a few short fields.
MAX_FORM_BYTES = 4096


@dataclass(frozen=True)
class WebState:
    """What the pages need: the hub they show, and the key that allows writes (None: read-only)."""

    hub: Hub
    api_key: str | None = None


class PageRoute(APIRoute):
    """A route whose errors become HTML pages (an exception handler would have to be installed on every app
    that includes the router; a route class travels with it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except NotFound as exc:
                return error_page(request, 404, "Not found", str(exc))
            except DatabaseError as exc:
                return error_page(request, 503, "Registry unavailable", str(exc))
            except RequestValidationError as exc:  # a query parameter of the wrong type, e.g. yanked=maybe
                return error_page(request, 400, "Bad request", _invalid_parameter(exc))
            except HubError as exc:
                return error_page(request, 400, "Bad request", str(exc))
            except HTTPException:
                raise
            except Exception:
                log.exception("page %s failed", request.url.path)
                return error_page(request, 500, "Internal error", "the page failed; the server log has details")

        return handle


router = APIRouter(route_class=PageRoute)
templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                        trim_blocks=True, lstrip_blocks=True)


def state(request: Request) -> WebState:
    return request.app.state.web


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    # A page links to every version it lists: each route's path is looked up once (url_for walks every route of
    # the app) with placeholders, then filled in per link.
    paths: dict[tuple[str, tuple[str, ...]], str] = {}

    def url(route: str, /, **params: Any) -> str:
        """The path of ``route`` with its path ``params``, and ``query`` (a dict) as its query string."""
        query = {k: v for k, v in params.pop("query", {}).items() if v not in (None, "", [], ())}
        key = (route, tuple(sorted(params)))
        if key not in paths:
            paths[key] = str(request.url_for(route, **{name: f"__hub_{name}__" for name in params}).path)
        path = paths[key]
        for name, value in params.items():
            path = path.replace(f"__hub_{name}__", quote(str(value), safe=""))
        return path + ("?" + urlencode(query, doseq=True) if query else "")

    html = templates.get_template(template).render(url=url, writable=state(request).api_key is not None, **context)
    return HTMLResponse(html, status_code=status)


def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    return render(request, "error.html", status=status, title=title, message=scrub(message))


def version_url(request: Request, ref: str) -> str:
    name, _, number = ref.partition("@")
    return str(request.url_for("version", name=name, selector=number).path)


# ---------------------------------------------------------------------------------------------------- pages


@router.get("/", name="home", response_class=HTMLResponse)
def home(request: Request) -> HTMLResponse:
    hub = state(request).hub
    return render(request, "home.html", counts=browse.counts(hub.registry), recent=browse.recent(hub.registry),
                  bases=hub.bases())


@router.get("/search", name="search", response_class=HTMLResponse)
def search(request: Request, q: str = "", method: str = "", base: str = "", tag: str = "", where: str = "",
           after: str = "", yanked: bool = False) -> HTMLResponse:
    filters = {"q": q, "method": method, "base": base, "tag": tag, "where": where, "yanked": "1" if yanked else ""}
    if not q.strip():
        return render(request, "search.html", filters=filters, hits=None, next_after=None)
    query = Query(method=method or None, weights_hash=base.strip() or None, tags=tuple(tag.split()),
                  where=tuple(where.split()), include_yanked=yanked, limit=PAGE, after=after or None)
    hits = state(request).hub.search(q, query)
    return render(request, "search.html", filters=filters, hits=hits, next_after=hits.next_after)


@router.get("/adapters/{name}", name="adapter", response_class=HTMLResponse)
def adapter(request: Request, name: str, after: str = "") -> HTMLResponse:
    hub = state(request).hub
    summary = browse.adapter_summary(hub.registry, name)
    versions = hub.list(Query(name=name, include_yanked=True, limit=PAGE, after=after or None))
    charts = [(key, metric_chart(*key, points, lambda number: version_url(request, f"{name}@{number}")))
              for key, points in browse.metric_history(hub.registry, name).items()]
    return render(request, "adapter.html", summary=summary, versions=versions, next_after=versions.next_after,
                  charts=charts)


@router.get("/adapters/{name}/{selector}", name="version", response_class=HTMLResponse)
def version(request: Request, name: str, selector: str) -> Response:
    hub = state(request).hub
    found = hub.get(f"{name}@{selector}")
    if selector != str(found.number):  # an alias or "latest": show the version under its number
        return RedirectResponse(version_url(request, found.ref), status_code=307)
    remotes = hub.remotes(found.ref)
    edges = hub.lineage(found.ref)
    children = browse.children(hub.registry, found.name, found.number)
    nodes = {found.ref: Node(found.ref, 0, version_url(request, found.ref))}
    for edge in edges:
        nodes.setdefault(edge.parent.ref, Node(edge.parent.ref, -edge.depth, version_url(request, edge.parent.ref)))
    for child, _, _ in children:
        nodes.setdefault(child, Node(child, 1, version_url(request, child)))
    graph_edges = [Edge(e.child, e.parent.ref, _edge_label(e.parent.weight, e.parent.strategy)) for e in edges]
    graph_edges += [Edge(child, found.ref, _edge_label(weight, strategy)) for child, weight, strategy in children]
    repo_id = remotes[0].repo_id if remotes else f"YOUR-ORG/{found.name}"
    return render(request, "version.html", v=found, remotes=remotes, edges=edges, children=children,
                  graph=lineage_graph(list(nodes.values()), graph_edges), card=model_card(found, repo_id=repo_id),
                  snippets=_snippets(request, found, remotes))


@router.get("/bases/{key}", name="base", response_class=HTMLResponse)
def base(request: Request, key: str, after: str = "") -> HTMLResponse:
    hub = state(request).hub
    found = next((b for b in hub.bases() if key in (b.fingerprint.weights_hash, b.fingerprint.shape_hash)), None)
    if found is None:
        raise NotFound(f"no base with weights or shape hash {key[:64]!r} is registered")
    matches = hub.compatible(found.fingerprint, Query(include_yanked=True, limit=PAGE, after=after or None))
    return render(request, "base.html", base=found, matches=matches, next_after=matches.next_after,
                  kinds=["exact" if match.exact else "structural" for match in matches])


@router.get("/compare", name="compare", response_class=HTMLResponse)
def compare(request: Request, a: str = "", b: str = "") -> HTMLResponse:
    diff = state(request).hub.diff(a, b) if a and b else None
    return render(request, "compare.html", a=a, b=b, diff=diff)


@router.get("/static/{file}", name="static")
def static(file: str) -> FileResponse:
    if file not in STATIC:
        raise NotFound(f"no static file {file[:100]!r}")
    return FileResponse(HERE / "static" / file, media_type=STATIC[file])


# -------------------------------------------------------------------------------------------------- actions


@router.post("/adapters/{name}/{number}/{action}", name="action", response_class=HTMLResponse)
async def action(request: Request, name: str, number: str, action: str) -> Response:
    """Move an alias to this version, or yank or unyank it; only with the app's API key in the form."""
    web = state(request)
    if action not in ("alias", "yank", "unyank"):
        raise NotFound(f"no action {action[:40]!r}")
    if web.api_key is None:
        return error_page(request, 403, "Read-only", "this registry UI is read-only: start it with an API key "
                                                     "(hub ui --api-key, or HUB_API_KEY) to move aliases and yank")
    form = await _form(request)
    given = form.get("api_key", "")
    if not hmac.compare_digest(given.encode(), web.api_key.encode()):
        return error_page(request, 401, "Wrong API key", "the API key given does not match the server's")
    ref = f"{name}@{number}"
    if action == "alias":
        web.hub.alias(ref, form.get("alias", ""))
    elif action == "yank":
        web.hub.yank(ref)
    else:
        web.hub.unyank(ref)
    return RedirectResponse(version_url(request, ref), status_code=303)


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form body (each field's first value). Raises QueryError for anything else."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise QueryError("send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise QueryError(f"form body over {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise QueryError("form body is not UTF-8") from None
    return {key: values[0] for key, values in fields.items()}


# -------------------------------------------------------------------------------------------------- helpers


def _invalid_parameter(exc: RequestValidationError) -> str:
    first = next(iter(exc.errors()), {})
    name = first.get("loc", ("", "?"))[-1]
    return f"query parameter {str(name)[:100]!r}: {first.get('msg', 'invalid value')}"


def _edge_label(weight: float | None, strategy: str | None) -> str:
    return " ".join(part for part in (f"×{weight:g}" if weight is not None else "", strategy or "") if part)


def _snippets(request: Request, v: Any, remotes: list[Any]) -> list[tuple[str, str, str]]:
    """(id, title, code) of the ways to use a version: PEFT where PEFT can load it, the hub, and an OpenAI client
    against ``hub serve``."""
    folder = f"./{v.name}-v{v.number}"
    base = v.base_name if v.base_name else "BASE-MODEL"
    snippets = []
    if lookup(v.config.get("peft_type")).peft_loadable:
        source = (f'"{remotes[0].repo_id}", revision="{remotes[0].tag}"' if remotes
                  else f'"{folder}"  # after: hub export {v.ref} {folder}')
        snippets.append(("peft", "PEFT", "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                         f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
                         f"model = PeftModel.from_pretrained(base, {source})"))
    snippets.append(("hub", "hub", "from hub import Hub\n\nhub = Hub()\n"
                     f'loaded = hub.load_base("{base}")\n'
                     f'handle = hub.activate(loaded.model, "{v.ref}")  # handle.detach() takes it off\n\n'
                     f"# or on the command line: hub export {v.ref} {folder}"))
    snippets.append(("openai", "OpenAI client (hub serve)",
                     "from openai import OpenAI\n\n"
                     'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="HUB_API_KEY")\n'
                     f'reply = client.chat.completions.create(model="{v.ref}",\n'
                     '                                       messages=[{"role": "user", "content": "Hello"}])\n'
                     "print(reply.choices[0].message.content)"))
    return snippets


# ------------------------------------------------------------------------------------------------------ apps


def mount(app: FastAPI, hub: Hub, *, api_key: str | None = None, prefix: str = "") -> None:
    """Add the pages to ``app`` under ``prefix`` (e.g. ``/ui`` beside ``hub serve``'s API)."""
    app.state.web = WebState(hub, api_key or None)
    app.include_router(router, prefix=prefix)


def http_error_page(request: Request, exc: HTTPException) -> Response:
    """The HTML page for a routing error (an unknown page 404, a wrong method 405) under the pages' prefix."""
    if exc.status_code == 404:
        return error_page(request, 404, "Not found", f"no page at {request.url.path[:200]}")
    if exc.status_code == 405:
        return error_page(request, 405, "Method not allowed", f"{request.method} is not allowed here")
    return error_page(request, exc.status_code, "Error", str(exc.detail))


def create_app(hub: Hub, *, api_key: str | None = None) -> FastAPI:
    """The pages alone (``hub ui``): no model is loaded. Unknown paths get an HTML 404 page."""
    app = FastAPI(title="adapter hub", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, hub, api_key=api_key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return http_error_page(request, exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("request %s failed", request.url.path, exc_info=exc)
        return error_page(request, 500, "Internal error", "the page failed; the server log has details")

    return app

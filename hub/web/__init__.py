"""The registry in the browser: search, adapter lines with their metrics over versions, versions with lineage,
model card and load snippets, bases with the adapters that fit them, and a real diff of any two versions.

``create_app(hub, api_key=None)`` is the app ``hub ui`` serves (pages only, no model loaded); ``router`` holds
the pages for any other FastAPI app, and ``mount(app, hub, api_key=None, prefix="/ui")`` adds them to one (as
``hub serve`` can). Pages are rendered on the server (Jinja2, autoescaped); charts are inline SVG; the only
script copies snippets to the clipboard.
"""

from hub.web.app import WebState, create_app, mount, router

__all__ = ["WebState", "create_app", "mount", "router"]

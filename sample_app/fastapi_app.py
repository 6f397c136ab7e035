"""The sample's routes again, as a FastAPI app: the same middleware traces both.

    app.mount("/fastapi", api)       # sample_app.app does this

FastAPI runs sync dependencies and endpoints in the thread pool: /fastapi/sync shows that.
/fastapi/items/{item_id} takes a parameter in its path: its traces carry the route's template
(the root's ``route`` annotation), which ``asgi-asynctrace routes`` and the viewer group by.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI

from . import patterns as p

api = FastAPI(title="asgi-asynctrace sample (FastAPI)")


def current_user() -> str:
    """A sync dependency: FastAPI runs it in the thread pool."""
    return "ada"


@api.get("/items")
async def items(user: str = Depends(current_user)) -> dict[str, Any]:
    rows = await p.load_items()
    return {"user": user, "items": rows, "prices": await p.prices_in_parallel(rows)}


@api.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, Any]:
    return {"item": await p.load_item(item_id), "price": await p.price(item_id)}


@api.get("/sequential")
async def sequential() -> dict[str, Any]:
    return {"prices": await p.prices_one_by_one(await p.load_items())}


@api.get("/timers")
async def timers() -> dict[str, Any]:
    return await p.timers()


@api.get("/sync")
def sync_report() -> dict[str, Any]:
    return {"rows": p.report_rows()}


@api.get("/slow")
async def slow() -> dict[str, Any]:
    return await p.slow_report()

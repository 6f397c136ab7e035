"""Serve the sample app: ``python -m sample_app`` (HOST and PORT from the environment)."""

from __future__ import annotations

import os

import uvicorn

if __name__ == "__main__":
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    print(
        f"sample app on http://{host}:{port}/  try: curl -si -H 'X-Async-Trace: 1' "
        f"http://{host}:{port}/items",
        flush=True,
    )
    uvicorn.run("sample_app.app:app", host=host, port=port)

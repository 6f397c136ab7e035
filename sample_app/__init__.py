"""A small Starlette app with the tracer on, to try asgi-asynctrace in a minute.

python -m sample_app                 # http://127.0.0.1:8000
curl -si -H 'X-Async-Trace: 1' http://127.0.0.1:8000/items
"""

from __future__ import annotations

import importlib

import asgi_asynctrace


def test_all_is_sorted_and_names_exactly_what_the_package_exports() -> None:
    names = asgi_asynctrace.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    submodules = {"annotations", "instrumentation", "testing"}
    # "@py_builtins" and the like: pytest rewrites the package it loads our plugin from
    public = {n for n in vars(asgi_asynctrace) if not n.startswith(("_", "@"))} - submodules
    assert set(names) == public


def test_instrumentation_is_installed_under_the_packages_own_namespace() -> None:
    # Imported by name: the folder is mapped there at install time, which mypy cannot see.
    module = importlib.import_module("asgi_asynctrace.instrumentation")
    assert module.__name__ == "asgi_asynctrace.instrumentation"
    assert isinstance(module.available(), list)


def test_instrument_never_imports_a_library_and_instruments_it_when_the_app_does() -> None:
    """``instrument()`` (what the middleware calls) leaves unimported libraries unimported: an
    installed library the app never uses costs no import, memory or collection time. One the
    app imports later is instrumented the moment it is imported, its loader left as it was."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        import asgi_asynctrace
        on = asgi_asynctrace.instrument()
        assert on["timers"] and not on["aiocache"] and not on["aio_pika"], on
        assert not {"aiocache", "aio_pika", "asyncpg", "sqlalchemy"} & set(sys.modules)
        asgi_asynctrace.uninstrument("aio_pika")  # no longer awaited
        import aiocache.base
        from asgi_asynctrace.instrumentation.aiocache import instrumentation
        assert instrumentation.installed
        assert aiocache.base.BaseCache.get.__wrapped__.__qualname__ == "BaseCache.get"
        assert type(aiocache.__loader__).__name__ == "SourceFileLoader"
        assert aiocache.__spec__.loader is aiocache.__loader__
        import aio_pika
        from asgi_asynctrace.instrumentation.aio_pika import instrumentation as pika
        assert not pika.installed
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

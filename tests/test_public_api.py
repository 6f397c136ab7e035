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

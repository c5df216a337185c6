"""Paths into nested-dict pytrees (our params and their shardings), as tuples of keys."""

from __future__ import annotations

from collections.abc import Iterator


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def iter_paths(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """(path, leaf) for every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from iter_paths(value, (*prefix, key))
        else:
            yield (*prefix, key), value

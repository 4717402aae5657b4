"""Paths and cycles in a directed graph (graphs.py)."""

from cmsupervisor import graphs


def test_find_path_find_cycle_and_describe():
    edges = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": [], "e": ["a"], "s": ["s"]}
    succ = lambda n: edges.get(n, ())  # noqa: E731
    assert graphs.find_path("e", "c", succ) == ["e", "a", "b", "c"]
    assert graphs.find_path("d", "a", succ) is None
    assert graphs.find_path("d", "d", succ) == ["d"]
    assert graphs.find_cycle("a", succ) == ["a", "b", "c", "a"]
    assert graphs.find_cycle("e", succ) is None  # e reaches a cycle but is not on one
    assert graphs.find_cycle("d", succ) is None
    assert graphs.find_cycle("s", succ) == ["s", "s"]
    assert graphs.describe(["a", "b", "a"]) == "a → b → a"
    assert graphs.describe([1, 2], name=lambda n: f"n{n}") == "n1 → n2"

"""Rules of the code base checked on its syntax tree: a database session is not used after its `with`
block (SQLAlchemy would quietly open a new transaction on it and keep its pooled connection until the
object is collected: under load the pool runs dry and every request fails)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
CHECKED = ("controller", "drivers", "schedules")


def sessions_used_after_their_block(source: str) -> list[tuple[int, str]]:
    """(line, name) of each read of a `with Session(...) as name` variable after that block ends, in
    the same function, unless a later `with Session(...)` binds the name again."""
    found: list[tuple[int, str]] = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        blocks = [
            (item.optional_vars.id, node.lineno, node.end_lineno or node.lineno)
            for node in ast.walk(function)
            if isinstance(node, ast.With)
            for item in node.items
            if isinstance(item.optional_vars, ast.Name)
            and isinstance(item.context_expr, ast.Call)
            and isinstance(item.context_expr.func, ast.Name)
            and item.context_expr.func.id == "Session"
        ]
        for name, _start, end in blocks:
            rebound = [start for other, start, _ in blocks if other == name and start > end]
            until = min(rebound, default=10**9)
            found += [
                (node.lineno, name)
                for node in ast.walk(function)
                if isinstance(node, ast.Name)
                and node.id == name
                and isinstance(node.ctx, ast.Load)
                and end < node.lineno < until
            ]
    return found


def test_the_check_finds_a_session_used_after_its_block():
    source = (
        "def describe(engine):\n"
        "    with Session(engine) as session:\n"
        "        row = session.get(Row, 1)\n"
        "    return session.exec(select(Other)).all()\n"
    )
    assert sessions_used_after_their_block(source) == [(4, "session")]


def test_no_session_is_used_after_its_block():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} uses {name!r} after its `with Session` block"
        for package in CHECKED
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in sessions_used_after_their_block(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []

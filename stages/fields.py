"""Help texts of the config dataclasses: the docstring written under each field.

Every stage keeps its options in one frozen dataclass whose field docstrings are
the only copy of their documentation; ``kd --help``, ``docs/cli.md`` and the
recipe checks all read them from here.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (parsed once per class)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs

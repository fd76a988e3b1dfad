"""The KaLM instruction format, the one place it is spelled (training, mining and evaluation).

KaLM-Embedding-V2 prefixes instructed inputs (queries; every text of a symmetric task) with the
task instruction; documents stay bare. With instruction ``I`` and text ``t`` the input is::

    Instruct: {I} \\n Query: {t}

An empty instruction leaves the text unchanged.
"""

from __future__ import annotations

QUERY_TEMPLATE = "Instruct: {instruction} \n Query: {text}"


def format_instructed(instruction: str, text: str) -> str:
    """``text`` with ``instruction`` applied in KaLM's format (``text`` itself when ``instruction`` is empty)."""
    return QUERY_TEMPLATE.format(instruction=instruction, text=text) if instruction else text

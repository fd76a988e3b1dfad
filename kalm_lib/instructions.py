"""The KaLM instruction format, the one place it is spelled (training, mining, evaluation, saved models).

KaLM-Embedding-V2 prefixes instructed inputs (queries; every text of a symmetric task) with the
task instruction; documents stay bare. With instruction ``I`` and text ``t`` the input is::

    Instruct: {I} \\n Query: {t}

An empty instruction leaves the text unchanged. The part before ``t`` is a plain prefix, so a saved
model carries it as a sentence-transformers prompt (:func:`instruction_prompt`) under a name that
follows mteb's convention (:func:`prompt_name`).
"""

from __future__ import annotations

PROMPT_TEMPLATE = "Instruct: {instruction} \n Query: "
QUERY_SUFFIX = "-query"  # mteb's "<task>-query" prompt name: the prompt of a task's queries only


def instruction_prompt(instruction: str) -> str:
    """The prefix KaLM puts before an instructed text (empty for an empty instruction)."""
    return PROMPT_TEMPLATE.format(instruction=instruction) if instruction else ""


def format_instructed(instruction: str, text: str) -> str:
    """``text`` with ``instruction`` applied in KaLM's format (``text`` itself when ``instruction`` is empty)."""
    return instruction_prompt(instruction) + text


def prompt_name(task: str, symmetric: bool) -> str:
    """Name of a task's prompt in a saved model: ``task`` when every text of the task is instructed
    (symmetric), ``task-query`` when only its queries are (documents stay bare)."""
    return task if symmetric else f"{task}{QUERY_SUFFIX}"

"""What a rendered report must (not) show: its section headings in order, and no leaked warnings,
tracebacks or object reprs."""

import html as html_lib
import re

LEAKS = re.compile(r"IProgress|Traceback|\b\w*Warning\b|Profile\(|<kalm_lib\.|object at 0x")


def headings(html: str, level: int = 2) -> list[str]:
    """The text of the report's ``<hN>`` headings, in order (anchor links and tags stripped)."""
    found = re.findall(rf"<h{level}\b[^>]*>(.*?)</h{level}>", html, flags=re.DOTALL)
    return [html_lib.unescape(re.sub(r"<[^>]+>", "", text)).replace("¶", "").strip() for text in found]


def leaks(html: str) -> list[str]:
    """The :data:`LEAKS` the report holds (each match once)."""
    return sorted(set(LEAKS.findall(html)))

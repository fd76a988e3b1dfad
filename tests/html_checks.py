"""What a rendered report must (not) show: its section headings in order, and no leaked warnings,
tracebacks or object reprs."""

import html as html_lib
import re

LEAKS = ("IProgress", "Traceback", "UserWarning", "FutureWarning", "DeprecationWarning", "Profile(", "<kalm_lib.", "object at 0x")


def headings(html: str, level: int = 2) -> list[str]:
    """The text of the report's ``<hN>`` headings, in order (anchor links and tags stripped)."""
    found = re.findall(rf"<h{level}\b[^>]*>(.*?)</h{level}>", html, flags=re.DOTALL)
    return [html_lib.unescape(re.sub(r"<[^>]+>", "", text)).replace("¶", "").strip() for text in found]


def leaks(html: str) -> list[str]:
    """The :data:`LEAKS` strings the report holds."""
    return [leak for leak in LEAKS if leak in html]

"""HTML bytes -> the main text of the page, through resiliparse (a real DOM parser, never regexes).

Navigation bars, footers, scripts and style sheets are not prose a model should learn from; the
main-content heuristics of `resiliparse.extract.html2text` drop them while keeping paragraphs,
headings, lists and code blocks. Bytes are decoded with the page's own charset when the server or
a `<meta charset>` says so, and by resiliparse's detector (uchardet) otherwise: the web is not all
UTF-8, and a wrong guess turns every accented letter into mojibake.
"""

from __future__ import annotations

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from resiliparse.parse.html import HTMLTree

HTML_TYPES = ("text/html", "application/xhtml+xml")


def is_html(content_type: str | None) -> bool:
    """Whether an HTTP Content-Type names an HTML page.

    >>> is_html("text/html; charset=utf-8"), is_html("TEXT/HTML"), is_html("text/plain"), is_html(None)
    (True, True, False, False)
    """
    return bool(content_type) and content_type.split(";")[0].strip().lower() in HTML_TYPES


def charset_of(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type header, if any.

    >>> charset_of('text/html; charset="ISO-8859-1"'), charset_of("text/html")
    ('iso-8859-1', None)
    """
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"\'').lower()
    return None


def decode_html(data: bytes, charset: str | None = None) -> str:
    """Unicode text of an HTML document: the declared charset first, else the meta tag, else detection.

    A declared charset that Python does not know (a typo in a server config) falls back to detection.
    """
    encoding = charset
    if encoding:
        try:
            "".encode(encoding)
        except LookupError:
            encoding = None
    encoding = encoding or detect_encoding(data, from_html_meta=True)
    # bytes_to_str strips a byte-order mark and falls back to UTF-8/cp1252 when the guess fails.
    return bytes_to_str(data, encoding, errors="replace")


def extract_text(html: str | bytes, charset: str | None = None) -> str:
    """The main-content text of an HTML page, blocks separated by newlines ("" when there is none)."""
    if isinstance(html, bytes):
        html = decode_html(html, charset)
    tree = HTMLTree.parse(html)
    text = extract_plain_text(tree, main_content=True, preserve_formatting=True, list_bullets=True,
                              alt_texts=False, links=False, form_fields=False, noscript=False, comments=False)
    return text.strip()

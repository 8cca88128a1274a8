"""Make a patient's HTML mail safe to show inside our page (nh3, an allow-list cleaner).

What survives: text structure (paragraphs, lists, tables, quotes, emphasis), links and
inline ``data:`` raster images. What does not:
- scripts, event handlers, forms, frames, objects, ``<style>`` and every ``style``/``class``/
  ``id`` attribute, so a mail can neither run code nor overlay or restyle our page;
- links other than http(s) and mailto (no ``javascript:``, no ``data:`` documents); the rest
  open in a new tab with ``rel="noopener noreferrer nofollow"``;
- remote images: their ``src`` is dropped (a tracking pixel would tell the sender that
  and when staff read the mail); the ``alt`` text stays and the image is marked blocked.
"""

from __future__ import annotations

import re

import nh3
from markupsafe import Markup

_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "cite", "code", "dd", "del", "div", "dl",
    "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd",
    "li", "ol", "p", "pre", "q", "s", "small", "span", "strike", "strong", "sub", "sup",
    "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul",
}  # fmt: skip
_DROP_WITH_CONTENT = {
    "script", "style", "iframe", "object", "embed", "template", "noscript", "title", "head",
    "svg", "math", "select", "textarea", "button", "frameset", "noembed", "xmp",
}  # fmt: skip
_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title", "width", "height"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan", "scope"},
    "ol": {"start"},
    "abbr": {"title"},
}
_INLINE_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|webp);base64,[A-Za-z0-9+/=\s]+$", re.I)
_SAFE_HREF = re.compile(r"^(https?:|mailto:)", re.I)
_DIMENSION = re.compile(r"^\d{1,4}$")


def _filter(tag: str, attr: str, value: str) -> str | None:
    if tag == "img" and attr == "src":
        return value if _INLINE_IMAGE.match(value.strip()) else None
    if tag == "a" and attr == "href":
        return value if _SAFE_HREF.match(value.strip()) else None
    if attr in {"width", "height"}:
        return value if _DIMENSION.match(value.strip()) else None
    return value


def sanitize_html(html: str) -> Markup:
    """The mail's HTML, cleaned; safe to insert into a page unescaped."""
    cleaned = nh3.clean(
        html,
        tags=_TAGS,
        clean_content_tags=_DROP_WITH_CONTENT,
        attributes=_ATTRIBUTES,
        attribute_filter=_filter,
        url_schemes={"http", "https", "mailto", "data"},
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}, "img": {"loading": "lazy"}},
        strip_comments=True,
    )
    # An image whose remote source was dropped shows its alt text inside a marked box.
    cleaned = re.sub(
        r"<img(?![^>]*\ssrc=)([^>]*)>",
        r'<img\1 data-blocked="remote image not loaded">',
        cleaned,
    )
    return Markup(cleaned)  # noqa: S704  # cleaned by nh3 just above

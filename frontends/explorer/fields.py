"""The explorer's request fields, checked before any work: a bad one is a 422 naming the field, never a 500.

* every body model is strict (:class:`Body`): ``true`` is not the integer 1, ``"3"`` not 3, ``2.0`` not a
  position; a float field takes integers (JSON has one number type) but not booleans;
* text must be valid Unicode (:data:`Text`): JSON may escape a lone UTF-16 surrogate (``"\\ud800"``), which
  no tokenizer can encode;
* numbers that would only overflow downstream are bounded here (the steering coefficient).

:func:`validation_detail` turns pydantic's errors into FastAPI's ``[{loc, msg, type}]`` shape without
echoing the input, so a reply never fails to encode the request that caused it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start].encode("unicode_escape").decode("ascii")
        raise ValueError(f"holds a lone UTF-16 surrogate ({bad}) at character {err.start}, which is not text; "
                         "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A string that encodes as UTF-8."""


class Body(BaseModel):
    """Base of every request body: strict types (see the module docstring)."""

    model_config = ConfigDict(strict=True)


def validation_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors as ``{loc, msg, type}``, the message starting with the field's name; no input echo."""
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
        field = ".".join(p for p in loc[1:] if isinstance(p, str)) or "body"  # loc[0] is "body"
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":  # loc: ("body", character offset)
            msg = f"not valid JSON ({(e.get('ctx') or {}).get('error', msg)}) at character {loc[-1]}"
        out.append({"loc": loc, "msg": f"{field}: {msg}", "type": e.get("type", "value_error")})
    return out

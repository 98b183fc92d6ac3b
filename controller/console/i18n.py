"""The console's translation catalogues (i18n/<lang>/*.json): Vietnamese by default, English on request."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from fastapi import Request

LANGUAGES = ("vi", "en")
DEFAULT_LANGUAGE = "vi"
LANGUAGE_COOKIE = "wardcast_lang"
_CATALOGUE_DIR = Path(__file__).parent / "i18n"


@cache
def catalogue(language: str) -> dict[str, str]:
    """Every `i18n/<language>/*.json` file (one per part of the console) as one catalogue; a key defined
    twice is a bug, refused here rather than one text silently winning."""
    entries: dict[str, str] = {}
    for path in sorted((_CATALOGUE_DIR / language).glob("*.json")):
        part: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
        for key in part.keys() & entries.keys():
            raise ValueError(f"{path}: key {key!r} is already defined in another {language} catalogue file")
        entries.update(part)
    return entries


class Translator:
    """`t("key", name=value)`: the key's text in the language, with `{name}` filled in."""

    def __init__(self, language: str) -> None:
        self.language = language
        self._entries = catalogue(language)

    def __call__(self, key: str, **values: object) -> str:
        text = self._entries[key]  # a missing key is a bug: the catalogue test checks both languages
        return text.format(**values) if values else text

    def or_default(self, key: str, default: str) -> str:
        """For keys made from data (an area's kind): the data itself when the catalogue has no entry."""
        return self._entries.get(key, default)


def requested_language(request: Request) -> tuple[str, bool]:
    """The language for this request, and whether it was chosen now (`?lang=`) and should be remembered."""
    chosen = request.query_params.get("lang")
    if chosen in LANGUAGES:
        return chosen, True
    cookie = request.cookies.get(LANGUAGE_COOKIE)
    return (cookie if cookie in LANGUAGES else DEFAULT_LANGUAGE), False

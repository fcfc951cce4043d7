"""A small registry of named factories (models, priors, likelihoods, datasets).

Looking up an unknown name raises a ``ValueError`` that lists the valid names, so the CLI
can turn it into a one-line message. Registries replace if/elif chains over names.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


_ABBREVIATIONS = ("al.", "e.g.", "i.e.", "etc.", "vs.", "cf.")


def first_sentence(text: str) -> str:
    """The first sentence of ``text``'s first paragraph, whole however many lines it spans (a
    period inside parentheses or after an abbreviation, as in "et al. 2017", ends none; a
    sentence ends at a period before a capital letter or the paragraph's end), with reST markup
    taken out."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    paragraph = re.sub(r":\w+:`~?([^`]*)`", r"\1", paragraph).replace("``", "")
    depth = 0
    for i, char in enumerate(paragraph):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char != "." or depth > 0:
            continue
        if i + 1 == len(paragraph):
            return paragraph
        word = paragraph[: i + 1].rsplit(" ", 1)[-1].lower()
        if (
            paragraph[i + 1 : i + 3].startswith(" ")
            and paragraph[i + 2 : i + 3].isupper()
            and word not in _ABBREVIATIONS
        ):
            return paragraph[: i + 1]
    return paragraph


class Registry(Generic[T]):
    """Maps names to objects (usually factories); ``kind`` names the registry in errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._docs: Dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            text = doc if doc is not None else (getattr(obj, "__doc__", None) or "")
            self._docs[name] = first_sentence(text)
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}") from None

    def describe(self, name: str) -> str:
        self.get(name)
        return self._docs[name]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

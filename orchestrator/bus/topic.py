"""AMQP topic-pattern matching: ``*`` matches exactly one word, ``#`` zero or more words."""

from __future__ import annotations

from functools import lru_cache


def matches(pattern: str, routing_key: str) -> bool:
    """True when ``routing_key`` matches the topic ``pattern`` (words separated by dots)."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


@lru_cache(maxsize=4096)
def _match(pat: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pat:
        return not key
    head, rest = pat[0], pat[1:]
    if head == "#":
        # '#' swallows zero words, or one word and stays.
        return _match(rest, key) or (bool(key) and _match(pat, key[1:]))
    if not key:
        return False
    return (head == "*" or head == key[0]) and _match(rest, key[1:])

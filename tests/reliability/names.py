"""Hostile task names: path traversal in raw, encoded, double-encoded, backslash, NUL, absolute,
Unicode-lookalike and overlong forms. ``traversal_payloads()`` yields >= 1,000 unique strings, none
of which matches ``delta.TASK_NAME_RE`` (so every one must be refused before any disk write)."""

from __future__ import annotations

from typing import Iterator
from urllib.parse import quote

from bitfit_serve.delta import is_task_name

_UP = ["..", ".", "...", "....", ". .", "..;", "..\u0000", ".\u200b."]
_SEP = ["/", "\\", "//", "\\\\", "/./", "\u2215", "\u2044", "\uff0f", "\uff3c", "\u29f8", "\u0000/"]
_DOTS = {"..": ["%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%c0%ae%c0%ae", "%e0%80%ae%e0%80%ae",
                "\u2024\u2024", "\uff0e\uff0e", "\u3002\u3002", "\u2025", "%u002e%u002e", "0x2e0x2e"]}
_SEP_ENC = ["%2f", "%2F", "%5c", "%5C", "%252f", "%255c", "%c0%af", "%e0%80%af", "%c1%9c", "%u2215", "%00%2f"]
_TARGETS = ["outside", "outside/pwned.safetensors", "etc/passwd", "store2/x", "pwned", ".ssh/authorized_keys",
            "pwned.safetensors", "x"]
_ABSOLUTE = ["/etc/passwd", "/tmp/pwned", "//etc/passwd", "\\etc\\passwd", "C:\\Windows\\win.ini", "C:/x",
             "\\\\server\\share\\x", "file:///etc/passwd", "~/pwned", "~root/x", "$HOME/x", "%HOME%/x",
             "/proc/self/environ", "/dev/null", "\u0000", "/", "\\", "."]
_ODD = [" ", "-", "_", ".hidden", "-rf", "a b", "a\nb", "a\r\nX-Injected: 1", "a\tb", "tâche", "caf\u00e9",
        "\u202eexe.txt", "a\u0301", "\u0430dmin", "\ufeffa", "a\u200d", "\U0001f600", "a;b", "a|b", "a`id`",
        "a$(id)", "a'b", 'a"b', "a<b>", "a?b", "a#b", "a*b", "a%b", "a%", "%", "%%", "a:b", "NUL\u0000x",
        "a/b", "a\\b", "", "a\x7f", "a\x01", "a@b", "a!b", "a,b", "a=b", "a+b", "a&b", "a[0]", "a{b}",
        "a~", "a^b"]


# Hand-written payloads and their simple variants: always part of a sample.
CORE = {f"{prefix}{s}{suffix}" for s in _ABSOLUTE + _ODD for prefix in ("", "x") for suffix in ("", ".safetensors")}


def _depths(up: str, sep: str, target: str) -> Iterator[str]:
    for depth in (1, 2, 3, 8):
        yield (up + sep) * depth + target
    yield sep + (up + sep) * 2 + target  # absolute + traversal
    yield "a" + sep + (up + sep) * 2 + target  # from inside a legitimate-looking name


def traversal_payloads() -> list[str]:
    out: dict[str, None] = {}

    def add(s: str) -> None:
        if not is_task_name(s):  # a pattern-valid name is not an attack (e.g. "a..b")
            out.setdefault(s, None)

    for up in _UP + _DOTS[".."]:
        for sep in _SEP + _SEP_ENC:
            for target in _TARGETS[:4]:
                for s in _depths(up, sep, target):
                    add(s)
    for target in _TARGETS:
        for s in list(out)[:40]:
            add(s.replace(_TARGETS[0], target))
    for s in _ABSOLUTE + _ODD:
        add(s)
        add(s + ".safetensors")
        add("x" + s)
    # Overlong names: just past the 64-character limit, file-system limits, and far beyond.
    for n in (65, 66, 100, 128, 250, 251, 255, 256, 1000, 4096, 65536):
        add("a" * n)
        add("a" * (n - 12) + ".safetensors")
    # Encoded once more as a whole (what a client library would send for a literal name).
    for s in list(out)[:300]:
        add(quote(s, safe=""))
    return list(out)


def file_name_ok(name: str) -> bool:
    """Can this string be one file name in a folder on Linux (so the watched-folder test can try it)?"""
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..") \
        and len((name + ".safetensors").encode()) <= 255

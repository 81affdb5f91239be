"""LaTeX answer text brought to one spelling, so that forms a reader sees as the same compare equal.

A competition-maths answer arrives as `$\\boxed{\\dfrac{\\sqrt3}2}$`, `\\frac{\\sqrt{3}}{2}` or
`\\left( 1, 2 \\right)`: ``clean`` takes the last `\\boxed{}` (balanced braces), drops math
delimiters, sizing (`\\left`, `\\right`, `\\displaystyle`) and spacing (`\\,` `\\!` `\\quad` `~`),
unwraps `\\text{}`-like commands, spells `\\dfrac`/`\\tfrac` as `\\frac` and gives every `\\frac` and
`\\sqrt` braced arguments (`\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`), and first
undoes what a JSON decoder does to unescaped LaTeX (``undo_json_escapes``). It only rewrites
spelling: it never decides that two different expressions are one (that is ``answers``'s job, and
it is conservative). Pure; no I/O.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_TEXT_CMDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mbox", "operatorname")
_DROP = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|displaystyle)(?![A-Za-z])")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_FRAC_ALIAS = re.compile(r"\\[dt]frac(?![A-Za-z])")


def group_end(text: str, start: int) -> int:
    """The index just past the brace group opening at `start` (text[start] == '{'), or -1 when
    its braces never balance."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif text[i] == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def unbox(text: str) -> str:
    """The content of the last \\boxed{...} (`\\boxed 5` too), or the text unchanged."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return text
    start = boxes[-1].end()
    if start < len(text) and text[start] == "{":
        end = group_end(text, start)
        return text[start + 1 : end - 1] if end > 0 else text
    m = re.match(r"[^\s$]+", text[start:])
    return m.group(0) if m else text


def _unwrap_text(text: str) -> str:
    """`\\text{ cm}` -> ` cm` for every text-like command (nested braces kept balanced)."""
    pattern = re.compile(r"\\(?:" + "|".join(_TEXT_CMDS) + r")\s*\{")
    while (m := pattern.search(text)) is not None:
        end = group_end(text, m.end() - 1)
        if end < 0:
            break
        text = text[: m.start()] + text[m.end() : end - 1] + text[end:]
    return text


def _argument(text: str, i: int) -> tuple[str, int] | None:
    """The argument of a command at `i` (after spaces): a brace group's content, one command
    (`\\pi`) or one character; with the index past it. None at the end of the text."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        end = group_end(text, i)
        return (text[i + 1 : end - 1], end) if end > 0 else None
    if text[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", text[i:])
        if m:
            return m.group(0), i + m.end()
    return text[i], i + 1


def brace_arguments(text: str) -> str:
    """Every `\\frac` and `\\sqrt` with braced arguments: `\\frac12` -> `\\frac{1}{2}`,
    `\\sqrt 2` -> `\\sqrt{2}`, `\\sqrt[3]8` -> `\\sqrt[3]{8}`, recursively."""
    out: list[str] = []
    i = 0
    while i < len(text):
        m = re.match(r"\\(frac|sqrt)(?![A-Za-z])", text[i:])
        if m is None:
            out.append(text[i])
            i += 1
            continue
        name, j = m.group(1), i + m.end()
        args: list[str] = []
        index = ""
        if name == "sqrt":
            k = j
            while k < len(text) and text[k] == " ":
                k += 1
            if k < len(text) and text[k] == "[" and (close := text.find("]", k)) > 0:
                index, j = text[k : close + 1], close + 1
        for _ in range(2 if name == "frac" else 1):
            arg = _argument(text, j)
            if arg is None:
                break
            args.append(brace_arguments(arg[0]).strip())
            j = arg[1]
        if len(args) != (2 if name == "frac" else 1):
            out.append(text[i:])  # a truncated command stays as it was written
            break
        out.append(f"\\{name}{index}" + "".join("{" + a + "}" for a in args))
        i = j
    return "".join(out)


def undo_json_escapes(text: str) -> str:
    """LaTeX that went through a JSON string unescaped: a model writing `"\\frac12"` in its JSON
    reply (one backslash) gets a form feed and `rac12` back from the decoder, `\\boxed` a
    backspace, `\\text` a tab, `\\right` a carriage return; a reply whose JSON did not parse keeps
    doubled backslashes (`\\\\frac`). Both are put back as the command they were."""
    text = text.replace("\f", "\\f").replace("\b", "\\b")
    text = re.sub(r"\t(?=[a-z])", r"\\t", text)
    text = re.sub(r"\r(?=[a-z])", r"\\r", text)
    return re.sub(r"\\\\(?=[A-Za-z{}])", r"\\", text)


def clean(answer: str) -> str:
    """One spelling of a (LaTeX) answer; see the module docstring."""
    text = unbox(undo_json_escapes(answer).strip()).strip()
    text = text.strip("$").strip()
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opener) and text.endswith(closer):
            text = text[2:-2].strip()
    text = _unwrap_text(text)
    text = text.replace("\u2212", "-").replace("\\$", "").replace("{,}", ",").replace("\\%", "%")
    text = re.sub(r"(?<=[\d,])\\[,!](?=\d{3})", "", text)  # 1\,000, 1,\!000: thousands
    text = _SPACING.sub(" ", text)
    text = _DROP.sub("", text)
    text = _FRAC_ALIAS.sub(r"\\frac", text)
    text = brace_arguments(text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()

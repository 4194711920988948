"""Check that every measured number in the Markdown docs occurs in its machine-written source.

The convention (docs/numbers.md has the full text):

- A marker ``<!-- source: PATH[, PATH ...] -->`` (paths from the repository root, globs
  allowed) names the committed machine-written files (JSON, CSV, or text a script wrote) that
  the text after it comes from. ``run: SCRIPT ARGS`` in the list names a Python script of the
  repository that only reads committed files (a table renderer such as
  ``benchmarks/report.py``): the check runs it and reads the numbers it prints. A marker
  governs everything up to the next ``source`` marker, the next ``<!-- /source -->``, or the
  next Markdown heading, whichever comes first.
- Checked numbers: every decimal (``0.946``, ``1.073x``, ``5.41%``, ``3.2e-5``) and every
  integer written as a ratio or percentage (``37x``, ``16-17x``, ``8%``). Plain integers
  (epochs, layer counts, seeds) are not checked, nor versions (a number right after torch,
  Python, CUDA, arXiv, ...). Text inside code (fenced blocks and inline backticks), HTML
  comments and link targets is not checked.
- A checked number passes when some number in a source file rounds to it at the precision it
  is written with (``0.946`` matches ``0.94612``; ``5.41%`` also matches ``0.0541``; ``41.7 ms``
  also matches ``0.0417`` seconds). Signs are ignored (ranges such as ``0.84-1.08``).
- Settings, thresholds and quoted claims of the paper are not results: list them in
  ``<!-- allow: 0.05 0.9 (why) -->``. An allow marker holds until the next heading.
- A checked number outside any source scope and not allowed is an error, as is a source
  path that matches no file.

Run ``python scripts/check_doc_numbers.py [FILES...]`` to list the failures (default: README.md,
BENCHMARKS.md and docs/*.md); ``tests/test_doc_numbers.py`` runs the same check.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_DOCS = ("README.md", "BENCHMARKS.md", "docs/*.md")

# A number in a source file: anything that parses as a float literal, inside or outside quotes.
_SOURCE_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<![\w])\.\d+")
# A checked number in a doc: a decimal (optionally with exponent), or an integer followed by
# x or %. Not preceded by a letter, digit, dot or underscore (names such as ResNet-18 or bf16
# have letters before the digits); not followed by a dot-digit (versions like 2.13.0).
_DOC_NUMBER = re.compile(
    r"(?<![\w.])(?P<num>\d+\.\d+(?:[eE][-+]?\d+)?|\d+(?=[x%×](?!\w)))"
    r"(?:(?P<suffix>[x%×])(?!\w)|(?![\w]|\.\d))(?P<unit>\s*(?:ms|s)\b)?")
_MARKER = re.compile(r"<!--\s*(source|/source|allow)\s*:?\s*(.*?)\s*-->")
_HEADING = re.compile(r"^#{1,6}\s")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}")
# "13.8 / 21.2 %", "72.6-80.2 %": a percent sign after the number with no word in between.
_PERCENT_AFTER = re.compile(r"[^A-Za-z%|]{0,14}%")
# A version or an identifier, not a measurement: "torch 2.13", "Python >= 3.10", "arXiv 2505.1".
_VERSION_BEFORE = re.compile(
    r"(?i)\b(torch|python|cuda|arxiv|version|peft|transformers|numpy|galore-torch)"
    r"\s*(>=|<=|==|>|<|~=)?\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_URL = re.compile(r"https?://\S+")


@dataclass(frozen=True)
class Problem:
    doc: str
    line: int
    number: str
    why: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.number}: {self.why}"


@dataclass
class _Scope:
    sources: tuple[str, ...] = ()
    values: tuple[float, ...] = ()
    line: int = 0


def _decimals(text: str) -> int:
    mant = text.lower().split("e")[0]
    return len(mant.split(".")[1]) if "." in mant else 0


def matches(text: str, values: tuple[float, ...], percent: bool = False,
            millis: bool = False) -> bool:
    """Whether some value, at the precision ``text`` is written with, rounds to ``text``.

    For ``d`` decimals, ``v`` matches when ``|v - x| <= 0.5 * 10**-d`` (both halves allowed).
    With an exponent the precision is relative: ``3.2e-5`` allows ``0.05e-5``. Percentages also
    match ``v * 100``; milliseconds also match ``v * 1000`` (a time stored in seconds).
    """
    x = abs(float(text))
    lower = text.lower()
    if "e" in lower:
        exp = int(lower.split("e")[1])
        tol = 0.5 * 10.0 ** (exp - _decimals(text))
    else:
        tol = 0.5 * 10.0 ** (-_decimals(text))
    tol *= 1 + 1e-9
    scales = [1.0]
    if percent:
        scales.append(100.0)
    if millis:
        scales.append(1000.0)
    for v in values:
        for s in scales:
            if abs(abs(v) * s - x) <= tol + 1e-12 * x:
                return True
    return False


_value_cache: dict[Path, tuple[float, ...]] = {}


def source_values(path: Path) -> tuple[float, ...]:
    """Every number written in a source file (JSON, CSV or text), as floats."""
    if path not in _value_cache:
        _value_cache[path] = _numbers(path.read_text(errors="replace"))
    return _value_cache[path]


_run_cache: dict[tuple[str, ...], tuple[float, ...] | str] = {}


def run_values(cmd: tuple[str, ...], root: Path) -> tuple[float, ...] | str:
    """Numbers printed by ``python SCRIPT ARGS`` (a script in the repository that only reads
    committed files, e.g. a table renderer), or an error message."""
    if cmd not in _run_cache:
        script = root / cmd[0]
        if not cmd[0].endswith(".py") or not script.is_file():
            _run_cache[cmd] = f"run: {cmd[0]} is not a Python script in the repository"
        else:
            try:
                out = subprocess.run([sys.executable, str(script), *cmd[1:]], cwd=root,
                                     capture_output=True, text=True, timeout=120, check=True)
                _run_cache[cmd] = _numbers(out.stdout)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                _run_cache[cmd] = f"run: {' '.join(cmd)} failed ({type(err).__name__})"
    return _run_cache[cmd]


def _numbers(text: str) -> tuple[float, ...]:
    vals = []
    for m in _SOURCE_NUMBER.finditer(text):
        try:
            v = float(m.group(0))
        except ValueError:
            continue
        if math.isfinite(v):
            vals.append(v)
    return tuple(vals)


def _resolve(spec: str, root: Path) -> tuple[list[Path], list[tuple[str, ...]]]:
    """Files and ``run:`` commands named by a source marker's argument."""
    out: list[Path] = []
    cmds: list[tuple[str, ...]] = []
    for chunk in spec.split(","):
        chunk = chunk.strip()
        if chunk.startswith("run:"):
            words = tuple(chunk[4:].split())
            if words:
                cmds.append(words)
            continue
        for part in chunk.split():
            if any(c in part for c in "*?["):
                out.extend(sorted(p for p in root.glob(part) if p.is_file())
                           or [Path(part)])  # a glob matching nothing: reported as missing
            elif (root / part).is_file():
                out.append(root / part)
            else:
                out.append(Path(part))  # missing: reported by the caller
    return out, cmds


def _strip(line: str) -> str:
    """Blank out what is not checked (inline code, comments, link targets, URLs), keeping
    columns so that nothing joins across a removed span."""
    for pat in (_COMMENT, _INLINE_CODE, _LINK_TARGET, _URL):
        line = pat.sub(lambda m: " " * len(m.group(0)), line)
    return line


def check_text(text: str, doc: str = "<text>", root: Path = ROOT) -> list[Problem]:
    """All problems of one Markdown text (see the module docstring for the convention)."""
    problems: list[Problem] = []
    scope = _Scope()
    allowed: set[str] = set()
    allowed_vals: tuple[float, ...] = ()
    in_fence = False
    open_code = False  # an inline code span continues from the previous line
    header: list[str] = []
    prev_row = ""
    for i, raw in enumerate(text.split("\n")):
        if _FENCE.match(raw):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if not raw.strip():
            open_code = False  # a code span never crosses a paragraph break
        if open_code:
            close = raw.find("`")
            if close < 0:
                continue
            raw = " " * (close + 1) + raw[close + 1:]
            open_code = False
        rest = _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), raw)
        if "`" in rest:  # an unmatched backtick opens a span that ends on a later line
            cut = rest.index("`")
            raw = raw[:cut] + " " * (len(raw) - cut)
            open_code = True
        if _HEADING.match(raw):
            scope = _Scope()
            allowed, allowed_vals = set(), ()
        for m in _MARKER.finditer(_INLINE_CODE.sub(" ", raw)):
            kind, arg = m.group(1), m.group(2)
            if kind == "/source":
                scope = _Scope()
            elif kind == "allow":
                nums = _SOURCE_NUMBER.findall(arg)
                allowed |= set(nums)
                allowed_vals = allowed_vals + tuple(float(n) for n in nums)
            else:
                paths, cmds = _resolve(arg, root)
                vals: list[float] = []
                for p in paths:
                    if not p.is_file():
                        problems.append(Problem(doc, i + 1, arg, f"source {p} does not exist"))
                        continue
                    vals.extend(source_values(p))
                for cmd in cmds:
                    got = run_values(cmd, root)
                    if isinstance(got, str):
                        problems.append(Problem(doc, i + 1, arg, got))
                    else:
                        vals.extend(got)
                if not paths and not cmds:
                    problems.append(Problem(doc, i + 1, arg, "source marker names no file"))
                scope = _Scope(tuple(arg.split()), tuple(vals), i + 1)
        body = _strip(raw)
        if not body.lstrip().startswith("|"):
            header = []
        elif _TABLE_RULE.match(body) and prev_row:
            header = [c.strip() for c in prev_row.split("|")]
        prev_row = body if body.lstrip().startswith("|") else ""
        for m in _DOC_NUMBER.finditer(body):
            if _VERSION_BEFORE.search(body[max(0, m.start() - 20):m.start()]):
                continue
            num = m.group("num")
            suffix = m.group("suffix") or ""
            unit = (m.group("unit") or "").strip()
            if num in allowed or matches(num, allowed_vals):
                continue
            if not scope.sources:
                problems.append(Problem(doc, i + 1, num + suffix,
                                        "no source marker governs this line"))
                continue
            col = header[body[:m.start()].count("|")] if header and body[:m.start()].count(
                "|") < len(header) else ""
            percent = suffix == "%" or bool(_PERCENT_AFTER.match(body, m.end())) or "%" in col
            millis = unit == "ms" or "ms" in col.split() or "(ms" in col
            if not matches(num, scope.values, percent=percent, millis=millis):
                problems.append(Problem(
                    doc, i + 1, num + suffix,
                    f"not found in {' '.join(scope.sources)} (marker on line {scope.line})"))
    return problems


def check_files(patterns: tuple[str, ...] | list[str] = DEFAULT_DOCS,
                root: Path = ROOT) -> list[Problem]:
    problems: list[Problem] = []
    for pat in patterns:
        for path in sorted(root.glob(pat)):
            problems.extend(check_text(path.read_text(), str(path.relative_to(root)), root))
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    problems = check_files(args or DEFAULT_DOCS)
    for p in problems:
        print(p)
    print(f"{len(problems)} unsourced number(s)" if problems else "all numbers sourced",
          file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every measured number in README.md, BENCHMARKS.md and docs/*.md occurs in the committed
machine-written file its ``<!-- source: ... -->`` marker names (convention: docs/numbers.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_doc_numbers",
                                               ROOT / "scripts" / "check_doc_numbers.py")
assert _spec is not None and _spec.loader is not None
cdn = importlib.util.module_from_spec(_spec)
sys.modules["check_doc_numbers"] = cdn
_spec.loader.exec_module(cdn)

# Documents not yet brought to the convention: checked, but a failure is expected (xfail).
# Remove a document from this set as soon as it passes.
PENDING: set[str] = set()


def _docs() -> list[str]:
    out: list[str] = []
    for pat in cdn.DEFAULT_DOCS:
        out.extend(str(p.relative_to(ROOT)) for p in sorted(ROOT.glob(pat)))
    return out


@pytest.mark.parametrize("doc", _docs())
def test_every_number_has_a_source(doc: str) -> None:
    if doc in PENDING:
        pytest.xfail(f"{doc} not yet brought to the docs/numbers.md convention")
    problems = cdn.check_text((ROOT / doc).read_text(), doc)
    assert not problems, "unsourced numbers (docs/numbers.md):\n" + "\n".join(map(str, problems))


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.json").write_text('{"ratio": 1.07346, "frac": 0.0541, "t_s": 0.04172,'
                                           ' "n": 37.2, "tiny": 3.21e-05}')
    (tmp_path / "r" / "b.csv").write_text("x,y\n0.5,83.625\n")
    return tmp_path


def _nums(problems: list) -> list[str]:
    return [p.number for p in problems]


def test_number_in_source_passes_and_missing_fails(src: Path) -> None:
    text = "<!-- source: r/a.json -->\nratio 1.073x, 1.07, 37x, 5.41%, 41.7 ms, 3.2e-5.\n"
    assert cdn.check_text(text, root=src) == []
    # A number the file does not hold (1.08 is not 1.07346 at two decimals) fails, as does
    # a percentage or millisecond value that only matches with the wrong scale.
    bad = "<!-- source: r/a.json -->\n1.08x and 5.42% and 41.7 and 0.0541 ms and 5.41\n"
    assert _nums(cdn.check_text(bad, root=src)) == ["1.08x", "5.42%", "41.7", "5.41"]


def test_precision_is_the_written_one(src: Path) -> None:
    # 1.07346 is 1.0735 at four decimals and 1.07 at two, but neither 1.0734 nor 1.074.
    text = "<!-- source: r/a.json -->\n1.0735 1.07 1.073 1.07346 1.0734 1.074 1.1\n"
    assert _nums(cdn.check_text(text, root=src)) == ["1.0734", "1.074"]


def test_scope_ends_at_heading_and_close_marker(src: Path) -> None:
    text = ("<!-- source: r/a.json -->\n1.073\n## Next\n1.073\n"
            "<!-- source: r/a.json -->\n1.073\n<!-- /source -->\n1.073\n")
    probs = cdn.check_text(text, root=src)
    assert [p.line for p in probs] == [4, 8]
    assert all("no source marker" in p.why for p in probs)


def test_several_sources_and_globs(src: Path) -> None:
    text = "<!-- source: r/a.json, r/b.csv -->\n1.073 and 83.62\n<!-- source: r/*.csv -->\n83.6\n"
    assert cdn.check_text(text, root=src) == []
    assert _nums(cdn.check_text("<!-- source: r/*.csv -->\n1.073\n", root=src)) == ["1.073"]


def test_missing_source_file_is_an_error(src: Path) -> None:
    probs = cdn.check_text("<!-- source: r/nope.json -->\ntext\n", root=src)
    assert len(probs) == 1 and "does not exist" in probs[0].why


def test_what_is_not_checked(src: Path) -> None:
    text = ("ResNet-18 on bf16, torch 2.13.0, 10 epochs, seed 3, 2 cores, torch 2.11, "
            "Python >= 3.10, arXiv 2505.23369.\n"
            "`--lr 0.1` and [a link](results/v1.2/x.json) <!-- 9.99 -->\n"
            "```\nloss 2.3081\n```\n")
    assert cdn.check_text(text, root=src) == []
    # Outside code, the same numbers are checked.
    assert _nums(cdn.check_text("lr 0.1 and 2x\n", root=src)) == ["0.1", "2x"]


def test_allow_marker_until_heading(src: Path) -> None:
    text = "<!-- allow: 0.1 0.9 (settings) -->\nlr 0.1, momentum 0.9\n# H\nlr 0.1\n"
    probs = cdn.check_text(text, root=src)
    assert [(p.line, p.number) for p in probs] == [(4, "0.1")]


def test_marker_inside_code_is_not_a_marker(src: Path) -> None:
    text = "Write `<!-- source: r/a.json -->` before a table.\n1.073\n"
    assert _nums(cdn.check_text(text, root=src)) == ["1.073"]


def test_run_source_reads_the_script_output(src: Path) -> None:
    (src / "render.py").write_text("import sys\nprint('| total |', 1.0 + 0.0241, sys.argv[1])\n")
    text = "<!-- source: r/a.json, run: render.py 7.25 -->\n1.024x 1.073 7.25 and 9.99\n"
    assert _nums(cdn.check_text(text, root=src)) == ["9.99"]
    probs = cdn.check_text("<!-- source: run: nope.py -->\n1.0\n", root=src)
    assert any("not a Python script" in p.why for p in probs)


def test_percent_and_ms_from_context_and_table_headers(src: Path) -> None:
    # a.json holds 0.0541 (a fraction) and 0.04172 (seconds).
    text = ("<!-- source: r/a.json -->\n5.41 / 5.41 % of it\n"
            "| model | time (ms) | share % | other |\n|---|---|---|---|\n"
            "| x | 41.7 | 5.41 | 41.7 |\n")
    assert [(p.line, p.number) for p in cdn.check_text(text, root=src)] == [(5, "41.7")]
    # Without the percent sign nearby, 5.41 is not 0.0541.
    assert _nums(cdn.check_text("<!-- source: r/a.json -->\n5.41 points\n", root=src)) == ["5.41"]


def test_catches_a_stale_ratio_against_the_real_json() -> None:
    # BENCHMARKS.md once said "~7.6x on ResNet-18" for the optimizer step while the committed
    # JSON's dsbp_step_ratio was 2.45: a figure far from the JSON's fails, the JSON's passes.
    import json

    path = "benchmarks/results/step_overhead_resnet18_cpu_fp32.json"
    ratio = json.loads((ROOT / path).read_text())["dsbp_step_ratio"]["median"]
    marker = f"<!-- source: {path} -->\n"
    assert cdn.check_text(marker + f"the step is {ratio:.2f}x SGD's\n") == []
    stale = f"{3.1 * ratio:.3f}x"
    assert _nums(cdn.check_text(marker + f"the step is ~{stale} SGD's\n")) == [stale]


def test_inline_code_across_lines_is_not_checked(src: Path) -> None:
    text = "Call `f(rho=0.9,\ntau=0.3)` with 0.25 here.\n\nThen 0.5 `x\n\n1.5` is prose.\n"
    assert _nums(cdn.check_text(text, root=src)) == ["0.25", "0.5", "1.5"]

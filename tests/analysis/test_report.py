"""The audit report: strict JSON, one self-contained HTML page, escaping, gaps said plainly."""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.report import (
    CSP,
    ReportError,
    json_safe,
    render_html,
    render_markdown,
    report_json,
    write_report,
)
from attribution.errors import InputError

from .sample_report import XSS, sample_report

SECTIONS = (
    "models",
    "headline",
    "metrics",
    "forget-quality",
    "membership",
    "shift",
    "parameters",
    "relearning",
)
# A payload whose effect shows in the DOM, for the browser test (window.__x does not).
DOM_XSS = (
    "<script>document.documentElement.dataset.pwned='script'</script>"
    "<img src=x onerror=\"document.documentElement.dataset.pwned='img'\">"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def nasty_report():
    return sample_report(nasty=XSS + DOM_XSS)


@pytest.fixture(scope="module")
def written(nasty_report, tmp_path_factory):
    """The nasty report written once: (report, paths)."""
    return nasty_report, write_report(nasty_report, tmp_path_factory.mktemp("report") / "out")


@pytest.fixture(scope="module")
def bare_report():
    """An audit without reference, holdout, neighbour/world splits or relearning."""
    return sample_report(reference=False, holdout=False, optional_splits=False, relearning=False)


def test_json_round_trip_is_strict_and_sorted(written):
    report, paths = written
    assert sorted(p.name for p in paths.json.parent.iterdir()) == [
        "report.html",
        "report.json",
        "report.md",
    ]  # and no temporary file left behind
    text = paths.json.read_text(encoding="utf-8")
    loaded = json.loads(text, parse_constant=_refuse)
    assert loaded == json_safe(report) == report  # the sample holds no NaN
    assert text == json.dumps(loaded, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_nan_and_inf_become_null(nasty_report):
    report = copy.deepcopy(nasty_report)
    per_example = report["metrics"]["forget"]["after"]["probability"]["per_example"]
    per_example[:3] = [math.nan, math.inf, -math.inf]
    report["headline"]["forget_quality"] = np.float32("nan")
    report["parameters"]["total_tensors"] = np.int64(39)
    text = report_json(report)
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=_refuse)
    assert loaded["metrics"]["forget"]["after"]["probability"]["per_example"][:4] == [
        None,
        None,
        None,
        per_example[3],
    ]
    assert loaded["headline"]["forget_quality"] is None
    assert loaded["parameters"]["total_tensors"] == 39
    with pytest.raises(ReportError, match=r"report\.headline\.x: a object"):
        json_safe({"headline": {"x": object()}})


def test_wrong_schema_is_refused_and_nothing_written(tmp_path, nasty_report):
    folder = tmp_path / "out"
    for bad in ({**nasty_report, "schema": "excise-audit/0"}, {"headline": {}}, [1, 2]):
        with pytest.raises(InputError, match=r"schema|expected a dict"):
            write_report(bad, folder)
    assert not folder.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="is a file"):
        write_report(nasty_report, tmp_path / "file")


def test_every_section_is_present_with_its_plots(written):
    report, paths = written
    page = paths.html.read_text(encoding="utf-8")
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # truth ratios, ROC, shift histograms, parameters per layer
    assert all(base64.b64decode(image)[:8] == PNG_MAGIC for image in images)
    assert page.count("not available") == 3  # the world split's truth ratio, per model
    assert page.count("not available: no perturbed_completions in the world split") == 3
    head = report["headline"]
    assert f"{head['forget_quality']:.3g}" in page
    assert f"{head['forget_probability_after']:.4g}" in page
    assert "KS statistic D = 0.125" in page and "n = 40 forget, 40 reference" in page
    assert "model.layers.2.mlp.down_proj.weight" in page


def test_data_strings_are_escaped_and_the_page_is_self_contained(written):
    _, paths = written
    page = paths.html.read_text(encoding="utf-8")
    lowered = page.lower()
    assert "<script" not in lowered  # the page has no script of its own either
    assert "<img src=x" not in lowered
    assert re.findall(r"<img\b[^>]*>", page) == re.findall(r'<img src="data:[^>]*>', page)
    assert not re.search(r"\son\w+\s*=", " ".join(re.findall(r"<[a-z][^>]*>", page)))
    assert html.escape(XSS, quote=True) in page
    assert page.count(html.escape(XSS, quote=True)) >= 8  # ids, prompts, paths, module, reason
    assert f'content="{CSP}"' in page
    assert "http:" not in lowered and "https:" not in lowered and "url(" not in lowered
    assert all(v.startswith("data:") for v in re.findall(r'(?:src|href)="([^"]*)"', page))


def test_warnings_lead_the_page_and_the_summary(written, nasty_report):
    _, paths = written
    page = paths.html.read_text(encoding="utf-8")
    header = page.split("</header>")[0]
    assert '<p class="warn">warning: 2 of the 40 forget records are also in the retain' in header
    assert html.escape(XSS, quote=True) in header  # escaped like every data string
    summary = render_markdown(nasty_report)
    assert "## Warnings" in summary and "forgotten and kept at once" in summary
    assert "## Warnings" not in render_markdown({**nasty_report, "warnings": []})


def test_unavailable_sections_say_so(bare_report, tmp_path):
    page = render_html(bare_report)
    assert "not available: no reference model" in page
    assert "not available: no holdout split" in page
    assert "not available: relearning was not requested" in page
    assert "not available: no neighbor split" in page
    headline = page.split('<section id="headline">')[1].split("</section>")[0]
    assert "<td>forget quality (KS p-value, after vs reference)</td><td>n/a</td>" in headline
    assert page.count("<img ") == 3  # truth ratios (before, after), shift, parameters
    markdown = render_markdown(bare_report)
    assert "not available: no reference model" in markdown
    assert "membership inference: not available: no holdout split" in markdown


def test_missing_sections_render_as_not_available():
    page = render_html({"schema": "excise-audit/1"})
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    assert page.count("not available: missing from the report") >= 6
    assert "<img" not in page
    assert render_markdown({"schema": "excise-audit/1"}).count("n/a") >= 5


def test_markdown_escapes_pipes_and_markup(nasty_report):
    report = copy.deepcopy(nasty_report)
    report["models"]["before"]["path"] = "/models/a|b\nc"
    text = render_markdown(report)
    assert "/models/a\\|b c" in text
    assert not re.search(r"(?<!\\)[<>`]", text) and "\\<script\\>" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 11  # header, rule, 9 headline rows
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 4 for line in table)


def test_rendering_leaves_matplotlib_global_state_alone(bare_report):
    import matplotlib

    rc_before = copy.deepcopy(dict(matplotlib.rcParams))
    backend = matplotlib.get_backend()
    figures = _pyplot_figures()
    render_html(bare_report)
    assert dict(matplotlib.rcParams) == rc_before
    assert matplotlib.get_backend() == backend
    assert _pyplot_figures() == figures


def _pyplot_figures() -> list[int] | None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    return None if pyplot is None else pyplot.get_fignums()


# --- the page in a real browser


def _chromium() -> str | None:
    found = shutil.which("chromium")
    return found or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.mark.skipif(
    _chromium() is None and not IN_CI,
    reason="chromium is not installed (.ci/run installs Debian's chromium; CI=true requires it)",
)
def test_page_renders_in_headless_chromium_and_no_script_from_data_runs(written, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.fail("CI: chromium is missing; .ci/run installs Debian's chromium package")
    _, paths = written
    shot = tmp_path / "shot.png"
    _browser(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", paths.html)
    image = _read_png(shot)
    assert image.shape[:2] == (2000, 1200)
    colours = np.unique(_pack(image))
    not_white = (image[..., :3] < 0.9).any(axis=-1).mean()
    assert colours.size > 200 and not_white > 0.03, (colours.size, not_white)

    dom = _browser(binary, tmp_path, "--dump-dom", paths.html)
    assert "</section>" in dom and "data-pwned" not in dom
    assert "&lt;script&gt;document.documentElement.dataset.pwned='script'&lt;/script&gt;" in dom
    assert "<script" not in dom.lower()

    # Negative control: the same payload unescaped does run, so the check above can fail.
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><body><p>{DOM_XSS}</p></body></html>")
    assert 'data-pwned="' in _browser(binary, tmp_path, "--dump-dom", control)


def _browser(binary: str, tmp: Path, *args: object) -> str:
    *flags, page = args
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        *map(str, flags),
        Path(page).resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _read_png(path: Path) -> np.ndarray:
    from matplotlib import image

    return image.imread(path)  # float in [0, 1], RGB or RGBA


def _pack(image: np.ndarray) -> np.ndarray:
    """One integer per pixel colour (8 bits per channel)."""
    rgb = np.round(image[..., :3] * 255).astype(np.int64).reshape(-1, 3)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def _refuse(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")

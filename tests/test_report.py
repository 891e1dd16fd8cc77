"""The moderator's HTML report, rendered in a real headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--allow-file-access-from-files", "--virtual-time-budget=5000"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is not installed (scripts/test.sh installs it)"
    return path


def render(page: Path, out: Path, tmp_path: Path) -> tuple[str, np.ndarray]:
    """The DOM after load (with the page's image-load counters) and a screenshot."""
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, *profile, "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    subprocess.run([chromium(), *CHROMIUM_FLAGS, *profile, "--window-size=1200,1600", f"--screenshot={out}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    return dom, cv2.imread(str(out))


@pytest.fixture(scope="module")
def report(corpus, tmp_path_factory) -> tuple[dict, Path]:
    """The packaged demo model's report on the real carphone clip (what `deepfake moderate --example
    --report DIR` writes)."""
    from worker.pipeline import Moderator
    from worker.settings import Settings

    out = tmp_path_factory.mktemp("report") / "carphone"
    verdict = Moderator(Settings(log_format="json")).moderate_path(corpus["carphone"], report_dir=out)
    assert verdict["model"]["trained"] is True
    return verdict, out


def test_report_files(report):
    verdict, out = report
    assert verdict["report"] == str(out / "index.html")
    names = {p.name for p in out.iterdir()}
    assert {"index.html", "verdict.json", "scores.png", "top_0.png", "bottom_0.png", "spectrum_top.png"} <= names
    assert {"gradcam_rgb_0.png", "gradcam_freq_0.png"} <= names  # one heatmap per branch
    assert "spectrum_reference.png" in names  # the model card's real reference face
    heat = cv2.imread(str(out / "gradcam_rgb_0.png"))
    crop = cv2.imread(str(out / "top_0.png"))
    assert heat.shape == crop.shape and np.abs(heat.astype(int) - crop.astype(int)).mean() > 5  # overlaid


def test_report_renders_in_headless_chromium(report, tmp_path):
    verdict, out = report
    dom, shot = render(out / "index.html", tmp_path / "shot.png", tmp_path)
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-loaded="(\d+)"', dom).group(1))
    assert images >= 10 and loaded == images  # every PNG loaded
    assert "Deepfake report" in dom and verdict["label"] in dom
    assert f'class="action action-{verdict["action"]}"' in dom  # block / review / allow beside the label
    assert shot is not None and shot.shape[0] > 500
    assert shot.std() > 20  # not a blank page
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 500  # photos and charts, not just text
    keep = os.environ.get("DEEPFAKE_REPORT_SCREENSHOT")  # the README's picture comes from here
    if keep:
        shutil.copy(tmp_path / "shot.png", keep)


def test_the_reports_policy_runs_its_own_script_alone(report, tmp_path):
    """Were an escape ever missed, markup an upload smuggled into the page could not run: the page's
    Content-Security-Policy allows its one script by hash, and nothing inline besides."""
    _, out = report
    page = (out / "index.html").read_text()
    injected = ('<script>document.body.dataset.pwned="script"</script>'
                '<img src="missing.png" onerror="document.body.dataset.pwned=\'handler\'">')
    tampered = out / "tampered.html"
    tampered.write_text(page.replace("</h1>", "</h1>" + injected, 1))
    dom, _ = render(tampered, tmp_path / "tampered.png", tmp_path)
    assert "data-images=" in dom and "data-pwned" not in dom, dom[:2000]


def test_error_verdicts_get_a_report_too(moderator, corpus, tmp_path):
    v = moderator.moderate_path(corpus["text_mp4"], report_dir=tmp_path / "bad")
    page = (tmp_path / "bad" / "index.html").read_text()
    assert v["status"] == "error" and "not_a_video" in page


def test_a_key_that_spoofs_its_look_is_shown_as_it_is(moderator, corpus, tmp_path):
    """S3 keys may hold any Unicode: a right-to-left override shows `clip\u202e4pm.gpj` as `clipjpg.mp4`,
    and a C1 control (U+009B, CSI) is obeyed by some viewers. The page shows each as its escape."""
    from worker.report import write_report

    verdict = moderator.moderate_path(corpus["text_mp4"])
    spoof = "uploads/clip\u202e4pm.gpj\u009b[2J"
    verdict["source"] = f"s3://tenant-a/{spoof}"
    verdict["error"]["message"] += " \u2066hidden\u2069"
    page = write_report(verdict, tmp_path / "spoof", {}, model=None).read_text()
    assert not any(c in page for c in "\u202e\u009b\u2066\u2069")
    assert "uploads/clip\\u202e4pm.gpj\\u009b[2J" in page and "\\u2066hidden\\u2069" in page
    assert page.count("\\u202e") == 2  # the title and the summary table


def test_json_for_a_terminal_escapes_the_same_and_still_decodes():
    """`deepfake what-if` prints moves as `allow→block` (readable UTF-8), but a model name or prefix
    with an override or control is escaped, and the output is still JSON of the same value."""
    import json

    from worker.shown_text import json_for_terminal, visible

    value = {"moves": {"allow→block": 2}, "model": "mdcsd \u202eevil\u009b", "tag": "\U000e0041", "n": [1.5, None]}
    text = json_for_terminal(value, indent=2)
    assert json.loads(text) == value
    assert "allow→block" in text and "\\u202e" in text and "\\u009b" in text and "\\udb40\\udc41" in text
    assert not any(c in text for c in "\u202e\u009b\U000e0041")
    assert visible("clé 中.mp4") == "clé 中.mp4" and visible("a\u200db") == "a\\u200db"

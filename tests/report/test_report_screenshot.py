"""report.html as a browser shows it: headless Chromium renders the page and its inlined figures, offline.

Needs a Chromium binary (`make test` installs Debian's `chromium` where it can); skipped without one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from alambic.report.plots import RUN_COLORS
from alambic.report.render import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason=f"no headless browser found (looked for {', '.join(BROWSERS)} on PATH); "
    "install one with `apt-get install -y chromium` (make test tries this) to check the HTML report renders",
)
WIDTH, HEIGHT = 1200, 3000


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: containers run as root, where Chromium's sandbox refuses to start; a profile of our own
    # so nothing is read from or written to the user's
    command = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}"
    return done


@pytest.fixture
def report_url(fake_run) -> str:
    run = fake_run()
    write_report(run)
    return (run / "report.html").resolve().as_uri()


def test_screenshot_shows_a_page_with_its_figures(report_url, tmp_path):
    shot = tmp_path / "out.png"
    _chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", report_url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    rgb = np.round(pixels.reshape(-1, 3) * 255).astype(np.int32)
    colours = len(np.unique(rgb[:, 0] * 65536 + rgb[:, 1] * 256 + rgb[:, 2]))
    not_white = float((rgb.min(axis=1) < 245).mean())
    assert colours > 200, f"only {colours} distinct colours: text, tables and figures should give hundreds"
    assert 0.03 < not_white < 0.9, f"{not_white:.1%} of the page is not white: blank, or a failed render"
    # The CE control's line colour appears nowhere but in the inlined training-curve figure: it rendered.
    control = np.array([int(RUN_COLORS[1][i : i + 2], 16) for i in (1, 3, 5)])
    near = int((np.abs(rgb - control).max(axis=1) < 30).sum())
    assert near > 200, f"{near} pixels of the CE control's colour {RUN_COLORS[1]}: the training curves did not show"


def test_dom_has_the_tables_and_inlined_plots(report_url, tmp_path):
    dom = _chromium(tmp_path, "--dump-dom", report_url).stdout
    # quality, cost, retention, architecture, pruning (3), stages
    assert dom.count("<table>") == 8 and "top-5 agree" in dom and "student CE control" in dom
    assert "latency / token" in dom and "## Advice" not in dom and "<h2>Advice</h2>" in dom
    assert dom.count('src="data:image/png;base64,') == 4
    for alt in ("Training curves", "Layer importance", "Head importance", "Quality kept against cost saved"):
        assert f'alt="{alt}"' in dom
    assert "figure not found" not in dom

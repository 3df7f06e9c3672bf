"""``benchmarks/tensorboard_screenshot.py``: a real run's logs, served by TensorBoard, pictured by Chromium.

The log-producing and serving steps run everywhere (TensorBoard is a dependency); the screenshot step
needs Debian's ``chromium`` and is skipped where it is not installed (CI). The script is imported from
its folder, as ``tests/test_suite.py`` imports the suite.
"""

from __future__ import annotations

import re
import shutil
import sys
import urllib.error
import urllib.parse
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import tensorboard_screenshot as screenshot_script

STEPS = 10


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-step ResNet-20 run with pruning and QAT on generated images, logged to TensorBoard."""
    root = tmp_path_factory.mktemp("tensorboard")
    images = screenshot_script.write_generated_images(root / "tree", per_class=2)
    run = screenshot_script.produce_logs(root / "runs", data=str(images), steps=STEPS, batch_size=4,
                                         final_sparsity=0.5, log_every=1, cache_dir=str(root / "cache"))
    assert run == root / "runs" / screenshot_script.RUN_NAME and list(run.glob("events.out.tfevents.*"))
    return root / "runs"


def test_tensorboard_serves_the_runs_sparsity_and_quant_curves(logdir):
    with screenshot_script.serve(logdir) as (base_url, tags):
        assert base_url.startswith("http://127.0.0.1:")
        served = tags[screenshot_script.RUN_NAME]
        assert {"sparsity/global", "sparsity/target", "quant/weight_error/model.conv1",
                "quant/weight_error/model.fc", "train/loss"} <= set(served)
        assert screenshot_script.scalar_tags(base_url) == tags  # the HTTP data API, as the dashboard reads it
        query = urllib.parse.urlencode({"run": screenshot_script.RUN_NAME, "tag": "sparsity/global"})
        points = screenshot_script.get_json(f"{base_url}/data/plugin/scalars/scalars?{query}")
        assert points[-1][1] == STEPS - 1 and points[-1][2] == pytest.approx(0.5, abs=0.01)  # [wall, step, value]
        assert min(point[2] for point in points) < 0.5  # the ramp, not only its end
        shown = [tag for tag in served if re.search(screenshot_script.DEFAULT_TAG_FILTER, tag)]
        assert len(shown) == 6  # the picture's cards all exist in a ResNet-20 run
    with pytest.raises(urllib.error.URLError):  # TensorBoard was stopped with the context
        screenshot_script.get_json(f"{base_url}/data/plugin/scalars/tags", timeout=2)


def test_dashboard_urls_carry_the_filter_where_tensorboard_reads_it():
    scalars = screenshot_script.dashboard_url("http://h:1", "^sparsity/|quant/")
    assert scalars == "http://h:1/#scalars&tagFilter=%5Esparsity%2F%7Cquant%2F&_smoothingWeight=0"
    timeseries = screenshot_script.dashboard_url("http://h:1", "sparsity/", "timeseries")
    assert timeseries.startswith("http://h:1/?tagFilter=sparsity%2F&") and timeseries.endswith("#timeseries")
    assert "forceSVG=true" in timeseries  # WebGL charts draw nothing in headless Chromium without a GPU
    with pytest.raises(ValueError, match="dashboard must be"):
        screenshot_script.dashboard_url("http://h:1", "x", "images")


def test_missing_tools_are_named_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(screenshot_script.Missing, match=r"^no-such-chromium is not installed \(Debian: apt-get"):
        screenshot_script.find_chromium("no-such-chromium")
    monkeypatch.setattr(screenshot_script, "tensorboard_available", lambda: False)
    with pytest.raises(screenshot_script.Missing, match=r"^tensorboard is not installed"), \
            screenshot_script.serve(tmp_path):
        pass


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_chromium_pictures_the_curves(logdir, tmp_path):
    png = tmp_path / "out" / "tensorboard.png"
    with screenshot_script.serve(logdir) as (base_url, _tags):
        url = screenshot_script.dashboard_url(base_url, screenshot_script.DEFAULT_TAG_FILTER)
        ink = screenshot_script.screenshot(url, png, shutil.which("chromium"), window=(1000, 700))
        assert ink == screenshot_script.ink_fraction(png) > screenshot_script.MIN_INK  # charts drawn
        before = png.read_bytes()
        with pytest.raises(screenshot_script.Missing, match="has no charts"):  # no time to draw them
            screenshot_script.screenshot(url, png, shutil.which("chromium"), virtual_time_ms=1)
    assert before.startswith(b"\x89PNG") and png.read_bytes() == before  # the good picture was kept
    assert sorted(p.name for p in png.parent.iterdir()) == ["tensorboard.png"]  # no staging left behind

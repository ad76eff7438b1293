"""End to end in a real browser: the explorer served by `streamlit run` on localhost, driven by
headless Chromium through Selenium. The map renders (plotly in the page's DOM), clicking a point
shows its spectrogram, and a screenshot of the page is not blank."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, make_tone

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason=f"Chromium is absent ({CHROMIUM}, {CHROMEDRIVER}): install the Debian packages "
        "chromium and chromium-driver (scripts/test.sh does when run as root)",
    ),
    pytest.mark.slow,
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free localhost port, on embeddings of a few generated recordings."""
    from bioaudio.inference.embed import EmbedConfig, embed_to_parquet
    from bioaudio.models.audio_model import build_model
    from bioaudio.models.checkpoint import save_export

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("browser")
    data = base / "data"
    for i in range(12):
        p = data / f"SITE_2024{1 + i % 12:02d}01_0{i % 10}0000.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, make_tone(1.0, 16000, 400.0 + 300 * (i % 4), seed=i), 16000)
    model = save_export(build_model("eat", encoder="tiny"), base / "eat")
    emb = base / "runs" / "emb.parquet"
    embed_to_parquet(model, data, emb, EmbedConfig(window=1.0, progress=False, cpu=True))
    port = _free_port()
    app = ROOT / "bioaudio" / "explorer" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port)]
    cmd += ["--server.address", "127.0.0.1", "--server.headless", "true"]
    cmd += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    cmd += ["--", str(emb), "--method", "pca", "--no_warm_up", "--data_dir", str(data)]
    cmd += ["--runs_dir", str(base / "runs")]
    log = open(base / "streamlit.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=base)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()  # only the server this fixture started, by its own handle
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def browser():
    selenium = pytest.importorskip("selenium", reason="selenium is not installed (dev extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert selenium
    profile = tempfile.mkdtemp(prefix="bioaudio-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_map_point_spectrogram_and_screenshot(served, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served)
    wait = WebDriverWait(browser, 90)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot")))
    points = wait.until(
        EC.presence_of_all_elements_located(
            (By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .point")
        )
    )
    assert len(points) >= 12  # every window of the map is an SVG marker in the DOM
    assert browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg")
    assert "spectrogram:" not in browser.page_source
    target = points[len(points) // 2]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", target)
    time.sleep(0.5)
    ActionChains(browser).move_to_element(target).click().perform()
    titles = "return [...document.querySelectorAll('.gtitle')].map(e => e.textContent)"
    # JavaScript reads: Streamlit re-renders the page, Selenium element handles go stale
    wait.until(lambda d: any(t.startswith("spectrogram:") for t in d.execute_script(titles)))
    heatmaps = "return document.querySelectorAll('.js-plotly-plot .heatmaplayer image').length"
    wait.until(lambda d: d.execute_script(heatmaps) > 0)
    wait.until(lambda d: d.execute_script("return document.querySelectorAll('audio').length"))
    time.sleep(1.0)  # let the spectrogram paint
    import matplotlib.image as mpimg

    png = browser.get_screenshot_as_png()
    pixels = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    assert float(np.var(pixels)) > 1e-3  # not a blank page
    # many distinct colours: markers, the magma spectrogram, text
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200

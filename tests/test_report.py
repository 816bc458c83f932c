"""The report: a fresh run on a tiny pipeline, a rebuild from saved results alone, atomic replacement,
escaping, and a real headless browser that loads every image without console errors."""
import re
import shutil
from pathlib import Path

import pytest

from shapefirst.report import page as rep
from shapefirst.report import BUDGETS, build_page, run_report

TINY = dict(n=3, pairs=3, steps=4, film=2, sweep_n=4, batch=4, stops=(0.5,))


@pytest.fixture(scope="module")
def report_dir(tiny_pipe, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setitem(BUDGETS, "quick", {**BUDGETS["quick"], **TINY})
    from shapefirst.metrics import Clip
    from shapefirst.tiny import tiny_clip_folder

    clip = Clip.load(tiny_clip_folder(tmp_path_factory.mktemp("clip")))
    out = tmp_path_factory.mktemp("report") / "rep"
    prompts = ["a red <script>alert(1)</script> circle", "a blue square", "a green cross"]
    run_report(tiny_pipe, out, "quick", prompts=prompts, world=False, clip=clip,
               pairs=[("a red circle", "a blue square")] * 3)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def referenced(index: Path) -> list[str]:
    return re.findall(r'src="([^"]+)"', index.read_text())


def test_fresh_run_writes_every_section_and_file(report_dir):
    index = report_dir / "index.html"
    text = index.read_text()
    for sec in ("generate", "stages", "frequency", "attention", "eos-swap", "token-ablation", "sweep"):
        assert f'id="{sec}"' in text, sec
    files = referenced(index)
    assert len(files) >= 10
    assert all((report_dir / f).is_file() for f in files)


def test_prompts_are_html_escaped(report_dir):
    text = (report_dir / "index.html").read_text()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_rebuild_from_saved_results_alone_replaces_the_page(report_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    old = referenced(copy / "index.html")
    index = build_page(copy)  # no pipeline anywhere
    new = referenced(index)
    assert len(new) == len(old) and new != old  # a new page folder ...
    assert all((copy / f).is_file() for f in new)
    assert not any((copy / f).exists() for f in old)  # ... and the old one is gone
    assert len(list(copy.glob("page-*"))) == 1


def test_page_is_never_half_written(report_dir, tmp_path, monkeypatch):
    """A crash while building leaves the previous index.html intact."""
    copy = tmp_path / "copy"
    shutil.copytree(report_dir, copy)
    before = (copy / "index.html").read_text()

    def boom(*a, **k):
        raise RuntimeError("crash while rendering")

    monkeypatch.setattr(rep, "_sections", boom)
    with pytest.raises(RuntimeError):
        build_page(copy)
    assert (copy / "index.html").read_text() == before
    assert all((copy / f).is_file() for f in referenced(copy / "index.html"))


def test_headless_chromium_loads_every_image_without_console_errors(report_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    try:
        driver.get((report_dir / "index.html").as_uri())
        widths = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        driver.save_screenshot(str(report_dir / "screenshot.png"))
    finally:
        driver.quit()
    assert len(widths) >= 10 and all(w > 0 for w in widths), widths
    assert errors == []
    assert (report_dir / "screenshot.png").stat().st_size > 1000

"""The book (`make book`), built from the committed reference run and opened page by page in headless Chromium
served from 127.0.0.1: no console errors, every image loaded, every internal link resolves, a screenshot each."""
import functools
import http.server
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: Path):
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def pages(html: Path) -> list[str]:
    """Every page of the site (the theme's template snippets under _static are not pages)."""
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html") if "_static" not in p.parts)


def check_site(html: Path, shots: Path) -> dict:
    """Open every page; return {page: [problems]} (empty lists when all is well) and write a screenshot each."""
    server, base = serve(html)
    driver, problems = browser(), {}
    shots.mkdir(parents=True, exist_ok=True)
    try:
        for page in pages(html):
            found = []
            driver.get(base + page)
            driver.execute_script("return document.readyState")
            found += [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.src, i.complete ? i.naturalWidth : 0])")
            found += [f"image not loaded: {src}" for src, width in images if not width]
            links = driver.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
            for url in {u.split("#")[0] for u in links if u.startswith(base)}:
                try:
                    with urllib.request.urlopen(url, timeout=10) as r:
                        r.read()
                except urllib.error.URLError as e:
                    found.append(f"broken link {url}: {e}")
            driver.save_screenshot(str(shots / (page.replace("/", "__") + ".png")))
            problems[page] = found
    finally:
        driver.quit()
        server.shutdown()
    return problems


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and DRIVER and shutil.which("pandoc")),
                    reason="needs chromium, chromedriver and pandoc (.ci/run installs them from Debian)")
def test_book_builds_offline_and_every_page_works_in_a_real_browser(root, tmp_path):
    from persona_em import book

    html = book.build(root, tmp_path / "book")
    site = pages(html)
    assert {"index.html", "method.html", "tour.html", "paper.html", "reproduce.html", "results-tiny.html"} <= set(site)
    assert sum(p.startswith("chapters/") for p in site) == 5
    problems = check_site(html, tmp_path / "screenshots")
    assert not {page: found for page, found in problems.items() if found}
    assert len(list((tmp_path / "screenshots").glob("*.png"))) == len(site)
    assert (html / "tour.html").read_text().count("<img") >= 2   # the tour's DPO curve and its place in the run
    chapter5 = (html / "chapters" / "05_analyze.html").read_text()
    assert chapter5.count("<img") >= 5   # the chapter's figures are inline
    paper = (html / "paper.html").read_text()
    assert "Threats to validity" in paper and "paper-tiny.pdf" in paper


def test_the_paper_is_prepared_for_pandoc_as_the_pdf_reads(root):
    """The conditionals, optional inputs, citations and figures of paper.tex resolved as LaTeX resolves them for
    the PDF (no pandoc or browser needed)."""
    from persona_em.book import paper_for_pandoc

    tex = (root / "paper" / "paper.tex").read_text()
    macros = {"PairsBestOfN": "1", "HFiveShortDigest": "abc", "ProfileDigest": "abc", "DirectionLayer": "12"}
    out = paper_for_pandoc(tex, macros, "tiny", "figures/tiny", frozenset({"generated/tiny/h5_length.tex"}))
    assert "\\ifnum" not in out and "\\ifdefined" not in out and "\\cite{" not in out and "\\fi" not in out
    assert "best-of-n method instead" in out and "Trained \\HFiveLengthRatio" in out
    assert "read out at layer \\DirectionLayer" in out and "figures/tiny/direction_by_layer.png" in out
    assert "the registered rule's choice" in out and "chooses the same layer" not in out   # no registered layer: differs
    same = paper_for_pandoc(tex, macros | {"DirectionRegisteredLayer": "12"}, "tiny", "figures/tiny")
    assert "chooses the same layer" in same and "the registered rule's choice" not in same and "\\fi" not in same
    assert "\\input{generated/\\profile/h5_length.tex}" in out and "[1]" in out
    assert "\\includegraphics{figures/tiny/design.png}" in out
    teacher = paper_for_pandoc(tex, {"PairsBestOfN": "0"}, "tiny", "figures/tiny")
    assert "best-of-n method instead" not in teacher and "Trained \\HFiveLengthRatio" not in teacher
    assert "misalignment direction" not in teacher and "direction_by_layer" not in teacher   # a run without it
    assert "InputIfFileExists" not in teacher and "h5_length" not in teacher


def test_the_book_never_replaces_a_folder_it_did_not_build(root, tmp_path):
    from persona_em.book import BookError, build

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BookError, match="not a book folder"):
        build(root, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"

"""The playground page in a real browser (headless Chromium from Debian, driven by Playwright): the
page loads, a prompt is submitted, the progress bar moves, the image appears; an upload is captioned;
an upload is edited."""

import shutil

import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")

from test_serve import checkpoint, picture, real_server  # noqa: E402, F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make system installs it)")
def test_the_page_draws_and_captions(real_server, tmp_path):  # noqa: F811
    _, url = real_server
    (tmp_path / "red.png").write_bytes(picture((24, 24)))
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('status').textContent.includes('16x16')")
        page.fill("#prompt", "a red circle")
        page.fill("#n", "1")
        page.fill("#steps", "60")
        page.click("#draw-button")
        card = page.locator("#history .card").first
        # the progress bar moves before the end: some value strictly between 0 and 1 is seen
        page.wait_for_function(
            "(() => { const p = document.querySelector('#history .card progress');"
            " return p && p.value > 0 && p.value < 1; })()",
            timeout=30_000,
        )
        page.wait_for_selector("#history .card.done", timeout=60_000)
        image = card.locator(".pictures img")
        assert image.count() == 1 and "preview" not in (image.get_attribute("class") or "")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert page.evaluate("document.querySelector('#history .card .pictures img').naturalWidth") == 16
        page.set_input_files("#upload", str(tmp_path / "red.png"))
        page.click("#caption-button")
        page.wait_for_function("document.querySelectorAll('#history .card.done').length == 2", timeout=60_000)
        caption = page.locator("#history .card").first
        assert "caption of red.png" in caption.locator(".title").text_content()
        assert not caption.locator(".text.error").count()
        import httpx

        files = {"file": ("red.png", (tmp_path / "red.png").read_bytes(), "image/png")}
        want = httpx.post(f"{url}/v1/caption", files=files, timeout=60).json()["caption"]
        assert caption.locator(".text").text_content() == want  # what the API answers for that upload
        # an edit: the input shown beside the edited images, which arrive as they denoise
        page.set_input_files("#edit-upload", str(tmp_path / "red.png"))
        page.fill("#instruction", "make the red square blue")
        page.fill("#edit-n", "2")
        page.fill("#edit-steps", "40")
        page.click("#edit-button")
        page.wait_for_function("document.querySelectorAll('#history .card.done').length == 3", timeout=60_000)
        edit = page.locator("#history .card").first
        assert "make the red square blue" in edit.locator(".title").text_content()
        assert not edit.locator(".text.error").count()
        pictures = edit.locator(".pictures img")
        assert pictures.count() == 3 and "input" in pictures.first.get_attribute("class")
        assert all("preview" not in (pictures.nth(k).get_attribute("class") or "") for k in (1, 2))
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make system installs it)")
def test_the_api_reference_renders_offline(real_server):  # noqa: F811
    """``/docs`` with every request to another host refused (as without a network): the Swagger UI
    page loads its scripts from the server itself and lists the routes."""
    _, url = real_server
    refused: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()

        def only_local(route):
            if route.request.url.startswith(url):
                route.continue_()
            else:
                refused.append(route.request.url)
                route.abort()

        page.route("**/*", only_local)
        page.goto(f"{url}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = page.eval_on_selector_all(
            ".opblock-summary-path", "els => els.map(e => e.textContent.trim())"
        )
        browser.close()
    assert {"/v1/images", "/v1/caption", "/v1/generate", "/v1/images/generations", "/v1/images/edits"} <= {
        p.replace("\u200b", "") for p in paths
    }
    assert not refused, refused

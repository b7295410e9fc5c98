"""The Scan Wajah page in a real headless Chromium (Debian's ``chromium`` package, driven by
Playwright for Python; ``playwright install`` is never needed).

The camera is Chromium's fake capture device playing a YUV4MPEG2 video that the test builds
from a real face photo (scikit-image's astronaut, who is also enrolled). The service is the
real one in-process: real engine, models and Redis. The test acts as the LMS: it obtains a
launch ticket, sends the browser to the page and runs the return endpoint that receives
the token, which must verify against the service's JWKS.

Screenshots of every screen at 360 px and 1280 px width go to ``$FACESVC_SCREENSHOTS_DIR``
(default ``artifacts/screens``). Without a Chromium the module skips, unless
``FACESVC_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from grpc_health.v1 import health_pb2

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.domain import Gate
from facesvc.tokens import CheckPolicy, Expectation, PublicKeySet, check_token
from tests.browser.fixtures import CHROMIUM, need_browser
from tests.browser.support import (
    EngineHolder,
    FakeLms,
    http,
    multipart,
    portal_overrides,
    stranger,
    write_y4m,
)
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import ADMIN, DEV_TENANTS, astronaut, jpeg

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
SCREENS = Path(os.environ.get("FACESVC_SCREENSHOTS_DIR", "artifacts/screens"))
BASE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ERROR_SCREENS = {"problem", "result"}
WIDTHS = {360: 760, 1280: 860}

sync_api = pytest.importorskip("playwright.sync_api")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def service(
    start_module_server: ServerStarter,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    lms: FakeLms,
    holder: EngineHolder,
) -> RunningServer:
    """One service for the module (the model pack loads once).

    SPL scans run without liveness: the fake camera plays a photo, and a liveness check
    that passed a photo would be the bug (passive liveness rightly answers SPOOF_SUSPECTED
    to it). WEBINAR scans keep the challenge policy, to show its steps. OFFLINE has a cap of
    1 so a test can exhaust it with one real scan."""
    need_browser()
    overrides = portal_overrides(
        tmp_path_factory.mktemp("portal"),
        [f"dev={lms.origin}/return/"],
        liveness__spl="off",
        liveness__webinar="challenge",
        liveness__offline="off",
        limits__cap_offline=1,
        # Long enough for a scan on a busy 2-core machine, short enough to test a timeout.
        portal__verify_timeout_s=30.0,
    )
    running = start_module_server(redis_url, engine_factory=holder, **overrides)
    running.wait_health(SERVING, within_s=180)
    assert holder.engine is not None
    for participant in ("p-e2e", "p-net", "p-cap", "p-cam"):
        outcome = holder.run(
            holder.engine.enroll(
                participant, [jpeg(astronaut())], replace=True, caller=ADMIN, tenants=DEV_TENANTS
            )
        )
        assert outcome.enrolled, outcome.reason
    return running


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake camera: the enrolled participant's face, a few seconds, looped by Chromium."""
    return write_y4m(tmp_path_factory.mktemp("camera") / "astronaut.y4m", [astronaut()])


def fake_camera(video: Path, *, answer_prompt: bool = False) -> list[str]:
    """Chromium flags for a camera that plays ``video`` (y4m); with ``answer_prompt`` the
    browser grants the camera prompt itself instead of the page's context."""
    prompt = ["--use-fake-ui-for-media-stream"] if answer_prompt else []
    return [
        *prompt,
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
    ]


def _launch(playwright: Any, extra: list[str]) -> Any:
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=BASE_FLAGS + extra
    )


class Watch:
    """Everything the page did that a test may assert on: screens shown, console errors,
    uncaught exceptions."""

    def __init__(self, page: Any) -> None:
        self.screens: list[str] = []
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )
        page.expose_function("facesvcScreen", self._screen)
        # Reports every screen change (the page marks it on <body data-screen>), across
        # navigations; injected through DevTools, so the page's CSP does not apply to it.
        page.add_init_script(
            """
            document.addEventListener("DOMContentLoaded", () => {
              const report = () => window.facesvcScreen(document.body.dataset.screen || "");
              new MutationObserver(report).observe(document.body,
                {attributes: true, attributeFilter: ["data-screen"]});
              report();
            });
            """
        )

    def _screen(self, name: str) -> None:
        self.screens.append(name)


def new_page(browser: Any, origin: str, *, camera: bool = True) -> tuple[Any, Watch]:
    context = browser.new_context(viewport={"width": 360, "height": 760}, locale="id-ID")
    if camera:
        context.grant_permissions(["camera"], origin=origin)
    page = context.new_page()
    return page, Watch(page)


def snap(page: Any, name: str) -> None:
    """Screenshots of the current screen at 360 px and 1280 px width, and a check that the
    page fits a 360 px screen without sideways scrolling."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    for width, height in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=str(SCREENS / f"{name}-{width}.png"), full_page=True)
        if width == 360:
            overflow = page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= 360, f"{name}: {overflow} px wide at a 360 px screen"
    page.set_viewport_size({"width": 360, "height": 760})


def wait_screen(page: Any, screen: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_selector(f"body[data-screen='{screen}']", timeout=timeout_ms)


def wait_true(page: Any, expression: str, timeout_s: float = 30.0) -> None:
    """Poll ``expression`` in the page until it is true. (``wait_for_function`` evaluates
    strings inside the page, which the page's CSP rightly forbids; ``evaluate`` goes
    through DevTools.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        page.wait_for_timeout(100)


def wait_redirect(page: Any, lms: FakeLms, timeout_s: float = 120.0) -> None:
    """Wait until the page sends the browser back to the LMS; fail at once, quoting the
    page, if it shows an error or a decision instead."""
    deadline = time.monotonic() + timeout_s
    while not page.url.startswith(f"{lms.origin}/return/"):
        try:
            screen = page.evaluate("document.body ? document.body.dataset.screen || '' : ''")
        except sync_api.Error:
            screen = ""  # the page is navigating away
        if screen in ERROR_SCREENS:
            text = page.locator(f"#screen-{screen}").inner_text()
            pytest.fail(f"the page shows {screen!r} instead of redirecting: {text}")
        assert time.monotonic() < deadline, f"no redirect after {timeout_s} s (screen {screen})"
        page.wait_for_timeout(200)


def ticket_for(service: RunningServer, lms: FakeLms, participant: str, **changes: Any) -> str:
    """Acting as the LMS: CreateLaunchTicket over gRPC; returns the page URL to open."""
    fields: dict[str, Any] = {
        "participant_id": participant,
        "training_id": "t-1",
        "training_type": pb.TRAINING_TYPE_SPL,
        "gate": pb.GATE_SESSION,
        "session_id": "s-1",
        "return_url": f"{lms.origin}/return/?course=7",
    }
    fields.update(changes)
    reply = service.stub.CreateLaunchTicket(pb.CreateLaunchTicketRequest(**fields), timeout=10)
    page_url: str = reply.page_url
    return page_url


def attempts_used(service: RunningServer, page_url: str) -> int:
    ticket = page_url.split("#ticket=", 1)[1]
    reply = http(
        "GET", service.http_url + "/api/v1/session", headers={"Authorization": f"Bearer {ticket}"}
    )
    assert reply.status == 200, reply.body
    used: int = reply.json()["attempts"]["used"]
    return used


def assert_token_verifies(
    service: RunningServer, url: str, participant: str, training_id: str = "t-1"
) -> None:
    query = parse_qs(urlsplit(url).query)
    assert query["course"] == ["7"]
    (token,) = query["token"]
    jwks = PublicKeySet.from_json(http("GET", service.http_url + "/.well-known/jwks.json").body)
    result = check_token(
        token,
        jwks,
        Expectation(audience="dev", gate=Gate.SESSION, session_id="s-1", training_id=training_id),
        CheckPolicy(issuer=service.app.settings.tokens.issuer),
        datetime.now(UTC),
    )
    assert result.ok, result.reason
    assert result.claims is not None and result.claims.sub == participant


def run_scan(page: Any, *, on_screen: Callable[[str], None] | None = None) -> None:
    """From the intro screen: open the camera, wait for live feedback, start the scan."""
    wait_screen(page, "intro")
    page.click("#btn-open-camera")
    wait_screen(page, "camera")
    wait_true(page, "document.getElementById('video').videoWidth > 0")
    page.wait_for_selector("#btn-start-scan:not([disabled])")
    # Live feedback: the server's pre-check of a camera frame finds one usable face, and
    # the oval turns green.
    page.wait_for_selector("#guide-oval.ok", timeout=60_000)
    assert page.locator("#feedback").inner_text().startswith("Bagus")
    if on_screen:
        on_screen("camera")
    page.click("#btn-start-scan")
    page.wait_for_selector("#step-banner:not([hidden])")
    if on_screen:
        on_screen("step")


# ---------------------------------------------------------------- tests


def test_launch_camera_scan_and_redirect_with_a_token_that_verifies_against_the_jwks(
    service: RunningServer, lms: FakeLms, face_video: Path, playwright: Any
) -> None:
    browser = _launch(playwright, fake_camera(face_video, answer_prompt=True))
    page, watch = new_page(browser, service.http_url)
    page.goto(ticket_for(service, lms, "p-e2e"))
    wait_screen(page, "intro")
    assert page.locator("#fact-attempts").inner_text() == "5 dari 5"
    snap(page, "intro")
    page.click("button[data-lang='en']")
    assert page.evaluate("document.documentElement.lang") == "en"
    assert page.locator("#h-intro").inner_text() == "Face verification"
    snap(page, "intro-en")
    page.click("button[data-lang='id']")
    run_scan(page, on_screen=lambda name: snap(page, name))
    wait_redirect(page, lms)
    assert_token_verifies(service, page.url, "p-e2e")
    assert any(path.startswith("/return/?course=7&token=") for path in lms.requests)
    assert "success" in watch.screens
    assert not ERROR_SCREENS & set(watch.screens), watch.screens
    assert watch.errors == []
    browser.close()


def test_a_network_failure_shows_a_retry_that_resends_the_same_scan(
    service: RunningServer, lms: FakeLms, face_video: Path, playwright: Any
) -> None:
    browser = _launch(playwright, fake_camera(face_video))
    page, watch = new_page(browser, service.http_url)
    page_url = ticket_for(service, lms, "p-net")
    page.goto(page_url)
    page.route("**/api/v1/verify", lambda route: route.abort("internetdisconnected"))
    run_scan(page)
    wait_screen(page, "problem")
    assert "Koneksi terputus" in page.locator("#h-problem").inner_text()
    assert page.locator("#btn-problem-retry").is_visible()
    snap(page, "network-error")
    assert attempts_used(service, page_url) == 0
    page.unroute("**/api/v1/verify")
    page.click("#btn-problem-retry")
    wait_screen(page, "uploading")
    snap(page, "uploading")
    # The success screen stands for about a second before the redirect: photograph it
    # when the machine is quick enough (the redirect itself is what the test checks).
    try:
        wait_screen(page, "success", timeout_ms=60_000)
        snap(page, "success")
    except sync_api.Error:
        pass
    wait_redirect(page, lms)
    assert_token_verifies(service, page.url, "p-net")
    assert [e for e in watch.errors if "ERR_INTERNET_DISCONNECTED" not in e] == []
    browser.close()


def test_a_timeout_offers_a_retry_that_resends_the_same_scan(
    service: RunningServer, lms: FakeLms, face_video: Path, playwright: Any
) -> None:
    browser = _launch(playwright, fake_camera(face_video))
    page, watch = new_page(browser, service.http_url)
    page_url = ticket_for(service, lms, "p-net", training_id="t-slow")
    page.goto(page_url)
    held: list[Any] = []

    def hold(route: Any) -> None:
        held.append(route)  # never answered: the server seems to hang

    page.route("**/api/v1/verify", hold)
    run_scan(page)
    wait_screen(page, "problem", timeout_ms=90_000)
    assert page.locator("#h-problem").inner_text() == "Waktu habis"
    assert held, "the scan was sent"
    snap(page, "timeout")
    page.unroute("**/api/v1/verify")
    page.click("#btn-problem-retry")
    wait_redirect(page, lms)
    assert_token_verifies(service, page.url, "p-net", training_id="t-slow")
    # One scan, one attempt (asked with a fresh link: the first one is spent).
    assert attempts_used(service, ticket_for(service, lms, "p-net", training_id="t-slow")) == 1
    assert [e for e in watch.errors if "ERR_" not in e] == []
    browser.close()


def test_a_challenge_shows_its_steps_one_at_a_time(
    service: RunningServer, lms: FakeLms, face_video: Path, playwright: Any
) -> None:
    browser = _launch(playwright, fake_camera(face_video))
    page, watch = new_page(browser, service.http_url)
    page_url = ticket_for(
        service, lms, "p-net", training_type=pb.TRAINING_TYPE_WEBINAR, training_id="t-web"
    )
    page.goto(page_url)
    # The photo video cannot answer head turns; this test is about what the page shows,
    # so the upload is cut off (and the participant gets the no-cost network retry).
    page.route("**/api/v1/verify", lambda route: route.abort("internetdisconnected"))
    run_scan(page)
    steps = page.locator("#step-list li")
    assert steps.count() == 3  # look straight, then the two issued steps
    banner = page.locator("#step-banner")
    assert banner.inner_text().startswith("Langkah 1 dari 3")  # looking straight: no arrow
    assert page.locator("#feedback").is_hidden()  # no pre-check hint beside the steps
    page.wait_for_selector("#step-list li:nth-child(2)[aria-current='step']", timeout=20_000)
    # A step: which way to move (an arrow as the participant sees themselves), how far, and
    # a bar of the time left.
    assert banner.inner_text()[0] in "\u2190\u2192\u2191\u2193\u2922"
    assert "Langkah 2 dari 3" in banner.inner_text()
    assert "Tahan sampai garis hijau habis" in page.locator("#step-hint").inner_text()
    assert page.locator("#step-timer").is_visible()
    snap(page, "challenge-step")
    wait_screen(page, "problem")
    assert attempts_used(service, page_url) == 0
    assert [e for e in watch.errors if "ERR_INTERNET_DISCONNECTED" not in e] == []
    browser.close()


def test_camera_permission_denied_explains_and_retries_without_spending_an_attempt(
    service: RunningServer, lms: FakeLms, face_video: Path, playwright: Any
) -> None:
    browser = _launch(playwright, fake_camera(face_video))
    page, watch = new_page(browser, service.http_url, camera=False)
    page_url = ticket_for(service, lms, "p-cam")
    page.goto(page_url)
    wait_screen(page, "intro")
    page.click("#btn-open-camera")
    wait_screen(page, "problem")
    assert page.locator("#h-problem").inner_text() == "Akses kamera ditolak"
    assert page.locator("#problem-free").is_visible()
    snap(page, "camera-denied")
    # The participant allows the camera and retries: the camera opens, nothing was spent.
    page.context.grant_permissions(["camera"], origin=service.http_url)
    page.click("#btn-problem-retry")
    wait_screen(page, "camera")
    wait_true(page, "document.getElementById('video').videoWidth > 0")
    assert attempts_used(service, page_url) == 0
    assert watch.errors == []
    browser.close()


def test_no_camera_at_all_says_so(service: RunningServer, lms: FakeLms, playwright: Any) -> None:
    browser = _launch(playwright, [])  # no fake device: this machine has no camera
    page, watch = new_page(browser, service.http_url)
    page.goto(ticket_for(service, lms, "p-cam"))
    wait_screen(page, "intro")
    page.click("#btn-open-camera")
    wait_screen(page, "problem")
    assert page.locator("#h-problem").inner_text() == "Kamera tidak ditemukan"
    assert page.locator("#btn-problem-retry").is_visible()
    snap(page, "camera-absent")
    assert watch.errors == []
    browser.close()


def test_an_exhausted_cap_shows_the_reason_attempts_left_and_reset_time(
    service: RunningServer, lms: FakeLms, playwright: Any
) -> None:
    page_url = ticket_for(
        service, lms, "p-cap", training_type=pb.TRAINING_TYPE_OFFLINE, training_id="t-off"
    )
    ticket = page_url.split("#ticket=", 1)[1]
    # One real scan of someone else's face spends the OFFLINE cap of 1.
    body, content_type = multipart({}, [jpeg(stranger())])
    spent = http(
        "POST",
        service.http_url + "/api/v1/verify",
        headers={"Authorization": f"Bearer {ticket}", "Content-Type": content_type},
        body=body,
    )
    assert spent.json()["decision"] == "NOT_MATCHED", spent.body
    browser = _launch(playwright, [])
    page, watch = new_page(browser, service.http_url)
    page.goto(page_url)
    wait_screen(page, "result")
    assert page.locator("#result-message").inner_text() == "Batas percobaan hari ini sudah habis."
    assert page.locator("#result-attempts").inner_text() == "0 dari 1"
    assert page.locator("#result-reset").inner_text().endswith("WIB")
    assert page.locator("#btn-result-retry").is_hidden()
    assert page.locator("#link-back").get_attribute("href") == f"{lms.origin}/return/?course=7"
    snap(page, "exhausted")
    page.click("button[data-lang='en']")
    assert page.locator("#result-message").inner_text() == "You have used all of today's attempts."
    snap(page, "exhausted-en")
    assert watch.errors == []
    browser.close()


def test_a_tampered_launch_link_is_refused_on_the_page(
    service: RunningServer, lms: FakeLms, playwright: Any
) -> None:
    import json

    from facesvc.tokens.jws import b64url_decode, b64url_encode

    page_url = ticket_for(service, lms, "p-e2e")
    base, ticket = page_url.split("#ticket=", 1)
    header, payload, signature = ticket.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["sub"] = "p-cap"  # scan as somebody else
    forged = b64url_encode(json.dumps(claims).encode())
    browser = _launch(playwright, [])
    page, watch = new_page(browser, service.http_url)
    # The 401 the gateway answers is logged by Chromium; that is the expected refusal.
    page.goto(f"{base}#ticket={header}.{forged}.{signature}")
    wait_screen(page, "problem")
    assert page.locator("#h-problem").inner_text() == "Tautan tidak dapat dipakai"
    assert "telah diubah" in page.locator("#problem-message").inner_text()
    assert page.locator("#btn-problem-retry").is_hidden()
    assert "intro" not in watch.screens  # nothing of the scan was offered
    snap(page, "link-invalid")
    browser.close()

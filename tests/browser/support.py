"""Test helpers for the Scan Wajah page and its gateway.

- :func:`http`: one HTTP request with the standard library, any status returned (no raise).
- :class:`FakeLms`: the LMS's return endpoint, a tiny HTTP server on a free port that
  records every request the browser makes to it.
- :func:`write_y4m`: a fake-camera video (YUV4MPEG2, 4:2:0) built from RGB photos, which
  Chromium plays through ``--use-file-for-fake-video-capture``.
- :func:`portal_overrides` and :func:`engine_factory`: settings and a real engine for an
  in-process server (``start_server`` fixture).
"""

from __future__ import annotations

import http.server as http_server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facesvc.engine import Engine
from facesvc.serve.app import Resources
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | Iterable[bytes] | None = None,
    timeout_s: float = 60.0,
) -> Reply:
    """One request; 4xx/5xx answers are returned, not raised. A ``body`` given as pieces
    goes out chunked, each piece when the iterator yields it."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return Reply(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers.items()), error.read())


def multipart(fields: dict[str, str], frames: Sequence[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body as the page sends it: text fields, then ``frame`` files."""
    boundary = "facesvc-test-boundary-7d3f"
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for i, frame in enumerate(frames):
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="frame"; '
            f'filename="frame-{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        out += frame + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------- the LMS side


@dataclass
class FakeLms:
    """The LMS's return endpoint: answers 200 to every GET and records its path+query."""

    server: http_server.ThreadingHTTPServer
    thread: threading.Thread
    requests: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @classmethod
    def start(cls) -> FakeLms:
        seen: list[str] = []

        class Handler(http_server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                body = b"<!doctype html><title>LMS</title><h1>Back at the LMS</h1>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return cls(server, thread, seen)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- fake camera


def _fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` scaled to cover ``width`` x ``height`` and centre-cropped (like a camera)."""
    pil = Image.fromarray(image)
    scale = max(width / pil.width, height / pil.height)
    size = (max(width, round(pil.width * scale)), max(height, round(pil.height * scale)))
    pil = pil.resize(size, Image.Resampling.LANCZOS)
    left, top = (pil.width - width) // 2, (pil.height - height) // 2
    return np.asarray(pil.crop((left, top, left + width, top + height)))


def write_y4m(
    path: Path,
    photos: Sequence[np.ndarray],
    *,
    width: int = 640,
    height: int = 480,
    fps: int = 10,
    seconds_each: float = 1.0,
) -> Path:
    """Write a YUV4MPEG2 (4:2:0, full-range BT.601) video showing each RGB photo in turn
    for ``seconds_each``; Chromium loops it as the fake camera."""
    frames_each = max(1, round(fps * seconds_each))
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for photo in photos:
            rgb = _fit(photo, width, height).astype(np.float32)
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            y = 0.299 * r + 0.587 * g + 0.114 * b
            u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
            v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128

            def sub(plane: np.ndarray) -> np.ndarray:
                return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

            planes = b"".join(
                np.clip(np.rint(p), 0, 255).astype(np.uint8).tobytes() for p in (y, sub(u), sub(v))
            )
            for _ in range(frames_each):
                out.write(b"FRAME\n" + planes)
    return path


def stranger() -> np.ndarray:
    """A real face that is not the astronaut: the leftmost person of insightface's group
    photo t1.jpg (face at x 52-167, y 263-378; no other face in the crop, which also keeps
    the head pose within the quality limits), enlarged twice like a close webcam frame."""
    from tests.engine_support import insightface_image

    crop = Image.fromarray(insightface_image("t1.jpg")[180:470, 0:250])
    return np.asarray(crop.resize((crop.width * 2, crop.height * 2), Image.Resampling.LANCZOS))


# ---------------------------------------------------------------- server settings


def portal_overrides(tmp_path: Path, return_urls: Sequence[str], **more: Any) -> dict[str, Any]:
    """Overrides for ``start_server``: own token keys, a template key, the allowlist."""
    key_dir = tmp_path / "token-keys"
    if not key_dir.exists():
        # Active since yesterday, so a test can also sign as of a few minutes ago.
        keys_generate(key_dir, now=datetime.now(UTC) - timedelta(days=1))
    values: dict[str, Any] = {
        "tokens__key_dir": key_dir,
        "templates__key": generate_template_key("k1"),
        "portal__return_urls": tuple(return_urls),
    }
    values.update(more)
    return values


class EngineHolder:
    """An engine factory for ``start_server`` that keeps the engine and its event loop, so a
    test can enroll through the very engine the server uses."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.loop: Any = None

    async def __call__(self, resources: Resources) -> Engine:
        import asyncio

        from facesvc.serve.wiring import build_engine
        from tests.engine_support import default_pack

        self.loop = asyncio.get_running_loop()
        self.engine = await build_engine(
            resources.settings, resources.redis, resources.metrics, pack=default_pack()
        )
        return self.engine

    def run(self, coro: Any, timeout_s: float = 120.0) -> Any:
        """Run ``coro`` on the server's loop and wait for it."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

"""What the kiosk shows: a full-screen terminal view for venue staff, or JSON lines.

The terminal view is plain ANSI (no curses): the screen is cleared and redrawn for every
state, with one big coloured banner that says what to do in Bahasa Indonesia first and
English under it, then the few facts staff need (who, attempts left today, when they reset).
Green means let the person in, red means do not, yellow means the kiosk or the network needs
attention, blue means something is in progress. ``NO_COLOR`` (any value) turns colour off.

Headless mode writes one JSON object per line and state (:class:`JsonLinesOutput`): the
fields of :meth:`ScanEvent.to_json` plus ``ts`` (ISO 8601 UTC).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TextIO

from facesvc.clock import WIB, Clock, SystemClock
from facesvc.domain import Decision
from facesvc.kiosk.flow import ScanEvent, ScanState
from facesvc.tokens.passes import PassProblem

_GREEN, _RED, _YELLOW, _BLUE = "42;97", "41;97", "43;30", "44;97"

# state -> (colour, title in Bahasa Indonesia, title in English)
_TITLES: dict[ScanState, tuple[str, str, str]] = {
    ScanState.WAITING_FOR_PASS: (_BLUE, "TUNJUKKAN KODE QR ANDA", "SHOW YOUR QR CODE"),
    ScanState.CAPTURING: (_BLUE, "LIHAT KE KAMERA", "LOOK AT THE CAMERA"),
    ScanState.CHALLENGE: (_BLUE, "IKUTI PETUNJUK", "FOLLOW THE INSTRUCTION"),
    ScanState.VERIFYING: (_BLUE, "MEMERIKSA WAJAH...", "CHECKING THE FACE..."),
    ScanState.RETRYING: (_YELLOW, "JARINGAN LAMBAT, MENCOBA LAGI", "NETWORK SLOW, RETRYING"),
    ScanState.ADMITTED: (_GREEN, "SILAKAN MASUK", "ADMITTED"),
    ScanState.NOT_ADMITTED: (_RED, "TIDAK DAPAT MASUK", "NOT ADMITTED"),
    ScanState.PASS_REFUSED: (_RED, "KODE QR DITOLAK", "QR CODE REFUSED"),
    ScanState.UNREACHABLE: (_YELLOW, "LAYANAN TIDAK TERJANGKAU", "SERVICE UNREACHABLE"),
    ScanState.SERVICE_REFUSED: (_RED, "LAYANAN MENOLAK PEMINDAIAN", "SERVICE REFUSED THE SCAN"),
    ScanState.NO_PASS: (_YELLOW, "KODE QR TIDAK DITEMUKAN", "NO QR CODE FOUND"),
    ScanState.CAMERA_ERROR: (_YELLOW, "KAMERA BERMASALAH", "CAMERA PROBLEM"),
}

# state -> (what to do, in Bahasa Indonesia, in English) where the title is not enough
_HINTS: dict[ScanState, tuple[str, str]] = {
    ScanState.WAITING_FOR_PASS: (
        "Arahkan kode QR dari dasbor peserta ke kamera.",
        "Hold the QR code from the participant dashboard up to the camera.",
    ),
    ScanState.CAPTURING: (
        "Lepas masker/kacamata hitam, tatap kamera dan diam sejenak.",
        "Remove mask or sunglasses, face the camera and hold still.",
    ),
    ScanState.VERIFYING: ("Mohon tunggu.", "Please wait."),
    ScanState.RETRYING: (
        "Tidak perlu memindai ulang; percobaan tidak dihitung dua kali.",
        "No need to scan again; this scan is never counted twice.",
    ),
    ScanState.UNREACHABLE: (
        "Periksa jaringan, lalu pindai lagi. Peserta belum diizinkan masuk.",
        "Check the network, then scan again. The participant is not admitted yet.",
    ),
    ScanState.SERVICE_REFUSED: ("Hubungi petugas/operator.", "Call the operator."),
    ScanState.NO_PASS: ("Pindai lagi dengan kode QR.", "Scan again with the QR code."),
    ScanState.CAMERA_ERROR: (
        "Periksa kabel kamera, lalu mulai ulang.",
        "Check the camera cable, then start again.",
    ),
}

_DECISIONS: dict[Decision, tuple[str, str]] = {
    Decision.VERIFIED: ("Wajah cocok.", "The face matches."),
    Decision.NOT_MATCHED: (
        "Wajah tidak cocok dengan data peserta.",
        "The face does not match the participant's enrolled face.",
    ),
    Decision.SPOOF_SUSPECTED: (
        "Pemeriksaan keaktifan gagal: tatap langsung, tanpa foto atau layar.",
        "Liveness check failed: face the camera yourself, no photos or screens.",
    ),
    Decision.NO_FACE: (
        "Wajah tidak terlihat: hadapkan wajah ke kamera.",
        "No face seen: face the camera.",
    ),
    Decision.MULTIPLE_FACES: (
        "Lebih dari satu wajah: hanya peserta di depan kamera.",
        "More than one face: only the participant in front of the camera.",
    ),
    Decision.LOW_QUALITY: (
        "Gambar kurang jelas: cari cahaya lebih terang dan diam sejenak.",
        "Picture not clear: find more light and hold still.",
    ),
    Decision.CHALLENGE_FAILED: (
        "Gerakan kepala tidak sesuai petunjuk.",
        "The head movements did not follow the instructions.",
    ),
    Decision.ATTEMPTS_EXHAUSTED: (
        "Batas percobaan hari ini sudah habis.",
        "No attempts are left today.",
    ),
    Decision.NOT_ENROLLED: (
        "Wajah peserta belum terdaftar: hubungi penyelenggara program.",
        "The participant has no enrolled face: contact the programme.",
    ),
    Decision.OUTSIDE_WINDOW: (
        "Di luar waktu pemindaian (1 jam sebelum s.d. 2 jam setelah mulai).",
        "Outside the scan window (1 h before to 2 h after the start).",
    ),
}

_PROBLEMS: dict[PassProblem, tuple[str, str]] = {
    PassProblem.MALFORMED: (
        "Ini bukan kode QR peserta, atau rusak.",
        "This is not a participant's QR code, or it is damaged.",
    ),
    PassProblem.FORGED: (
        "Kode QR telah diubah atau bukan dari program.",
        "The QR code was altered or not issued by the programme.",
    ),
    PassProblem.EXPIRED: (
        "Kode QR kedaluwarsa: buka kembali dari dasbor peserta.",
        "The QR code has expired: open it again from the participant dashboard.",
    ),
    PassProblem.WRONG_VENUE: (
        "Kode QR ini untuk lokasi pelatihan lain.",
        "This QR code is for another training venue.",
    ),
    PassProblem.WRONG_SCAN: (
        "Kode QR ini untuk pertemuan lain: buka kode untuk pertemuan hari ini.",
        "This QR code is for another meeting: open the code for today's meeting.",
    ),
}

_STEPS: dict[str, tuple[str, str]] = {
    "TURN_LEFT": ("<<  TOLEH KE KIRI", "<<  TURN YOUR HEAD LEFT"),
    "TURN_RIGHT": ("TOLEH KE KANAN  >>", "TURN YOUR HEAD RIGHT  >>"),
    "LOOK_UP": ("^  LIHAT KE ATAS", "^  LOOK UP"),
    "LOOK_DOWN": ("v  LIHAT KE BAWAH", "v  LOOK DOWN"),
    "COME_CLOSER": ("MENDEKAT KE KAMERA", "COME CLOSER"),
}

# How far and how long: a turn must reach about 30 degrees and show the head's depth, so
# "turn a little" fails; moving the device instead of the head fails too.
_STEP_HINTS: dict[str, tuple[str, str]] = {
    "TURN_LEFT": (
        "Putar kepala (bukan perangkat) sampai hidung mengarah ke bahu kiri, lalu tahan.",
        "Turn your head (not the device) until your nose points at your left shoulder; hold.",
    ),
    "TURN_RIGHT": (
        "Putar kepala (bukan perangkat) sampai hidung mengarah ke bahu kanan, lalu tahan.",
        "Turn your head (not the device) until your nose points at your right shoulder; hold.",
    ),
    "LOOK_UP": (
        "Angkat dagu sampai Anda melihat langit-langit, lalu tahan.",
        "Lift your chin until you see the ceiling; hold.",
    ),
    "LOOK_DOWN": (
        "Tundukkan kepala sampai Anda melihat lantai, lalu tahan.",
        "Lower your head until you see the floor; hold.",
    ),
    "COME_CLOSER": (
        "Dekatkan wajah sampai memenuhi bingkai, lalu tahan.",
        "Move your face closer until it fills the frame; hold.",
    ),
}


def _wib(moment: datetime) -> str:
    return f"{moment.astimezone(WIB):%H:%M} WIB {moment.astimezone(WIB):%d-%m-%Y}"


def describe(event: ScanEvent) -> list[tuple[str, str]]:
    """The lines under the banner as (Bahasa Indonesia, English) pairs; a pair with equal
    halves (names, ids) is one line."""
    lines: list[tuple[str, str]] = []
    if event.state is ScanState.CHALLENGE and event.step is not None:
        lines.append(_STEPS.get(event.step, (event.step, event.step)))
        if event.step in _STEP_HINTS:
            lines.append(_STEP_HINTS[event.step])
    if event.problem is not None:
        lines.append(_PROBLEMS[event.problem])
    if event.state in _HINTS:
        lines.append(_HINTS[event.state])
    result = event.result
    if result is not None:
        lines.append(_DECISIONS[result.decision])
    if event.venue_pass is not None:
        p = event.venue_pass
        who = f"Peserta / Participant: {p.participant_id}  ({p.training_id} / {p.session_id})"
        lines.append((who, who))
    if result is not None and result.decision is not Decision.VERIFIED:
        left = (
            "Sisa percobaan hari ini / Attempts left today: "
            f"{result.attempts_remaining} / {result.attempts_limit}"
        )
        lines.append((left, left))
        if result.attempts_reset_at is not None:
            when = f"Direset / Resets: {_wib(result.attempts_reset_at)}"
            lines.append((when, when))
    if event.state is ScanState.RETRYING:
        wait = f"{event.retry_in_s:.1f} s"
        lines.append(
            (f"Percobaan {event.tries}, ulang dalam {wait}", f"Try {event.tries}, again in {wait}")
        )
    if event.detail and event.state not in (ScanState.ADMITTED,):
        lines.append((event.detail, event.detail))
    return lines


def render(event: ScanEvent, *, width: int = 72, color: bool = True) -> str:
    """The whole screen for ``event`` as text (ANSI colours when ``color``)."""
    tone, title_id, title_en = _TITLES[event.state]
    inner = width - 4

    def banner_line(text: str) -> str:
        body = f"  {text.center(inner)}  "
        return f"\x1b[1;{tone}m{body}\x1b[0m" if color else f"|{text.center(width - 2)}|"

    edge = banner_line("") if color else "+" + "=" * (width - 2) + "+"
    out = [edge, banner_line(""), banner_line(title_id), banner_line(title_en), banner_line("")]
    out.append(edge)
    out.append("")
    for id_text, en_text in describe(event):
        out.append(f"  {id_text}")
        if en_text != id_text:
            out.append(f"  \x1b[2m{en_text}\x1b[0m" if color else f"  {en_text}")
    out.append("")
    return "\n".join(out)


class TerminalUI:
    """Full-screen view on ``out`` (a terminal): clears and redraws on every event."""

    def __init__(self, out: TextIO, *, color: bool = True, width: int = 72) -> None:
        self._out = out
        self._color = color
        self._width = width

    def show(self, event: ScanEvent) -> None:
        """Redraw the screen for ``event``."""
        clear = "\x1b[2J\x1b[H" if self._color else "\n"
        self._out.write(clear + render(event, width=self._width, color=self._color))
        self._out.flush()

    def prompt_next(self) -> None:
        """Ask staff to start the next scan (the caller then waits for Enter)."""
        self._out.write("  [Enter] Pindai berikutnya / Next scan     [Ctrl+C] Keluar / Quit\n")
        self._out.flush()


class JsonLinesOutput:
    """Headless output: one JSON object per event on ``out``, flushed at once."""

    def __init__(self, out: TextIO, clock: Clock | None = None) -> None:
        self._out = out
        self._clock = clock or SystemClock()

    def show(self, event: ScanEvent) -> None:
        """Write ``event`` as one line: ``{"ts": ..., "state": ..., ...}``."""
        line = {"ts": self._clock.now().isoformat(), **event.to_json()}
        self._out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._out.flush()

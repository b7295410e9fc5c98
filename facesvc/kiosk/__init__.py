"""The venue kiosk: reads a participant's QR pass, scans the face, asks the service.

Modules: ``qr`` (the signed pass and QR images), ``camera`` (frames from a camera or
files, never written to disk), ``flow`` (one scan as a state machine with idempotent
retries), ``tui`` (the staff screen and headless JSON lines), ``passes`` (the programme's
``facesvc passes issue``), ``__main__`` (the ``facesvc-kiosk`` program).
"""

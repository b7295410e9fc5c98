"""Helpers for the Scan Wajah tests: a fake LMS, fake-camera video files, HTTP calls."""

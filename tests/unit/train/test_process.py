"""The training-process setup (dsk.train.process): glibc malloc thresholds, applied where they exist."""

from __future__ import annotations

import ctypes
import sys

from dsk.train import process


def test_pin_malloc_thresholds_applies_on_linux_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DSK_PIN_MALLOC", "0")
    assert process.pin_malloc_thresholds() is False
    assert process.tune_process() == {"malloc_pinned": False}
    monkeypatch.delenv("DSK_PIN_MALLOC")
    assert process.pin_malloc_thresholds() is sys.platform.startswith("linux")


def test_a_linux_without_glibc_is_left_alone(monkeypatch):
    def no_glibc(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")  # musl: no libc.so.6

    monkeypatch.delenv("DSK_PIN_MALLOC", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert process.pin_malloc_thresholds() is False
    assert process.tune_process() == {"malloc_pinned": False}

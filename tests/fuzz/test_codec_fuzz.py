"""The codec fuzzer, a small run in the suite (the million-input run is a command)."""

from __future__ import annotations

from pathlib import Path

from .codec_fuzz import SEEDS, fuzz, load_seeds


def test_seeds_are_real_client_captures_that_reach_transmission() -> None:
    names = {p.name.split("-")[0] for p in SEEDS.glob("*.bin")}
    assert {"nbdinfo", "qemu", "nbdcopy"} <= names
    seeds = load_seeds()
    assert sum(1 for s in seeds if s.requests) >= 3


def test_codec_survives_mutated_client_streams(tmp_path: Path) -> None:
    res = fuzz(20_000, seed=1, crash_dir=tmp_path)
    assert res.crashes == 0, sorted(p.name for p in tmp_path.iterdir())
    assert res.done_handshakes > 2000  # the transmission phase is reached often
    assert res.requests > 5000

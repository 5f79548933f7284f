"""Checkpoint integrity: what `verify` catches, and which checkpoint `choose` resumes from."""

from __future__ import annotations

import os
import shutil

import pytest

from trial_worker.checkpoint import MANIFEST, choose, verify, write_manifest


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "checkpoint_000002"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (d / "optimizer.pt").write_bytes(os.urandom(8192))
    (d / "sub" / "state.json").write_text('{"step": 20}')
    write_manifest(d)
    return d


def test_an_intact_checkpoint_verifies_and_its_manifest_lists_every_file(ckpt):
    assert verify(ckpt) is None
    assert (ckpt / MANIFEST).exists() and not list(ckpt.glob(f".{MANIFEST}*"))  # no temp file left


@pytest.mark.parametrize("damage, says", [
    (lambda d: (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:100]), "optimizer.pt is 100 bytes, 8192 were written"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(bytes(4096)), "adapter_model.safetensors fails its SHA-256 check"),
    (lambda d: (d / "sub" / "state.json").unlink(), "sub/state.json missing"),
    (lambda d: (d / MANIFEST).unlink(), f"no {MANIFEST}: its writing never finished"),
    (lambda d: (d / MANIFEST).write_text("{not json"), f"{MANIFEST} unreadable"),
    (lambda d: shutil.rmtree(d), "missing (deleted)"),
])
def test_damage_is_named(ckpt, damage, says):
    damage(ckpt)
    assert says in verify(ckpt)


def test_choose_takes_the_newest_that_verifies_and_says_why_it_skipped_the_others(tmp_path, ckpt):
    older = tmp_path / "checkpoint_000001"
    older.mkdir()
    (older / "adapter_model.safetensors").write_bytes(b"x" * 10)
    write_manifest(older)
    assert choose([ckpt, older]) == (ckpt, [])
    (ckpt / "optimizer.pt").write_bytes(os.urandom(8192))  # same size, other bytes
    chosen, notes = choose([ckpt, older])
    assert chosen == older
    assert notes == ["checkpoint checkpoint_000002 rejected: optimizer.pt fails its SHA-256 check (corrupted)"]
    shutil.rmtree(older)
    assert choose([ckpt, older]) == (None, [notes[0], "checkpoint checkpoint_000001 rejected: missing (deleted)"])

"""The checked-in stubs are generated from the repository's protos, and the
check fails when a proto changes without regenerating them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).resolve().parent.parent
PROTO = CLIENT.parent.parent / "proto"


def check(proto_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLIENT / "scripts/generate"), "--check", "--proto-dir", str(proto_dir)],
        capture_output=True,
        text=True,
    )


def test_the_checked_in_stubs_are_current() -> None:
    result = check(PROTO)
    assert result.returncode == 0, result.stderr


def test_a_stale_stub_fails_the_check(tmp_path: Path) -> None:
    protos = tmp_path / "proto"
    shutil.copytree(PROTO, protos)
    outbox = protos / "outboxd/v1/outbox.proto"
    text = outbox.read_text()
    changed = text.replace("message Header {\n", "message Header {\n  string note = 99;\n", 1)
    assert changed != text
    outbox.write_text(changed)

    result = check(protos)
    assert result.returncode == 1
    assert "stale" in result.stderr
    assert "differs: outboxd/v1/outbox_pb2.py" in result.stderr
    assert "differs: outboxd/v1/outbox_pb2.pyi" in result.stderr

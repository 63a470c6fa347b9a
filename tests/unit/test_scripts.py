"""scripts/builder-image.sh refuses bad input in one line before it builds anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def not_pem(tmp_path: Path) -> str:
    path = tmp_path / "not-pem.txt"
    path.write_text("this is not a certificate\n")
    return str(path)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--frobnicate"], "builder-image: error: unknown argument '--frobnicate' (see --help)"),
        (["--ca-bundle", "/nonexistent/ca.pem"], "builder-image: error: --ca-bundle "
         "/nonexistent/ca.pem: no such file"),
        (["--ca-bundle", "{not_pem}"], "builder-image: error: --ca-bundle {not_pem} holds no "
         "PEM certificate"),
    ],
)  # fmt: skip
def test_builder_image_bad_input(args, line, tmp_path):
    bad = not_pem(tmp_path)
    args = [a.replace("{not_pem}", bad) for a in args]
    proc = subprocess.run(
        [str(ROOT / "scripts/builder-image.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [line.replace("{not_pem}", bad)]
    assert proc.stdout == ""
    assert not (ROOT / "build/builder/ca-bundle.pem").exists()

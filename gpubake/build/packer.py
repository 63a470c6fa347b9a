"""A thin subprocess wrapper around the packer binary.

Version detection (Packer >= 1.7 needs `required_plugins` and `packer init`;
1.6 rejects them), init, and build with live progress; the output is read by
gpubake.build.ansible.Progress, whose summary names the Ansible role and task that failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gpubake import GpubakeError
from gpubake.build import guard
from gpubake.build.ansible import Progress

PLUGINS_SINCE = (1, 7, 0)
#: how long Packer gets, after Ctrl-C, to remove its build container or VM
CLEANUP_TIMEOUT_S = 600
_VERSION_RE = re.compile(r"Packer v?(\d+)\.(\d+)\.(\d+)")


class PackerError(GpubakeError):
    """Packer is missing, too old, or a Packer command failed."""


def find_packer() -> str:
    path = shutil.which("packer")
    if not path:
        raise PackerError("packer not found on PATH: install it (Debian: apt-get install packer)")
    return path


def parse_version(text: str) -> tuple[int, int, int]:
    """Parse `packer version` output ("Packer v1.6.6", "Packer v1.11.2\\n\\nYour version...")."""
    match = _VERSION_RE.search(text)
    if not match:
        raise PackerError(f"cannot read Packer's version from {text.strip()[:80]!r}")
    return int(match[1]), int(match[2]), int(match[3])


def needs_plugins(version: tuple[int, int, int]) -> bool:
    return version >= PLUGINS_SINCE


def packer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CHECKPOINT_DISABLE"] = "1"  # no version check phoning home
    env["PACKER_NO_COLOR"] = "1"
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Packer:
    binary: str
    version: tuple[int, int, int]

    @classmethod
    def detect(cls) -> Packer:
        binary = find_packer()
        out = subprocess.run(
            [binary, "version"],
            capture_output=True,
            text=True,
            env=packer_env(),
            timeout=60,
            check=False,
        )
        return cls(binary, parse_version(out.stdout + out.stderr))

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def needs_plugins(self) -> bool:
        return needs_plugins(self.version)

    def command(
        self,
        verb: str,
        template_dir: Path,
        var_file: Path | None = None,
        extra: Iterable[str] = (),
        only: str | None = None,
    ) -> list[str]:
        cmd = [self.binary, verb]
        if verb in ("build", "validate"):
            if verb == "build":
                cmd += ["-color=false", "-on-error=cleanup"]
            if only:
                cmd.append(f"-only={only}")
            if var_file is not None:
                cmd.append(f"-var-file={var_file}")
        cmd += list(extra)
        cmd.append(str(template_dir))
        return cmd

    def _run(self, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            env=packer_env(),
            timeout=1800,
            check=False,
        )

    def init(self, template_dir: Path) -> None:
        if not self.needs_plugins:
            return
        out = self._run(self.command("init", template_dir), template_dir)
        if out.returncode != 0:
            raise PackerError(
                "packer init failed (plugins could not be installed): "
                + _last_line(out.stdout + out.stderr)
            )

    def build(
        self,
        template_dir: Path,
        var_file: Path,
        on_line: Callable[[str, str | None], None] | None = None,
        only: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Progress:
        """Run `packer build`, streaming lines to `on_line(line, progress_message)`; `env`
        adds to its environment (TMPDIR: where Packer and Ansible keep temporary files).

        Ctrl-C or SIGTERM (gpubake.build.guard.Terminated) is passed to Packer as Ctrl-C, and
        Packer removes its build container or VM before gpubake goes on; when gpubake is
        killed outright, Packer gets Ctrl-C from the kernel (gpubake.build.guard.die_with_parent).
        """
        progress = Progress()
        cmd = self.command("build", template_dir, var_file, only=only)
        proc = subprocess.Popen(
            cmd,
            cwd=template_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**packer_env(), **(env or {})},
            bufsize=1,
            start_new_session=True,
            preexec_fn=guard.die_with_parent,  # gpubake starts no threads of its own
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                message = progress.feed(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"), message)
            proc.wait()
            guard.end_group(proc.pid)
        except KeyboardInterrupt:
            with guard.uninterruptible():
                print("\ngpubake: interrupted; waiting for Packer to clean up ...", file=sys.stderr)
                _stop(proc, signal.SIGINT)
                try:
                    proc.wait(timeout=CLEANUP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    _stop(proc, signal.SIGKILL)
                    proc.wait()
                    print(
                        f"gpubake: Packer did not finish its clean-up in {CLEANUP_TIMEOUT_S} s "
                        "and was stopped: a build container it left is removed by the next "
                        "build; a cloud VM or disk named packer-* is yours to delete",
                        file=sys.stderr,
                    )
                guard.end_group(proc.pid)  # Ansible's workers can outlive Packer
            raise
        if proc.returncode != 0:
            raise PackerError(progress.summary())
        return progress


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    """`sig` to Packer's process group (its plugins and provisioners), unless it has ended."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[:500] if lines else "no output"

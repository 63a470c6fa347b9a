"""A thin subprocess wrapper around the packer binary.

Version detection (Packer >= 1.7 needs `required_plugins` and `packer init`;
1.6 rejects them), validate, build with live progress, and a failure summary
naming the Ansible role and task that failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gpubake import GpubakeError

PLUGINS_SINCE = (1, 7, 0)
_VERSION_RE = re.compile(r"Packer v?(\d+)\.(\d+)\.(\d+)")
_TASK_RE = re.compile(r"(?:TASK|RUNNING HANDLER) \[(?:(?P<role>[\w.-]+) : )?(?P<task>[^\]]*)\]")
_PLAY_RE = re.compile(r"PLAY \[(?P<play>[^\]]*)\]")
_FATAL_RE = re.compile(r"(fatal|failed): \[[^\]]*\]: FAILED! => (?P<rest>.*)")
_MSG_RE = re.compile(r"\"msg\": \"(?P<msg>(?:[^\"\\]|\\.)*)\"")
_ERROR_RE = re.compile(r"^(?:==> [^:]+: )?Build '[^']*' errored(?: after [^:]*)?: (?P<msg>.*)")
_ANSIBLE_ERROR_RE = re.compile(r"^\[ERROR\]: (?P<msg>.+)")
_CHANGED_RE = re.compile(r"^changed: \[[^\]]*\]")
_RECAP_RE = re.compile(
    r"^\S+\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+.*failed=(?P<failed>\d+)"
)
_PREFIX_RE = re.compile(r"^\s*(?:==> )?[\w.-]+\.[\w.-]+: ")


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
class Progress:
    """What the build output says so far; fed line by line."""

    play: str | None = None
    role: str | None = None
    task: str | None = None
    tasks_seen: int = 0
    failure: str | None = None
    failed_role: str | None = None
    failed_task: str | None = None
    error: str | None = None
    lines: list[str] = field(default_factory=list)
    changed_tasks: list[str] = field(default_factory=list)  # "role : task", in order, once each
    recap: dict[str, int] = field(default_factory=dict)  # the PLAY RECAP counts, summed

    def changed_summary(self) -> str:
        """'12 tasks ok, 0 changed' from the recap (None seen: from the lines)."""
        ok, changed = self.recap.get("ok", 0), self.recap.get("changed", 0)
        text = f"{ok} tasks ok, {changed} changed"
        if self.changed_tasks:
            shown = "; ".join(self.changed_tasks[:8])
            more = f" and {len(self.changed_tasks) - 8} more" if len(self.changed_tasks) > 8 else ""
            text += f" ({shown}{more})"
        return text

    def feed(self, raw: str) -> str | None:
        """Record one line; return a short progress message when a new step starts."""
        line = _PREFIX_RE.sub("", raw.rstrip("\n"))
        self.lines.append(line)
        if len(self.lines) > 400:
            del self.lines[:200]
        if m := _PLAY_RE.search(line):
            self.play = m["play"]
            return f"play: {self.play}"
        if m := _TASK_RE.search(line):
            self.role, self.task = m["role"], m["task"].strip()
            if self.task.startswith("Validating arguments against arg spec"):
                return None
            self.tasks_seen += 1
            where = f"{self.role} : " if self.role else ""
            return f"[{self.tasks_seen:3d}] {where}{self.task}"
        if _CHANGED_RE.match(line) and self.task is not None:
            where = f"{self.role} : {self.task}" if self.role else self.task
            if where not in self.changed_tasks:
                self.changed_tasks.append(where)
            return None
        if m := _RECAP_RE.match(line):
            for key in ("ok", "changed", "failed"):
                self.recap[key] = self.recap.get(key, 0) + int(m[key])
            return None
        if m := _FATAL_RE.search(line):
            self._fail(_failure_text(m["rest"]))
            return None
        if m := _ANSIBLE_ERROR_RE.search(line):
            text = re.sub(r"^(Task failed: )?(Module failed: )?", "", m["msg"].strip())
            if self.task is not None:  # ansible-core >= 2.19 reports task failures this way
                self._fail(text)
            elif self.error is None:
                self.error = f"ansible: {text}"
        elif (m := _ERROR_RE.search(line)) and self.error is None:
            self.error = m["msg"].strip()
        return None

    def _fail(self, text: str) -> None:
        """Keep the first failure message of a task (later item lines repeat it), unless a
        later line says more: ansible-core 2.19 prints "[ERROR]: ... non-zero return code"
        before the result that holds the command's stderr."""
        if self.failed_task == self.task and self.failure and not text.startswith(self.failure):
            return
        self.failure = text[:500]
        self.failed_role, self.failed_task = self.role, self.task

    def summary(self) -> str:
        if self.failed_task:
            where = f"role {self.failed_role}, " if self.failed_role else ""
            return f"build failed in {where}task '{self.failed_task}': {self.failure}"
        if self.error:
            return f"build failed: {self.error}"
        tail = [ln for ln in self.lines if ln.strip()][-1:] or ["no output"]
        return f"build failed: {tail[0].strip()[:300]}"


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

    def validate(self, template_dir: Path, var_file: Path, only: str | None = None) -> None:
        out = self._run(self.command("validate", template_dir, var_file, only=only), template_dir)
        if out.returncode != 0:
            raise PackerError("packer validate failed: " + _last_line(out.stdout + out.stderr))

    def build(
        self,
        template_dir: Path,
        var_file: Path,
        on_line: Callable[[str, str | None], None] | None = None,
        only: str | None = None,
    ) -> Progress:
        """Run `packer build`, streaming lines to `on_line(line, progress_message)`.

        Ctrl-C is passed to Packer, which then removes its build container or VM.
        """
        progress = Progress()
        cmd = self.command("build", template_dir, var_file, only=only)
        proc = subprocess.Popen(
            cmd,
            cwd=template_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=packer_env(),
            bufsize=1,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                message = progress.feed(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"), message)
            proc.wait()
        except KeyboardInterrupt:
            print("\ngpubake: interrupted; waiting for Packer to clean up ...", file=sys.stderr)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=600)
            raise
        if proc.returncode != 0:
            raise PackerError(progress.summary())
        return progress


def _failure_text(rest: str) -> str:
    """The message of an Ansible failure result; for a failed command, what it printed last."""
    try:
        result = json.loads(rest)
    except ValueError:
        msg = _MSG_RE.search(rest)
        return (msg["msg"] if msg else rest).encode().decode("unicode_escape", errors="replace")
    if not isinstance(result, dict):
        return rest
    text = str(result.get("msg", "")).strip()
    err = [ln.strip() for ln in str(result.get("stderr", "")).splitlines() if ln.strip()]
    if err:
        text = f"{text}: {' '.join(err[-2:])}" if text else " ".join(err[-2:])
    return text or rest


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[:500] if lines else "no output"

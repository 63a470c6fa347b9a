"""The Ansible runner: ansible-playbook with gpubake's config and collection, and the parser of
its output (also read through Packer's Ansible provisioner), which turns the stream into
progress lines, a changed-tasks summary and a one-line failure naming the role and task.

The ssh and local targets run playbooks here; image builds run them through Packer
(gpubake.build.packer), whose output goes through the same `Progress`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpubake import GpubakeError, resources

_TASK_RE = re.compile(r"(?:TASK|RUNNING HANDLER) \[(?:(?P<role>[\w.-]+) : )?(?P<task>[^\]]*)\]")
_PLAY_RE = re.compile(r"PLAY \[(?P<play>[^\]]*)\]")
_FATAL_RE = re.compile(r"(fatal|failed): \[[^\]]*\]: FAILED! => (?P<rest>.*)")
_MSG_RE = re.compile(r"\"msg\": \"(?P<msg>(?:[^\"\\]|\\.)*)\"")
_ANSIBLE_ERROR_RE = re.compile(r"^\[ERROR\]: (?P<msg>.+)")
_CHANGED_RE = re.compile(r"^changed: \[[^\]]*\]")
_PREFIX_RE = re.compile(r"^\s*(?:==> )?[\w.-]+\.[\w.-]+: ")
_RECAP_RE = re.compile(
    r"^\S+\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+.*failed=(?P<failed>\d+)"
)

_ERROR_RE = re.compile(r"^(?:==> [^:]+: )?Build '[^']*' errored(?: after [^:]*)?: (?P<msg>.*)")
_OWN_PREFIX = f"{resources.FQCN}."


def _short_role(role: str | None) -> str | None:
    """gpubake's own roles by their short names (Ansible prints them by FQCN)."""
    return role[len(_OWN_PREFIX) :] if role and role.startswith(_OWN_PREFIX) else role


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
            self.role, self.task = _short_role(m["role"]), m["task"].strip()
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


class AnsibleError(GpubakeError):
    """ansible-playbook is missing, or a playbook failed."""


def playbook_command() -> str:
    """The ansible-playbook of gpubake's own environment, else the one on PATH."""
    candidate = Path(sys.executable).parent / "ansible-playbook"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ansible-playbook")
    if not found:
        raise AnsibleError(
            "ansible-playbook not found: install gpubake with pip (it brings ansible)"
        )
    return found


def playbook_path(name: str) -> Path:
    """One of the collection's playbooks (vm.yml, smoke.yml, ...), in gpubake's data."""
    return resources.data_root() / "playbooks" / name


def run_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus gpubake's Ansible config and collection path."""
    return {
        **os.environ,
        **resources.ansible_env(),
        "ANSIBLE_FORCE_COLOR": "0",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def run_playbook(
    book: str,
    args: Sequence[str],
    on_line: Callable[[str, str | None], None],
) -> Progress:
    """Run one of gpubake's playbooks with `args` (inventory, -e, --check ...), streaming
    each line to `on_line(line, progress message)`; raise AnsibleError naming the failed task."""
    progress = Progress()
    cmd = [playbook_command(), *args, str(playbook_path(book))]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=run_env(),
        cwd=resources.data_root(),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        on_line(line.rstrip("\n"), progress.feed(line))
    if proc.wait() != 0:
        raise AnsibleError(progress.summary().replace("build failed", f"{book} failed", 1))
    return progress


def write_vars(path: Path, variables: Mapping[str, object]) -> Path:
    """The Ansible variables as one JSON file (passed as -e @FILE)."""
    path.write_text(json.dumps(dict(variables), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path

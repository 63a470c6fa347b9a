"""How the suite runs: which tests share a worker, in what order, where the time went, and
that nothing was built twice.

- **Workers.** pytest-xdist runs the suite on both cores (`-n 2`, pyproject's addopts; the
  scheduler is GroupScheduling). Each test module is one unit of work (its module fixtures
  are set up once), and modules that share something expensive or the engine's build state
  are one group, run one after another on one worker: BUILDS (the default image and what is
  made from it, and the fault matrix, whose checks say "nothing of a build is left" and
  must not see another build's work) and the modules with tests on the shared VM host.
- **Order.** Groups are handed out longest first (GROUP_ORDER, from the durations this
  report prints), so the two longest run side by side from the start and the short unit
  modules fill in at the end.
- **Report.** The run ends with the slowest tests (--durations), the slowest session and
  module fixtures (the image builds, the VM host), the time per module and per group, and
  the suite's wall time.
- **Audit.** Every stage gpubake builds is written to its build journal (gpubake.build.journal);
  at the end, a stage input hash built twice in this run fails the run, unless the second
  build was asked with --force (tests/integration/test_faults.py proves --force).
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

#: modules run one after another on one worker (see the docstring)
BUILDS = (
    "test_build.py",  # first: the default image, which the others take from it
    "test_sbom.py",
    "test_wheel.py",
    "test_notebook_image.py",
    "test_notebook_browser.py",  # the fastai image test_notebook_image.py built
    "test_image_registry.py",
    "test_jobs.py",
    "test_locked_builds.py",
    "test_legacy_family.py",  # fastai-legacy's chain, then pull's choice between both fastai
    "test_tensorflow_image.py",
    "test_stage_reuse.py",  # its images carry gpubake-stage/ names: none while a build runs
    "test_prune.py",  # the same, and a container of a stage image
    "test_base_refusals.py",  # builds that sweep leftovers (test_faults' killed builds')
    "test_faults.py",
)
#: the modules with tests on the shared VM host (vm_host.py): its users first, one after
#: another, so that it is removed after the last (tests/integration/conftest.py)
VM_HOST_MODULES = (
    "test_cuda.py",
    "test_nvidia_driver.py",
    "test_vm_host.py",
    "test_notebook_connect.py",
    "test_notebook_idle.py",
)
VM_HOST = "vm-host"
#: groups and modules that take longest, longest first; the rest follow in collection order
GROUP_ORDER = (
    "builds",
    VM_HOST,
    "tests/integration/test_qemu_image.py",
    "tests/integration/test_vm_disk.py",
    "tests/integration/test_builder_image.py",
    "tests/integration/test_notebook_role.py",
    "tests/integration/test_jupyter.py",
    "tests/integration/test_cloud_roles.py",
    "tests/integration/test_roles_converge.py",
    "tests/integration/test_scan.py",
    "tests/integration/test_collection_consumer.py",
    "tests/integration/test_conda_path.py",
    "tests/unit/test_cli.py",
    "tests/unit/test_render_validate.py",
    "tests/unit/test_lint.py",
)
_FIXTURE = "gpubake-fixture-setup"


def uses_vm_host(item: pytest.Item) -> bool:
    return "vm_host" in getattr(item, "fixturenames", ())


def group_of(nodeid: str) -> str:
    """The group of a test, from its id alone (the scheduler has no more)."""
    module = nodeid.split("::", 1)[0]
    if module.startswith("tests/integration/"):
        name = Path(module).name
        if name in BUILDS:
            return "builds"
        if name in VM_HOST_MODULES:
            return VM_HOST
    return module


def _rank(group: str) -> int:
    return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)


def _rank_in_group(item: pytest.Item) -> int:
    name = Path(item.nodeid.split("::", 1)[0]).name
    if name in VM_HOST_MODULES:
        return 0 if uses_vm_host(item) else 1
    return BUILDS.index(name) if name in BUILDS else 0


class GroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with gpubake's groups as the scopes. (xdist's loadgroup
    marks tests by rewriting Item._nodeid, which pytest 9 no longer reads.)"""

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)


class SuitePlugin:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.started_at = dt.datetime.now(dt.UTC)
        self.pending: list[tuple[str, str, float]] = []  # fixtures set up for the next report
        self.fixtures: list[tuple[float, str, str, str]] = []  # seconds, scope, name, where
        self.modules: collections.Counter[str] = collections.Counter()
        self.groups: collections.Counter[str] = collections.Counter()
        self.audit: list[str] = []

    # -- grouping and order ------------------------------------------------------------------
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Every process collects in this order: the groups longest first, each whole."""
        first_seen: dict[str, int] = {}
        for index, item in enumerate(items):
            first_seen.setdefault(group_of(item.nodeid), index)

        def key(pair: tuple[int, pytest.Item]) -> tuple[int, int, int, int]:
            index, item = pair
            group = group_of(item.nodeid)
            return (_rank(group), first_seen[group], _rank_in_group(item), index)

        items[:] = [item for _, item in sorted(enumerate(items), key=key)]

    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> GroupScheduling:
        return GroupScheduling(config, log)

    # -- timing (in the process that runs the tests) --------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: pytest.FixtureRequest):
        started = time.monotonic()
        try:
            return (yield)
        finally:
            if fixturedef.scope in ("session", "package", "module"):
                seconds = time.monotonic() - started
                if seconds >= 1:
                    self.pending.append((fixturedef.scope, fixturedef.argname, seconds))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if self.pending:
            report.user_properties.extend((_FIXTURE, entry) for entry in self.pending)
            self.pending.clear()
        return report

    # -- gathering (in the controller, or the one process without xdist) ----------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        module = report.nodeid.split("::", 1)[0]
        self.modules[module] += report.duration
        self.groups[group_of(report.nodeid)] += report.duration
        for name, value in report.user_properties:
            if name == _FIXTURE:
                scope, argname, seconds = value
                self.fixtures.append((seconds, scope, argname, module))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return  # the controller audits the whole run
        from gpubake.build import journal

        self.audit = rebuilt(journal.entries(since=self.started_at))
        if self.audit and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput"):
            return
        write = terminalreporter.write_line
        terminalreporter.section("where the time went")
        write("slowest session and module fixtures (set-up):")
        for seconds, scope, name, where in sorted(self.fixtures, reverse=True)[:20]:
            write(f"  {seconds:8.1f}s  {scope:<7} {name}  ({where})")
        write("time per group of tests run one after another (set-up + call + teardown):")
        for group, seconds in self.groups.most_common(12):
            write(f"  {seconds:8.1f}s  {group}")
        write("time per module:")
        for module, seconds in self.modules.most_common(20):
            write(f"  {seconds:8.1f}s  {module}")
        workers = getattr(self.config.option, "numprocesses", None) or 0
        busy = sum(self.modules.values())
        wall = time.monotonic() - self.started
        write(
            f"suite: {wall:.0f} s wall ({wall / 60:.1f} min), {busy:.0f} s of tests"
            f" on {workers or 1} worker(s)"
        )
        if self.audit:
            terminalreporter.section("built twice in one run", red=True)
            for line in self.audit:
                write(line)


def rebuilt(entries: Any) -> list[str]:
    """The stage builds of `entries` (gpubake.build.journal) that repeat an input hash already
    built, --force ones excepted: one line each."""
    seen: dict[str, dict[str, Any]] = {}
    found = []
    for entry in entries:
        first = seen.setdefault(entry["input_hash"], entry)
        if first is not entry and not entry.get("forced"):
            found.append(
                f"{entry['stack']}:{entry['stage']} ({entry['input_hash'][:12]}) built at "
                f"{entry['time']} by pid {entry['pid']}, again: first at {first['time']} "
                f"by pid {first['pid']}"
            )
    return found

"""`gpubake-stacks` and `gpubake-gpus`: the tables of images/stacks.yml and images/gpus.yml,
read and checked by gpubake.stacks as every command reads them, with the sources the files
cite. Which stacks run on which GPU is gpubake.stacks.stacks_for_gpu's answer on the day
the site is built (driver branches past their end of life drop out)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

from doc_nodes import Cell, code, link, para, section, table
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from gpubake import stacks
from gpubake.resources import data_root


def cited_sources(data: Any) -> Iterator[str]:
    """Every address a data file cites (`source`, `*_source`), once each, in file order."""
    seen: set[str] = set()

    def walk(value: Any, key: str = "") -> Iterator[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, str(k))
        elif isinstance(value, list):
            for v in value:
                yield from walk(v, key)
        elif (
            (key == "source" or key.endswith("_source"))
            and isinstance(value, str)
            and value.startswith(("http://", "https://"))
            and value not in seen
        ):
            seen.add(value)
            yield value

    return walk(data)


def _source(entry: dict[str, Any]) -> Cell:
    url = entry.get("source")
    return link(url) if isinstance(url, str) and url.startswith("http") else ""


def _sources_section(document: nodes.document, data: Any, ident: str) -> nodes.section:
    node = section(document, "Sources", ident)
    items = nodes.bullet_list()
    for url in cited_sources(data):
        item = nodes.list_item()
        item += para(link(url, url))
        items += item
    node += items
    return node


class _DataDirective(SphinxDirective):
    def note_files(self) -> None:
        for name in ("stacks.yml", "gpus.yml"):
            self.env.note_dependency(str(data_root() / "images" / name))


class StacksDirective(_DataDirective):
    def run(self) -> list[nodes.Node]:
        self.note_files()
        data, doc = stacks.stacks_data(), self.state.document
        default = data["default_stack"]
        rows = []
        for name in stacks.stack_names():
            raw = stacks.raw_stack(name)
            cuda = str(raw["cuda"])
            kernels = stacks.stack_kernels(raw, cuda)
            ptx = (raw.get("kernels") or {}).get("ptx")
            pythons = ", ".join(raw.get("pythons", []))
            python = raw.get("python") or (f"the OS's: {pythons}" if pythons else "the OS's")
            rows.append(
                (
                    nodes.inline("", "", code(name), nodes.Text(" (default)"))
                    if name == default
                    else code(name),
                    raw["description"],
                    raw["framework"],
                    raw["python_env"],
                    python,
                    cuda,
                    str(raw["driver_branch"]),
                    stacks.sm_span(kernels) + (f", PTX {ptx}" if ptx else ""),
                    code(raw["parent"]) if raw["parent"] else "",
                    code(stacks.family_of(name)),
                    [code(f"{p}=={v}") for p, v in raw["packages"].items()],
                )
            )
        header = ("Stack", "Description", "Framework", "Environment", "Python", "CUDA")
        header += ("Driver branch", "Kernels", "Built on", "Family", "Packages")
        stack_part = section(doc, "Stacks", "stacks-table")
        stack_part += table(header, rows)

        os_part = section(doc, "Operating systems", "operating-systems")
        os_part += para("The default is ", code(data["default_os"]), ".")
        os_part += table(
            ("OS", "Family", "Codename", "Python", "glibc", "Container base image"),
            [
                (
                    code(k),
                    v["family"],
                    v["codename"],
                    str(v["python"]),
                    str(v.get("glibc", "")),
                    code(v["base_image"]),
                )
                for k, v in data["operating_systems"].items()
            ],
        )

        branches = section(doc, "Driver branches", "driver-branches")
        branches += table(
            ("Branch", "Kind", "Newest CUDA", "Minimum driver", "End of life", "Source"),
            [
                (
                    code(k),
                    v["kind"],
                    str(v["max_cuda"]),
                    str(v.get("min_driver", "")),
                    str(v.get("eol", "none given")),
                    _source(v),
                )
                for k, v in data["driver_branches"].items()
            ],
        )
        return [stack_part, os_part, branches, _sources_section(doc, data, "stacks-sources")]


class GpusDirective(_DataDirective):
    def run(self) -> list[nodes.Node]:
        self.note_files()
        data, doc = stacks.gpus_data(), self.state.document
        majors = section(doc, "CUDA major versions", "cuda-majors")
        majors += table(
            ("CUDA", "Oldest compute capability", "Minimum driver", "Source"),
            [
                (code(k), str(v["min_cc"]), str(v["min_driver"]), _source(v))
                for k, v in data["cuda"].items()
            ],
        )

        arches = section(doc, "Architectures", "architectures")
        arches += table(
            ("Architecture", "First compute capability", "Open kernel module", "Drivers", "Source"),
            [
                (code(k), str(v["min_cc"]), v["open_kernel_module"], _branches(v), _source(v))
                for k, v in data["architectures"].items()
            ],
        )

        today = datetime.datetime.now(datetime.UTC).date()
        gpu_part = section(doc, "GPUs", "gpus-table")
        gpu_part += para(
            "Stacks that run on each GPU: kernels for its compute capability, a driver branch "
            f"it can use and NVIDIA still supports (on {today:%Y-%m-%d}, when this page was "
            "built), an x86_64 host. Default GPU of cloud builds: ",
            code(stacks.stacks_data()["default_cloud_gpu"]),
            ".",
        )
        rows = []
        for key, raw in data["gpus"].items():
            gpu = stacks.get_gpu(key)
            fits = stacks.stacks_for_gpu(gpu, today=today)
            notes = [n for n in ("end of life" if gpu.end_of_life else "",) if n]
            if gpu.host_arch != "x86_64":
                notes.append(f"{gpu.host_arch} hosts (not built yet)")
            rows.append(
                (
                    code(key),
                    gpu.name,
                    gpu.architecture,
                    gpu.compute_capability,
                    f"{gpu.memory_gib:g}",
                    [code(a) for a in gpu.gcp_accelerators],
                    [code(f) for f in gpu.aws_instance_families],
                    [code(m) for m in raw.get("paperspace", {}).get("machine_types", [])],
                    [code(s) for s in fits] or "none",
                    "; ".join(notes),
                    _source(raw),
                )
            )
        header = ("GPU", "Name", "Architecture", "Compute capability", "Memory (GiB)", "GCP")
        header += ("AWS", "Paperspace", "Stacks", "Notes", "Source")
        gpu_part += table(header, rows)
        return [majors, arches, gpu_part, _sources_section(doc, data, "gpus-sources")]


def _branches(arch: dict[str, Any]) -> str:
    first, last = arch.get("first_driver_branch"), arch.get("last_driver_branch")
    if first and last:
        return f"{first} to {last}"
    if first:
        return f"{first} and newer"
    return f"up to {last}" if last else "any"


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("gpubake-stacks", StacksDirective)
    app.add_directive("gpubake-gpus", GpusDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

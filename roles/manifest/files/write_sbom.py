"""Print the image's CycloneDX SBOM as JSON (run by the manifest role with the environment's
Python): the environment's Python packages with the SHA-256 of every file the stack's lock
allows for the installed version, and the OS's deb packages as dpkg recorded them.

Standard library only (it runs on the images' Python, 3.10 and up). No clock and no random
serial number: the same image and lock give the same file, byte for byte.
"""

import argparse
import hashlib
import importlib.metadata
import json
import re
import sys
import urllib.parse
import uuid
from pathlib import Path

SPEC_VERSION = "1.6"
#: Namespace of the serial number: uuid5 of the document's own content.
_SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://gpubake/sbom")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def normalize(name):
    """PEP 503: the name pip, uv and the lock use (and the pypi purl's)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _purl_part(text):
    # as packageurl-python writes it: ':' and '~' kept, '+' and the rest percent-encoded
    return urllib.parse.quote(text, safe=":~")


def os_release(path):
    info = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            info[key] = value.strip().strip("\"'")
    return info


def dpkg_installed(path):
    """(name, version, architecture) of every installed package of a dpkg status file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields = {}
        for line in paragraph.splitlines():
            if not line or line[0] in " \t":  # a continuation line (descriptions, conffiles)
                continue
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        status = fields.get("status", "").split()
        if fields.get("package") and fields.get("version") and status[-1:] == ["installed"]:
            found.append((fields["package"], fields["version"], fields.get("architecture", "")))
    return found


def deb_components(packages, release):
    distro_id = release.get("ID", "debian").lower()
    distro_version = release.get("VERSION_ID") or release.get("VERSION_CODENAME", "")
    components = []
    for name, version, arch in packages:
        qualifiers = {"arch": arch} if arch else {}
        if distro_version:
            qualifiers["distro"] = f"{distro_id}-{distro_version}"
        query = "&".join(f"{k}={_purl_part(v)}" for k, v in sorted(qualifiers.items()))
        purl = f"pkg:deb/{distro_id}/{_purl_part(name)}@{_purl_part(version)}"
        components.append(
            {
                "type": "library",
                "bom-ref": purl + (f"?{query}" if query else ""),
                "name": name,
                "version": version,
                "purl": purl + (f"?{query}" if query else ""),
            }
        )
    return components


def python_distributions(paths):
    """{normalized name: (name, version)} of the distributions on `paths` (None: this
    interpreter's sys.path), the first of a name winning as it does on import."""
    found = {}
    for dist in importlib.metadata.distributions(path=list(paths) if paths else sys.path):
        name = dist.metadata.get("Name")
        if not name or not dist.version:
            continue
        found.setdefault(normalize(name), (name, dist.version))
    return found


def _same_version(a, b):
    return a.strip().lower().lstrip("v") == b.strip().lower().lstrip("v")


def python_components(distributions, pins):
    """Each installed distribution; one that the lock pins at the installed version carries
    the lock's hashes: the SHA-256 of every file (wheel, sdist) the lock allows for that
    version, one of which is the file that was installed (uv installed the lock with
    --require-hashes). A package the lock does not pin, or pins at another version, has none."""
    pins = {normalize(k): v for k, v in pins.items()}
    components = []
    for key, (name, version) in sorted(distributions.items()):
        purl = f"pkg:pypi/{_purl_part(key)}@{_purl_part(version)}"
        component = {"type": "library", "bom-ref": purl, "name": name, "version": version}
        component["purl"] = purl
        pin = pins.get(key) or {}
        if pin and _same_version(str(pin.get("version", "")), version):
            digests = sorted(
                {
                    h.split(":", 1)[1].lower()
                    for h in pin.get("hashes", [])
                    if h.lower().startswith("sha256:") and _HEX64.match(h.split(":", 1)[1])
                }
            )
            if digests:
                component["hashes"] = [{"alg": "SHA-256", "content": d} for d in digests]
        components.append(component)
    return components


def sbom(*, dpkg_status, os_release_path, site_packages, pins, build):
    release = os_release(os_release_path)
    components = python_components(python_distributions(site_packages), pins)
    refs = {c["bom-ref"] for c in components}
    for component in deb_components(dpkg_installed(dpkg_status), release):
        if component["bom-ref"] not in refs:
            refs.add(component["bom-ref"])
            components.append(component)
    components.sort(key=lambda c: c["bom-ref"])
    stack = build.get("stack")
    tool = {"type": "application", "name": "gpubake"}
    if build.get("gpubake_version"):
        tool["version"] = str(build["gpubake_version"])
    properties = [
        {"name": f"gpubake:{key}", "value": str(value)}
        for key, value in sorted(build.items())
        if value is not None and not isinstance(value, (dict, list))
    ]
    if release.get("PRETTY_NAME"):
        properties.append({"name": "gpubake:os", "value": release["PRETTY_NAME"]})
    document = {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "version": 1,
        "metadata": {
            "tools": {"components": [tool]},
            "component": {
                "type": "container" if build.get("target") == "docker" else "operating-system",
                "bom-ref": "image",
                "name": f"gpubake/{stack}" if stack else "gpubake-image",
            },
            "properties": properties,
        },
        "components": components,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    document["serialNumber"] = f"urn:uuid:{uuid.uuid5(_SERIAL_NAMESPACE, digest)}"
    return document


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpkg-status", default="/var/lib/dpkg/status")
    parser.add_argument("--os-release", default="/etc/os-release")
    parser.add_argument(
        "--site-packages",
        action="append",
        default=[],
        help="where the distributions are (repeatable; default: this Python's sys.path)",
    )
    parser.add_argument(
        "--lock-pins", help="JSON file: {name: {version: ..., hashes: [sha256:...]}}"
    )
    parser.add_argument("--build", default="{}", help="JSON: build facts (stack, target, ...)")
    parser.add_argument("--out", help="write here instead of stdout")
    args = parser.parse_args(argv)
    pins = {}
    if args.lock_pins:
        pins = json.loads(Path(args.lock_pins).read_text(encoding="utf-8")) or {}
    document = sbom(
        dpkg_status=args.dpkg_status,
        os_release_path=args.os_release,
        site_packages=args.site_packages,
        pins=pins,
        build=json.loads(args.build) or {},
    )
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

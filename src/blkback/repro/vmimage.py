"""The guest image for ``blkback repro --guests vm``: a Debian kernel and a small initramfs.

Everything comes from Debian packages, nothing from anywhere else:

* the kernel: the cloud flavour that ``linux-image-cloud-amd64`` depends on, fetched with
  ``apt-get download`` (the host installs no kernel) and unpacked with ``dpkg-deb -x``; its
  ``vmlinuz`` and the virtio modules (``virtio_ring`` ... ``virtio_blk``; ext4 is built in);
* ``busybox-static`` (the shell and the tools), and from the host's installed packages
  ``mke2fs`` (e2fsprogs) with its shared libraries, coreutils' ``dd`` (so that the guest's
  dd prints its lines as the seed's did) and ``date`` (nanoseconds, for dd + sync);
* the project's own ``/init`` and workload scripts (``guestfs/``).

The image is cached under a key that hashes all of these inputs (the kernel package's
version, the files' contents, the scripts, this builder's format), so it is rebuilt exactly
when one of them changes (images unused for two days go when another is built).
``python -m blkback.repro.vmimage`` builds it (``scripts/setup``
does, so that tests find it ready); ``blkback repro --guests vm`` builds it when missing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from blkback.errors import EnvironmentProblem

FORMAT = 1  # bump when the image's layout changes
PRUNE_UNUSED_S = 2 * 86400.0  # an image unused this long goes when another is built
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
VIRTIO_MODULES = (
    "virtio/virtio_ring",
    "virtio/virtio",
    "virtio/virtio_pci_modern_dev",
    "virtio/virtio_pci_legacy_dev",
    "virtio/virtio_pci",
    "block/virtio_blk",
)
BUSYBOX = "/bin/busybox"
# Host binaries from Debian packages, copied with their shared libraries: guest path -> host.
HOST_BINARIES = {
    "/sbin/mke2fs": "/sbin/mke2fs",
    "/usr/bin/dd": "/bin/dd",
    "/usr/bin/date": "/bin/date",
}
HOST_FILES = {"/etc/mke2fs.conf": "/etc/mke2fs.conf"}
GUESTFS = Path(__file__).with_name("guestfs")
GUEST_SCRIPTS = {"/init": "init", "/bin/bursts.sh": "bursts.sh", "/bin/ddloop.sh": "ddloop.sh"}


@dataclass(frozen=True)
class GuestImage:
    """A built image: ``-kernel`` and ``-initrd`` for QEMU."""

    kernel: Path
    initrd: Path
    kernel_package: str
    kernel_version: str
    key: str

    def describe(self) -> str:
        return f"{self.kernel_package} {self.kernel_version} + busybox-static initramfs"


def default_cache_dir() -> Path:
    """``$BLKBACK_GUEST_CACHE``, else /var/cache/blkback/guest as root, else ~/.cache."""
    env = os.environ.get("BLKBACK_GUEST_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/blkback/guest")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "blkback" / "guest"


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"guest image: {argv[0]} not found") from exc
    if p.returncode != 0:
        raise EnvironmentProblem(f"guest image: {' '.join(argv)}: {p.stderr.strip()[-400:]}")
    return p.stdout


def kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel that ``linux-image-cloud-amd64`` depends on."""
    deps = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    names = [
        ln.split(":", 1)[1].strip()
        for ln in deps.splitlines()
        if ln.strip().startswith("Depends:") and "linux-image-" in ln
    ]
    if not names:
        raise EnvironmentProblem(f"guest image: {KERNEL_META_PACKAGE} names no kernel package")
    name = names[0]
    show = _run(["apt-cache", "show", "--no-all-versions", name])
    version = next(
        (ln.split(":", 1)[1].strip() for ln in show.splitlines() if ln.startswith("Version:")),
        "",
    )
    return name, version


def shared_libraries(binary: str) -> list[str]:
    """The absolute paths ``ldd`` resolves for ``binary`` (with the dynamic loader)."""
    out = []
    for line in _run(["ldd", binary]).splitlines():
        parts = line.split()
        if "=>" in parts and parts[-1].startswith("("):
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                out.append(target)
        elif parts and parts[0].startswith("/"):
            out.append(parts[0])
    return out


def _host_payload() -> dict[str, Path]:
    """Guest path -> host file, for everything taken from the host's packages."""
    files: dict[str, Path] = {"/bin/busybox": Path(BUSYBOX)}
    for guest, host in HOST_BINARIES.items():
        files[guest] = Path(host)
        for lib in shared_libraries(host):
            files[lib] = Path(lib)
    for guest, host in HOST_FILES.items():
        if os.path.exists(host):
            files[guest] = Path(host)
    for guest, name in GUEST_SCRIPTS.items():
        files[guest] = GUESTFS / name
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise EnvironmentProblem(
            "guest image: missing " + ", ".join(missing) + " (busybox-static, e2fsprogs)"
        )
    return files


def image_key(package: str, version: str, payload: dict[str, Path]) -> str:
    """A hash over every input of the image."""
    h = hashlib.sha256(f"format={FORMAT} kernel={package}={version}\n".encode())
    for guest in sorted(payload):
        h.update(f"{guest}\n".encode())
        h.update(hashlib.sha256(payload[guest].read_bytes()).digest())
    return h.hexdigest()[:16]


def ensure_image(cache_dir: Path | None = None, log: object = None) -> GuestImage:
    """The cached image for today's inputs, built first if it is not there."""
    cache = cache_dir or default_cache_dir()
    package, version = kernel_package()
    payload = _host_payload()
    key = image_key(package, version, payload)
    target = cache / key
    image = GuestImage(target / "vmlinuz", target / "initrd.gz", package, version, key)
    if image.kernel.exists() and image.initrd.exists():
        os.utime(target)  # in use: not pruned by another checkout's build
        return image
    if callable(log):
        log(f"guest image: building {key} ({package} {version}) in {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        build = Path(tmp)
        kernel, modules = _fetch_kernel(package, build)
        files = dict(payload)
        for mod in VIRTIO_MODULES:
            files[f"/lib/modules/{mod.rsplit('/', 1)[1]}.ko"] = modules / f"{mod}.ko"
        (build / "out").mkdir()
        shutil.copyfile(kernel, build / "out" / "vmlinuz")
        (build / "out" / "initrd.gz").write_bytes(initramfs(files))
        (build / "out" / "inputs.txt").write_text(
            f"{package} {version}\n" + "".join(f"{g} <- {p}\n" for g, p in sorted(files.items()))
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(build / "out", target)
    prune(cache, keep=key)
    return image


def prune(cache: Path, keep: str, unused_s: float = PRUNE_UNUSED_S) -> list[str]:
    """Remove images other than ``keep`` that nobody has used for ``unused_s``.

    Not every other key at once: two checkouts of the project (worktrees, a branch and
    main) have different keys, and one's build must not delete the image the other's run
    is about to boot. Returns the removed keys.
    """
    removed = []
    # Unix time, not the Clock's: it is compared with the images' mtimes.
    now = time.time()
    for old in cache.iterdir():
        if not old.is_dir() or old.name == keep or old.name.startswith("build-"):
            continue
        if now - old.stat().st_mtime > unused_s:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old.name)
    return removed


def _fetch_kernel(package: str, build: Path) -> tuple[Path, Path]:
    """apt-get download + dpkg-deb -x: (vmlinuz, the modules' kernel/drivers directory)."""
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], cwd=build)
    debs = list(build.glob(f"{package}_*.deb"))
    if not debs:
        raise EnvironmentProblem(f"guest image: apt-get download {package} fetched nothing")
    root = build / "root"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise EnvironmentProblem(f"guest image: no vmlinuz in {debs[0].name}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    return kernels[0], root / "lib" / "modules" / release / "kernel" / "drivers"


# -- the initramfs: a gzip'd cpio "newc" archive ---------------------------------------------
def initramfs(files: dict[str, Path]) -> bytes:
    """The archive: the directories, /dev/console, and ``files`` (guest path -> host file)."""
    out = io.BytesIO()
    ino = 1
    dirs: set[str] = {"/dev", "/proc", "/sys", "/tmp", "/mnt"}
    for guest in files:
        parent = os.path.dirname(guest)
        while parent not in ("/", ""):
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for d in sorted(dirs):
        _cpio_entry(out, d.lstrip("/"), stat.S_IFDIR | 0o755, b"", ino)
        ino += 1
    _cpio_entry(out, "dev/console", stat.S_IFCHR | 0o600, b"", ino, rdev=(5, 1))
    ino += 1
    for guest in sorted(files):
        host = files[guest]
        mode = 0o755 if os.access(host, os.X_OK) else 0o644
        _cpio_entry(out, guest.lstrip("/"), stat.S_IFREG | mode, host.read_bytes(), ino)
        ino += 1
    _cpio_entry(out, "TRAILER!!!", 0, b"", 0)
    return gzip.compress(out.getvalue(), compresslevel=6, mtime=0)


def _cpio_entry(
    out: io.BytesIO, name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int] = (0, 0)
) -> None:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
    out.write(b"\0" * (-(110 + len(raw)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) the repro guest image.")
    parser.add_argument("--cache", type=Path, default=None, help="cache directory")
    args = parser.parse_args(argv)
    image = ensure_image(args.cache, log=print)
    print(f"guest image: {image.kernel.parent} ({image.describe()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

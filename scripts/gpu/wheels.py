"""The GPU check's wheelhouse: slim the bitsandbytes wheel, check what the wheels need, and their size.

    python scripts/gpu/wheels.py slim-bnb DIR     # keep only the CUDA 13 and CPU libraries of bitsandbytes
    python scripts/gpu/wheels.py check DIR        # one wheel per pin, every Requires-Dist met, total under 60 MiB

`scripts/gpu/wheelhouse.sh DIR` runs both after downloading the wheels of `wheels.txt`. Standard library and
`packaging` only (pip's own copy when the package is missing), so it runs under any Python 3.10+.

Why slim bitsandbytes: its 0.50.2 wheel holds one native library per CUDA version (41 MiB packed). bitsandbytes
loads `libbitsandbytes_cuda{major}{minor}.so` for torch's CUDA version (`torch.version.cuda` "13.0" -> cuda130),
else the nearest one of the same major version (`cextension.get_cuda_bnb_library_path`), and
`libbitsandbytes_cpu.so` without CUDA. The GPU image's torch is 2.11+cu130, so the CUDA 13 libraries (cuda130,
cuda132) and the CPU one are kept; the RECORD lists exactly the files left, with their hashes, and the marker file
`SLIMMED.txt` in the dist-info says what was removed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pragma: no cover - a Python without the packaging package still has pip's copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIMIT_MIB = 60  # wheels + project tree; what travels to the GPU machine may not pass 64 MiB
KEEP_BNB = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d)\.so$")
DROP_BNB = re.compile(r"bitsandbytes/libbitsandbytes_\w+\.so$")
# the GPU machine: Python 3.12 on Linux x86_64 (markers of Requires-Dist are evaluated for it)
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def pins(path: Path = HERE / "wheels.txt") -> dict[str, str]:
    """The pinned `name==version` lines of wheels.txt, by canonical name."""
    out = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, version = spec.split("==")
            out[canonicalize_name(name)] = version
    return out


def image_packages(path: Path = HERE / "image.txt") -> dict[str, str | None]:
    """The GPU image's packages (image.txt): canonical name -> version, or None where the version is not known."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if parts:
            out[canonicalize_name(parts[0])] = parts[1] if len(parts) > 1 else None
    return out


def metadata(wheel: Path) -> dict:
    """Name, version, Requires-Python and Requires-Dist of a wheel, read from its METADATA."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = Parser().parsestr(z.read(name).decode("utf-8"))
    return {"name": canonicalize_name(msg["Name"]), "version": msg["Version"],
            "requires_python": msg.get("Requires-Python"), "requires": msg.get_all("Requires-Dist") or []}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_bitsandbytes(wheel: Path) -> tuple[int, int, list[str]]:
    """Rewrite the bitsandbytes wheel in place without the native libraries the GPU image cannot load.

    Returns:
        The sizes before and after (bytes) and the names of the removed libraries (empty if already slim).
    """
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        marker = f"{dist_info}/SLIMMED.txt"
        if marker in names:
            return before, before, []
        dropped = [n for n in names if DROP_BNB.search(n) and not KEEP_BNB.search(n)]
        kept_libs = [n for n in names if KEEP_BNB.search(n)]
        if not any("cuda13" in n for n in kept_libs):
            raise SystemExit(f"{wheel.name}: no CUDA 13 library in it ({kept_libs}); check KEEP_BNB")
        note = ("Slimmed for the finetune GPU check (scripts/gpu/wheels.py): the native libraries for other CUDA, ROCm "
                "and XPU versions were removed.\nKept: " + ", ".join(sorted(kept_libs)) + "\nRemoved: "
                + ", ".join(sorted(dropped)) + "\n").encode()
        tmp = wheel.with_suffix(".tmp")
        record_name = f"{dist_info}/RECORD"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in dropped or info.filename == record_name:
                    continue
                out.writestr(info, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
            out.writestr(marker, note)
            lines = [line for line in src.read(record_name).decode().splitlines()
                     if line and line.split(",")[0] not in dropped and line.split(",")[0] != record_name]
            lines += [f"{marker},{_record_hash(note)},{len(note)}", f"{record_name},,"]
            out.writestr(record_name, "\n".join(lines) + "\n")
    tmp.replace(wheel)
    return before, wheel.stat().st_size, [Path(n).name for n in dropped]


def verify_record(wheel: Path) -> list[str]:
    """Files of a wheel whose RECORD entry is missing or whose hash or size differs (empty: the RECORD is right)."""
    with zipfile.ZipFile(wheel) as z:
        record_name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        entries = {}
        for line in z.read(record_name).decode().splitlines():
            path, digest, size = line.rsplit(",", 2)
            entries[path] = (digest, size)
        problems = [f"{n}: not in RECORD" for n in z.namelist() if n not in entries and not n.endswith("/")]
        for path, (digest, size) in entries.items():
            if path == record_name:
                continue
            if path not in z.namelist():
                problems.append(f"{path}: in RECORD, not in the wheel")
                continue
            data = z.read(path)
            if digest != _record_hash(data) or int(size) != len(data):
                problems.append(f"{path}: hash or size differs from RECORD")
    return problems


def requirement_rows(wheels: dict[str, dict], image: dict[str, str | None]) -> list[tuple[str, str, str]]:
    """Every Requires-Dist of the carried wheels (markers for Python 3.12, Linux x86_64, no extras), what meets it.

    Returns:
        (wheel, requirement, verdict) rows; a verdict starting with "MISSING" or "CONFLICT" is a problem.
    """
    rows = []
    for name, meta in sorted(wheels.items()):
        for text in meta["requires"]:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**TARGET_ENV, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels:
                version = wheels[dep]["version"]
                ok = req.specifier.contains(Version(version), prereleases=True)
                verdict = f"carried {version}" if ok else f"CONFLICT: carried {version}"
            elif dep in image:
                version = image[dep]
                if version is None:
                    verdict = "image (version not listed: checked on the machine)"
                else:
                    ok = req.specifier.contains(Version(version), prereleases=True)
                    verdict = f"image {version}" if ok else f"CONFLICT: image {version}"
            else:
                verdict = "MISSING: neither carried nor in the image"
            rows.append((f"{name} {meta['version']}", str(req), verdict))
    return rows


def tree_bytes(exclude: Path | None = None) -> int:
    """Bytes of the project tree that travels: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    total = 0
    for rel in filter(None, listed):
        path = ROOT / rel
        if exclude is not None and exclude in path.parents:
            continue
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def fitting(directory: Path) -> tuple[list[Path], list[Path]]:
    """The wheels of `directory` this interpreter can install, and the ones it cannot (other Python or platform)."""
    here = set(sys_tags())
    fit, other = [], []
    for wheel in sorted(directory.glob("*.whl")):
        tags = parse_wheel_filename(wheel.name)[3]
        (fit if tags & here else other).append(wheel)
    return fit, other


def check(directory: Path) -> int:
    """Print the wheelhouse's table, requirements and total size; returns the number of problems found."""
    wheels_found = sorted(directory.glob("*.whl"))
    metas = [metadata(w) | {"file": w} for w in wheels_found]
    by_name: dict[str, dict] = {}
    problems = []
    for m in metas:
        if m["name"] in by_name:
            problems.append(f"two wheels of {m['name']}: {by_name[m['name']]['file'].name}, {m['file'].name}")
        by_name[m["name"]] = m
    wanted = pins()
    for name, version in wanted.items():
        if name not in by_name:
            problems.append(f"{name}=={version}: no wheel")
        elif by_name[name]["version"] != version:
            problems.append(f"{name}: wheel {by_name[name]['version']}, pinned {version}")
    problems += [f"{name}: not in wheels.txt" for name in by_name if name not in wanted]
    if "bitsandbytes" in by_name:
        problems += [f"bitsandbytes RECORD: {p}" for p in verify_record(by_name["bitsandbytes"]["file"])]
    print(f"{'wheel':<72} {'MiB':>7}")
    for m in metas:
        print(f"{m['file'].name:<72} {m['file'].stat().st_size / 2**20:7.2f}")
    print("\nRequires-Dist of every carried wheel (Python 3.12, Linux x86_64), and what meets it:")
    for wheel, req, verdict in requirement_rows(by_name, image_packages()):
        print(f"  {wheel:<28} {req:<44} {verdict}")
        if verdict.startswith(("MISSING", "CONFLICT")):
            problems.append(f"{wheel} needs {req}: {verdict}")
    for m in metas:
        rp = m["requires_python"]
        if rp and not Requirement(f"x{rp}").specifier.contains("3.12.3"):
            problems.append(f"{m['file'].name}: Requires-Python {rp} excludes 3.12")
    wheel_bytes = sum(w.stat().st_size for w in wheels_found)
    inside = directory.resolve().is_relative_to(ROOT)
    tree = tree_bytes(directory.resolve() if inside else None)
    total = wheel_bytes + tree
    print(f"\n{len(wheels_found)} wheels {wheel_bytes / 2**20:.1f} MiB + project tree {tree / 2**20:.1f} MiB = "
          f"total {total / 2**20:.1f} MiB (limit {LIMIT_MIB} MiB; the GPU machine takes at most 64 MiB)")
    if total > LIMIT_MIB * 2**20:
        problems.append(f"total {total / 2**20:.1f} MiB is over {LIMIT_MIB} MiB")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("wheelhouse OK" if not problems else f"wheelhouse has {len(problems)} problem(s)")
    return len(problems)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("slim-bnb", "check"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    directory = Path(args[1])
    if args[0] == "check":
        return 1 if check(directory) else 0
    (wheel,) = directory.glob("bitsandbytes-*.whl")
    before, after, dropped = slim_bitsandbytes(wheel)
    if dropped:
        print(f"{wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, removed {', '.join(dropped)}")
    else:
        print(f"{wheel.name}: already slim ({after / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

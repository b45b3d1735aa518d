"""Installation: `pip install .` from a clean tree, deploy/setup.sh, deploy/test.sh.

The pip test builds the package exactly as a user's clone would (build isolation, a fresh venv,
the C shim compiled during the build) and runs the installed console script from outside the
source tree, so nothing can come from the working tree by accident.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "deploy" / "setup.sh"
TEST_SH = REPO / "deploy" / "test.sh"

# What a fresh clone does not hold (VCS data, virtualenvs, build artefacts; see .gitignore).
NOT_IN_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".pytest_cache", ".hypothesis", "*.so", "store",
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="deploy scripts run as root (sudo deploy/test.sh)")


def _base_python() -> str:
    """The interpreter behind the running venv (a venv made from a venv's python is fine too)."""
    return getattr(sys, "_base_executable", None) or sys.executable


@pytest.mark.slow
def test_pip_install_from_clean_tree_in_fresh_venv(tmp_path: Path) -> None:
    src = tmp_path / "clone"
    shutil.copytree(REPO, src, ignore=NOT_IN_CLONE, symlinks=True)
    venv = tmp_path / "venv"
    subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    t0 = time.monotonic()
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(src)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert pip.returncode == 0, f"pip install . failed:\n{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}"
    build_s = time.monotonic() - t0

    # The console script works from outside the tree.
    run = subprocess.run([str(venv / "bin" / "gridckpt"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for verb in ("run", "orchestrator", "agent", "submit", "status", "checkpoint", "restart", "cancel"):
        assert verb in run.stdout, f"`gridckpt --help` does not list {verb!r}"

    # Every import package comes from the venv, and the compiled shim ships with interpose.
    probe = subprocess.run(
        [str(py), "-c",
         "import orchestrator, nodeagent, interpose, pathlib;"
         "print(pathlib.Path(orchestrator.__file__).parent);"
         "print(pathlib.Path(nodeagent.__file__).parent);"
         "print(pathlib.Path(interpose.__file__).parent)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    dirs = [Path(line) for line in probe.stdout.split()]
    for d in dirs:
        assert d.is_relative_to(venv), f"{d} is not inside the fresh venv {venv}"
    shims = sorted(dirs[2].glob("*.so"))
    assert shims, f"no compiled shim (*.so) in the installed interpose package {dirs[2]}"
    elf = shims[0].read_bytes()[:4]
    assert elf == b"\x7fELF", f"{shims[0]} is not an ELF shared object"
    print(f"pip install . took {build_s:.1f} s")


def _mirror(tmp_path: Path, codename: str, files: dict[str, str]) -> subprocess.CompletedProcess:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return subprocess.run(["bash", "-c", f'source "{SETUP}"; debian_mirror "{etc}" {codename}'],
                          capture_output=True, text=True, timeout=30)


def test_setup_finds_the_mirror_in_one_line_sources(tmp_path: Path) -> None:
    r = _mirror(tmp_path, "bookworm", {"sources.list": (
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://apt.vendor.example/repo stable main\n"
        "deb http://sec.example.org/debian-security bookworm-security main\n"
        "deb http://ftp.fr.debian.org/debian/ bookworm main contrib\n"
        "deb http://other.example/debian bookworm main\n")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://ftp.fr.debian.org/debian"


def test_setup_finds_the_mirror_in_deb822_sources(tmp_path: Path) -> None:
    r = _mirror(tmp_path, "trixie", {
        "sources.list.d/debian.sources": (
            "Types: deb\nURIs: http://mirror.one/debian-security\nSuites: trixie-security\n"
            "Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n"
            " URIs: http://inline-key.example/debian\n -----END PGP PUBLIC KEY BLOCK-----\n\n"
            "Types: deb\nURIs: http://disabled.example/debian\nSuites: trixie\nComponents: main\n"
            "Enabled: no\n\n"
            "Types: deb deb-src\nURIs: http://mirror.two/debian/ http://mirror.three/debian\n"
            "Suites: trixie trixie-updates\nComponents: main\n"),
        "sources.list.d/vendor.list": "deb https://vendor.example/apt trixie main\n",
        "sources.list.d/ignored.list.disabled": "deb http://ignored.example/debian trixie main\n",
    })
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://mirror.two/debian"


def test_setup_prefers_the_release_suite_over_a_debian_looking_uri(tmp_path: Path) -> None:
    r = _mirror(tmp_path, "bookworm", {
        "sources.list": "deb http://backports.example/debian bookworm-backports main\n",
        # third-party repositories that name the release: other path, or other component
        "sources.list.d/a-vendor.list": "deb https://packages.vendor.example/php/ bookworm main\n",
        "sources.list.d/docker.list": "deb https://download.docker.example/linux/debian bookworm stable\n",
        "sources.list.d/z-debian.sources": "Types: deb\nURIs: http://main.example/debian\n"
                                           "Suites: bookworm\nComponents: main contrib\n",
    })
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://main.example/debian"


def test_setup_without_any_debian_mirror_fails(tmp_path: Path) -> None:
    r = _mirror(tmp_path, "bookworm", {"sources.list": "deb https://vendor.example/apt stable main\n"})
    assert r.returncode != 0
    assert r.stdout.strip() == ""


@needs_root
def test_setup_check_finds_the_system_complete_and_is_quick() -> None:
    env = dict(os.environ, GRIDCKPT_VENV=sys.prefix)
    t0 = time.monotonic()
    r = subprocess.run([str(SETUP), "--check"], env=env, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert r.returncode in (0, 1), r.stderr
    assert "CRIU ok" in r.stderr, r.stderr
    assert "missing: apt-get" not in r.stderr and "missing: build CRIU" not in r.stderr, r.stderr
    assert elapsed < 5, f"setup.sh --check took {elapsed:.1f} s"


@needs_root
def test_test_sh_treats_no_tests_ran_as_failure() -> None:
    # A non-local broker: test.sh leaves the local RabbitMQ alone; setup already ran.
    env = dict(os.environ, GRIDCKPT_VENV=sys.prefix, GRIDCKPT_SKIP_SETUP="1",
               GRIDCKPT_TEST_BROKER="amqp://guest:guest@broker.invalid/")
    r = subprocess.run([str(TEST_SH), "tests/test_install.py", "-k", "no_such_test_zzz", "-p", "no:cacheprovider"],
                       env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "no tests ran" in r.stderr


def test_usage_errors_exit_2() -> None:
    for script, args in ((SETUP, ["--bogus"]), (REPO / "deploy/rabbitmq/setup-vo.sh", ["only-one-arg"])):
        r = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2, (script, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and "usage" in r.stderr.lower(), r.stderr

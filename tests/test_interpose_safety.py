"""The shim is invisible to programs: errno, MSG_PEEK, EAGAIN, non-socket fds, its own fd
protected from close/dup2/close_range; and the same programs under an AddressSanitizer
build of the shim."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))
import shimlib  # noqa: E402
from shimlib import Unit, check_ends_agree, check_unit, finish, kill_all, start_server  # noqa: E402

import interpose  # noqa: E402
from interpose.reader import merge_ranges, read_directory  # noqa: E402


@pytest.fixture(scope="module")
def progs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("progs")
    return {name: str(shimlib.build_c(shimlib.PROGS / f"{name}.c", d / name)) for name in ("safety", "tcpprog")}


@pytest.fixture(scope="module")
def asan_preload() -> str:
    return shimlib.asan_preload()


def run_safety(tmp_path, prog, preload=None):
    unit = Unit("u", tmp_path, preload=preload)
    p = unit.popen([prog], env={"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "AddressSanitizer" not in err, err
    import json
    expect = json.loads(out)
    groups = merge_ranges(read_directory(unit.dir))
    sizes = sorted((d, rs) for (c, d, i), rs in groups.items())
    # three directions of two connections; each recorded exactly once, PEEK and EAGAIN excluded
    assert sorted(rs[-1][1] for (c, d, i), rs in groups.items() if d == "send") == sorted(
        [expect["first_ab"], expect["first_ba"], expect["second_ab"]]), sizes
    assert sorted(rs[-1][1] for (c, d, i), rs in groups.items() if d == "recv") == sorted(
        [expect["first_ab"], expect["first_ba"], expect["second_ab"]]), sizes
    assert all(rs == [(0, rs[-1][1])] for rs in groups.values())


def test_program_cannot_tell(tmp_path, progs):
    run_safety(tmp_path, progs["safety"])


def test_safety_under_asan(tmp_path, progs, asan_preload):
    run_safety(tmp_path, progs["safety"], preload=asan_preload)


@pytest.mark.parametrize("mode,opts", [("epoll", ["--mode", "epoll", "--partial"]), ("fork", ["--threads", "--dup"])])
def test_programs_under_asan(tmp_path, progs, asan_preload, mode, opts):
    tcpprog = progs["tcpprog"]
    asan_env = {"ASAN_OPTIONS": "detect_leaks=0"}
    srv = Unit("server", tmp_path, preload=asan_preload)
    cli = Unit("client", tmp_path, preload=asan_preload)
    try:
        sp, port = start_server(srv, [tcpprog, "server", "--mode", mode, "--conns", "2"]
                                + (["--partial"] if "--partial" in opts else []))
        cp = cli.popen([tcpprog, "client", "--port", str(port), "--conns", "2", "--bytes", "30000", *opts],
                       env=asan_env)
        cl, sl = finish(cp), finish(sp)
    finally:
        kill_all(srv, cli)
    check_ends_agree(check_unit(cli, cl), check_unit(srv, sl))


def test_without_shim_dir_nothing_is_recorded(tmp_path, progs):
    """LD_PRELOAD alone (no GRIDCKPT_SHIM_DIR): pure pass-through, no files anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDCKPT_")}
    env["LD_PRELOAD"] = str(interpose.library_path())
    p = subprocess.run([progs["safety"]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    # the fd-protection checks need a log; everything before them must pass
    assert "shim log fd not found" in p.stderr
    assert list(tmp_path.iterdir()) == []

"""Real TCP client/server programs (C and Python) under the shim: the byte counts the
programs keep themselves must equal the recorded determinants exactly, and both ends must
name every connection direction alike."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))
import shimlib  # noqa: E402
from shimlib import Unit, check_ends_agree, check_unit, finish, kill_all, start_server  # noqa: E402


@pytest.fixture(scope="module")
def tcpprog(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("progs") / "tcpprog"
    return str(shimlib.build_c(shimlib.PROGS / "tcpprog.c", out))


def run_pair(tmp_path, server_cmd, client_cmd_fn, preload=None):
    srv = Unit("server", tmp_path, preload=preload)
    cli = Unit("client", tmp_path, preload=preload)
    try:
        sp, port = start_server(srv, server_cmd)
        cp = cli.popen(client_cmd_fn(port))
        client_lines = finish(cp)
        server_lines = finish(sp)
    finally:
        kill_all(srv, cli)
    a = check_unit(cli, client_lines)
    b = check_unit(srv, server_lines)
    check_ends_agree(a, b)
    return a, b, client_lines, server_lines


@pytest.mark.parametrize("mode,client_opts", [
    ("blocking", []),
    ("blocking", ["--partial"]),
    ("epoll", ["--mode", "epoll"]),
    ("epoll", ["--mode", "epoll", "--partial"]),
    ("thread", ["--threads"]),
    ("fork", ["--threads"]),
    ("blocking", ["--dup"]),
])
def test_c_programs(tmp_path, tcpprog, mode, client_opts):
    conns = 3
    nbytes = 20000 if "--partial" in client_opts else 400000
    a, b, cl, sl = run_pair(
        tmp_path,
        [tcpprog, "server", "--mode", mode, "--conns", str(conns)] + (["--partial"] if "--partial" in client_opts else []),
        lambda port: [tcpprog, "client", "--port", str(port), "--conns", str(conns), "--bytes", str(nbytes)] + client_opts,
    )
    assert len(a) == conns * 2 and len(b) == conns * 2
    assert all(v["send"] == nbytes or v["recv"] == nbytes for v in a.values())
    if mode == "fork":  # each connection was served by a child logging as itself
        assert len({l["pid"] for l in sl}) == conns


def test_c_ipv6(tmp_path, tcpprog):
    a, b, _, _ = run_pair(
        tmp_path,
        [tcpprog, "server", "--mode", "epoll", "--conns", "2", "--family", "6"],
        lambda port: [tcpprog, "client", "--port", str(port), "--conns", "2", "--bytes", "100000", "--family", "6"],
    )
    assert all(c.startswith("[::1]:") and ">[::1]:" in c for c in a)


def test_fork_child_continues_parent_counters(tmp_path, tcpprog):
    """A forked child sends the first half on the parent's socket, the parent the rest:
    one stream, one contiguous byte range split across two processes' logs."""
    a, b, cl, _ = run_pair(
        tmp_path,
        [tcpprog, "server", "--mode", "blocking", "--conns", "1"],
        lambda port: [tcpprog, "client", "--port", str(port), "--conns", "1", "--bytes", "300000", "--fork-split"],
    )
    cli_recs = shimlib.read_directory(tmp_path / "client")
    sends = sorted((r.start, r.end, r.pid) for r in cli_recs if r.direction == "send")
    pids = {p for _, _, p in sends}
    assert len(pids) == 2
    child = next(l["pid"] for l in cl if "child_sent" in l)
    child_bytes = sum(e - s for s, e, p in sends if p == child)
    assert child_bytes == 150000
    assert max(e for s, e, p in sends if p == child) == 150000  # child's part is the start of the stream


def test_reconnect_same_pair_gets_two_generations(tmp_path, tcpprog):
    import socket as pysocket
    s = pysocket.socket()
    s.bind(("127.0.0.1", 0))
    local_port = s.getsockname()[1]
    s.close()
    a, b, cl, sl = run_pair(
        tmp_path,
        [tcpprog, "server", "--mode", "blocking", "--conns", "2"],
        lambda port: [tcpprog, "client", "--port", str(port), "--conns", "2", "--bytes", "50000",
                      "--local-port", str(local_port)],
    )
    assert cl[0]["local"] == cl[1]["local"] and cl[0]["peer"] == cl[1]["peer"]
    gens = sorted(c.rsplit("#", 1)[1] for c in a)
    assert gens == ["0", "0", "1", "1"]
    assert set(a) == set(b)


def py_server(*opts):
    return [shimlib.python(), str(shimlib.PYPROG), "server", *opts]


def py_client(port, *opts):
    return [shimlib.python(), str(shimlib.PYPROG), "client", "--port", str(port), *opts]


def test_python_threaded_server_sendmsg_iovecs(tmp_path):
    run_pair(tmp_path, py_server("--conns", "2"), lambda p: py_client(p, "--conns", "2", "--bytes", "150000"))


def test_python_forking_server_ipv6(tmp_path):
    a, b, _, sl = run_pair(tmp_path, py_server("--conns", "2", "--fork", "--family", "6"),
                           lambda p: py_client(p, "--conns", "2", "--family", "6", "--bytes", "80000"))
    assert all(c.startswith("[::1]:") for c in a)


def test_python_sendfile(tmp_path):
    run_pair(tmp_path, py_server("--conns", "1"), lambda p: py_client(p, "--bytes", "200000", "--sendfile"))


def test_exec_with_empty_environment_keeps_logging(tmp_path, tcpprog):
    """A Python client moves the first bytes, then execs a C program with env={} on the same
    socket: the shim stays loaded, and the stream offsets continue where Python stopped."""
    a, b, cl, _ = run_pair(
        tmp_path, py_server("--conns", "1"),
        lambda p: py_client(p, "--bytes", "120000", "--exec-after", "50000", "--exec-prog", tcpprog))
    assert [l.get("continued", False) for l in cl] == [False, True]
    (send_conn,) = [c for c, v in a.items() if v["send"]]
    assert a[send_conn] == {"send": 120000, "recv": 0}
    pids = {r.pid for r in shimlib.read_directory(tmp_path / "client")}
    assert len(pids) == 1  # exec keeps the pid; a second log file of the same pid after exec
    assert len(list((tmp_path / "client").glob("det.*.log"))) == 2

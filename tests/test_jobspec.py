"""Job file loading and validation (orchestrator.jobspec)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest

from orchestrator.jobspec import (JobFileError, JobSpec, UnitSpec, load_job_file, parse_duration,
                                  parse_job)

UNIT = '[[units]]\nname = "a"\ncommand = ["python3", "x.py"]\n'


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path: Path) -> str:
    with pytest.raises(JobFileError) as ei:
        load_job_file(path)
    msg = str(ei.value)
    assert "\n" not in msg, "errors are one line"
    assert msg.startswith(f"{path}: "), msg
    return msg


# (id, job file text, the key path the message must name, another phrase it must hold)
BAD = [
    ("unknown-top-key", 'name = "j"\nnmae = "x"\n' + UNIT, "nmae: unknown key", "did you mean"),
    ("unknown-unit-key", 'name = "j"\n' + UNIT + 'cmd = ["x"]\n', "units[0].cmd: unknown key", "known:"),
    ("two-unknown-keys", 'name = "j"\n' + UNIT + 'foo = 1\nbar = 2\n', "units[0].foo, units[0].bar",
     "unknown keys"),
    ("missing-name", UNIT, "name: missing", "required"),
    ("bad-name-chars", 'name = "my job"\n' + UNIT, "name: 'my job' is not a valid name", "letters"),
    ("dotdot-name", 'name = ".."\n' + UNIT, "name: '..'", "not a valid name"),
    ("name-not-string", 'name = 5\n' + UNIT, "name: must be a string", "got integer 5"),
    ("bad-protocol", 'name = "j"\nprotocol = "chandy"\n' + UNIT, "protocol: unknown value 'chandy'",
     '"coordinated", "independent"'),
    ("bad-restart", 'name = "j"\nrestart = "always"\n' + UNIT, "restart: unknown value 'always'",
     '"auto", "manual"'),
    ("bad-verify", 'name = "j"\nverify_images = "never"\n' + UNIT, "verify_images: unknown value 'never'",
     '"changed", "full"'),
    ("command-string", 'name = "j"\n[[units]]\nname = "a"\ncommand = "python3 x.py"\n',
     "units[0].command: must be a non-empty array of non-empty strings", "got string"),
    ("command-empty", 'name = "j"\n[[units]]\nname = "a"\ncommand = []\n',
     "units[0].command: must be a non-empty array", "got empty array"),
    ("command-empty-string", 'name = "j"\n[[units]]\nname = "a"\ncommand = ["python3", ""]\n',
     "units[0].command[1]: must be a non-empty string", "empty string"),
    ("command-int-item", 'name = "j"\n[[units]]\nname = "a"\ncommand = ["sleep", 5]\n',
     "units[0].command[1]: must be a non-empty string", "got integer 5"),
    ("command-missing", 'name = "j"\n[[units]]\nname = "a"\n', "units[0].command: missing", "command"),
    ("unit-name-missing", 'name = "j"\n[[units]]\ncommand = ["x"]\n', "units[0].name: missing", "required"),
    ("duplicate-unit", 'name = "j"\n' + UNIT + UNIT, "units[1].name: duplicate unit name 'a'",
     "also units[0]"),
    ("unknown-checkpointer", 'name = "j"\n' + UNIT + 'checkpointer = "dmtcp"\n',
     "units[0].checkpointer: unknown checkpointer 'dmtcp'", '"criu", "app"'),
    ("bad-duration", 'name = "j"\ncheckpoint_every = "10x"\n' + UNIT,
     "checkpoint_every: '10x' is not a duration", "1m30s"),
    ("duration-wrong-order", 'name = "j"\ncheckpoint_every = "30s1m"\n' + UNIT,
     "checkpoint_every: '30s1m' is not a duration", "500ms"),
    ("duration-zero", 'name = "j"\nstage_timeout = 0\n' + UNIT, "stage_timeout: must be a positive duration",
     "0"),
    ("duration-zero-text", 'name = "j"\nstage_timeout = "0s"\n' + UNIT,
     "stage_timeout: must be a positive duration", "0s"),
    ("duration-negative", 'name = "j"\nstage_timeout = -5\n' + UNIT,
     "stage_timeout: must be a positive duration", "-5"),
    ("duration-negative-text", 'name = "j"\nstage_timeout = "-5s"\n' + UNIT,
     "stage_timeout: '-5s' is not a duration", "30s"),
    ("duration-bool", 'name = "j"\ncheckpoint_every = true\n' + UNIT, "checkpoint_every: must be a duration",
     "got boolean"),
    ("max-restarts-negative", 'name = "j"\nmax_restarts = -1\n' + UNIT, "max_restarts: must be an integer >= 0",
     "got -1"),
    ("max-restarts-string", 'name = "j"\nmax_restarts = "3"\n' + UNIT, "max_restarts: must be an integer",
     "got string '3'"),
    ("max-restarts-bool", 'name = "j"\nmax_restarts = true\n' + UNIT, "max_restarts: must be an integer",
     "got boolean"),
    ("interpose-string", 'name = "j"\n' + UNIT + 'interpose = "yes"\n', "units[0].interpose: must be a boolean",
     "got string 'yes'"),
    ("env-int", 'name = "j"\n' + UNIT + 'env = { N = 3 }\n', "units[0].env.N: must be a string", "integer 3"),
    ("env-not-table", 'name = "j"\n' + UNIT + 'env = ["A=1"]\n', "units[0].env: must be a table", "array"),
    ("callback-unknown", 'name = "j"\n' + UNIT + 'callbacks = { pre_ckpt = ["x"] }\n',
     "units[0].callbacks.pre_ckpt: unknown key", "pre_checkpoint"),
    ("callback-empty", 'name = "j"\n' + UNIT + 'callbacks = { restart = [] }\n',
     "units[0].callbacks.restart: must be a non-empty array", "empty array"),
    ("callback-string", 'name = "j"\n' + UNIT + 'callbacks = { post_checkpoint = "./x.sh" }\n',
     "units[0].callbacks.post_checkpoint: must be a non-empty array", "got string"),
    ("units-missing", 'name = "j"\n', "units: missing", "[[units]]"),
    ("units-empty", 'name = "j"\nunits = []\n', "units: must be a non-empty array", "empty array"),
    ("units-not-tables", 'name = "j"\nunits = ["a"]\n', "units[0]: must be a table", "string"),
    ("unit-every-coordinated", 'name = "j"\n' + UNIT + 'checkpoint_every = "10s"\n',
     "units[0].checkpoint_every: only allowed when protocol", "independent"),
    ("interpose-false-independent", 'name = "j"\nprotocol = "independent"\n' + UNIT + 'interpose = false\n',
     "units[0].interpose: must be true", "independent"),
    ("jitter-over-100", 'name = "j"\nprotocol = "independent"\n' + UNIT + 'checkpoint_jitter = "150%"\n',
     "units[0].checkpoint_jitter: a jitter fraction must be in", "150%"),
    ("jitter-garbage", 'name = "j"\nprotocol = "independent"\n' + UNIT + 'checkpoint_jitter = "lots"\n',
     "units[0].checkpoint_jitter: 'lots' is not a duration", "10%"),
    ("node-with-dot", 'name = "j"\n' + UNIT + 'node = "n1.example"\n', "units[0].node: 'n1.example'",
     "not a valid node name"),
    ("site-int", 'name = "j"\n' + UNIT + 'site = 1\n', "units[0].site: must be a string", "integer 1"),
    ("cwd-empty", 'name = "j"\n' + UNIT + 'cwd = ""\n', "units[0].cwd: must be a non-empty string", "string"),
    ("second-unit-bad", 'name = "j"\n' + UNIT + '[[units]]\nname = "b"\ncommand = ["x"]\ncheckpointer = 7\n',
     "units[1].checkpointer: must be one of", "got integer 7"),
]


@pytest.mark.parametrize("text,key,phrase", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_job_file_names_the_key(tmp_path: Path, text: str, key: str, phrase: str) -> None:
    msg = error_of(write(tmp_path, text))
    assert key in msg
    assert phrase in msg


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, 'name = "j"\nprotocol = \n' + UNIT))
    assert "invalid TOML" in msg and "line 2" in msg


def test_duplicate_toml_key_is_invalid_toml(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, 'name = "j"\nname = "k"\n' + UNIT))
    assert "invalid TOML" in msg and "line 2" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.toml")
    assert "no such job file" in msg


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert "is a directory" in error_of(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "job.toml"
    p.write_bytes(b'name = "\xff"\n')
    assert "not UTF-8" in error_of(p)


def test_relative_path_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, 'name = "j"\n' + UNIT + 'checkpointer = "x"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobFileError, match=r"^job\.toml: units\[0\]\.checkpointer: "):
        load_job_file("job.toml")


DESIGN_EXAMPLE = '''
name = "ring"
protocol = "coordinated"        # or "independent"
checkpoint_every = "30s"        # optional periodic checkpoints
restart = "auto"                # or "manual"
max_restarts = 3

[[units]]
name = "a"
command = ["python3", "examples/ring.py", "--listen", "7001", "--next", "127.0.0.1:7002"]
checkpointer = "criu"           # or "app"
node = "n1"                     # optional placement
interpose = true                # load the shim; implied by protocol = "independent"
env = { RING_ID = "a" }
callbacks = { pre_checkpoint = ["./flush.sh"] }   # also post_checkpoint, restart

[[units]]
name = "b"
command = ["python3", "examples/ring.py", "--listen", "7002", "--next", "127.0.0.1:7001"]
checkpointer = "app"
site = "site-1"
cwd = "work/b"
callbacks = { post_checkpoint = ["./done.sh", "--quiet"], restart = ["./restart.sh"] }
'''


def test_design_example(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)
    job = load_job_file(path)
    assert job.name == "ring" and job.protocol == "coordinated" and job.restart == "auto"
    assert job.checkpoint_every == 30.0 and job.max_restarts == 3 and job.stage_timeout == 30.0
    assert job.base_dir == str(tmp_path.resolve()) and job.source == str(path)
    a, b = job.units
    assert a.command[1] == "examples/ring.py", "command paths stay as written"
    assert a.checkpointer == "criu" and a.node == "n1" and a.site is None and a.interpose is True
    assert a.env == {"RING_ID": "a"} and a.callbacks == {"pre_checkpoint": ["./flush.sh"]}
    assert a.cwd is None and a.workdir() == job.base_dir
    assert b.checkpointer == "app" and b.site == "site-1" and b.interpose is False
    assert b.cwd == str(tmp_path.resolve() / "work" / "b") and b.workdir() == b.cwd
    assert b.callbacks["post_checkpoint"] == ["./done.sh", "--quiet"]
    assert job.unit("b") is b and job.unit_names == ["a", "b"]
    with pytest.raises(KeyError):
        job.unit("zz")


def test_defaults(tmp_path: Path) -> None:
    job = load_job_file(write(tmp_path, 'name = "j-1.x_y"\n' + UNIT))
    assert (job.protocol, job.restart, job.max_restarts, job.stage_timeout, job.checkpoint_every,
            job.verify_images) == ("coordinated", "manual", 3, 30.0, None, "changed")
    u = job.units[0]
    assert (u.checkpointer, u.node, u.site, u.interpose, u.env, u.cwd, u.callbacks) == (
        "criu", None, None, False, {}, None, {})
    assert u.jitter_seconds(100) == 0.0


def test_independent_job(tmp_path: Path) -> None:
    text = ('name = "ind"\nprotocol = "independent"\ncheckpoint_every = "1m"\nmax_restarts = 0\n'
            + UNIT + 'checkpoint_every = "1m30s"\ncheckpoint_jitter = "10%"\n'
            + '[[units]]\nname = "b"\ncommand = ["./b"]\ncheckpoint_jitter = "500ms"\ncwd = "/abs/dir"\n')
    job = load_job_file(write(tmp_path, text))
    a, b = job.units
    assert a.interpose and b.interpose, "independent implies the shim"
    assert a.checkpoint_every == 90.0 and a.checkpoint_jitter_fraction == 0.1 and a.checkpoint_jitter is None
    assert a.jitter_seconds(90.0) == pytest.approx(9.0)
    assert b.checkpoint_jitter == 0.5 and b.jitter_seconds(60) == 0.5
    assert job.unit_checkpoint_every(a) == 90.0 and job.unit_checkpoint_every("b") == 60.0
    assert b.cwd == "/abs/dir" and b.command == ["./b"] and job.max_restarts == 0


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("500ms", 0.5), ("2m", 120), ("1h", 3600), ("1m30s", 90), ("1h2m3s4ms", 3723.004),
    ("1.5s", 1.5), (" 10s ", 10), (7, 7), (0.25, 0.25)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10", "10 s", "1s1s", "1ms1s", "1d", "abc", "0ms", "-1s", "1e3s"])
def test_bad_durations_name_the_key(text: str) -> None:
    with pytest.raises(ValueError, match="^some.key: "):
        parse_duration(text, "some.key")


def test_round_trip(tmp_path: Path) -> None:
    for text in (DESIGN_EXAMPLE,
                 'name = "ind"\nprotocol = "independent"\n' + UNIT + 'checkpoint_jitter = "10%"\n'
                 'checkpoint_every = "5s"\n'):
        job = load_job_file(write(tmp_path, text))
        d = job.to_dict()
        # plain data: survives JSON (job.json) and msgpack (the bus) unchanged
        assert json.loads(json.dumps(d)) == d
        assert msgpack.unpackb(msgpack.packb(d), raw=False) == d
        again = JobSpec.from_dict(json.loads(json.dumps(d)))
        assert again == job
        assert again.to_dict() == d
        for u in job.units:
            assert UnitSpec.from_dict(msgpack.unpackb(msgpack.packb(u.to_dict()), raw=False)) == u


def test_to_dict_is_a_copy(tmp_path: Path) -> None:
    job = load_job_file(write(tmp_path, DESIGN_EXAMPLE))
    d = job.to_dict()
    d["units"][0]["command"].append("--evil")
    d["units"][0]["env"]["X"] = "1"
    assert "--evil" not in job.units[0].command and "X" not in job.units[0].env


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d.pop("name"), "name: missing"),
    (lambda d: d.update(units="x"), "units: must be list"),
    (lambda d: d["units"][0].update(command=[]), "command"),
    (lambda d: d["units"][0].update(env={"A": 1}), "env"),
    (lambda d: d.update(max_restarts="3"), "max_restarts"),
    (lambda d: d.update(stage_timeout=True), "stage_timeout"),
    (lambda d: d.update(stage_timeout=0), r"stage_timeout: must be a positive duration"),
    (lambda d: d.update(name="../x"), r"name: '\.\./x' is not a valid name"),
    (lambda d: d.update(protocol="nope"), r"protocol: unknown value"),
    (lambda d: d.update(verify_images="sometimes"), r"verify_images: unknown value"),
    (lambda d: d.update(max_restarts=-2), r"max_restarts: must be an integer >= 0"),
    (lambda d: d["units"][1].update(name="a"), r"units\[1\]\.name: duplicate unit name 'a'"),
    (lambda d: d["units"][0].update(checkpointer="dmtcp"), r"units\[0\]\.checkpointer: unknown checkpointer"),
    (lambda d: d["units"][0].update(node="a.b"), r"units\[0\]\.node: 'a\.b'"),
    (lambda d: d["units"][0].update(callbacks={"oops": ["x"]}), r"units\[0\]\.callbacks\.oops: unknown key"),
    (lambda d: d.update(units=[]), r"units: must be a non-empty"),
])
def test_from_dict_rejects_malformed(tmp_path: Path, mutate, where: str) -> None:
    d = load_job_file(write(tmp_path, DESIGN_EXAMPLE)).to_dict()
    mutate(d)
    with pytest.raises(JobFileError, match=where):
        JobSpec.from_dict(d)


def test_from_dict_ignores_newer_keys(tmp_path: Path) -> None:
    job = load_job_file(write(tmp_path, DESIGN_EXAMPLE))
    d = job.to_dict()
    d["future"] = 1
    d["units"][0]["future"] = 2
    assert JobSpec.from_dict(d) == job


def test_parse_job_from_dict_uses_source_in_messages(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match=r"^<inline>: units\[0\]\.command: "):
        parse_job({"name": "j", "units": [{"name": "a", "command": "x"}]}, "<inline>", base_dir=tmp_path)
    job = parse_job({"name": "j", "units": [{"name": "a", "command": ["x"], "cwd": "w"}]}, "<inline>",
                    base_dir=tmp_path)
    assert job.base_dir == str(tmp_path.resolve())
    assert job.units[0].cwd == os.path.join(str(tmp_path.resolve()), "w")

"""The command line means the same whether kmodguard builds every command's parser or, to start
faster, only those of the commands named: the same options, values and usage errors."""

from __future__ import annotations

import argparse

import pytest

from kmodguard import cli
from kmodguard.errors import InvalidInput

PARSED = [
    ["status", "--json"],
    ["--json", "status", "--kver", "6.1.0-1"],
    ["--kver", "6.1.0-1", "--index-dir", "/x", "status", "--all"],
    ["-vv", "explain", "-", "pci:v00008086d*"],
    ["explain", "status", "fix"],  # modaliases that look like command names
    ["--kver", "status", "explain", "pci:v1"],  # a kernel named like a command
    ["--kv", "status", "explain", "pci:v1"],  # an abbreviated option
    ["fix", "--dry-run", "0000:00:05.0", "--backend", "dnf"],
    ["index", "build", "--from-dir", "/p", "--package", "kernel-modules", "--version", "1", "--request", "r"],
    ["index", "list", "--json"],
    ["config", "check"],
    ["check", "--json"],
    ["daemon", "--no-bus", "--json"],
    ["footprint"],
    ["--json"],
    [],
]

REFUSED = [
    ["bogus"],
    ["status", "bogus"],
    ["--kv", "status", "bogus"],
    ["status", "--version"],
    ["explain"],
    ["fix", "--backend", "yum"],
    ["index"],
    ["config", "nothing"],
    ["--kver"],
]


def _whole(argv):
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", PARSED, ids=" ".join)
def test_the_same_arguments_as_the_whole_parser(argv):
    assert vars(cli.parse_args(argv)) == vars(_whole(argv))


@pytest.mark.parametrize("argv", REFUSED, ids=" ".join)
def test_the_same_usage_error_as_the_whole_parser(argv):
    with pytest.raises(InvalidInput) as whole:
        _whole(argv)
    with pytest.raises(InvalidInput) as fast:
        cli.parse_args(argv)
    assert fast.value.message == whole.value.message and fast.value.hint == whole.value.hint
    if argv[:1] == ["bogus"]:
        assert all(repr(c) in fast.value.message for c in cli.COMMANDS)  # every command named


def test_every_command_of_the_parser_is_known_to_the_fast_path():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(sub.choices) == cli.COMMANDS


@pytest.mark.parametrize("argv", [["status", "--help"], ["explain", "-h"], ["index", "build", "--help"]])
def test_a_command_s_help_is_the_same(argv, capsys):
    texts = []
    for parse in (cli.parse_args, _whole):
        with pytest.raises(SystemExit):
            parse(argv)
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and "exit status" in texts[0]


def test_a_command_runs_again_in_the_same_process(indexed, world, monkeypatch, capsys):
    """The command `status` lives in the family module `status`: once that module was imported,
    a lookup by attribute found the module, and a second `explain` or `status` in one process
    (a test, an embedding tool) ended as an internal error."""
    import json

    for key, value in indexed.env.items():
        if key.startswith("KMODGUARD_"):
            monkeypatch.setenv(key, value)
    from synthetic import ALIAS

    for argv in (["explain", "--json", "--kver", world.kver, ALIAS["gpu"]],) * 2 + (["status", "--json"],) * 2:
        code = cli.main(argv)
        out = capsys.readouterr()
        assert code in (0, 3), out.err
        assert "internal error" not in out.err and json.loads(out.out)

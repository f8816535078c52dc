"""The one description of every config key (fedcodec.config) and the sources that use it: command-line
flags and --help, --set, TOML files, Flower's run config and the Flower app's declared keys."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from fedcodec.cli import _configs, build_parser, main
from fedcodec.config import (CONFIG_KEYS, MAX_CONFIG_BYTES, PRESETS, Config, build_config, coerce, describe,
                             parse_assignments)
from fedcodec.errors import ConfigError
from fedcodec.flower.common import RUN_CONFIG_KEYS, FlowerSettings, parse_run_config

APP_PYPROJECT = Path(__file__).resolve().parents[1] / "flower_app" / "pyproject.toml"


def app_run_config() -> dict:
    return tomllib.loads(APP_PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    return str(info.value)


# --------------------------------------------------------------------------- the description


def test_flower_app_declares_exactly_the_run_config_keys():
    """flwr only accepts overrides of declared keys: the app must declare every key the apps parse,
    and nothing else (a declared key the apps do not know would fail every run)."""
    declared = app_run_config()
    assert set(declared) == set(RUN_CONFIG_KEYS)
    assert set(RUN_CONFIG_KEYS) == ({k.replace("_", "-") for k in CONFIG_KEYS}
                                    | {"corrupt-partition", "round-timeout", "straggler-timeout", "node-wait",
                                       "resume", "neural"})
    for name, value in declared.items():  # each declared default is a valid value of its key
        coerce(name, value, keys=RUN_CONFIG_KEYS, what="run-config key")
    cfg, settings = parse_run_config(declared)
    assert (cfg.method, cfg.rounds, cfg.local_epochs, cfg.lr, cfg.max_update_norm) == ("fedmrn-binary", 10, 1, None,
                                                                                       None)
    assert settings == FlowerSettings(-1, None, None, 120.0, False)


def test_choices_match_the_registries():
    from fedcodec.data import DATASETS
    from fedcodec.models import MODELS

    assert CONFIG_KEYS["dataset"].choices == DATASETS
    assert set(CONFIG_KEYS["model"].choices) == set(MODELS)


def test_every_config_key_is_described_and_documented():
    assert list(CONFIG_KEYS) == [f.name for f in Config.__dataclass_fields__.values()]
    assert all(key.help for key in CONFIG_KEYS.values())
    assert CONFIG_KEYS["lr"].optional and CONFIG_KEYS["lr"].kind is float and CONFIG_KEYS["lr"].above == 0
    assert (CONFIG_KEYS["rounds"].kind, CONFIG_KEYS["rounds"].default, CONFIG_KEYS["rounds"].at_least) == (int, 30, 1)
    assert CONFIG_KEYS["codec_options"].kind is dict and CONFIG_KEYS["codec_options"].default == {}


def test_a_plain_field_needs_no_parsing_code():
    """A field added without setting() (type and default only) is parsed and checked like the others."""

    @dataclass
    class Extra:
        server_lr: float = 1.0
        server_optimizer: Literal["sgd", "adam"] = "sgd"
        server_tau: float | None = None
        server_steps: int = 1
        server_nesterov: bool = False

    keys = describe(Extra)
    assert coerce("server_lr", "0.5", keys=keys) == ("server_lr", 0.5)
    assert coerce("server_lr", 2, text=False, keys=keys) == ("server_lr", 2.0)
    assert coerce("server_tau", "none", keys=keys) == ("server_tau", None)
    assert coerce("server_nesterov", "on", keys=keys) == ("server_nesterov", True)
    assert error(coerce, "server_optimizer", "adamw", keys=keys) == (
        "server_optimizer expects one of sgd, adam, got 'adamw'; did you mean 'adam'?")
    assert error(coerce, "server_steps", 1.5, text=False, keys=keys) == "server_steps expects an integer, got 1.5"
    assert error(coerce, "server_lrr", "1", keys=keys) == "unknown config key 'server_lrr'; did you mean 'server_lr'?"

    @dataclass
    class Bad:
        pair: tuple = (1, 2)

    with pytest.raises(TypeError, match="pair"):
        describe(Bad)


# --------------------------------------------------------------------------- coerce: values and errors


def test_strings_are_parsed_to_the_field_type():
    assert coerce("rounds", " 7 ") == ("rounds", 7)
    assert coerce("beta", "0.5") == ("beta", 0.5)
    assert coerce("downlink_delta", "yes") == ("downlink_delta", True)
    assert coerce("allow_subset", "0") == ("allow_subset", False)
    assert coerce("data_dir", "/data") == ("data_dir", "/data")
    assert coerce("codec_options", "noise=gaussian pm=false levels=4") == (
        "codec_options", {"noise": "gaussian", "pm": False, "levels": 4})
    assert coerce("codec_options", "") == ("codec_options", {})
    for unset in ("none", "None", "null", ""):  # optional keys only
        assert coerce("lr", unset) == ("lr", None)
        assert coerce("threads", unset) == ("threads", None)


def test_native_values_are_type_checked():
    assert coerce("lr", 1, text=False) == ("lr", 1.0)  # an int for a float is fine
    assert coerce("rounds", 3, text=False) == ("rounds", 3)
    assert coerce("codec_options", {"noise": "gaussian", "ef": True}, text=False) == (
        "codec_options", {"noise": "gaussian", "ef": True})
    assert coerce("lr", "", text=False) == ("lr", None)  # Flower's and TOML's way to say unset
    assert coerce("codec_options", "noise=gaussian", text=False) == ("codec_options", {"noise": "gaussian"})
    cases = [
        ("rounds", 2.5, "rounds expects an integer >= 1, got 2.5"),
        ("rounds", True, "rounds expects an integer >= 1, got true"),
        ("seed", {"a": 1}, "seed expects an integer, got a table"),
        ("beta", [0.1], "beta expects a number > 0, got an array"),
        ("allow_subset", 1, "allow_subset expects true or false, got 1"),
        ("partition", 3, "partition expects one of iid, dirichlet, k-classes, got 3"),
        ("rounds", "3", "rounds expects an integer >= 1, got '3' (a string; in TOML write numbers and booleans "
                        "without quotes)"),
        ("lr", float("inf"), "lr expects a number > 0 or none, got inf"),
        ("codec_options", {"noise": {"deep": 1}}, "codec_options.noise expects a string, number or boolean, "
                                                  "got a table"),
    ]
    for name, value, message in cases:
        assert error(coerce, name, value, text=False) == message


def test_error_messages_name_key_value_and_expectation():
    cases = {
        ("local_epoch", "3"): "unknown config key 'local_epoch'; did you mean 'local_epochs'?",
        ("local-epochs", "3"): "unknown config key 'local-epochs'; did you mean 'local_epochs'?",
        ("rounds", "x"): "rounds expects an integer >= 1, got 'x'",
        ("rounds", "2.5"): "rounds expects an integer >= 1, got '2.5'",
        ("rounds", "0"): "rounds expects an integer >= 1, got 0",
        ("batch_size", "1"): "batch_size expects an integer >= 2, got 1",
        ("lr", "0"): "lr expects a number > 0 or none, got 0.0",
        ("lr", "fast"): "lr expects a number > 0 or none, got 'fast'",
        ("dropout", "1"): "dropout expects a number >= 0 and < 1, got 1.0",
        ("rounds", ""): "rounds expects an integer >= 1, got ''",  # "" unsets optional keys only
        ("downlink_delta", "maybe"): "downlink_delta expects true or false, got 'maybe'",
        ("partition", "dirichelt"): "partition expects one of iid, dirichlet, k-classes, got 'dirichelt'; "
                                    "did you mean 'dirichlet'?",
        ("codec_options", "noise"): "codec_options expects space-separated NAME=VALUE codec options (e.g. "
                                    "\"noise=gaussian pm=false\"), got 'noise'",
    }
    for (name, value), message in cases.items():
        assert error(coerce, name, value) == message
    unknown = error(coerce, "colour", "blue")
    assert unknown.startswith("unknown config key 'colour'; known keys: aggregator, allow_subset, batch_clients, "
                              "batch_size, beta, ")
    long = error(coerce, "x" * 5000, "1")  # a huge name is shortened, not echoed whole
    assert long.startswith("unknown config key 'xxxx") and "(5000 characters)" in long and len(long) < 1000


# --------------------------------------------------------------------------- sources


def test_set_assignments():
    overrides, codec = parse_assignments(["rounds=4", "lr=none", "codec.noise=gaussian", "codec.pm=false",
                                          "downlink.levels=255", "downlink=qsgd", "partition = dirichlet"])
    assert overrides == {"rounds": 4, "lr": None, "downlink_options": {"levels": 255}, "downlink": "qsgd",
                         "partition": "dirichlet"}
    assert codec == {"noise": "gaussian", "pm": False}
    assert error(parse_assignments, ["rounds"]) == "--set expects key=value, got 'rounds'"
    assert error(parse_assignments, ["local_epoch=2"]) == (
        "unknown config key 'local_epoch'; did you mean 'local_epochs'?")
    assert error(parse_assignments, ["codec.noise=[1, [2]]"]) == (
        "codec.noise expects a string, number or boolean, got an array")
    assert error(parse_assignments, ["downlink.levels={a = 1}"]) == (
        "downlink.levels expects a string, number or boolean, got a table")


def test_toml_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nlr = 1\nmax_update_norm = ""\ndownlink_delta = true\ndownlink = "qsgd"\n'
                 'method = "fedmrn-binary"\n'
                 '[codec_options]\nnoise = "gaussian"\n[downlink_options]\nlevels = 255\n')
    cfg = build_config("quick", f, {"seed": "3", "codec_options": {"pm": False}})
    assert (cfg.rounds, cfg.lr, cfg.max_update_norm, cfg.seed, cfg.local_epochs) == (7, 1.0, None, 3, 1)
    assert cfg.codec_options == {"noise": "gaussian", "pm": False}  # overrides merge into the file's options
    assert cfg.downlink_options == {"levels": 255}
    bad = {
        "rounds = 2.5": "rounds expects an integer >= 1, got 2.5",
        'rounds = "x"': "rounds expects an integer >= 1, got 'x' (a string; in TOML write numbers and booleans "
                        "without quotes)",
        "local_epoch = 3": "unknown config key 'local_epoch'; did you mean 'local_epochs'?",
        "[rounds]\nx = 1": "rounds expects an integer >= 1, got a table",
        "partition = [\"iid\"]": "partition expects one of iid, dirichlet, k-classes, got an array",
        "[codec_options.noise]\nkind = 1": "codec_options.noise expects a string, number or boolean, got a table",
        "[" + ".".join(["codec_options"] + ["a"] * 20000) + "]": "codec_options.a expects a string, number or "
                                                                  "boolean, got a table",
    }
    for text, message in bad.items():
        f.write_text(text)
        assert error(build_config, None, f) == f"config file {f}: {message}"


def test_toml_files_that_cannot_be_read(tmp_path):
    f = tmp_path / "c.toml"
    cases = {
        "a = " + "[" * 50_000 + "]" * 50_000: "nests arrays or tables too deeply",
        "codec_options = " + "{a = " * 5000 + "1" + "}" * 5000: "nests arrays or tables too deeply",
        "rounds = = 3": "is not valid TOML: Invalid value (at line 1, column 10)",
    }
    for text, message in cases.items():
        f.write_text(text)
        assert error(build_config, None, f) == f"config file {f} {message}"
    f.write_text("#" * MAX_CONFIG_BYTES + "\nrounds = 3\n")
    assert error(build_config, None, f) == (
        f"config file {f} is larger than 1048576 bytes; a config file holds a few keys")
    f.write_bytes(b"rounds = 3 # \xff\n")
    assert error(build_config, None, f) == f"config file {f} is not UTF-8 text"
    assert error(build_config, None, tmp_path / "nope.toml") == f"config file {tmp_path / 'nope.toml'} does not exist"
    assert error(build_config, None, tmp_path) == f"config file {tmp_path} is a directory, not a file"


def test_flower_run_config():
    base = app_run_config()
    cfg, settings = parse_run_config({**base, "rounds": "4", "lr": 0.05, "codec-options": "noise=gaussian",
                                      "codec.pm": False, "round-timeout": 30, "resume": "true", "threads": ""})
    assert (cfg.rounds, cfg.lr, cfg.threads) == (4, 0.05, None)
    assert cfg.codec_options == {"noise": "gaussian", "pm": False}
    assert (settings.round_timeout, settings.straggler_timeout, settings.resume) == (30.0, None, True)
    bad = {
        "local-epoch": (2, "unknown run-config key 'local-epoch'; did you mean 'local-epochs'?"),
        "num_clients": (3, "unknown run-config key 'num_clients'; did you mean 'num-clients'?"),
        "rounds": (2.5, "rounds expects an integer >= 1, got 2.5"),
        "local-epochs": (True, "local-epochs expects an integer >= 1, got true"),
        "lr": ("fast", "lr expects a number > 0 or none, got 'fast'"),
        "resume": ("maybe", "resume expects true or false, got 'maybe'"),
        "round-timeout": (-1.0, "round-timeout expects a number >= 0 or none, got -1.0"),
        "node-wait": ("", "node-wait expects a number >= 0, got ''"),
        "codec.noise": ([1], "codec.noise expects a string, number or boolean, got an array"),
    }
    for name, (value, message) in bad.items():
        assert error(parse_run_config, {**base, name: value}) == message


# --------------------------------------------------------------------------- command line


def test_todays_flags_set_their_keys():
    flags = ["--rounds", "3", "--seed", "5", "--partition", "dirichlet", "--beta", "0.5", "--clients", "20",
             "--per-round", "4", "--local-epochs", "2", "--batch-size", "16", "--lr", "0.01", "--dataset",
             "synthetic", "--model", "cnn8", "--data-dir", "/d", "--out", "/o", "--threads", "2"]
    args = build_parser().parse_args(["run", "--method", "fedavg", *flags, "--set", "rounds=9",
                                      "--set", "min_clients=2"])
    (cfg,), root = _configs(args)
    assert (cfg.rounds, cfg.seed, cfg.partition, cfg.beta, cfg.num_clients, cfg.clients_per_round, cfg.local_epochs,
            cfg.batch_size, cfg.lr, cfg.dataset, cfg.model, cfg.data_dir, cfg.out_dir, cfg.threads,
            cfg.min_clients) == (
        3, 5, "dirichlet", 0.5, 20, 4, 2, 16, 0.01, "synthetic", "cnn8", "/d", "/o", 2, 2)  # flags beat --set
    assert root == Path("/o/synthetic-dirichlet-quick-s5")
    args = build_parser().parse_args(["compare", "--method", "fedavg", "--set", "rounds=9"])
    (cfg,), _ = _configs(args)
    assert (cfg.rounds, cfg.local_epochs, cfg.lr) == (9, 1, None)  # unset flags leave the preset's values


def test_flag_errors(capsys):
    for argv, message in [(["--rounds", "x"], "argument --rounds: rounds expects an integer >= 1, got 'x'"),
                          (["--per-round", "0"], "argument --per-round: clients_per_round expects an integer >= 1, "
                                                 "got 0"),
                          (["--partition", "dirichelt"], "argument --partition: partition expects one of iid, "
                                                         "dirichlet, k-classes, got 'dirichelt'; did you mean "
                                                         "'dirichlet'?")]:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(["run", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert main(["run", "--set", "local_epoch=2"]) == 2
    assert "fedcodec: error: unknown config key 'local_epoch'; did you mean 'local_epochs'?" in capsys.readouterr().err


def test_help_comes_from_the_key_description(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for key in CONFIG_KEYS.values():
        assert f"  {key.name} = {key.show_default()}: {key.expected()}\n" in text
    assert "--per-round PER_ROUND" in text and "--partition {iid,dirichlet,k-classes}" in text
    assert "local minibatch size (>= 2: BatchNorm needs two" in text


def test_flower_command_checks_set_before_starting(capsys):
    pytest.importorskip("flwr")
    assert main(["flower", "simulate", "--set", "local-epoch=2"]) == 2
    assert "unknown run-config key 'local-epoch'; did you mean 'local-epochs'?" in capsys.readouterr().err
    assert main(["flower", "simulate", "--set", "rounds=2.5"]) == 2
    assert "rounds expects an integer >= 1, got 2.5" in capsys.readouterr().err


def test_the_quick_preset_is_what_the_readme_says():
    """README command 1 is ``fedcodec run``: the quick preset and ``run``'s default methods. The
    paragraph under the quick start states both; they must be the code's."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quick = " ".join(readme[readme.index("## Quick start"):readme.index("## Using it")].split())  # one line
    stated = re.search(r"`--preset quick`: (\d+) rounds, (\d+) of (\d+) clients per round, (\d+) local epochs?, "
                       r"evaluated every (\d+) rounds and after the last", quick)
    assert stated, "the README's quick-start paragraph no longer states the quick preset"
    cfg = build_config("quick")
    assert PRESETS["quick"] == {"rounds": 16, "local_epochs": 1, "num_clients": 100, "clients_per_round": 5,
                                "eval_every": 8}
    assert tuple(map(int, stated.groups())) == (cfg.rounds, cfg.clients_per_round, cfg.num_clients, cfg.local_epochs,
                                                cfg.eval_every) == (16, 5, 100, 1, 8)
    assert (cfg.dataset, cfg.partition, cfg.device) == ("fashion-mnist", "iid", "cpu")
    args = build_parser().parse_args(["run"])
    assert args.preset == "quick"
    assert args.method.split(",") == ["fedavg", "fedmrn-binary-ec"]
    assert "FedAvg (`fedavg`)" in quick and "(`fedmrn-binary-ec`)" in quick

"""Flags mean what they say: explicit flags beat preset values, ``--set`` keys exist and values
are typed (booleans strictly), runners refuse flags they do not read, a missing data root is an
error, and the data file actually read is recorded (path and sha256).

Each test reproduces a fault found against ``dsbp bench`` (named in the docstring)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dsbp.cli import _grid_from_args, build_parser, main


def _grid(*flags: str):
    argv = ["bench", *flags]
    return _grid_from_args(build_parser(argv).parse_args(argv))[0]


def _refused(capsys, *argv: str) -> str:
    """The error of a refused command (a bench that is not refused would write into a fresh
    temporary folder, never into the working directory)."""
    import tempfile

    args = list(argv)
    if args[0] == "bench" and "--out" not in args:
        args += ["--out", str(Path(tempfile.mkdtemp()) / "out")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_explicit_lr_beats_the_presets_per_method_value():
    """Was: `--preset smoke --methods adamw --lr 0.5` ran at the preset's lr 0.002."""
    (run,) = _grid("--preset", "smoke", "--methods", "adamw", "--lr", "0.5")
    assert run.cfg.lr == 0.5
    assert run.cfg.weight_decay == 5e-2  # the preset's other AdamW value still applies
    (run,) = _grid("--preset", "smoke", "--methods", "adamw")
    assert run.cfg.lr == 2e-3


def test_set_beats_the_preset_and_is_validated(capsys):
    """Was: `--set rho=-1` on SAM was replaced by the preset's rho = 0.05."""
    (run,) = _grid("--preset", "smoke", "--methods", "sam", "--set", "rho=0.2")
    assert run.cfg.method_kwargs["rho"] == 0.2
    err = _refused(capsys, "bench", "--preset", "smoke", "--methods", "sam", "--set", "rho=-1")
    assert "rho" in err and ">= 0" in err and "-1" in err


def test_set_refuses_unknown_keys_with_a_suggestion(capsys):
    """Was: `--set rnak=2` ran with the default rank."""
    err = _refused(capsys, "bench", "--methods", "dsbp", "--set", "rnak=2")
    assert "unknown setting 'rnak'" in err and "did you mean rank" in err


def test_set_refuses_a_setting_no_method_of_the_grid_reads(capsys):
    err = _refused(capsys, "bench", "--methods", "sgd", "--set", "rho=0.1")
    assert "rho" in err and "sam" in err


@pytest.mark.parametrize("key,flag", [("seed", "--seeds"), ("dataset", "--datasets"),
                                      ("method", "--methods")])
def test_set_refuses_grid_axis_keys(capsys, key, flag):
    """Was: `--set seed=3` (dataset, method) was accepted, then ignored."""
    err = _refused(capsys, "bench", "--methods", "sgd", "--set", f"{key}=3")
    assert "axis of the grid" in err and flag in err
    err = _refused(capsys, "bench", "--methods", "sgd", "--ablate", f"{key}=1,2")
    assert "axis of the grid" in err


@pytest.mark.parametrize("text,value", [("no", False), ("false", False), ("0", False),
                                        ("No", False), ("yes", True), ("true", True),
                                        ("1", True)])
def test_booleans_are_parsed_strictly(text, value):
    """Was: `nesterov=no` turned Nesterov momentum on."""
    (run,) = _grid("--methods", "sgd", "--set", f"nesterov={text}")
    assert run.cfg.nesterov is value
    (run,) = _grid("--methods", "sam", "--set", f"adaptive={text}")
    assert run.cfg.method_kwargs["adaptive"] is value


@pytest.mark.parametrize("text", ["off", "maybe", "2", ""])
def test_a_word_that_is_not_a_boolean_is_refused(capsys, text):
    """Was: `augment=off` turned augmentation on."""
    err = _refused(capsys, "bench", "--methods", "sgd", "--set", f"augment={text}")
    assert "augment must be a boolean" in err


def test_a_non_number_is_a_clean_error(capsys):
    """Was: `--set lr=abc` ended in a TypeError traceback."""
    err = _refused(capsys, "bench", "--methods", "sgd", "--set", "lr=abc")
    assert "lr must be a number" in err and "Traceback" not in err
    err = _refused(capsys, "bench", "--methods", "dsbp", "--set", "rank=2.5")
    assert "rank must be an integer" in err


def test_trackers_are_listed_as_words(capsys):
    """Was: `--set track=hessian` listed unknown trackers one letter at a time."""
    (run,) = _grid("--methods", "sgd", "--set", "track=hessian,spectrum")
    assert run.cfg.track == ("hessian", "spectrum")
    err = _refused(capsys, "bench", "--methods", "sgd", "--set", "track=hesian")
    assert "unknown tracker(s) hesian;" in err and "'h'" not in err
    err = _refused(capsys, "bench", "--methods", "sgd", "--track", "hesian,spectrum")
    assert "unknown tracker(s) hesian;" in err


def test_config_rejects_wrong_types_directly():
    """RunConfig itself refuses a string for a boolean or a number."""
    from dsbp.experiments.config import RunConfig

    with pytest.raises(ValueError, match="nesterov must be true or false"):
        RunConfig(nesterov="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be a number"):
        RunConfig(lr="abc")  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", [["--epochs", "3"], ["--subset", "100"], ["--lr", "0.1"],
                                  ["--model", "mlp"], ["--set", "rank=2"],
                                  ["--ablate", "rank=2,3"], ["--batch-size", "16"],
                                  ["--preset", "smoke"]])
def test_fewshot_runner_refuses_flags_it_does_not_read(capsys, tmp_path, flag):
    """Was: `dsbp bench --methods maml,spectral_maml` dropped these flags without a word."""
    err = _refused(capsys, "bench", "--methods", "maml", *flag, "--out", str(tmp_path / "o"))
    assert flag[0] in err and "not used by the few-shot methods" in err
    assert not (tmp_path / "o").exists()


def test_fewshot_runner_honours_seeds_zero(capsys, tmp_path):
    """Was: `--seeds 0` was treated as the default (one seed)."""
    err = _refused(capsys, "bench", "--methods", "maml", "--seeds", "0",
                   "--out", str(tmp_path / "o"))
    assert "--seeds must be >= 1, got 0" in err


def test_a_missing_data_root_is_an_error(capsys, tmp_path):
    """Was: a nonexistent --data-root silently fell back to $DSBP_DATA."""
    missing = tmp_path / "no_such_folder"
    err = _refused(capsys, "bench", "--methods", "sgd", "--data-root", str(missing),
                   "--out", str(tmp_path / "o"))
    assert str(missing) in err and "not a folder" in err
    assert not (tmp_path / "o").exists()
    err = _refused(capsys, "fewshot", "--data-root", str(missing), "--out", str(tmp_path / "f"))
    assert str(missing) in err


def test_the_data_file_used_is_recorded_with_its_sha256(tmp_path):
    """Was: the data file actually used was recorded nowhere."""
    from importlib import resources

    out = tmp_path / "o"
    assert main(["bench", "--methods", "sgd", "--epochs", "1", "--subset", "64",
                 "--eval-subset", "100", "--set", 'model_kwargs={"width": 4}',
                 "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    env = json.loads((out / "runs" / "bundled-cnn-sgd-s0" / "env.json").read_text())
    (rec,) = env["data"]["files"]
    bundled = Path(str(resources.files("dsbp.data").joinpath("bundled",
                                                             "fashion_mnist_small.npz")))
    digest = hashlib.sha256(bundled.read_bytes()).hexdigest()
    assert rec["path"] == str(bundled.resolve()) and rec["sha256"] == digest
    assert rec["bytes"] == bundled.stat().st_size
    assert digest in (out / "report.md").read_text()


def test_data_files_finds_an_npz_named_in_the_source(tmp_path):
    """A data set read from a file on disk: its path (from ``source``) and checksum."""
    from types import SimpleNamespace

    from dsbp.experiments.run import data_files

    f = tmp_path / "fashion_mnist.npz"
    f.write_bytes(b"not really an npz, but bytes to hash")
    ds = SimpleNamespace(name="fashion_mnist", source=f"pixel-array npz {f}")
    (rec,) = data_files(ds)
    assert rec == {"path": str(f.resolve()), "bytes": f.stat().st_size,
                   "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}


def test_a_repeated_set_takes_the_last_value_and_a_flag_plus_set_is_refused(capsys):
    """Scripts give base settings, then one configuration's: the later --set wins. The same
    key as a flag and as --set is ambiguous (argparse keeps no order between them)."""
    (run,) = _grid("--methods", "dsbp", "--set", "rank=10", "--set", "rank=64")
    assert run.cfg.method_kwargs["rank"] == 64
    err = _refused(capsys, "bench", "--methods", "sgd", "--lr", "0.1", "--set", "lr=0.2")
    assert "lr given both as a flag and with --set" in err


def test_a_track_string_is_names_not_letters():
    from dsbp.experiments.config import RunConfig

    assert RunConfig(track="hessian,spectrum").track == ("hessian", "spectrum")  # type: ignore[arg-type]
    assert RunConfig.from_dict({"track": "hessian"}).track == ("hessian",)

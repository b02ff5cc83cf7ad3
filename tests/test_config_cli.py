"""Config checks and the command line: bad input is one clear line, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_cli

from fuselab.train.config import ConfigError, make_config


def test_defaults_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("fusion: {name: lmf, rank: 4}\ntrain: {epochs: 7}\n")
    from fuselab.train.config import read_yaml

    cfg = make_config(read_yaml(path), ["train.lr=0.01", "fusion.rank=8"])
    assert cfg.fusion.name == "lmf" and cfg.fusion.rank == 8 and cfg.train.epochs == 7 and cfg.train.lr == 0.01
    assert make_config(None, ["fusion.name=tfn"]).fusion == {"name": "tfn"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["fusion.name=concta"], "unknown fusion 'concta'; did you mean 'concat'"),
        (["model.name=mlp-stream"], "unknown model 'mlp-stream'; did you mean 'mlp-streams'"),
        (["data.name=mfet"], "unknown dataset 'mfet'; did you mean 'mfeat'?"),
        (["loss.terms=[{name: cee}]"], "unknown loss 'cee'; did you mean 'ce'?"),
        (["train.epochz=3"], "unknown config key 'train.epochz'; allowed: epochs, batch_size"),
        (["model.hiden=3"], "unknown config key 'model.hiden'; allowed: name, hidden, layers"),
        (["fusion.name=lmf", "fusion.rnak=3"], "unknown config key 'fusion.rnak'; allowed: name, out_dim, rank"),
        (["train.epochs=many"], "config key 'train.epochs'"),
        (["model.hidden=wide"], "config key 'model.hidden' must be int, got 'wide'"),
        (["trian.epochs=3"], "unknown config section 'trian'"),
        (["train.epochs"], "override 'train.epochs' must look like key=value"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        make_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


_cli = run_cli  # (exit code, stdout, stderr) of `fuselab ARGS`


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "fusion.name=concta"], "unknown fusion 'concta'; did you mean 'concat'"),
        (["run", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["run", "data.views=[pix,foo]", "train.epochs=1"], "unknown mfeat view 'foo'"),
        (["list", "things"], "cannot list 'things'"),
    ],
)
def test_cli_bad_input_exit_2_one_line(capsys, args, message):
    code, out, err = _cli(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_cli_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion: {name: concat\ntrain: [\n")
    code, _, err = _cli(capsys, "run", str(bad))
    assert code == 2 and "is not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_cli_list_fusions_shows_all_fourteen(capsys):
    code, out, _ = _cli(capsys, "list", "fusions")
    assert code == 0
    for name in ("concat", "lmf", "tfn", "late", "mfb"):
        assert name in out


def test_cli_run_trains_and_prints_metrics(tmp_path, capsys):
    code, out, _ = _cli(capsys, "run", "data.views=[fou,zer]", "model.hidden=16", "train.epochs=3",
                        "train.threads=1", "--out", str(tmp_path))
    assert code == 0 and "test accuracy" in out
    (folder,) = list(tmp_path.iterdir())
    assert (folder / "metrics.json").is_file()


def test_real_process_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fuselab.cli", "run", "fusion.name=concta"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "did you mean 'concat'" in proc.stderr and "Traceback" not in proc.stderr

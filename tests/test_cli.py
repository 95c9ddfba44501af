"""The medgen3d command line as a user runs it."""

import shutil
import subprocess
import sys

import pytest

from medgen3d.cli import main

CLI = [sys.executable, "-m", "medgen3d.cli"]


def run_cli(*args, check=True):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_help_lists_every_command():
    proc = run_cli("--help")
    out = proc.stdout + proc.stderr
    for command in ("demo", "demo-data", "import-dataset", "validate", "preview", "generate"):
        assert command in out


def test_command_help_shows_each_option_whole():
    """`demo --help` crashed (its options were one **kwargs that took --help), and python-fire
    cut option texts at a colon or merged options documented together."""
    proc = run_cli("demo", "--help")
    demo = proc.stdout + proc.stderr
    for option in ("--scale", "--weights", "--seeds", "--seg_regimes"):
        assert option in demo
    assert "about 80 min for the thorax at the demo" in demo
    proc = run_cli("generate", "--help")
    generate = proc.stdout + proc.stderr
    assert "A sampler of the other objective is refused." in generate
    assert "the dataset preset, e.g. --dataset brain" in generate


@pytest.mark.slow
def test_brain_cohort_validates_and_corrupted_copy_is_rejected(tmp_path):
    datalist = (
        run_cli("demo-data", "--dataset", "brain", "--cases", "2", "--out", str(tmp_path / "brain"))
        .stdout.strip()
        .splitlines()[-1]
    )
    assert "all 2 cases valid" in run_cli("validate", "--datalist", datalist).stdout
    png = tmp_path / "preview.png"
    run_cli("preview", "--datalist", datalist, "--out", str(png), "--cases", "2")
    assert png.read_bytes()[:4] == b"\x89PNG"

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "brain", bad)
    label = bad / "labelsTr" / "brain_001.nii.gz"
    label.write_bytes(label.read_bytes()[: label.stat().st_size // 2])  # truncated download
    before = {p: p.read_bytes() for p in bad.rglob("*.nii.gz")}
    proc = run_cli("validate", "--datalist", str(bad / "datalist.json"), check=False)
    assert proc.returncode == 1
    assert "2 of 2 cases" not in proc.stderr and "1 of 2 cases have problems" in proc.stderr
    assert "brain_001.nii.gz" in proc.stderr and "truncated" in proc.stderr
    assert before == {p: p.read_bytes() for p in bad.rglob("*.nii.gz")}  # nothing changed
    assert "brain_000" not in proc.stderr  # the intact case is not blamed


def test_unknown_dataset_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo-data", "--dataset", "liver"])
    assert err.value.code == 2
    assert "unknown demo dataset" in capsys.readouterr().err


def test_seg_study_takes_lr_and_refuses_a_bundle_key_with_a_message(tmp_path, capsys):
    missing = tmp_path / "real.json"
    with pytest.raises(SystemExit) as err:  # --lr is a study setting: no TypeError
        main(["seg-study", "--real", str(missing), "--regimes", "E2-1", "--lr", "0.01"])
    assert err.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}: the datalist has problems:")
    with pytest.raises(SystemExit) as err:
        main(["seg-study", "--real", str(missing), "--val_interval", "2"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: --val_interval: is not an option of seg-study. use ")
    assert "--overrides \"{'val_interval': VALUE}\"" in message

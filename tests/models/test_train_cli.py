"""``bonewatch train``: its options reach the trainer, and what cannot train says why."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bonewatch.worker.cli import app


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from bonewatch.worker.synth import synthesize

    root = tmp_path_factory.mktemp("cli-phantoms") / "ph"
    synthesize(root, studies=24, fmt="png", seed=5, size=64)
    return root


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args], catch_exceptions=False)


def test_imagenet_offline_fails_with_how_to_pass_a_local_file(tmp_path, phantoms, monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: [Errno -2]")

    monkeypatch.setattr(file_utils, "get_file", offline)
    result = _train(
        str(phantoms),
        "--out",
        str(tmp_path / "b"),
        "--backbone",
        "mobilenetv3small",
        "--weights",
        "imagenet",
        "--input-size",
        "32",
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "could not get the ImageNet weights for mobilenetv3small" in text
    assert "--weights mobilenetv3small-notop.weights.h5" in text
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / ".b.partial").exists()  # checked before any work began


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "imagenet"], "small_cnn has no pretrained weights"),
        (["--backbone", "vgg16"], "unknown backbone"),
        (["--backbone", "resnet50", "--weights", "nowhere.h5"], "does not exist"),
        (["--fractions", "0.5,0.2,0.1"], "sum to 1"),
        (["--layout", "labels"], "labels file"),
    ],
)
def test_what_cannot_train_is_a_usage_error(tmp_path, phantoms, args, message):
    result = _train(str(phantoms), "--out", str(tmp_path / "b"), *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_a_folder_with_no_dataset_says_which_layouts_it_reads(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _train(str(tmp_path / "empty"), "--out", str(tmp_path / "b"))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "MURA's layout" in text and "Fracture/" in text and "labels.csv" in text

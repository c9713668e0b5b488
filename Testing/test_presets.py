"""``--preset paper|ours`` (issue 12 §4): the paper preset sets every value the papers state, an option
the user gives still wins, and the preset is recorded in the dataset's meta and the checkpoint config."""

from __future__ import annotations

import json

import pytest

from x2recon.cli import build_parser, main
from x2recon.dataset.config import PAPER_BUILD, BuildConfig
from x2recon.structures import DEFAULT_STRUCTURES, resolve_structures


def _fake_dataset(tmp_path, **build):
    """A dataset folder with just enough for the train commands' dataset checks (one case's meta.json)."""
    (tmp_path / "splits").mkdir(parents=True)
    (tmp_path / "splits" / "all.txt").write_text("c\n")
    (tmp_path / "cases" / "c").mkdir(parents=True)
    cfg = BuildConfig(**build).to_dict()
    (tmp_path / "cases" / "c" / "meta.json").write_text(json.dumps({"config": cfg}))
    return tmp_path


def _build_config(*args):
    from x2recon.cli.dataset import _config_from_args

    return _config_from_args(build_parser().parse_args(["build-dataset", "--ct", "x", "--out", "y", *args]))


def test_build_dataset_paper_preset_sets_every_stated_value_and_user_flags_win():
    paper = _build_config("--preset", "paper")
    for name, value in PAPER_BUILD.items():
        want = resolve_structures(value) if name == "structures" else value
        assert getattr(paper, name) == want, name
    assert paper.near_surface_fraction == 0.0 and paper.preset == "paper"
    ours = _build_config()
    assert ours.to_dict() == BuildConfig().to_dict() and ours.near_surface_fraction == 0.5 and ours.preset == "ours"
    mixed = _build_config("--preset", "paper", "--near-surface", "0.3", "--points", "5000")
    assert mixed.near_surface_fraction == 0.3 and mixed.n_points == 5000 and mixed.preset == "paper"
    assert mixed.drr_size == PAPER_BUILD["drr_size"]
    assert _build_config("--structures", "ribs").structures == resolve_structures("ribs")
    assert set(resolve_structures(list(DEFAULT_STRUCTURES))) == set(paper.structures)


def test_build_config_records_the_preset_but_hashes_only_values():
    a = BuildConfig.from_preset("paper")
    b = BuildConfig(near_surface_fraction=0.0)
    assert a.to_dict()["preset"] == "paper" and BuildConfig.from_dict(a.to_dict()).preset == "paper"
    assert a.digest() == b.digest()  # same data under another name: not rebuilt
    assert a.digest() != BuildConfig().digest()
    with pytest.raises(ValueError, match="preset"):
        BuildConfig(preset="mine")


def test_dataset_meta_records_the_preset(tiny_x2b_dataset):
    meta = json.loads((tiny_x2b_dataset / "cases" / "chest" / "meta.json").read_text())
    assert meta["config"]["preset"] == "ours"


@pytest.fixture
def captured(monkeypatch):
    """Replace the training functions by recorders of what the CLI passes them."""
    import x2recon.spider.train as spider_train
    import x2recon.x2b.train as x2b_train

    calls = {}

    def fake(name):
        def run(data, settings, cfg, **kw):
            calls[name] = (settings, cfg, kw)  # x2b2 trains through train_x2b too
            return {"steps": 0}
        return run

    monkeypatch.setattr(x2b_train, "train_x2b", fake("x2b"))
    monkeypatch.setattr(spider_train, "train_spider", fake("spider"))
    return calls


@pytest.mark.parametrize("network", ["x2b", "x2b2"])
def test_train_x2b_paper_preset_and_overrides(tmp_path, captured, capsys, network):
    data = _fake_dataset(tmp_path / "ds")
    assert main(["train", network, "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "paper"]) == 0
    settings, cfg, kw = captured["x2b"]
    assert (cfg.backbone, cfg.image_size, cfg.latent_dim, cfg.local_features, cfg.fourier, cfg.threshold) == \
        ("convnext_base", 224, 0, False, 0, 0.2)
    assert cfg.kind == network
    assert settings.lr == 1e-4 and kw["n_points"] == 2048 and kw["augment"] is False and kw["preset"] == "paper"
    assert "near-surface" in capsys.readouterr().err  # the dataset's samples are not the paper's: said
    main(["train", network, "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "paper", "--augment",
          "--local-features", "--fourier", "4", "--lr", "3e-4", "--points", "512", "--threshold", "0.5"])
    settings, cfg, kw = captured["x2b"]
    assert (cfg.local_features, cfg.fourier, cfg.threshold, settings.lr, kw["n_points"], kw["augment"]) == \
        (True, 4, 0.5, 3e-4, 512, True)
    main(["train", network, "--data", str(data), "--out", str(tmp_path / "r")])
    settings, cfg, kw = captured["x2b"]
    assert kw["augment"] is True and kw["preset"] == "ours"


def test_train_spider_paper_preset_and_overrides(tmp_path, captured, capsys):
    data = _fake_dataset(tmp_path / "ds", structures=["vertebrae"])
    base = ["train", "spider", "--data", str(data), "--out", str(tmp_path / "r")]
    main([*base, "--preset", "paper"])
    settings, cfg, kw = captured["spider"]
    assert (kw["optimizer"], settings.lr, kw["lr_step_epochs"], kw["lr_gamma"], settings.epochs) == \
        ("sgd", 1e-3, 100, 0.5, 500)
    assert kw["foreground_fraction"] == 0.0 and kw["augment"] is False and kw["preset"] == "paper"
    assert "parallel beam" in capsys.readouterr().err
    main([*base, "--preset", "paper", "--foreground-fraction", "0.5", "--optimizer", "adam", "--augment"])
    settings, cfg, kw = captured["spider"]
    assert (kw["foreground_fraction"], kw["optimizer"], kw["augment"]) == (0.5, "adam", True)
    main(base)
    settings, cfg, kw = captured["spider"]
    assert kw["foreground_fraction"] == 0.25 and kw["augment"] is True and kw["preset"] == "ours"


def test_checkpoint_records_the_preset(tiny_x2b_dataset, tmp_path):
    """A real (one-step) run: the checkpoint config says which preset and what it set."""
    from x2recon.nn.checkpoint import read_config

    out = tmp_path / "run"
    rc = main(["train", "x2b", "--data", str(tiny_x2b_dataset), "--out", str(out), "--preset", "paper",
               "--backbone", "convnext_atto", "--image-size", "64", "--hidden", "32", "--blocks", "1", "--steps", "1",
               "--batch-size", "2", "--workers", "0", "--val-split", "", "--quiet", "--device", "cpu"])
    assert rc == 0
    conf = read_config(out / "last.safetensors")
    assert conf["training"]["preset"] == "paper" and conf["training"]["augment"] is False
    assert conf["training"]["n_points"] == 2048 and conf["model"]["backbone"] == "convnext_atto"

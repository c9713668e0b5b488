"""Shared fixtures: the one way tests reach the sample data — the chest CT bundled in the package, and
../shared/data for the larger cases (nothing downloads at run time).

Two tiers.  ``python -m pytest Testing`` runs the default tier: every package touched, minutes on 2 cores.
Tests marked ``@pytest.mark.slow`` (end-to-end builds of real CTs, training runs, detector training, the
study's smoke run, full-size reconstructions) are left out unless ``--all`` (or ``X2RECON_ALL_TESTS=1``) is
given, ``-m`` names a marker, or the test is named by its node id.  CI (.ci/run) runs ``--all``.
``--shuffle SEED`` runs the files and their tests in a shuffled order (a test must not depend on another's
leftovers: torch's thread count once did).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ALL_TESTS_ENV = "X2RECON_ALL_TESTS"
#: Fixtures that train a network or build a dataset of many structures (each costs more than the default
#: tier's whole budget share of its tests): every test using one is slow too.
SLOW_FIXTURES = {
    "tiny_x2b_model": "trains X2B for 400 steps",
    "tiny_spider_model": "trains SPIDER for 250 steps",
    "offline_run": "trains the YOLO detector for an epoch in a fresh process",
    "ribs_dataset": "builds a two-case dataset of every rib and vertebra (template library tests)",
}


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", dest="x2recon_all",
                     help=f"run the slow end-to-end tests too (as CI does; or {ALL_TESTS_ENV}=1)")
    parser.addoption("--shuffle", type=int, metavar="SEED", dest="x2recon_shuffle", default=None,
                     help="run the test files, and the tests in each, in an order shuffled with SEED: a test that "
                          "passes only after (or before) another shows up")


def _runs_everything(config) -> bool:
    return bool(config.getoption("x2recon_all") or os.environ.get(ALL_TESTS_ENV, "") not in ("", "0")
                or config.getoption("markexpr"))


def pytest_collection_modifyitems(config, items):
    """Tests that use a ``SLOW_FIXTURES`` fixture are marked slow; the default tier deselects the slow ones
    (the summary line counts them), unless named by node id."""
    for item in items:
        if SLOW_FIXTURES.keys() & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    if config.getoption("x2recon_shuffle") is not None:
        _shuffle(items, config.getoption("x2recon_shuffle"))
    if _runs_everything(config):
        return
    named = [a.replace("\\", "/") for a in config.args if "::" in a]
    keep, slow = [], []
    for item in items:
        explicit = any(_names(a, item.nodeid) for a in named)
        (slow if item.get_closest_marker("slow") and not explicit else keep).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = keep
        config._x2recon_slow_left_out = len(slow)


def _shuffle(items, seed: int) -> None:
    """Files in a random order, and the tests of each file in a random order (a file's tests stay together,
    so its module-scoped fixtures are built once)."""
    import random

    rng = random.Random(seed)
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(files.values())
    rng.shuffle(order)
    for tests in order:
        rng.shuffle(tests)
    items[:] = [t for tests in order for t in tests]


def _names(arg: str, nodeid: str) -> bool:
    """Whether a command-line ``path::name`` argument (relative to any folder, or absolute; with or without
    parameters; or naming the test's class) selects the test ``nodeid``."""
    arg_path, _, arg_name = arg.partition("::")
    node_path, _, node_name = nodeid.partition("::")
    same_file = arg_path == node_path or arg_path.endswith("/" + node_path) or node_path.endswith("/" + arg_path)
    return same_file and (node_name == arg_name or node_name.split("[")[0] == arg_name
                          or node_name.startswith(arg_name + "::"))


def pytest_report_header(config):
    if _runs_everything(config):
        return "x2recon: every test (slow ones included)"
    return f"x2recon: default tier; slow tests left out (run them too: --all or {ALL_TESTS_ENV}=1, as CI does)"


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_x2recon_slow_left_out", 0)
    if n:
        terminalreporter.write_line(f"x2recon: {n} slow tests left out of the default tier; run everything with "
                                    f"'python -m pytest Testing --all'")


def shared_data_dir() -> Path:
    """``$X2RECON_SHARED_DATA`` or ``../shared/data`` beside the repository (x2recon.sample_data)."""
    from x2recon.sample_data import sample_data_dir

    return sample_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"shared test data not found at {d} (set X2RECON_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def chest_half():
    """(ct_path, labels_path) of the half-resolution chest CT (fast tests): the copy bundled in the
    package, so these tests run from a clone alone."""
    from x2recon.sample_data import case_dir

    d = case_dir("chest_lidc0001_half")
    return d / "ct.nii.gz", d / "labels.nii.gz"


@pytest.fixture(scope="session")
def chest_full(shared_data):
    return shared_data / "chest_lidc0001" / "ct.nii.gz", shared_data / "chest_lidc0001" / "labels.nii.gz"


# ---- meshes and occupancy (Testing/test_mesh_extract.py, Testing/test_occupancy.py) ----
#: A few ribs (incl. the small 12th), a vertebra and the costal cartilages of chest_half.
MESH_TEST_STRUCTURES = ["rib_left_3", "rib_left_12", "rib_right_6", "rib_right_11", "vertebrae_T8", "costal_cartilages"]


@pytest.fixture(scope="session")
def chest_half_meshes(chest_half):
    """``(seg, names, meshes, skipped)`` for ``MESH_TEST_STRUCTURES`` of chest_half (extracted once)."""
    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.segmentation import segment
    from x2recon.io.volume import read_ct
    from x2recon.mesh.extract import labelmap_to_meshes

    seg, names, _ = segment(read_ct(chest_half[0]), chest_half[1], BuildConfig(structures=MESH_TEST_STRUCTURES))
    meshes, skipped = labelmap_to_meshes(seg, names)
    return seg, names, meshes, skipped


# ---- the default bone segmentation of chest_half, shared by box and target tests ----
@pytest.fixture(scope="session")
def chest_half_seg(chest_half):
    """``(ct, seg, names, isocenter)`` of chest_half with the default structures (built once)."""
    from x2recon.dataset.case import isocenter_of
    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.segmentation import segment
    from x2recon.io.volume import read_ct

    cfg = BuildConfig()
    ct = read_ct(chest_half[0])
    seg, names, _ = segment(ct, chest_half[1], cfg)
    return ct, seg, names, isocenter_of(seg, ct, cfg)


# ---- a tiny X2B dataset (vertebrae of chest_half, AP + LAT, 64² network inputs), built once ----
@pytest.fixture(scope="session")
def tiny_x2b_dataset(chest_half, tmp_path_factory):
    """Dataset folder with chest_half (train), one deformed variant (val) and another (test)."""
    from x2recon.dataset.builder import build_dataset
    from x2recon.dataset.case import CaseInput
    from x2recon.dataset.config import BuildConfig

    out = tmp_path_factory.mktemp("tiny_x2b")
    cfg = BuildConfig(structures=["vertebrae"], views=["AP", "LAT"], drr_size=128, x2b_size=64, n_points=20_000,
                      variants=2)
    s = build_dataset([CaseInput("chest", str(chest_half[0]), str(chest_half[1]))], out, cfg, progress=False)
    assert len(s.done) == 3, s.text()
    return out


# ---- an X2B model trained on the tiny dataset's training case (CPU, once per session) ----
TINY_X2B = dict(backbone="convnext_atto", image_size=64, hidden=128, n_blocks=5, local_features=True,
                local_stages=[0, 1], fourier=8)
TINY_X2B_STEPS = 400


@pytest.fixture(scope="session")
def tiny_x2b_model(tiny_x2b_dataset, tmp_path_factory):
    """Checkpoint of an X2B that has memorised the tiny dataset's training case (AP view)."""
    import torch

    from x2recon.x2b.network import X2BConfig
    from x2recon.train.common import TrainSettings
    from x2recon.x2b.train import train_x2b

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_x2b_run")
    s = TrainSettings(out=str(out), epochs=10**6, max_steps=TINY_X2B_STEPS, batch_size=4, lr=2e-3, workers=0,
                      save_every=0, progress=False, val_every=10**6)
    train_x2b(tiny_x2b_dataset, s, X2BConfig(views=["AP"], **TINY_X2B), val_split="", augment=False)
    return out / "last.safetensors"


# ---- a SPIDER model trained on the tiny dataset's training case (CPU, once per session) ----
TINY_SPIDER = dict(views=["AP", "LAT"], image_size=64, unet_channels=[16, 32, 64], feature_channels=16, hidden=64,
                   layers=2, classes=["thoracic"],
                   hash=dict(n_levels=12, n_features_per_level=2, log2_hashmap_size=17, base_resolution=8,
                             per_level_scale=None, finest_resolution=256))
TINY_SPIDER_STEPS = 250


@pytest.fixture(scope="session")
def tiny_spider_model(tiny_x2b_dataset, tmp_path_factory):
    """Checkpoint of a SPIDER (classes: thoracic vertebrae) that has memorised the tiny dataset's
    training case from its AP + LAT pair."""
    import torch

    from x2recon.dataset.spider_data import class_members
    from x2recon.spider.network import SpiderConfig
    from x2recon.train.common import TrainSettings
    from x2recon.spider.train import train_spider

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_spider_run")
    cfg = SpiderConfig(members=class_members(TINY_SPIDER["classes"]), **TINY_SPIDER)
    s = TrainSettings(out=str(out), epochs=10**6, max_steps=TINY_SPIDER_STEPS, batch_size=1, lr=1e-2, workers=0,
                      save_every=0, progress=False, val_every=10**6)
    train_spider(tiny_x2b_dataset, s, cfg, n_points=8192, optimizer="adam", lr_step_epochs=0, val_split="",
                 augment=False, foreground_fraction=0.25)
    return out / "last.safetensors"

"""Checkpoints a user or a crash can spoil: weights and training state written as one consistent pair
(a kill between the two writes falls back to the pair before), atomic best copy, leftovers of killed
writes cleaned, and every malformed checkpoint a ``CheckpointError`` naming the file and the key."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

from x2recon.cli import main
from x2recon.nn.checkpoint import CheckpointError, load_model, load_weights, read_config, save_checkpoint
from x2recon.train.common import Dist, finish_run, load_state, save_state, start_run


def _save_pair(out, model, opt, step):
    """What a training loop's ``checkpoint("last")`` does: weights, then state."""
    save_checkpoint(out / "last.safetensors", model, {"network": "x2b", "model": {}, "training": {"step": step}})
    save_state(out, opt, step, 0, -1.0)


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_kill_between_weights_and_state_resumes_the_consistent_pair(tmp_path):
    model, opt = _model_and_opt(0)
    _save_pair(tmp_path, model, opt, 27)
    state = load_state(tmp_path)
    assert state["step"] == 27 and state["weights"] == tmp_path / "last.safetensors"
    step27 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight += 1.0  # step 28's weights are written, then the run is killed before its state
    save_checkpoint(tmp_path / "last.safetensors", model, {"network": "x2b", "model": {}, "training": {"step": 28}})
    with pytest.warns(UserWarning, match="previous consistent pair"):
        state = load_state(tmp_path)
    assert state["step"] == 27
    fresh = torch.nn.Linear(3, 2)
    load_weights(state["weights"], fresh)
    assert torch.equal(fresh.weight, step27)  # the weights of step 27, not step 28's
    # the next complete save makes the last pair consistent again
    _save_pair(tmp_path, model, opt, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_state(tmp_path)
    assert state["step"] == 28 and state["weights"].name == "last.safetensors"


def test_weights_without_a_matching_state_are_refused(tmp_path):
    model, opt = _model_and_opt(1)
    save_checkpoint(tmp_path / "last.safetensors", model, {"network": "x2b", "model": {}})
    with pytest.raises(CheckpointError, match="--resume never"):  # killed during the very first save
        load_state(tmp_path)
    _save_pair(tmp_path, model, opt, 4)
    assert start_run(tmp_path, "never", True) is None  # starting over drops the old run's training state
    assert not any((tmp_path / n).exists() for n in ("last.state.pt", "last.prev.state.pt", "last.prev.safetensors"))
    _save_pair(tmp_path, model, opt, 5)
    (tmp_path / "last.prev.safetensors").unlink()  # no previous pair to fall back to
    (tmp_path / "last.prev.state.pt").unlink()
    with torch.no_grad():
        model.weight += 1.0
    save_checkpoint(tmp_path / "last.safetensors", model, {"network": "x2b", "model": {}})
    with pytest.raises(CheckpointError, match="not the file last.state.pt \\(step 5\\) was saved with"):
        load_state(tmp_path)


def test_state_that_needs_code_is_not_unpickled(tmp_path):
    model, opt = _model_and_opt(2)
    _save_pair(tmp_path, model, opt, 3)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    with open(tmp_path / "last.state.pt", "wb") as f:
        pickle.dump({"optimizer": Evil(), "step": 3, "epoch": 0, "best": 0.0}, f)
    with pytest.raises(CheckpointError, match="last.state.pt: cannot read the training state"):
        load_state(tmp_path)


def test_start_run_removes_leftovers_of_killed_writes(tmp_path):
    keep = [tmp_path / "last.safetensors", tmp_path / "notes.part.txt", tmp_path / ".hidden"]
    gone = [tmp_path / ".last.k3x_9abz.part.safetensors", tmp_path / ".last.state.0oub5had.part.state.pt",
            tmp_path / ".summary.abcdefgh.part.json"]
    for p in keep + gone:
        p.write_bytes(b"")
    sub = tmp_path / "tensorboard"
    sub.mkdir()
    (sub / ".x.abcdefgh.part.json").write_bytes(b"")  # not the run folder itself: left alone
    with pytest.raises(CheckpointError):  # a 0-byte last.safetensors without a state
        start_run(tmp_path, "auto", main=False)  # only the main process cleans
    assert all(p.exists() for p in gone)
    with pytest.raises(CheckpointError):
        start_run(tmp_path, "auto", main=True)
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in keep) and (sub / ".x.abcdefgh.part.json").exists()


def test_best_copy_is_atomic(tmp_path, monkeypatch):
    model, opt = _model_and_opt(3)
    _save_pair(tmp_path, model, opt, 1)
    real = shutil.copyfile

    def killed_copy(src, dst, **kw):  # writes half the file, then the process is "killed"
        data = open(src, "rb").read()
        open(dst, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed_copy)
    with pytest.raises(KeyboardInterrupt):
        finish_run(tmp_path, {"steps": 1}, Dist(), best_is_last=True)
    assert not (tmp_path / "best.safetensors").exists()
    monkeypatch.setattr(shutil, "copyfile", real)
    finish_run(tmp_path, {"steps": 1}, Dist(), best_is_last=True)
    assert (tmp_path / "best.safetensors").read_bytes() == (tmp_path / "last.safetensors").read_bytes()


def _with_metadata(path, text):
    save_file({"w": torch.zeros(2)}, str(path), metadata={"x2recon": text})
    return path


@pytest.mark.parametrize("text, message", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    (json.dumps([1, 2]), "is a JSON list, not an object"),
    (json.dumps({"format": "x2recon.checkpoint/1", "network": "x2b"}), "key 'model'"),
    (json.dumps({"format": "x2recon.checkpoint/1", "model": {}}), "key 'network'"),
], ids=["nested-200000", "list", "no-model", "no-network"])
def test_malformed_config_names_the_file_and_key(tmp_path, capsys, text, message):
    p = _with_metadata(tmp_path / "bad.safetensors", text)
    with pytest.raises(CheckpointError, match=message) as e:
        read_config(p)
    assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match=message):
        load_model(p)
    assert main(["info", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"x2recon info: error: {p}" in err and message.split("'")[0] in err


def test_model_config_that_cannot_build_names_the_key(tmp_path):
    p = _with_metadata(tmp_path / "m.safetensors", json.dumps(
        {"format": "x2recon.checkpoint/1", "network": "x2b", "model": {"no_such_setting": 1}}))
    with pytest.raises(CheckpointError, match="'model' config"):
        load_model(p)


@pytest.mark.parametrize("make", ["text", "pickle", "folder"])
def test_weights_from_a_file_that_is_not_safetensors(tmp_path, make):
    p = tmp_path / "weights.safetensors"
    if make == "text":
        p.write_text("hello\n")
    elif make == "pickle":
        torch.save({"w": torch.zeros(2)}, p)
    else:
        p.mkdir()
    with pytest.raises(CheckpointError) as e:
        load_weights(p, torch.nn.Linear(1, 1))
    assert str(p) in str(e.value)


@pytest.mark.slow
def test_train_x2b_killed_between_the_two_writes_resumes_the_previous_pair(tiny_x2b_dataset, tmp_path, monkeypatch):
    """The real loop: killed after a later step's weights, before its state → the next run warns and resumes
    at step 2 from step 2's weights (before: "resuming at step 2" with the later weights, silently)."""
    import x2recon.x2b.train as x2b_train
    from x2recon.train.common import TrainSettings
    from x2recon.x2b.network import X2BConfig

    out = tmp_path / "run"
    cfg = X2BConfig(views=["AP"], backbone="convnext_atto", image_size=64, hidden=32, n_blocks=1)

    def run(steps, log=print):
        settings = TrainSettings(out=str(out), epochs=100000, max_steps=steps, batch_size=2, lr=1e-3, workers=0,
                                 save_every=2, progress=False, val_every=100000, threads=0)
        return x2b_train.train_x2b(tiny_x2b_dataset, settings, cfg, val_split="", log=log)

    run(2)
    step2 = (out / "last.safetensors").read_bytes()

    def killed(*args, **kw):  # the process dies between the weights and the state of its next save
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)  # the state is the one file written with torch.save
    with pytest.raises(KeyboardInterrupt):
        run(4)
    assert read_config(out / "last.safetensors")["training"]["step"] > 2  # newer weights than the state are on disk
    monkeypatch.undo()
    assert (out / "last.prev.safetensors").read_bytes() == step2
    lines = []
    with pytest.warns(UserWarning, match="previous consistent pair last.prev.safetensors"):
        summary = run(5, log=lines.append)
    assert any("at step 2" in line for line in lines), lines
    assert summary["steps"] == 5 and read_config(out / "last.safetensors")["training"]["step"] == 5
    assert load_state(out)["weights"].name == "last.safetensors"  # consistent again after the next save

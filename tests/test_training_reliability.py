"""Training reliability (issue 15): checkpoints written atomically, one training per checkpoint
set (a lock naming its PID), signals passed on to the bundle's trainer, and one-line messages
for unreadable resume files and data errors."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bundle_helpers import REPO
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver

from common.core.bundle_configs import bundle_parser
from common.core.errors import DataError, find_data_error
from common.core.lock import claim, release
from common.core.training import ResumeCheckpoint

BUNDLES = REPO / "bundles"
IMAGE = ["inference.yaml", "train.yaml"]
# every bundle training: bundle, config files, its resume file
TRAININGS = {
    "masks": ("mask_diffusion", ["inference.yaml", "train.yaml"], "resume.pt"),
    "generator": ("image_synthesis", [*IMAGE, "train_generator.yaml"], "resume_generator.pt"),
    "refiner": ("image_synthesis", [*IMAGE, "train_refiner.yaml"], "resume_refiner_axial.pt"),
    "seg": ("seg_downstream", ["train.yaml"], "resume.pt"),
}
CLI = [sys.executable, "-m", "medgen3d.cli"]


def _parser(name: str, root: Path, **values):
    bundle, files, _ = TRAININGS[name]
    return bundle_parser(
        BUNDLES / bundle, files, "tiny", "thorax", {"bundle_root": str(root), **values}
    )


def _saver_ids(parser) -> list[str]:
    """Config ids of every CheckpointSaver the training builds (train and validate handlers)."""
    ids = []
    for section in ("train#handlers", "validate#handlers"):
        for i, item in enumerate(parser[section]):
            if isinstance(item, str) and item.startswith("@"):
                item_id, item = item[1:], parser[item[1:]]
            else:
                item_id = f"{section}#{i}"
            if isinstance(item, dict) and item.get("_target_", "").endswith("CheckpointSaver"):
                ids.append(item_id)
    return ids


def _full_disk(real_save):
    """A ``torch.save`` that writes half of the file, then fails as it does on a full disk."""

    def save(obj, f, **kwargs):
        data = io.BytesIO()
        real_save(obj, data, **kwargs)
        part = data.getvalue()[: len(data.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(part)
        else:
            Path(f).write_bytes(part)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    return save


@pytest.mark.parametrize("name", TRAININGS)
def test_a_failed_checkpoint_write_keeps_the_previous_file(
    name, tmp_path, monkeypatch, tiny_segthor_datalist
):
    # the savers record the training cases (provenance), so they read a real datalist
    parser = _parser(name, tmp_path, dataset_dir=str(tiny_segthor_datalist.parent))
    ids = _saver_ids(parser)
    assert len(ids) == (1 if name == "seg" else 2)  # the final and the best; seg: the best
    for item_id in ids:
        saver = parser.get_parsed_content(item_id)
        folder = tmp_path / item_id.replace("#", "_")
        for ckpt in (saver._final_checkpoint, saver._key_metric_checkpoint):
            if ckpt is None:
                continue
            ckpt.save_handler.dirname = folder
            folder.mkdir(exist_ok=True)
            good = {"w": torch.arange(50_000.0)}
            ckpt.save_handler(good, "ckpt.pt")
            (final,) = list(folder.iterdir())
            (folder / f".{final.name}.killed.tmp.pt").write_bytes(b"left by a kill")
            with monkeypatch.context() as m:
                m.setattr(torch, "save", _full_disk(torch.save))
                with pytest.raises(DataError, match=rf"{final.name}: could not be written"):
                    ckpt.save_handler({"w": torch.zeros(50_000)}, "ckpt.pt")
            assert [p.name for p in folder.iterdir()] == [final.name], "a temporary was left"
            assert torch.equal(torch.load(final, weights_only=True)["w"], good["w"]), final
            final.unlink()


KILLED_WRITER = """
import sys, torch
from common.core.bundle_configs import bundle_parser
parser = bundle_parser(sys.argv[1], ["inference.yaml", "train.yaml"], "tiny", "thorax",
                       {"bundle_root": sys.argv[2], "dataset_dir": sys.argv[3]})
handler = parser.get_parsed_content("train#handlers#2")._final_checkpoint.save_handler
state = {"w": torch.randn(8_000_000)}  # 32 MB: a write takes a while
for i in range(1000):
    print(i, flush=True)
    handler(state, "model.pt")
"""


def _partial_file_in(folder: Path, size: int) -> bool:
    """Whether a file in ``folder`` is shorter than ``size`` bytes (being written)."""
    for path in folder.iterdir():
        try:
            if path.stat().st_size < size:
                return True
        except FileNotFoundError:  # a temporary file renamed meanwhile
            pass
    return False


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_never_leaves_a_partial_file(
    tmp_path, tiny_segthor_datalist
):
    """The mask_diffusion final saver, killed with SIGKILL in the middle of its 2nd, 3rd and
    4th write of a 32 MB model.pt."""
    for writes in (2, 3, 4):
        root = tmp_path / str(writes)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                KILLED_WRITER,
                str(BUNDLES / "mask_diffusion"),
                str(root),
                str(tiny_segthor_datalist.parent),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(writes):
            proc.stdout.readline()
        model = root / "models" / "model.pt"
        size, deadline = model.stat().st_size, time.time() + 10
        while not _partial_file_in(model.parent, size) and time.time() < deadline:
            pass
        proc.kill()
        proc.wait()
        assert model.exists()
        assert torch.load(model, weights_only=True)["w"].numel() == 8_000_000


HOLDER = """
import sys, time
from common.core.lock import claim
claim(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


def _hold(lock: Path) -> subprocess.Popen:
    """Another process holding ``lock`` (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_names_its_holder_and_is_taken_over_when_the_holder_died(tmp_path):
    lock = tmp_path / "resume.pt.lock"
    holder = _hold(lock)
    try:
        with pytest.raises(DataError, match=rf"resume.pt.lock: .*training process {holder.pid}"):
            claim(lock)
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text().split()[0] == str(holder.pid)  # a stale lock file is left
    claim(lock)
    assert lock.read_text().split()[0] == str(os.getpid())
    release(lock)
    assert not lock.exists()
    (tmp_path / "file").touch()
    with pytest.raises(DataError, match=r"models/resume.pt.lock: cannot be created \(Not a dir"):
        claim(tmp_path / "file" / "models" / "resume.pt.lock")


@pytest.mark.parametrize("name", TRAININGS)
def test_every_bundle_training_refuses_a_checkpoint_folder_in_use(
    name, tiny_segthor_datalist, tmp_path
):
    parser = _parser(name, tmp_path, dataset_dir=str(tiny_segthor_datalist.parent))
    holder = _hold(tmp_path / "models" / f"{TRAININGS[name][2]}.lock")
    try:
        with pytest.raises(Exception) as err:
            parser.get_parsed_content("train#resume")
    finally:
        holder.kill()
        holder.wait()
    assert f"training process {holder.pid}" in str(find_data_error(err.value))


def test_resume_checkpoint_releases_its_lock_when_training_completes(tmp_path):
    trainer, net = _trainer()
    ResumeCheckpoint(tmp_path, {"model": net}).attach(trainer)
    assert (tmp_path / "resume.pt.lock").exists()
    (tmp_path / ".resume.pt.killed.tmp.pt").write_bytes(b"left by a kill")
    trainer.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]  # no lock, no temporary


PARENT = """
import sys
from medgen3d.bundles import run_child
child = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(300)"]
sys.exit(run_child(child))
"""


def _gone(pid: int, timeout: float = 20) -> bool:
    """Whether process ``pid`` ends within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_stops_its_child(signum):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child = int(parent.stdout.readline())
    parent.send_signal(signum)
    try:
        assert parent.wait(timeout=20) == 128 + signum
        assert _gone(child), "the child outlived its parent"
    finally:
        if not _gone(child, 0):
            os.kill(child, signal.SIGKILL)


def _trainer(epochs: int = 2):
    net = torch.nn.Linear(2, 1)
    data = [{"image": torch.ones(4, 2), "label": torch.zeros(4, 1)}] * 3
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.MSELoss(),
        decollate=False,
    )
    return trainer, net


def _final_saver(trainer, net, folder: Path) -> None:
    CheckpointSaver(str(folder), {"model": net}, save_final=True, final_filename="model.pt").attach(
        trainer
    )


DAMAGES = ["truncated", "garbage", "a list", "another stage", "another network"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_unreadable_resume_file_is_a_clear_error(damage, tmp_path):
    trainer, net = _trainer()
    ResumeCheckpoint(tmp_path, {"model": net}).attach(trainer)
    trainer.run()
    resume = tmp_path / "resume.pt"
    if damage == "truncated":
        resume.write_bytes(resume.read_bytes()[:300])
    elif damage == "garbage":
        resume.write_text("not a checkpoint")
    elif damage == "a list":
        torch.save([1, 2], resume)
    elif damage == "another stage":
        torch.save({"generator": net.state_dict()}, resume)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(trained, tmp_path / "model.pt")

    again, net2 = _trainer(epochs=3)
    if damage == "another network":
        net2 = torch.nn.Linear(3, 1)
    _final_saver(again, net2, tmp_path)
    with pytest.raises(DataError, match=r"resume\.pt: .*\. delete it") as err:
        ResumeCheckpoint(tmp_path, {"model": net2}).attach(again)
        again.run()
    assert "\n" not in str(err.value)
    model = torch.load(tmp_path / "model.pt", weights_only=True)  # not overwritten
    assert all(torch.equal(model[k], v) for k, v in trained.items())


@pytest.mark.slow
def test_train_stops_its_trainer_on_sigterm_and_refuses_a_busy_folder(
    tiny_segthor_datalist, tmp_path
):
    """``medgen3d train``: a second run into the same folder exits 2 naming the first trainer;
    SIGTERM to the first stops its trainer (no orphan)."""
    args = [*CLI, "train", "masks", "--scale", "tiny", "--out", str(tmp_path)]
    args += ["--dataset_dir", str(tiny_segthor_datalist.parent), "--max_epochs", "100000"]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = tmp_path / "models" / "resume.pt.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline:
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.2)
    trainer = int(lock.read_text().split()[0])
    try:
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {lock}: ") and f"training process {trainer}" in last
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 128 + signal.SIGTERM
        assert _gone(trainer), "the bundle's trainer outlived medgen3d train"
    finally:
        first.kill()
        if not _gone(trainer, 0):
            os.kill(trainer, signal.SIGKILL)


@pytest.mark.slow
def test_train_data_error_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nowhere" / "datalist.json"
    args = [*CLI, "train", "masks", "--scale", "tiny", "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [*args, "--datalist", str(missing)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {missing}: "), proc.stderr
    assert "Traceback" not in proc.stderr and "Failed to" not in proc.stderr


def test_find_data_error_looks_through_wrapping_errors():
    try:
        try:
            raise DataError("a.json", "broken", "fix it")
        except DataError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as e:
        assert str(find_data_error(e)) == "a.json: broken. fix it"
    assert find_data_error(ValueError("x")) is None
    try:
        try:
            raise DataError("a.json", "broken")
        except DataError:
            raise TypeError("a bug while handling it")  # noqa: B904
    except TypeError as e:
        assert find_data_error(e) is None  # not blamed on the data


def test_an_uncaught_data_error_prints_one_line_and_exits_2():
    code = (
        "from common.core.errors import DataError, report_data_errors\n"
        "report_data_errors()\n"
        "try:\n    raise DataError('a.json', 'broken', 'fix it')\n"
        "except DataError as e:\n    raise RuntimeError('Failed to evaluate') from e\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (2, "error: a.json: broken. fix it\n")

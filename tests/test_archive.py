"""safe_extract: refuses absolute paths, `..` and symlinks, naming the member; atomic."""

import stat
import zipfile

import pytest

from common.archive import safe_extract
from common.errors import DataError


def _zip(path, members: dict, link: str | None = None):
    """A zip of ``{name: text}`` members, plus a symlink member named ``link``."""
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return path


def test_extracts_a_bundle(tmp_path):
    members = {"bundle/configs/train.yaml": "a: 1\n", "bundle/models/model.pt": "w"}
    dest = safe_extract(_zip(tmp_path / "b.zip", members), tmp_path / "out")
    assert (dest / "bundle" / "configs" / "train.yaml").read_text() == "a: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zip", "out"]  # no temp folder left


@pytest.mark.parametrize(
    "name, problem",
    [
        ("/etc/evil.sh", "member '/etc/evil.sh' has an absolute path"),
        ("C:/evil.sh", "member 'C:/evil.sh' has an absolute path"),
        ("bundle/../../evil.sh", "member 'bundle/../../evil.sh' points outside the archive"),
        ("link", "member 'link' is a symbolic link"),
    ],
)
def test_malicious_member_is_refused_and_nothing_written(tmp_path, name, problem):
    members = {"bundle/ok.txt": "ok"}
    archive = _zip(
        tmp_path / "evil.zip",
        members if name == "link" else {**members, name: "x"},
        link="link" if name == "link" else None,
    )
    with pytest.raises(DataError, match="unsafe archive") as info:
        safe_extract(archive, tmp_path / "sub" / "out")
    assert str(info.value).startswith(
        f"{archive}: unsafe archive, nothing was extracted: {problem}"
    )
    assert not (tmp_path / "sub").exists() and not (tmp_path.parent / "evil.sh").exists()


def test_existing_destination_and_bad_zip(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="already exists"):
        safe_extract(_zip(tmp_path / "b.zip", {"a": "1"}), tmp_path / "out")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot be read as a zip archive"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "new")


def test_failed_extraction_leaves_no_partial_folder(tmp_path, monkeypatch):
    def half_then_fail(self, path, members=None, pwd=None):
        (path / "half.txt").write_text("x")
        raise OSError("disk full")

    archive = _zip(tmp_path / "b.zip", {"a": "1"})
    monkeypatch.setattr(zipfile.ZipFile, "extractall", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        safe_extract(archive, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["b.zip"]

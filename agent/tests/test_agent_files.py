"""restore-files' own checks: paths given on the command line, and what a zip may name."""

import io
import os
import zipfile

import pytest
from reclo_agent import files
from reclo_agent.errors import DiskError, UsageError


@pytest.mark.parametrize(
    ("text", "place"),
    [(None, files.Place(None, "/")), ("1", files.Place(1, "/")), ("2:/home/ann", files.Place(2, "/home/ann"))],
)
def test_places(text, place):
    assert files.parse_place(text) == place


@pytest.mark.parametrize("text", ["home", "0:/", "x:/etc", "1:etc", "-1:/"])
def test_bad_places_are_usage_errors(text):
    with pytest.raises(UsageError):
        files.parse_place(text)


def zip_of(entries: dict) -> io.BytesIO:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, (data, mode, mtime) in entries.items():
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | mode) << 16
            info.extra = files.struct.pack("<HHBl", 0x5455, 5, 1, mtime)
            zf.writestr(info, data)
    out.seek(0)
    return out


def test_a_zip_unpacks_with_its_modes_and_times(tmp_path):
    count = files._unzip(zip_of({"a/b.txt": (b"hi", 0o640, 1_600_000_000), "c": (b"", 0o600, 1_500_000_000)}), tmp_path)
    assert count == 2
    st = os.stat(tmp_path / "a" / "b.txt")
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"hi"
    assert st.st_mode & 0o777 == 0o640 and st.st_mtime == 1_600_000_000


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../x"])
def test_a_zip_naming_a_place_outside_the_folder_is_refused(tmp_path, name):
    with pytest.raises(DiskError):
        files._unzip(zip_of({name: (b"x", 0o644, 0)}), tmp_path / "in")
    assert not (tmp_path / "escape.txt").exists()

"""An allow-list folder is read again when it changes: a key copied in, a key removed,
and a key file rewritten in place with another key (which changes no time of the
folder itself)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from paddler.curve import KeyFolder, generate, load_public


def test_keys_added_removed_and_rewritten_in_place_take_effect(tmp_path: Path) -> None:
    made = tmp_path / "made"
    first, _ = generate(made, "first")
    second, _ = generate(made, "second")
    folder = tmp_path / "allowed"
    folder.mkdir()
    keys = KeyFolder(folder)
    one, two = load_public(first, "first"), load_public(second, "second")
    assert not keys.allows(one)

    shutil.copy(first, folder / "box.key")
    assert keys.allows(one) and not keys.allows(two)

    # the same file name, another key: the folder's own times do not change
    stat = folder.stat()
    (folder / "box.key").write_bytes(second.read_bytes())
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert keys.allows(two) and not keys.allows(one)

    (folder / "box.key").unlink()
    assert not keys.allows(two)

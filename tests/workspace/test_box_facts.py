"""`lenslab-box facts` answers the autostop watcher's state too: `lenslab status` on a box
without Docker then needs one exec on the box, not two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lenslab.remote.autostop import CONTAINER_STATE

BOX = str(Path(sys.executable).with_name("lenslab-box"))


def facts(root: Path) -> dict[str, object]:
    result = subprocess.run([BOX, "--root", str(root), "facts", "--json"], capture_output=True, text=True, check=True)
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_facts_carry_the_watchers_state_from_the_file_the_laptop_names(tmp_path: Path) -> None:
    assert facts(tmp_path)["autostop"] is None  # no watcher state yet
    state = {"stop_at": 1234.5, "busy": ["ssh"]}
    path = tmp_path / CONTAINER_STATE  # the path the laptop's autostop module names
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(state))
    answer = facts(tmp_path)
    assert answer["autostop"] == state
    assert answer["root"] == str(tmp_path)


def test_a_state_that_is_no_object_is_no_state(tmp_path: Path) -> None:
    path = tmp_path / CONTAINER_STATE
    path.parent.mkdir(parents=True)
    for text in ("[1, 2]", "not json", ""):
        path.write_text(text)
        assert facts(tmp_path)["autostop"] is None

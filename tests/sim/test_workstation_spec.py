from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpupanel.core.units import GIB
from gpupanel.errors import ConfigError
from gpupanel.sim.workstation import Workstation, parse_spec


def test_default_workstation_is_two_24_and_two_48_gib_cards_with_stable_uuids() -> None:
    ws = parse_spec(None)
    assert [g.memory_total // GIB for g in ws.gpus] == [24, 24, 48, 48]
    assert all(g.uuid.startswith("GPU-") for g in ws.gpus)
    assert len({g.uuid for g in ws.gpus}) == 4
    assert [g.uuid for g in parse_spec("default").gpus] == [g.uuid for g in ws.gpus]


def test_shorthand_and_count() -> None:
    assert [g.memory_total // GIB for g in parse_spec("1x24, 2x80").gpus] == [24, 80, 80]
    assert len(parse_spec("8").gpus) == 8


def test_file_spec_json_and_toml(tmp_path: Path) -> None:
    j = tmp_path / "ws.json"
    j.write_text(json.dumps({"name": "box", "gpus": [{"memory_gib": 16, "uuid": "GPU-fixed"}]}))
    assert parse_spec(str(j)).gpus[0].uuid == "GPU-fixed"
    t = tmp_path / "ws.toml"
    t.write_text('name = "box"\n[[gpus]]\nmemory_gib = 12\nname = "Tiny"\n')
    (g,) = parse_spec(str(t)).gpus
    assert (g.name, g.memory_total) == ("Tiny", 12 * GIB)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"gpus": [{"name": "x"}]}, "gpus[0]: missing field 'memory_gib'"),
        ({"gpus": [{"memory_gib": "lots"}]}, "gpus[0]: field 'memory_gib' must be a number"),
        ({"gpus": [{"memory_gib": 8, "uuid": "abc"}]}, "field 'uuid' must start with 'GPU-'"),
        ({"gpus": []}, "at least one GPU"),
        ({"cards": []}, "expected a table with a 'gpus' list"),
    ],
)
def test_bad_spec_files_name_the_file_item_and_field(
    tmp_path: Path, content: dict[str, object], message: str
) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as err:
        parse_spec(str(f))
    assert message in str(err.value) and str(f) in str(err.value)


def test_unknown_spec_says_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match="shorthand like '4x24'"):
        parse_spec("nonsense")


def test_resolve_by_uuid_or_index_and_round_trip(tmp_path: Path) -> None:
    ws = parse_spec("2x24")
    assert ws.resolve("1") == ws.gpus[1]
    assert ws.resolve(ws.gpus[0].uuid) == ws.gpus[0]
    assert ws.resolve("5") is None
    ws.save(tmp_path)
    assert Workstation.load_recorded(tmp_path) == ws
    assert Workstation.load_recorded(tmp_path / "none") is None

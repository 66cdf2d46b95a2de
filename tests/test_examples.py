"""Every shipped example config is valid and finds its data; generated example data is
reproducible from its documented seeded script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedfm import api
from fedfm.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
USERS_OWN_DATA = {"hub_llama_chat"}  # documented: data.path is the user's chat file


def test_the_recipes_are_all_there() -> None:
    names = {path.stem for path in CONFIGS}
    recipes = {"quickstart", "instruction_dolly", "multilingual_nusax", "preference_dpo",
               "vision_digits", "speech_words", "recommendation_items"}
    assert recipes <= names, f"missing recipes: {sorted(recipes - names)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_example_config_is_valid_and_its_data_is_shipped(path: Path) -> None:
    config = load_config(path)
    api.check_components(config)
    api.build_algorithm(config)
    if path.stem in USERS_OWN_DATA:
        return
    for data_file in (config.data.path, config.data.validation_path):
        if data_file is not None:
            assert Path(data_file).is_file(), f"{path.name}: {data_file} is not shipped"


def test_recommendation_data_is_reproduced_by_its_seeded_script(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(EXAMPLES / "data" / "make_recsys.py"),
                    "--out", str(tmp_path)], check=True)
    for name in ("recsys_train.jsonl", "recsys_validation.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / "data" / name).read_bytes()

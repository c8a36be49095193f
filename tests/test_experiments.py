"""Every sweep preset in experiments/ composes with the real configs and names existing options."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import trimkv.tasks  # noqa: F401  (registers every task)
from trimkv.tasks.base import TASK_REGISTRY

REPO = Path(__file__).resolve().parents[1]
EVALUATE_PRESETS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml") if not p.stem.startswith("train_"))


def compose_preset(name):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=[f"+experiment={name}"], return_hydra_config=True)


@pytest.mark.parametrize("name", EVALUATE_PRESETS)
def test_sweep_preset_composes(name):
    cfg = compose_preset(name)
    params = cfg.hydra.sweeper.params
    assert params, f"{name} defines no sweep"
    assert cfg.hydra.sweep.dir == f"multirun/evaluate/{cfg.sweep_name}"
    groups = {"task": REPO / "conf" / "task", "method": REPO / "conf" / "method"}
    for key, folder in groups.items():
        for option in str(params.get(key, "")).split(","):
            if option:
                assert (folder / f"{option}.yaml").exists(), f"{name}: no {key} option {option!r}"
    for budget in str(params.get("budget", "1")).split(","):
        assert int(budget) > 0


def test_table_presets_cover_the_paper_tables():
    assert {"math_tables", "math_full", "longproc_tables", "longproc_full", "longmemeval_tables"} <= set(EVALUATE_PRESETS)
    math = compose_preset("math_tables").hydra.sweeper.params
    assert math.task == "gsm8k,math500,aime24"
    assert math.budget == "64,128,256,512,1024,2048,4096"
    assert compose_preset("math_full").sweep_name == compose_preset("math_tables").sweep_name


def test_longproc_presets_sweep_only_released_tiers():
    swept = set()
    for name in EVALUATE_PRESETS:
        cfg = compose_preset(name)
        if cfg.sweep_name != "longproc_tables":
            continue
        params = cfg.hydra.sweeper.params
        tasks = str(params.task).split(",")
        tiers = str(params["task.tier"]).split(",")
        for task in tasks:
            for tier in tiers:
                assert tier in TASK_REGISTRY[task].tiers, f"{name} sweeps {task} at tier {tier}"
                swept.add((task, tier))
    assert {("longproc_travel_planning", "2k"), ("longproc_travel_planning", "8k")} <= swept

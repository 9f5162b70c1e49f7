"""tools/experiments.py without running it: every row is a valid train.py command that differs from
DR-LoRA only in what the row names, and --quick's shorter schedule still reaches r_target."""
import json

import pytest
import torch

import drlora
import train
from tools import experiments


@pytest.mark.parametrize("quick", [False, True])
def test_rows_are_the_default_recipe_but_for_their_own_switch(quick):
    s = {**experiments.settings(quick), "task": "arithmetic"}
    cfgs = {name: train.parse_args(experiments.row_argv(extra, s, 0, "out/x", False))
            for name, extra in {**experiments.ROWS, **experiments.SWEEP}.items()}
    dr = cfgs["DR-LoRA"]
    tiny = train.PRESETS["tiny"]
    assert (dr.lora.r_init, dr.lora.r_target, dr.lora.r_max) == (tiny["r_init"], tiny["r_target"], tiny["r_max"])
    assert (dr.steps, dr.batch_size, dr.lr) == ((tiny["steps"] // 6) if quick else tiny["steps"], 16, tiny["lr"])
    changed = {name: {k for k, v in train.flat(c).items() if v != train.flat(dr)[k]} - {"eval_split"}
               for name, c in cfgs.items()}
    assert changed["LoRA r=r_target"] == {"method", "r_init", "r_max"}  # uniform 8, allocated at 8
    assert cfgs["LoRA r=r_target"].lora.r_max == cfgs["LoRA r=r_target"].lora.r_init == dr.lora.r_target
    assert changed["LoRA r=r_max"] == {"method", "r_init", "r_target"} and cfgs["LoRA r=r_max"].lora.r_init == 16
    assert changed["DR-LoRA saliency=f"] == {"saliency"} and changed["DR-LoRA saliency=g"] == {"saliency"}
    assert changed["DR-LoRA freeze_router"] == {"freeze_router"} and changed["DR-LoRA allocation=global"] == {"allocation"}
    assert all(cfgs[f"LoRA r={r}"].eval_split == "val" and cfgs[f"LoRA r={r}"].lora.r_target == r for r in (4, 8, 16))
    # the schedule of the (quick) recipe fits and ends every layer at E * r_target
    t_warm, events, quota, cap = drlora.schedule(dr.lora, dr.steps, n_experts=8)
    assert len(events) * min(quota, 8 * cap) >= 8 * (dr.lora.r_target - dr.lora.r_init)


def test_rank_vs_frequency_reads_the_runs_result(tmp_path):
    ranks = [[4, 8, 12, 8], [8, 8, 8, 8 + 1]]
    f = [[0.1, 0.2, 0.3, 0.2], [0.4, 0.1, 0.1, 0.2]]  # layer 0: f = ranks / 40 exactly; layer 1: uncorrelated
    cfg = {"lora": {"method": "drlora", "r_max": 16, "r_target": 8}}
    (tmp_path / "result.json").write_text(json.dumps({"config": cfg, "result": {
        "ranks": ranks, "f": f, "active_lora_params": 10 * sum(map(sum, ranks))}}))
    corr, got_ranks, got_f = experiments.rank_vs_frequency(str(tmp_path))
    assert got_ranks == ranks and torch.allclose(got_f, torch.tensor(f))
    assert corr[0] == pytest.approx(1.0) and corr[1] == pytest.approx(0.0, abs=1e-6)

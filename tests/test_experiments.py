"""tools/experiments.py without running it: every row is a valid train.py command that differs from
DR-LoRA only in what the row names, and --quick's shorter schedule still reaches r_target."""
import pytest

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

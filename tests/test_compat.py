"""Upstream DeepSpeed-Chat names kept only for scripts written against upstream (dschat/utils/compat.py).

Why they stay: upstream's step mains, and projects built from them, import `save_hf_format` and
`save_zero_three_model` from `dschat.utils.utils` and call `DataCollatorRLHF(max_len, inference_tp_size)`
positionally; those scripts must run unchanged here although the project's own code uses other names.
"""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from dschat.utils import compat
from dschat.utils.utils import load_hf_tokenizer


def test_upstream_step_main_import_line_still_works():
    from dschat.utils.utils import (  # noqa: F401  upstream step 1 / step 3 main's import line
        get_all_reduce_mean,
        get_optimizer_grouped_parameters,
        moving_average,
        print_rank_0,
        save_hf_format,
        save_zero_three_model,
        set_random_seed,
        to_device,
    )

    assert save_hf_format is compat.save_hf_format and save_zero_three_model is compat.save_zero_three_model
    with pytest.raises(ImportError):
        from dschat.utils.utils import MovingAverage  # noqa: F401  removed: no upstream script imports it


def test_save_hf_format_and_save_zero_three_model_write_loadable_weights(tiny_llama_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    compat.save_hf_format(model, tiny_tokenizer, Namespace(output_dir=str(tmp_path)), sub_folder="actor")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "actor")).eval()
    ids = torch.tensor([tiny_tokenizer("Once upon a time").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert load_hf_tokenizer(str(tmp_path / "actor"))("Once upon a time").input_ids == ids[0].tolist()

    compat.save_zero_three_model(model, 0, str(tmp_path / "z3"), zero_stage=3)
    state = torch.load(tmp_path / "z3" / "pytorch_model.bin", weights_only=True)
    assert set(state) >= {k for k in model.state_dict() if k != "lm_head.weight"}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)
    assert [p.name for p in (tmp_path / "z3").iterdir()] == ["pytorch_model.bin"]  # no temporary left behind
    compat.save_zero_three_model(model, 1, str(tmp_path / "rank1"))
    assert not (tmp_path / "rank1").exists()  # only global rank 0 writes


def test_data_collator_rlhf_upstream_positional_call():
    from dschat.utils.data.data_utils import DataCollatorRLHF

    collate = DataCollatorRLHF(6, 1)  # upstream: (max_token_len, inference_tp_size); pad from the batch
    prompt = torch.tensor([5, 6, 7])
    batch = collate([(prompt, torch.ones(3, dtype=torch.long), 2)])
    assert batch["prompt"].tolist() == [[2, 2, 2, 5, 6, 7]]
    assert batch["prompt_att_mask"].tolist() == [[0, 0, 0, 1, 1, 1]]

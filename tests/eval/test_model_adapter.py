"""The model adapter's pure parts: what a left-padded row sees, which MileBench template a family answers in,
where generation stops. No model."""

from types import SimpleNamespace

import pytest

from orchestrator.eval.model_adapter import eos_token_ids, left_pad, milebench_template_for


def test_left_pad_positions_count_real_tokens_only():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_milebench_template_auto_is_the_llava_worker_for_llava_and_the_chat_template_for_the_others():
    assert milebench_template_for("auto", "llava") == "llava_llama_2"
    assert milebench_template_for("auto", "llava_next") == milebench_template_for("auto", "qwen2_5_vl") == "chat"
    assert milebench_template_for("llava_v1", "qwen2_5_vl") == "llava_v1"
    assert milebench_template_for("chat", "llava") == "chat"


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_the_llava_worker_template_named_for_another_family_is_refused_saying_what_to_use(family):
    with pytest.raises(ValueError, match=rf"'llava_llama_2' is MileBench's LLaVA-1.5 worker template, not a {family} "
                                         r"model's; use 'chat'"):
        milebench_template_for("llava_llama_2", family)
    with pytest.raises(ValueError, match=r"eval.milebench_template 'llava_v2': expected one of"):
        milebench_template_for("llava_v2", family)


@pytest.mark.parametrize("configured, expected", [(None, [7]), (5, [5]), ([5, 9], [5, 9])])
def test_eos_ids_are_the_generation_configs_else_the_tokenizers(configured, expected):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    assert eos_token_ids(model, SimpleNamespace(eos_token_id=7)) == expected

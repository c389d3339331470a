"""benchmarks/common.py: the benchmarks' model is the planner's shape, and their tables say "-" for no number."""

import math

import numpy as np
import pytest

from benchmarks.common import LLAVA_15_7B, TINY_SHAPE, fmt, llava_config, shape_processor


def test_the_7b_config_is_the_planners_shape():
    config = llava_config()
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.image_size, vision.patch_size) == (1024, 4096, 24, 16, 336, 14)
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size, text.max_position_embeddings) == \
        (4096, 11008, 32, 32, 32, 32064, 4096)
    assert (config.image_token_index, config.image_seq_length, config.pad_token_id) == (32000, 576, 0)


def test_a_model_built_from_the_config_has_the_parameters_the_planner_counts():
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(llava_config(TINY_SHAPE, max_positions=64))
    assert sum(p.numel() for p in model.parameters()) == TINY_SHAPE.total_params()


def test_the_processor_expands_one_image_to_the_shapes_image_tokens(tiny_model_dir):
    from orchestrator.model.llava import load_processor

    from PIL import Image

    tokenizer = load_processor(tiny_model_dir).tokenizer
    processor = shape_processor(tokenizer, TINY_SHAPE)
    inputs = processor(images=[Image.new("RGB", (80, 50), "red")], text=["<image> a cat"], return_tensors="pt")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == TINY_SHAPE.image_tokens == 16
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 64)
    assert LLAVA_15_7B.image_tokens == 576


@pytest.mark.parametrize("value, spec, unit, width, expected", [
    (3.14159, ".2f", "", 0, "3.14"),
    (2.0, ".1f", " GB", 0, "2.0 GB"),
    (12, "d", "", 5, "   12"),
    (None, ".2f", " GB", 6, "     -"),
    (math.nan, ".2f", "", 0, "-"),
    (math.inf, ".1f", "s", 0, "-"),
    (np.float32(1.5), ".1f", "", 4, " 1.5"),
    (np.float32("nan"), ".1f", "", 0, "-"),
])
def test_fmt_formats_numbers_and_dashes_what_is_missing(value, spec, unit, width, expected):
    assert fmt(value, spec, unit, width) == expected

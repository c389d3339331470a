import pytest

from orchestrator.model.templates import (IGNORE_INDEX, build_prompt, encode_example, encode_prompt,
                                          expand_image_tokens)

V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the user's questions.")


def test_v1_prompt_is_llava_15_exactly():
    assert build_prompt("Describe this image in detail.", "v1") == \
        f"{V1} USER: <image>\nDescribe this image in detail. ASSISTANT:"


def test_llava_v1_differs_only_in_the_system_prompt():
    prompt = build_prompt("Is there a cat in the image?", "llava_v1")
    assert prompt.startswith("A chat between a curious human and")
    assert "the human's questions. USER: <image>\nIs there a cat in the image? ASSISTANT:" in prompt


def test_prompt_with_placeholders_is_kept_and_images_can_be_omitted():
    assert build_prompt("<image>\n<image>\nsame?", "v1").count("<image>") == 2
    assert "<image>" not in build_prompt("text only", "v1", num_images=0)


def test_image_tokens_expand_in_place():
    assert expand_image_tokens([1, 5, 9, 5], image_token_id=5, tokens_per_image=3) == [1, 5, 5, 5, 9, 5, 5, 5]
    # one count per image, in order (images of other sizes take other counts)
    assert expand_image_tokens([1, 5, 9, 5], image_token_id=5, tokens_per_image=[2, 1]) == [1, 5, 5, 9, 5]
    with pytest.raises(ValueError, match="prompt holds 2 image placeholders but 3 images were given"):
        expand_image_tokens([1, 5, 9, 5], image_token_id=5, tokens_per_image=[2, 1, 4])


def test_labels_cover_only_the_answer_and_its_eos(tiny_model_dir):
    from orchestrator.model.llava import load_processor

    processor = load_processor(tiny_model_dir)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    prompt_ids = encode_prompt(tokenizer, build_prompt("Is there a dog in the image?"), image_id, 16)
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(image_id) == 16
    input_ids, labels = encode_example(tokenizer, prompt_ids, "Yes, there is a dog in the image.", 512)
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer = labels[len(prompt_ids):]
    assert answer[-1] == tokenizer.eos_token_id and IGNORE_INDEX not in answer
    assert tokenizer.decode(answer, skip_special_tokens=True) == "Yes, there is a dog in the image."


def test_truncation_cuts_the_answer_never_the_prompt(tiny_model_dir):
    import pytest

    from orchestrator.model.llava import load_processor

    tokenizer = load_processor(tiny_model_dir).tokenizer
    prompt_ids = list(range(3, 13))
    input_ids, labels = encode_example(tokenizer, prompt_ids, "Yes, there is a dog in the image.", 13)
    assert input_ids[:10] == prompt_ids and len(input_ids) == 13
    with pytest.raises(ValueError, match="does not fit max_length"):
        encode_example(tokenizer, prompt_ids, "Yes", 10)

"""The objectives against numbers computed by hand."""

import math

import pytest
import torch

from orchestrator.model.templates import IGNORE_INDEX, encode_answer, encode_example
from orchestrator.train.losses import dpo_loss, dpo_metrics, sequence_logps, sft_nll, token_logps

# Two pairs, beta 0.5. Pair 1: logits = (-1 - -3) - (-2 - -2) = 2; pair 2: (-4 - -2) - (-3 - -3) = -2.
POLICY_CHOSEN = torch.tensor([-1.0, -4.0])
POLICY_REJECTED = torch.tensor([-3.0, -2.0])
REFERENCE_CHOSEN = torch.tensor([-2.0, -3.0])
REFERENCE_REJECTED = torch.tensor([-2.0, -3.0])
BETA = 0.5


@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))]),  # -log sigmoid(beta * logits)
    ("ipo", [(2 - 1) ** 2, (-2 - 1) ** 2]),                                # (logits - 1/(2 beta))^2, 1 token each
    ("hinge", [0.0, 2.0]),                                                 # relu(1 - beta * logits)
])
def test_dpo_loss_matches_hand_computed_values(loss_type, expected):
    one_token = torch.ones(2)
    losses, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED,
                                        BETA, loss_type, chosen_tokens=one_token, rejected_tokens=one_token)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, -0.5])    # beta * (pi_c - ref_c)
    assert rejected.tolist() == pytest.approx([-0.5, 0.5])  # beta * (pi_r - ref_r)


# softplus(t) = log(1 + e^t): at beta * logits = +1 and -1.
SOFTPLUS_MINUS_1, SOFTPLUS_1 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))


@pytest.mark.parametrize("loss_type, smoothing, expected", [
    # cDPO (Mitchell's note; TRL <= 0.28 `dpo_loss`): -(1-e) log sig(z) - e log sig(-z), z = beta * logits.
    # Since log sig(z) - log sig(-z) = z, it equals softplus(-z) + e z: 0.31326 + 0.1 and 1.31326 - 0.1.
    ("sigmoid", 0.1, [0.9 * SOFTPLUS_MINUS_1 + 0.1 * SOFTPLUS_1, 0.9 * SOFTPLUS_1 + 0.1 * SOFTPLUS_MINUS_1]),
    ("sigmoid", 0.1, [0.41326169, 1.21326169]),
    # robust DPO (Chowdhury et al. 2024, eq. 4; TRL): ((1-e) softplus(-z) - e softplus(z)) / (1 - 2e)
    # = softplus(-z) - e z / (1 - 2e): 0.31326 - 0.125 and 1.31326 + 0.125.
    ("robust", 0.1, [(0.9 * SOFTPLUS_MINUS_1 - 0.1 * SOFTPLUS_1) / 0.8,
                     (0.9 * SOFTPLUS_1 - 0.1 * SOFTPLUS_MINUS_1) / 0.8]),
    ("robust", 0.1, [0.18826169, 1.43826169]),
    ("robust", 0.0, [SOFTPLUS_MINUS_1, SOFTPLUS_1]),  # no flipped labels: plain DPO
])
def test_label_smoothing_matches_the_cdpo_and_robust_dpo_formulas(loss_type, smoothing, expected):
    losses, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED,
                                        BETA, loss_type, label_smoothing=smoothing)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, -0.5]) and rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_ipo_averages_log_probs_over_each_answers_tokens():
    # TRL's ipo: x = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r; loss = (x - 1/(2 beta))^2 (IPO eq. 17).
    # Pair 1, n = (2, 3): x = (-1 + 2)/2 - (-3 + 2)/3 = 1/2 + 1/3 = 5/6; loss = (5/6 - 1)^2 = 1/36.
    # Pair 2, n = (4, 1): x = (-4 + 3)/4 - (-2 + 3)/1 = -5/4; loss = (-5/4 - 1)^2 = 81/16.
    losses, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA,
                                        "ipo", chosen_tokens=torch.tensor([2, 4]),
                                        rejected_tokens=torch.tensor([3, 1]))
    assert losses.tolist() == pytest.approx([1 / 36, 81 / 16], abs=1e-6)
    # the rewards stay on summed log-probs, as TRL logs them
    assert chosen.tolist() == pytest.approx([0.5, -0.5]) and rejected.tolist() == pytest.approx([-0.5, 0.5])
    # TRL <= 0.28 averaged all four log-probs before forming the logits: the same number
    old_style = ((POLICY_CHOSEN / torch.tensor([2, 4]) - POLICY_REJECTED / torch.tensor([3, 1]))
                 - (REFERENCE_CHOSEN / torch.tensor([2, 4]) - REFERENCE_REJECTED / torch.tensor([3, 1])))
    assert losses.tolist() == pytest.approx(((old_style - 1 / (2 * BETA)) ** 2).tolist(), abs=1e-6)


def test_ipo_does_not_grow_with_the_answers_length():
    # the same per-token log-probs over answers ten times as long: summed log-probs are ten times larger,
    # the loss is not
    short, _, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "ipo",
                           chosen_tokens=torch.tensor([1, 1]), rejected_tokens=torch.tensor([1, 1]))
    long, _, _ = dpo_loss(10 * POLICY_CHOSEN, 10 * POLICY_REJECTED, 10 * REFERENCE_CHOSEN, 10 * REFERENCE_REJECTED,
                          BETA, "ipo", chosen_tokens=torch.tensor([10, 10]), rejected_tokens=torch.tensor([10, 10]))
    assert long.tolist() == pytest.approx(short.tolist())


def test_ipo_needs_token_counts_and_smoothing_only_fits_sigmoid_and_robust():
    with pytest.raises(ValueError, match="chosen_tokens and rejected_tokens"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "ipo")
    for loss_type in ("ipo", "hinge"):
        with pytest.raises(ValueError, match="applies to the sigmoid and robust losses"):
            dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, loss_type,
                     label_smoothing=0.1, chosen_tokens=torch.tensor([1, 1]), rejected_tokens=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "robust",
                 label_smoothing=0.5)


def test_dpo_loss_rejects_an_unknown_type():
    with pytest.raises(ValueError, match="unknown DPO loss type 'kto'"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "kto")


def test_dpo_loss_is_log_two_when_policy_equals_reference():
    losses, _, _ = dpo_loss(REFERENCE_CHOSEN, REFERENCE_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_dpo_loss_gradient_flows_to_the_policy_only():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, chosen, _ = dpo_loss(policy_chosen, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA)
    losses.sum().backward()
    # d/dx -log sigmoid(beta x) = -beta * sigmoid(-beta x); x = 2 and -2.
    expected = [-BETA * (1 / (1 + math.exp(1))), -BETA * (1 / (1 + math.exp(-1)))]
    assert policy_chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert not chosen.requires_grad


def test_dpo_metrics_report_rewards_accuracy_and_logps():
    _, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA)
    metrics = {key: float(value) for key, value in
               dpo_metrics(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, chosen, rejected).items()}
    assert metrics["rewards/chosen"] == pytest.approx(0.0)
    assert metrics["rewards/rejected"] == pytest.approx(0.0)
    assert metrics["rewards/margins"] == pytest.approx(0.0)    # (+1 and -1) / 2
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)  # pair 1 right, pair 2 wrong
    assert metrics["logps/chosen"] == pytest.approx(-2.5)
    assert metrics["logps/rejected"] == pytest.approx(-2.5)
    assert metrics["logps/ref_chosen"] == pytest.approx(-2.5)
    assert metrics["logps/ref_rejected"] == pytest.approx(-2.5)
    assert metrics["logits/mean"] == pytest.approx(0.0)        # (2 + -2) / 2


def _hand_logits():
    # One sequence of 4 positions over a vocabulary of 3; position t predicts the token at t + 1.
    ln2 = math.log(2)
    return torch.tensor([[[0.0, 0.0, 0.0],     # p = 1/3, 1/3, 1/3
                          [0.0, ln2, 0.0],     # p = 1/4, 1/2, 1/4
                          [0.0, 0.0, ln2],     # p = 1/4, 1/4, 1/2
                          [9.0, 9.0, 9.0]]])   # never used: nothing follows the last position


def test_sequence_logps_sums_shifted_label_log_probs():
    logits = _hand_logits()
    every = torch.tensor([[IGNORE_INDEX, 1, 2, 0]])
    # log p(1 | pos 0) + log p(2 | pos 1) + log p(0 | pos 2)
    assert sequence_logps(logits, every).item() == pytest.approx(math.log(1 / 3) + 2 * math.log(1 / 4))
    answer_only = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 0]])
    assert sequence_logps(logits, answer_only).item() == pytest.approx(2 * math.log(1 / 4))


def test_sequence_logps_computes_in_float32_whatever_the_logits_dtype():
    logits = _hand_logits().to(torch.bfloat16)
    result = sequence_logps(logits, torch.tensor([[IGNORE_INDEX, 1, 2, 0]]))
    assert result.dtype == torch.float32


def test_sft_nll_is_the_mean_over_labelled_tokens_of_the_batch():
    logits = _hand_logits().repeat(2, 1, 1)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 0], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 0]])
    expected = -(math.log(1 / 3) + 2 * math.log(1 / 4) + math.log(1 / 4)) / 4
    assert sft_nll(logits, labels).item() == pytest.approx(expected)


def test_token_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        token_logps(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))


def test_labels_exclude_prompt_and_image_positions_and_include_end_of_sequence(tiny_model_dir):
    from orchestrator.model.families import load_model
    from orchestrator.model.templates import build_prompt, encode_prompt

    loaded = load_model(tiny_model_dir)
    tokenizer = loaded.tokenizer
    prompt_ids = encode_prompt(tokenizer, build_prompt("Is there a cat in the image?"), loaded.image_token_id,
                               loaded.tokens_per_image)
    ids, labels = encode_example(tokenizer, prompt_ids, "Yes, there is a cat in the image.", 256)
    answer = encode_answer(tokenizer, "Yes, there is a cat in the image.")
    assert answer[-1] == tokenizer.eos_token_id
    image_positions = [i for i, token in enumerate(ids) if token == loaded.image_token_id]
    assert len(image_positions) == loaded.tokens_per_image
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    assert labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == answer  # every answer token and </s>, nothing else

    # The log-prob counts exactly the answer tokens and </s>: with uniform logits it is -n log V.
    vocab = len(tokenizer)
    logits = torch.zeros(1, len(ids), vocab)
    total = sequence_logps(logits, torch.tensor([labels])).item()
    assert total == pytest.approx(-len(answer) * math.log(vocab), rel=1e-6)


def test_sft_first_token_weight_reweights_only_each_rows_first_answer_token():
    import math

    import torch

    from orchestrator.train.losses import sft_nll

    # Two rows, vocab 2, uniform logits: every labelled token has log-prob log(1/2).
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor([[-100, 1, 0, 1], [-100, -100, 1, 0]])
    plain = sft_nll(logits, labels)
    assert math.isclose(plain.item(), math.log(2), rel_tol=1e-6)
    # Per-token log-probs differ: make the first answer token of row 0 certain.
    logits[0, 0, 1] = 20.0  # position 0 predicts label at position 1
    weighted = sft_nll(logits, labels, first_token_weight=4.0)
    # tokens: row0 first (nll ~0, weight 4), row0 two more (log 2 each), row1 first (log 2, weight 4), row1 one more
    expected = (0 * 4 + 2 * math.log(2) + 4 * math.log(2) + math.log(2)) / (4 + 2 + 4 + 1)
    assert math.isclose(weighted.item(), expected, rel_tol=1e-4)


def test_the_log_window_averages_metric_tensors_over_its_micro_batches():
    """The loop's metrics stay tensors until a log step reads the window (no GPU wait per micro-batch); a
    micro-batch rerun with weight 0 (the last good one, when no image of the next loaded) adds nothing."""
    from types import SimpleNamespace

    from orchestrator.train.recipe import _Window

    window = _Window()
    batch = SimpleNamespace(num_examples=2, num_tokens=10, skipped=["x"])
    window.add({"loss": torch.tensor(1.0), "rewards/margins": torch.tensor(0.5)}, batch, 1.0)
    window.add({"loss": torch.tensor(3.0), "rewards/margins": torch.tensor(1.5)}, batch, 1.0)
    window.add({"loss": torch.tensor(100.0), "rewards/margins": torch.tensor(100.0)}, batch, 0.0)
    report = window.reduce(world=1)
    assert report["loss"] == pytest.approx(2.0) and report["rewards/margins"] == pytest.approx(1.0)
    assert isinstance(report["loss"], float) and report["skipped_rows"] == 2
    assert window.reduce(world=1)["skipped_rows"] == 0   # reduce starts a new window

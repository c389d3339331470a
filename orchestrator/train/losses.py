"""The training objectives as pure functions: token log-probs in, losses and rewards out.

Nothing here knows about Ray, DeepSpeed or the model; every formula is tested against numbers
computed by hand (tests/train/test_losses.py).

Conventions (CONTEXT.md section 3):
- a sequence's log-prob is the SUM over its response tokens of log-softmax (float32) at the label;
  positions labelled -100 (system prompt, question, image tokens, padding) are excluded and the
  answer's ``</s>`` is included;
- logits at position t predict the token at t + 1, so logits[:, :-1] are scored against labels[:, 1:];
- DPO's implicit reward of a sequence is ``beta * (log p_policy - log p_reference)``;
- the one exception to summed log-probs is IPO, which TRL (and the IPO authors' results) compute on
  log-probs averaged over each answer's tokens: `dpo_loss` takes the token counts for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the (shifted) labels and the mask of positions that count.

    logits: [B, T, V] (any float dtype; upcast to float32 here), labels: [B, T] with -100 where
    nothing is scored. Returns (logps [B, T-1] float32, zero where masked; mask [B, T-1] bool).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of log p(label): [B, T, V], [B, T] -> [B] (float32)."""
    logps, _ = token_logps(logits, labels)
    return logps.sum(-1)


def sft_nll(logits: torch.Tensor, labels: torch.Tensor, first_token_weight: float = 1.0) -> torch.Tensor:
    """The standard LM loss: mean negative log-likelihood over every labelled token of the batch.

    `first_token_weight` weights each row's first labelled token (for QA, the Yes/No that decides the
    answer); the mean is taken over the weights, so 1.0 is exactly the standard loss.
    """
    logps, mask = token_logps(logits, labels)
    return masked_nll(logps, mask, first_token_weight)


def masked_nll(logps: torch.Tensor, mask: torch.Tensor, first_token_weight: float = 1.0) -> torch.Tensor:
    """`sft_nll` from per-token log-probs [B, L] and their mask (see `sft_nll`)."""
    weights = mask.to(logps.dtype)
    if first_token_weight != 1.0:
        first = mask & (mask.cumsum(-1) == 1)
        weights = weights + (first_token_weight - 1.0) * first.to(logps.dtype)
    return -(logps * weights).sum() / weights.sum().clamp(min=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards, from summed sequence log-probs (all [B]).

    With logits x = (pi_c - pi_r) - (ref_c - ref_r) and label smoothing e (the probability that a
    preference label is flipped), as TRL's ``DPOTrainer`` computes them:

    sigmoid (DPO, HA-DPO's; cDPO when e > 0, TRL <= 0.28):
                    -(1 - e) log sigmoid(beta x) - e log sigmoid(-beta x)
    robust (robust DPO, Chowdhury et al. 2024; TRL):
                    (-(1 - e) log sigmoid(beta x) + e log sigmoid(-beta x)) / (1 - 2e)
    hinge (SLiC):   relu(1 - beta x)
    ipo (IPO, Azar et al. 2023, eq. 17, length-normalised as in TRL):
                    (x_avg - 1 / (2 beta))^2, x_avg = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r,
                    i.e. x on log-probs averaged over each answer's tokens (n_c = `chosen_tokens`,
                    n_r = `rejected_tokens`, each at least 1); summed log-probs would make the squared
                    loss grow with the answer's length.

    label_smoothing applies to sigmoid and robust only (0 <= e < 0.5); TRL ignores it for the others
    with a warning, here it is an error. Rewards are ``beta * (pi - ref)`` of the summed log-probs for
    every loss (as TRL logs them), carry no gradient, and feed `dpo_metrics`.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type!r}")
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "robust":
        losses = ((-(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
                   + label_smoothing * F.logsigmoid(-beta * logits)) / (1.0 - 2.0 * label_smoothing))
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * logits)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages log-probs over each answer's tokens: pass chosen_tokens and "
                             "rejected_tokens (PairLogps.token_counts())")
        averaged = (chosen_ratio / chosen_tokens.to(chosen_ratio).clamp(min=1.0)
                    - rejected_ratio / rejected_tokens.to(rejected_ratio).clamp(min=1.0))
        losses = (averaged - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
                chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The numbers HA-DPO / TRL log for a batch, averaged over its pairs: 0-dim tensors on the batch's device,
    so the step does not wait for the GPU here (the loop reads them as floats when it logs)."""
    pc, pr = policy_chosen.detach(), policy_rejected.detach()
    rc, rr = reference_chosen.detach(), reference_rejected.detach()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    logits = (pc - pr) - (rc - rr)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
        "logps/ref_chosen": rc.mean(),
        "logps/ref_rejected": rr.mean(),
        "logits/mean": logits.mean(),
    }

"""Training loss: binary cross-entropy over the 6 labels weighted like the competition metric,
with optional positive weighting and the asymmetric loss of Ridnik et al. (2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ich_train.metrics import LABEL_WEIGHTS


class MultiLabelLoss(nn.Module):
    """Per image sum_j w_j * loss_j / sum(w), averaged over the batch (w = 2 for any, 1 otherwise).

    loss_j = -pos_weight_j * y * (1 - p)^gamma_pos * log(p) - (1 - y) * p_m^gamma_neg * log(1 - p_m)
    with p_m = max(p - clip, 0). gamma_pos = gamma_neg = clip = 0 and pos_weight = 1 is plain BCE.
    """

    def __init__(
        self, pos_weight=None, gamma_pos: float = 0.0, gamma_neg: float = 0.0, clip: float = 0.0
    ):
        super().__init__()
        pw = (
            torch.ones(6)
            if pos_weight is None
            else torch.as_tensor(pos_weight, dtype=torch.float32).expand(6)
        )
        self.register_buffer("weights", torch.as_tensor(LABEL_WEIGHTS, dtype=torch.float32))
        self.register_buffer("pos_weight", pw.clone())
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = logits.float(), targets.float()
        log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)  # log p, log(1 - p)
        if self.clip > 0:
            q_m = (torch.sigmoid(-x) + self.clip).clamp(max=1)  # 1 - p_m
            log_q = torch.log(q_m.clamp(min=1e-8))
        pos, neg = log_p, log_q
        if self.gamma_pos > 0:
            pos = pos * (1 - log_p.exp()).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            neg = neg * (1 - log_q.exp()).pow(self.gamma_neg)
        loss = -(self.pos_weight * y * pos + (1 - y) * neg)
        # an elementwise product and sum, not a matmul: autocast would run a matmul in bf16
        return ((loss * self.weights).sum(dim=1) / self.weights.sum()).mean()


def create_loss(cfg) -> MultiLabelLoss:
    """The loss a TrainConfig asks for: 'bce' (optionally pos-weighted) or 'asl'."""
    if cfg.loss == "asl":
        return MultiLabelLoss(cfg.pos_weight, cfg.asl_gamma_pos, cfg.asl_gamma_neg, cfg.asl_clip)
    return MultiLabelLoss(cfg.pos_weight)

"""Why a model does or does not leave the prior on a small build: ich-train fit's model, head at
the prior, optimizer, schedule, loss and augmentation, trained on one fold's complement held in
memory (a uniform shuffle each epoch: no loader, no shards read during training), so one setting
can be changed at a time. Prints per epoch the training loss, the held-out weighted log loss
(batch norm in eval mode, as fit validates) and AUC any, and with --diag:

  trunk grad:  the mean gradient norm reaching every parameter but the head, before clipping;
  train imgs:  the loss on 192 training images (no augmentation) with the batch-norm running
               statistics fit keeps, and with each batch's own statistics (train mode);
with --recompute-bn the running statistics are recomputed over the training images (no
augmentation; torch.optim.swa_utils.update_bn) before each validation.

    python benchmarks/probe_small_data.py BUILD --model efficientnet_b0 --fold 0 [--diag]
    python benchmarks/probe_small_data.py BUILD --model efficientnet_b0 --no-augment --recompute-bn
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from ich_train.augment import AugmentParams, DeviceAugment
from ich_train.data import Build, decode_sample, read_shard
from ich_train.losses import MultiLabelLoss
from ich_train.metrics import compute_metrics
from ich_train.model import build_model, init_head, model_spec, normalization, zero_init_residuals
from ich_train.optim import create_optimizer, create_scheduler


def load_folds(root: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """fold -> (uint8 images (N, H, W, C), labels (N, 6)) of a labelled build, in shard order."""
    b, out = Build(root), {}
    for fold in sorted({s.fold for s in b.shards}):
        items = [decode_sample(raw, b.encoding) for s in b.shards if s.fold == fold for raw in read_shard(s, b.encoding)]  # fmt: skip
        out[fold] = (np.stack([i[1] for i in items]), np.stack([i[2] for i in items]))
    return out


def make_model(a, prior: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    model = build_model(model_spec(a.model, 3, 0.0))
    init_head(model, prior)
    if a.zero_residuals:
        zero_init_residuals(model)
    if a.head == "timm":  # keep the prior bias; weights uniform in +-1/sqrt(outputs), timm's
        head = model.get_classifier()
        torch.manual_seed(a.seed + 1)
        r = 1 / math.sqrt(head.weight.shape[0])
        torch.nn.init.uniform_(head.weight, -r, r)
    return model.to(memory_format=torch.channels_last)


def predict(model, aug, x: np.ndarray, train_bn: bool = False) -> np.ndarray:
    """Probabilities for `x`; with `train_bn` each batch normalised by its own statistics (the
    running statistics it would update are restored after)."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}  # fmt: skip
    model.train(train_bn)
    with torch.no_grad():
        out = np.concatenate([torch.sigmoid(model(aug(torch.from_numpy(x[i : i + 64]), train=False))).numpy() for i in range(0, len(x), 64)])  # fmt: skip
    model.load_state_dict(saved, strict=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("build")
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--head", choices=("zero", "timm"), default="zero")
    p.add_argument("--zero-residuals", action="store_true", help="zero_init_residuals, as fit does")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--recompute-bn", action="store_true")
    p.add_argument("--diag", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    folds = load_folds(a.build)
    xt = np.concatenate([x for f, (x, _) in folds.items() if f != a.fold])
    yt = np.concatenate([y for f, (_, y) in folds.items() if f != a.fold])
    xv, yv = folds[a.fold]
    prior = yt.mean(0)
    model = make_model(a, prior)
    ap = AugmentParams(noise=a.noise) if not a.no_augment else AugmentParams(0, 0, 0, 0, 0, 0, 0)
    aug = DeviceAugment(a.image_size, *normalization(model, 3), ap, True)
    steps = len(xt) // a.batch_size
    opt = create_optimizer(model, a.lr, a.weight_decay, torch.device("cpu"))
    sched = create_scheduler(opt, steps * a.epochs, a.warmup_frac, 0.01)
    loss_fn, g, rng = MultiLabelLoss(), torch.Generator().manual_seed(a.seed), np.random.default_rng(a.seed)  # fmt: skip
    trunk = [q for q in model.parameters() if all(q is not h for h in model.get_classifier().parameters())]  # fmt: skip
    prior_loss = compute_metrics(yv, np.tile(prior, (len(yv), 1)))["valid_loss"]
    best, t0 = math.inf, time.time()
    for ep in range(a.epochs):
        model.train()
        perm, losses, norms = rng.permutation(len(xt)), [], []
        for s in range(steps):
            idx = perm[s * a.batch_size : (s + 1) * a.batch_size]
            loss = loss_fn(model(aug(torch.from_numpy(xt[idx]), train=not a.no_augment, generator=g)), torch.from_numpy(yt[idx]))  # fmt: skip
            opt.zero_grad()
            loss.backward()
            if a.diag:
                norms.append(torch.norm(torch.stack([q.grad.norm() for q in trunk if q.grad is not None] or [torch.zeros(())])).item())  # fmt: skip
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        if a.recompute_bn:
            with torch.no_grad():
                update_bn([aug(torch.from_numpy(xt[perm[i : i + a.batch_size]]), train=False) for i in range(0, len(xt), a.batch_size)], model)  # fmt: skip
        m = compute_metrics(yv, predict(model, aug, xv))
        best = min(best, m["valid_loss"])
        line = f"epoch {ep + 1}: train loss {np.mean(losses):.4f}, valid {m['valid_loss']:.4f}, AUC any {m['valid_auc_any']:.3f}"  # fmt: skip
        if a.diag:
            run_bn = compute_metrics(yt[:192], predict(model, aug, xt[:192]))["valid_loss"]
            own_bn = compute_metrics(yt[:192], predict(model, aug, xt[:192], True))["valid_loss"]
            line += f"; trunk grad {np.mean(norms):.2f}; train imgs: running BN {run_bn:.4f}, batch BN {own_bn:.4f}"  # fmt: skip
        print(line, flush=True)
    print(f"{a.model} fold {a.fold} seed {a.seed}: best valid {best:.4f} vs prior {prior_loss:.4f} ({(best / prior_loss - 1) * 100:+.1f}%), {time.time() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()

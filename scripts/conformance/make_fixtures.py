#!/usr/bin/env python3
"""Regenerates the golden conformance fixtures in tests/fixtures/ (see README.md here).

Every fixture holds seeded random inputs AND the outputs that an independent implementation
computes from them:
- pytorch_token_ops.json: torch log_softmax/gather and F.cross_entropy per-token log-probs,
  autograd gradients into the logits, per-sequence sums (f32 and bf16-rounded logits);
- trl_losses.json: TRL's own KTOTrainer.kto_loss, DPOTrainer.dpo_loss, CPOTrainer.cpo_loss (simpo)
  and ORPOTrainer.odds_ratio_loss, called on float64 tensors with autograd gradients;
- tiny_gpt2/: a seeded random transformers GPT2LMHeadModel saved with save_pretrained, plus its
  logits and per-token log-probs on fixed inputs (transformers_gpt2.json).

The Rust tests tests/conformance_{pytorch,trl,transformers}.rs compare against these without
Python. Run: python3 scripts/conformance/make_fixtures.py (creates the venv on first use).
"""

import argparse
import importlib.metadata as md
import json
import math
import os
import subprocess
import sys
import tempfile
import types
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
# The model fixtures belong to the halo-train crate of the workspace (its tests read them).
TRAIN_FIXTURES = ROOT / "halo-train" / "tests" / "fixtures"
VENV = ROOT / ".tools" / "conformance-venv"
REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
IGNORE = -100


def reachable(url, timeout=5):
    try:
        urllib.request.urlopen(url, timeout=timeout)
        return True
    except Exception:
        return False


def ensure_venv():
    """Re-runs this script inside .tools/conformance-venv, creating it first if needed (CPU-only
    torch from PyTorch's CPU index when that is reachable, else the default index)."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not python.exists():
        print(f"creating {VENV.relative_to(ROOT)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        torch_pin = next(line.strip() for line in REQUIREMENTS.read_text().splitlines()
                         if line.startswith("torch=="))
        if reachable(TORCH_CPU_INDEX + "/"):
            subprocess.run(pip + ["--index-url", TORCH_CPU_INDEX, torch_pin], check=True)
        subprocess.run(pip + ["-r", str(REQUIREMENTS)], check=True)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


if __name__ == "__main__":
    ensure_venv()

import numpy as np  # noqa: E402  (after the venv bootstrap)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ----------------------------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------------------------


def f32_list(values):
    """Exact f32 values as the shortest decimal that parses back (via f64, as serde_json does,
    then `as f32`) to the same f32."""
    out = []
    for v in np.asarray(values, dtype=np.float32).reshape(-1):
        if not math.isfinite(float(v)):
            raise ValueError(f"non-finite input {v!r}")
        short = float(str(v))
        if np.float32(short) != v:  # would double-round: write the exact value instead
            short = float(v)
        out.append(short)
    return out


def f64_list(values):
    out = []
    for v in np.asarray(values, dtype=np.float64).reshape(-1):
        if not math.isfinite(float(v)):
            raise ValueError(f"non-finite output {v!r}")
        out.append(float(f"{float(v):.12g}"))  # 12 digits: far below every test tolerance
    return out


def int_list(values):
    return [int(v) for v in np.asarray(values).reshape(-1)]


def opt_f64(t):
    """A scalar metric or None (TRL gives NaN / empty tensors for a class that is absent)."""
    if t is None:
        return None
    t = torch.as_tensor(t).detach().double().reshape(-1)
    if t.numel() == 0:
        return None
    v = float(t.mean())
    return v if math.isfinite(v) else None


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    path.write_text(text + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({len(text) / 1024:.1f} KiB)")


def versions():
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "trl", "transformers", "numpy", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------------------------
# 1. PyTorch token ops
# ----------------------------------------------------------------------------------------------


def random_labels(gen, rows, vocab, ignore_frac, all_ignored_rows=()):
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    ignored = torch.rand(rows, generator=gen) < ignore_frac
    labels[ignored] = IGNORE
    for r in all_ignored_rows:
        labels[r] = IGNORE
    return labels


def token_case(name, seed, batch, seq, vocab, dtype="f32", scale=3.0, extreme=False,
               ignore_frac=0.2, ignored_sequences=()):
    """One case on `batch` sequences of `seq` tokens (padded layout, rows = batch*seq)."""
    gen = torch.Generator().manual_seed(seed)
    rows = batch * seq
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    logits += torch.randn(rows, 1, generator=gen, dtype=torch.float64) * scale  # row offsets
    if extreme:
        # Saturating logits: ±1e4 entries (with mixed signs) dominate each row's logsumexp.
        spikes = torch.rand(rows, vocab, generator=gen) < 0.05
        signs = torch.where(torch.rand(rows, vocab, generator=gen) < 0.5, -1.0, 1.0)
        logits = torch.where(spikes, signs.double() * 1e4, logits)
        logits[0, 0] = 1e4
    all_ignored_rows = [b * seq + t for b in ignored_sequences for t in range(seq)]
    labels = random_labels(gen, rows, vocab, ignore_frac, all_ignored_rows)
    # Weights of the per-token log-probs in the scalar whose gradient we take (never zero).
    weights = torch.rand(rows, generator=gen, dtype=torch.float64) * 2 - 1
    weights = torch.where(weights.abs() < 0.05, torch.full_like(weights, 0.3), weights)

    # The f32 (or bf16-rounded) logits are the inputs; everything below is computed from exactly
    # those values in float64.
    if dtype == "f32":
        stored = logits.float()
    elif dtype == "bf16":
        stored = logits.to(torch.bfloat16).float()
    elif dtype == "f16":
        stored = logits.clamp(-65504, 65504).half().float()
    else:
        raise ValueError(dtype)
    z = stored.double().requires_grad_(True)

    keep = labels != IGNORE
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
    lse = torch.logsumexp(z, dim=-1) * keep
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="none")
    objective = (logp * weights).sum()
    (grad,) = torch.autograd.grad(objective, z)

    # Padded-layout per-sequence sums and counts (the masked sum TRL's get_batch_logps takes).
    seq_sums = (logp.detach().view(batch, seq)).sum(-1)
    seq_counts = keep.view(batch, seq).sum(-1)

    case = {
        "name": name,
        "dtype": dtype,
        "batch": batch,
        "seq": seq,
        "vocab": vocab,
        "logits": f32_list(stored),
        "labels": int_list(labels),
        "grad_weights": f32_list(weights.float()),
        "logp": f64_list(logp.detach()),
        "lse": f64_list(lse.detach()),
        "cross_entropy": f64_list(ce.detach()),
        "grad_logits": f64_list(grad),
        "sequence_sums": f64_list(seq_sums),
        "sequence_counts": int_list(seq_counts),
    }
    if dtype == "bf16":
        # What torch itself computes natively in bf16 (output rounded to bf16): a loose cross-check.
        zb = stored.to(torch.bfloat16)
        ce_bf16 = F.cross_entropy(zb, labels, ignore_index=IGNORE, reduction="none")
        case["cross_entropy_torch_bf16"] = f64_list(ce_bf16.double())
    if dtype == "f16":
        zh = stored.half()
        ce_f16 = F.cross_entropy(zh, labels, ignore_index=IGNORE, reduction="none")
        case["cross_entropy_torch_f16"] = f64_list(ce_f16.double())
    # The gradient is taken with respect to the f32 weights as stored.
    return case


def make_pytorch_fixture():
    torch.manual_seed(0)
    cases = [
        token_case("vocab1", 11, batch=3, seq=5, vocab=1),
        token_case("vocab37", 12, batch=4, seq=7, vocab=37, ignored_sequences=(2,)),
        token_case("vocab1000", 13, batch=2, seq=3, vocab=1000),
        token_case("batch_of_one_vocab257", 14, batch=1, seq=9, vocab=257),
        token_case("vocab4099_lane_tail", 15, batch=1, seq=2, vocab=4099, scale=6.0),
        token_case("extreme_logits_vocab333", 16, batch=2, seq=4, vocab=333, extreme=True),
        token_case("large_scale_vocab50", 17, batch=3, seq=4, vocab=50, scale=40.0),
        token_case("bf16_vocab37", 21, batch=3, seq=6, vocab=37, dtype="bf16",
                   ignored_sequences=(1,)),
        token_case("bf16_vocab1000", 22, batch=2, seq=2, vocab=1000, dtype="bf16"),
        token_case("bf16_extreme_vocab129", 23, batch=2, seq=3, vocab=129, dtype="bf16",
                   extreme=True),
        token_case("f16_vocab37", 31, batch=2, seq=5, vocab=37, dtype="f16",
                   ignored_sequences=(0,)),
        token_case("f16_vocab1000", 32, batch=1, seq=3, vocab=1000, dtype="f16", scale=5.0),
    ]
    write_json(FIXTURES / "pytorch_token_ops.json", {
        "source": "torch.log_softmax(logits.double()).gather / F.cross_entropy(ignore_index=-100, "
                  "reduction='none') / torch.autograd.grad of sum(grad_weights * logp)",
        "ignore_index": IGNORE,
        "versions": versions(),
        "cases": cases,
    })


# ----------------------------------------------------------------------------------------------
# 2. TRL losses, through TRL's own code with a minimal fake `self`
# ----------------------------------------------------------------------------------------------


class IdentityAccelerator:
    """Single-process accelerate stub: gather is the identity (what one process does)."""

    device = torch.device("cpu")

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t


class TwoDeviceKlAccelerator(IdentityAccelerator):
    """Pretends a second process holds other KL pairs: gather_for_metrics on the per-device KL mean
    (a 0-d tensor) returns [ours, other device's mean], as accelerate would; other values (token
    counts, metric sums) stay single-process."""

    def __init__(self, other_kl_mean):
        self.other = torch.tensor(other_kl_mean, dtype=torch.float64)
        self.kl_gathered = False

    def gather_for_metrics(self, t):
        if not self.kl_gathered and t.dim() == 0 and t.dtype == torch.float64:
            self.kl_gathered = True
            return torch.stack([t, self.other])
        return t


class TableModel:
    """A stand-in causal LM for TRL's `_compute_loss`: row i of `input_ids` carries its row id in
    column 0, and the model returns per-token log-probs whose sum over the sequence is exactly
    `table[id]` (all of it at the first position), so the gradient TRL's loss sends into that
    entry is the gradient w.r.t. the summed sequence log-prob."""

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, labels=None, **kwargs):
        ids = input_ids[:, 0]
        n, length = input_ids.shape
        first = torch.zeros(n, length - 1, dtype=self.table.dtype)
        first[:, 0] = 1.0
        log_probs = self.table[ids].unsqueeze(-1) * first
        zeros = torch.zeros(n, length - 1, dtype=self.table.dtype)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros(n, length - 1, dtype=torch.bool),
                                     aux_loss=None)


def metrics_of(metric_lists):
    out = {}
    for key, values in metric_lists.items():
        if key in ("num_tokens", "entropy", "logits/chosen", "logits/rejected",
                   "mean_token_accuracy"):
            continue
        out[key] = float(values[-1])
    return out


def completion_masks(counts, length):
    """[n, length] masks with `counts[i]` completion tokens, never at position 0 (the prompt)."""
    mask = torch.zeros(len(counts), length, dtype=torch.long)
    for i, c in enumerate(counts):
        mask[i, 1:1 + c] = 1
    return mask


def kto_case(name, seed, n, beta=0.1, dw=1.0, uw=1.0, loss_type="kto", mode="mixed",
             kl_shift=0.0, scale=40.0, spread=10.0, other_device_kl=None):
    from trl.trainer.kto_trainer import KTOTrainer

    gen = torch.Generator().manual_seed(seed)
    policy = (-(torch.rand(n, generator=gen, dtype=torch.float64) * scale + 1)).float().double()
    reference = (policy + torch.randn(n, generator=gen, dtype=torch.float64) * spread).float().double()
    kl_policy = (-(torch.rand(n, generator=gen, dtype=torch.float64) * scale + 1)).float().double()
    kl_reference = (kl_policy - kl_shift
                    + torch.randn(n, generator=gen, dtype=torch.float64) * spread).float().double()
    if mode == "mixed":
        desirable = torch.rand(n, generator=gen) < 0.5
        desirable[0], desirable[-1] = True, False
    else:
        desirable = torch.full((n,), mode == "desirable")
    if n == 1:
        desirable = torch.tensor([mode != "undesirable"])

    policy_leaf = policy.clone().requires_grad_(True)
    table = torch.cat([policy_leaf, kl_policy])  # ids 0..n-1: completions, n..2n-1: KL pairs
    length = 4
    ids = torch.zeros(n, length, dtype=torch.long)
    ids[:, 0] = torch.arange(n)
    kl_ids = ids.clone()
    kl_ids[:, 0] += n
    counts = torch.randint(1, length, (n,), generator=gen).tolist()
    cmask = completion_masks(counts, length)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cmask,
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(ids),
        "KL_completion_mask": cmask.clone(),
        "label": desirable.clone(),
        "ref_logps": reference,
        "ref_KL_logps": kl_reference if loss_type == "kto" else None,
    }
    accelerator = (IdentityAccelerator() if other_device_kl is None
                   else TwoDeviceKlAccelerator(other_device_kl))
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator,
        calculate_KL=loss_type != "apo_zero_unpaired", loss_type=loss_type, beta=beta,
        desirable_weight=dw, undesirable_weight=uw, precompute_ref_logps=True,
        aux_loss_enabled=False, _metrics={"train": _defaultdict_list()}, _total_train_tokens=0,
        _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    fake._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake)
    loss = KTOTrainer._compute_loss(fake, TableModel(table), inputs, return_outputs=False)
    loss.backward()
    case = {
        "name": name, "loss_type": loss_type, "beta": beta, "desirable_weight": dw,
        "undesirable_weight": uw,
        "policy_logps": f32_list(policy), "reference_logps": f32_list(reference),
        "is_desirable": [bool(d) for d in desirable],
        "loss": float(loss.detach()), "grad_policy_logps": f64_list(policy_leaf.grad),
        "metrics": metrics_of(fake._metrics["train"]),
    }
    if loss_type == "kto":
        case["kl_policy_logps"] = f32_list(kl_policy)
        case["kl_reference_logps"] = f32_list(kl_reference)
    if other_device_kl is not None:
        case["other_device_kl_mean"] = other_device_kl
    return case


def _defaultdict_list():
    from collections import defaultdict
    return defaultdict(list)


def dpo_case(name, seed, n, loss_type, beta=0.1, label_smoothing=0.0, scale=60.0, spread=8.0,
             margin_scale=1.0, discopop_tau=0.05, f_divergence="reverse_kl", alpha=0.5,
             dtype=torch.float64):
    """`dtype=torch.float32` runs TRL in float32 (its alpha-divergence has no float64 branch)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    gen = torch.Generator().manual_seed(seed)

    def logps():
        return (-(torch.rand(n, generator=gen, dtype=torch.float64) * scale + 0.5)).float().double()

    pc, pr = logps(), logps()
    rc = (pc + torch.randn(n, generator=gen, dtype=torch.float64) * spread * margin_scale).float().double()
    rr = (pr + torch.randn(n, generator=gen, dtype=torch.float64) * spread * margin_scale).float().double()
    counts_c = torch.randint(1, 30, (n,), generator=gen).tolist()
    counts_r = torch.randint(1, 30, (n,), generator=gen).tolist()
    pc_leaf = pc.clone().to(dtype).requires_grad_(True)
    pr_leaf = pr.clone().to(dtype).requires_grad_(True)
    table = torch.cat([pc_leaf, pr_leaf])
    length = 31
    ids = torch.zeros(2 * n, length, dtype=torch.long)
    ids[:, 0] = torch.arange(2 * n)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "completion_mask": completion_masks(counts_c + counts_r, length),
        "ref_chosen_logps": rc.to(dtype), "ref_rejected_logps": rr.to(dtype),
    }
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=IdentityAccelerator(),
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type=f_divergence,
        f_alpha_divergence_coef=alpha,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, aux_loss_enabled=False, _metrics={"train": _defaultdict_list()},
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(discopop_tau=discopop_tau),
    )
    loss = DPOTrainer._compute_loss(fake, TableModel(table), inputs, return_outputs=False)
    loss.backward()
    return {
        "name": name, "loss_type": loss_type, "beta": beta, "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau, "f_divergence": f_divergence,
        "f_alpha_divergence_coef": alpha, "dtype": str(dtype).removeprefix("torch."),
        "policy_chosen_logps": f32_list(pc), "policy_rejected_logps": f32_list(pr),
        "reference_chosen_logps": f32_list(rc), "reference_rejected_logps": f32_list(rr),
        "chosen_counts": counts_c, "rejected_counts": counts_r,
        "loss": float(loss.detach()), "grad_chosen": f64_list(pc_leaf.grad),
        "grad_rejected": f64_list(pr_leaf.grad), "metrics": metrics_of(fake._metrics["train"]),
    }


def reference_free_inputs(gen, n, vocab, length, near_zero=False):
    """Summed chosen/rejected log-probs and counts. Built from random logits with TRL's own
    `get_batch_logps` (sum), then rounded to f32 (our input type); `near_zero` instead draws
    average log-probs in (-0.05, 0) (probabilities near 1, where ORPO's log(1 - p) is delicate)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    if near_zero:
        counts_c = torch.randint(1, 12, (n,), generator=gen)
        counts_r = torch.randint(1, 12, (n,), generator=gen)
        avg_c = -torch.rand(n, generator=gen, dtype=torch.float64) * 0.05 - 1e-4
        avg_r = -torch.rand(n, generator=gen, dtype=torch.float64) * 0.05 - 1e-4
        sums_c, sums_r = (avg_c * counts_c).float(), (avg_r * counts_r).float()
        return sums_c, sums_r, counts_c, counts_r, None
    logits = torch.randn(2 * n, length, vocab, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (2 * n, length), generator=gen)
    # Prompt tokens and right padding are -100; every completion keeps at least one token.
    for i in range(2 * n):
        start = int(torch.randint(1, length // 2, (1,), generator=gen))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=gen))
        labels[i, :start] = -100
        labels[i, end:] = -100
    sums = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    counts = (labels[:, 1:] != -100).sum(-1)
    # nn.CrossEntropyLoss over the chosen half, as CPO/ORPO's concatenated_forward computes it.
    ce = torch.nn.CrossEntropyLoss()(logits[:n, :-1, :].reshape(-1, vocab),
                                     labels[:n, 1:].reshape(-1))
    return sums[:n].float(), sums[n:].float(), counts[:n], counts[n:], float(ce)


def simpo_case(name, seed, n, beta=0.1, gamma=0.5, label_smoothing=0.0, cpo_alpha=0.0,
               vocab=37, length=12):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    gen = torch.Generator().manual_seed(seed)
    sums_c, sums_r, counts_c, counts_r, ce = reference_free_inputs(gen, n, vocab, length)
    sc = sums_c.double().requires_grad_(True)
    sr = sums_r.double().requires_grad_(True)
    # get_batch_logps(average_log_prob=True) for loss_type "simpo": sum / count.
    avg_c, avg_r = sc / counts_c, sr / counts_r
    fake = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                                 label_smoothing=label_smoothing, accelerator=IdentityAccelerator())
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, avg_c, avg_r)
    # CrossEntropyLoss(mean) over the chosen tokens, written on the f32 sums so it is
    # differentiable w.r.t. them: -sum of token log-probs / number of tokens.
    nll = -sc.sum() / counts_c.sum()
    loss = losses.mean() + cpo_alpha * nll
    loss.backward()
    return {
        "name": name, "beta": beta, "simpo_gamma": gamma, "label_smoothing": label_smoothing,
        "cpo_alpha": cpo_alpha,
        "policy_chosen_logps": f32_list(sums_c), "policy_rejected_logps": f32_list(sums_r),
        "chosen_counts": int_list(counts_c), "rejected_counts": int_list(counts_r),
        "loss": float(loss.detach()), "losses": f64_list(losses.detach()),
        "grad_chosen": f64_list(sc.grad), "grad_rejected": f64_list(sr.grad),
        "nll_loss": float(nll.detach()), "nll_loss_cross_entropy_f64_logits": ce,
        "metrics": {
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).double().mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "logps/chosen": float(avg_c.detach().mean()),
            "logps/rejected": float(avg_r.detach().mean()),
        },
    }


def orpo_case(name, seed, n, beta=0.1, near_zero=False, vocab=37, length=12):
    from trl.experimental.orpo import orpo_trainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    gen = torch.Generator().manual_seed(seed)
    sums_c, sums_r, counts_c, counts_r, ce = reference_free_inputs(gen, n, vocab, length,
                                                                   near_zero=near_zero)
    sc = sums_c.double().requires_grad_(True)
    sr = sums_r.double().requires_grad_(True)
    avg_c, avg_r = sc / counts_c, sr / counts_r
    fake = types.SimpleNamespace(beta=beta, accelerator=IdentityAccelerator())
    # TRL as is: odds_ratio_loss casts its inputs to float32 (`.float()`) before the formula.
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = \
        ORPOTrainer.odds_ratio_loss(fake, avg_c, avg_r)
    nll = -sc.sum() / counts_c.sum()
    loss = nll - losses.mean()
    loss.backward()
    # The same formula in float64 (odds_ratio_loss without its `.float()`), with TRL's log1mexp.
    c64, r64 = avg_c.detach(), avg_r.detach()
    sc64 = sc.detach().clone().requires_grad_(True)
    sr64 = sr.detach().clone().requires_grad_(True)
    a, b = sc64 / counts_c, sr64 / counts_r
    log_odds64 = (a - b) - (orpo_trainer.log1mexp(a) - orpo_trainer.log1mexp(b))
    ratio64 = F.logsigmoid(log_odds64)
    loss64 = -sc64.sum() / counts_c.sum() - (beta * ratio64).mean()
    loss64.backward()
    return {
        "name": name, "beta": beta,
        "policy_chosen_logps": f32_list(sums_c), "policy_rejected_logps": f32_list(sums_r),
        "chosen_counts": int_list(counts_c), "rejected_counts": int_list(counts_r),
        "loss": float(loss.detach()), "grad_chosen": f64_list(sc.grad), "grad_rejected": f64_list(sr.grad),
        "loss_f64": float(loss64.detach()), "grad_chosen_f64": f64_list(sc64.grad),
        "grad_rejected_f64": f64_list(sr64.grad),
        "nll_loss": float(nll.detach()),
        "nll_loss_cross_entropy_f64_logits": ce,
        "metrics": {
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).double().mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "logps/chosen": float(c64.mean()),
            "logps/rejected": float(r64.mean()),
            "log_odds_ratio": float(ratio64.detach().mean()),
            "log_odds_chosen": float(log_odds64.detach().mean()),
            "log_odds_ratio_trl_f32": float(log_odds_ratio),
            "log_odds_chosen_trl_f32": float(log_odds_chosen),
        },
    }


class LogitsModel:
    """A stand-in causal LM with real logits: `logits[id]` is row id's `[length - 1, vocab]`
    block (position t predicts token t + 1), and the model returns what a fused LM head returns,
    `log_softmax(logits)[labels[:, 1:]]` with 0 where the shifted label is -100."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, labels=None, **kwargs):
        z = self.logits[input_ids[:, 0]]
        shifted = labels[:, 1:]
        keep = shifted != IGNORE
        lp = torch.log_softmax(z, -1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        log_probs = lp * keep
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros_like(keep), aux_loss=None)


def end_to_end_case(name, seed, n, loss_type, vocab=37, length=7, beta=0.1):
    """Logits -> per-token log-probs -> TRL loss -> autograd gradient into the logits, for KTO
    (`KTOTrainer._compute_loss`) and DPO sigmoid (`DPOTrainer._compute_loss`)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n  # KTO: n completions + n KL completions; DPO: n chosen + n rejected
    logits = (torch.randn(rows, length - 1, vocab, generator=gen, dtype=torch.float64) * 2.5)
    logits = logits.float().double()
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    counts = torch.randint(1, length - 1, (rows,), generator=gen)
    if n > 1:
        counts[1] = length - 2
    cmask = completion_masks(counts.tolist(), length)
    leaf = logits.clone().requires_grad_(True)
    model = LogitsModel(leaf)
    table_ids = ids.clone()
    table_ids[:, 0] = torch.arange(rows)  # column 0 (a prompt token) carries the row id
    reference = (-(torch.rand(rows, generator=gen, dtype=torch.float64) * 20 + 5)).float().double()
    common = dict(model=types.SimpleNamespace(training=True), accelerator=IdentityAccelerator(),
                  precompute_ref_logps=True, aux_loss_enabled=False,
                  _metrics={"train": _defaultdict_list()}, _total_train_tokens=0, _tp_size=1,
                  beta=beta, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    case = {"name": name, "loss_type": loss_type, "beta": beta, "n": n, "vocab": vocab,
            "positions": length - 1}
    if loss_type == "kto":
        desirable = torch.rand(n, generator=gen) < 0.5
        desirable[0] = True
        inputs = {
            "input_ids": table_ids[:n], "attention_mask": torch.ones_like(ids[:n]),
            "completion_mask": cmask[:n], "KL_input_ids": table_ids[n:],
            "KL_attention_mask": torch.ones_like(ids[n:]), "KL_completion_mask": cmask[n:],
            "label": desirable.clone(), "ref_logps": reference[:n], "ref_KL_logps": reference[n:],
        }
        fake = types.SimpleNamespace(calculate_KL=True, loss_type="kto", desirable_weight=1.0,
                                     undesirable_weight=1.0, **common)
        fake._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake)
        loss = KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
        case["is_desirable"] = [bool(d) for d in desirable]
    else:
        inputs = {
            "input_ids": table_ids, "attention_mask": torch.ones_like(ids),
            "completion_mask": cmask,
            "ref_chosen_logps": reference[:n], "ref_rejected_logps": reference[n:],
        }
        fake = types.SimpleNamespace(ld_alpha=None, f_divergence_type="reverse_kl",
                                     loss_types=[loss_type], loss_weights=[1.0],
                                     label_smoothing=0.0, use_weighting=False, **common)
        loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    loss.backward()
    # Our layout: row r, position t predicts ids[r, t + 1]; -100 outside the completion.
    shifted = ids[:, 1:].masked_fill(cmask[:, 1:] == 0, IGNORE)
    case.update({
        "logits": f32_list(logits), "labels": int_list(shifted),
        "reference_logps": f32_list(reference),
        "loss": float(loss.detach()), "grad_logits": f64_list(leaf.grad),
        "metrics": metrics_of(fake._metrics["train"]),
    })
    return case


def make_trl_fixture():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    kto = [
        kto_case("mixed_default", 101, 9),
        kto_case("mixed_z0_positive", 102, 7, kl_shift=6.0, beta=0.3),
        kto_case("mixed_z0_clamped", 103, 8, kl_shift=-9.0),
        kto_case("all_desirable", 104, 6, mode="desirable", kl_shift=3.0),
        kto_case("all_undesirable", 105, 5, mode="undesirable", kl_shift=3.0),
        kto_case("batch_of_one", 106, 1, kl_shift=2.0, beta=0.5),
        kto_case("weighted", 107, 10, dw=1.33, uw=0.75, kl_shift=1.0),
        kto_case("saturated", 108, 6, beta=2.0, spread=300.0, scale=800.0),
        kto_case("apo_zero_unpaired", 109, 7, loss_type="apo_zero_unpaired", beta=0.2),
        kto_case("apo_zero_unpaired_all_undesirable", 110, 4, loss_type="apo_zero_unpaired",
                 mode="undesirable"),
        # TRL's KL over two processes: mean of the per-process means, clamped.
        kto_case("two_devices_mean_of_means", 111, 6, kl_shift=4.0, other_device_kl=11.5),
    ]
    dpo = [
        dpo_case("sigmoid", 201, 8, "sigmoid"),
        dpo_case("sigmoid_beta0.5_batch_of_one", 202, 1, "sigmoid", beta=0.5),
        # TRL >= 1.0 ignores label_smoothing for "sigmoid" (no cDPO term): see the Rust test.
        dpo_case("sigmoid_label_smoothing_ignored", 203, 6, "sigmoid", label_smoothing=0.1),
        dpo_case("sigmoid_saturated", 204, 6, "sigmoid", beta=1.0, margin_scale=80.0),
        dpo_case("robust", 205, 7, "robust", label_smoothing=0.2),
        dpo_case("hinge", 206, 9, "hinge", beta=0.3),
        dpo_case("ipo", 207, 7, "ipo", beta=0.1),
        dpo_case("ipo_beta1", 208, 5, "ipo", beta=1.0),
        dpo_case("apo_zero", 209, 8, "apo_zero", beta=0.2),
        dpo_case("apo_down", 210, 8, "apo_down", beta=0.2),
        dpo_case("exo_pair_paper_eps", 211, 7, "exo_pair", label_smoothing=1e-3),
        dpo_case("exo_pair_eps0.2", 212, 6, "exo_pair", beta=0.5, label_smoothing=0.2),
        dpo_case("nca_pair", 213, 8, "nca_pair"),
        dpo_case("bco_pair", 214, 7, "bco_pair", beta=0.3),
        dpo_case("sppo_hard", 215, 8, "sppo_hard"),
        dpo_case("sppo_hard_beta1", 216, 5, "sppo_hard", beta=1.0),
        dpo_case("aot", 217, 9, "aot"),
        dpo_case("aot_smoothed", 218, 7, "aot", beta=0.3, label_smoothing=0.1),
        dpo_case("aot_batch_of_one", 219, 1, "aot"),
        dpo_case("aot_unpaired", 220, 9, "aot_unpaired"),
        dpo_case("aot_unpaired_smoothed", 221, 6, "aot_unpaired", label_smoothing=0.2),
        dpo_case("discopop", 222, 8, "discopop"),
        dpo_case("discopop_tau0.5", 223, 6, "discopop", beta=0.3, discopop_tau=0.5),
        dpo_case("sft", 224, 6, "sft"),
        dpo_case("sigmoid_norm", 225, 7, "sigmoid_norm", beta=0.5),
        # f-DPO (f_divergence_type) on every loss type that has a form for it.
        dpo_case("sigmoid_forward_kl", 231, 7, "sigmoid", f_divergence="forward_kl"),
        dpo_case("sigmoid_js", 232, 7, "sigmoid", beta=0.5, f_divergence="js_divergence"),
        dpo_case("sigmoid_alpha0.5_f32", 233, 6, "sigmoid", f_divergence="alpha_divergence",
                 alpha=0.5, dtype=torch.float32),
        dpo_case("robust_alpha1.5_f32", 234, 6, "robust", label_smoothing=0.2,
                 f_divergence="alpha_divergence", alpha=1.5, dtype=torch.float32),
        dpo_case("ipo_forward_kl", 235, 6, "ipo", f_divergence="forward_kl"),
        dpo_case("hinge_js", 236, 6, "hinge", beta=0.3, f_divergence="js_divergence"),
        dpo_case("exo_pair_js", 237, 6, "exo_pair", label_smoothing=0.1,
                 f_divergence="js_divergence"),
        dpo_case("discopop_forward_kl", 238, 6, "discopop", spread=1.0, f_divergence="forward_kl"),
        dpo_case("sigmoid_norm_js", 239, 6, "sigmoid_norm", beta=0.5,
                 f_divergence="js_divergence"),
        dpo_case("sft_forward_kl", 240, 5, "sft", f_divergence="forward_kl"),
    ]
    simpo = [
        simpo_case("simpo_default", 301, 6),
        simpo_case("simpo_paper_beta", 302, 5, beta=2.5, gamma=1.4),
        simpo_case("simpo_label_smoothing", 303, 4, beta=2.0, gamma=0.8, label_smoothing=0.15),
        simpo_case("cpo_alpha_1", 304, 5, cpo_alpha=1.0),
        simpo_case("batch_of_one_vocab1000", 305, 1, beta=2.0, vocab=1000, length=6),
    ]
    orpo = [
        orpo_case("orpo_default", 401, 6),
        orpo_case("orpo_beta1", 402, 5, beta=1.0),
        orpo_case("orpo_near_zero_logps", 403, 6, beta=0.5, near_zero=True),
        orpo_case("orpo_batch_of_one", 404, 1, beta=0.2),
    ]
    end_to_end = [
        end_to_end_case("kto_logits_to_grad", 501, 4, "kto"),
        end_to_end_case("dpo_sigmoid_logits_to_grad", 502, 3, "sigmoid", beta=0.5),
        end_to_end_case("dpo_ipo_logits_to_grad", 503, 3, "ipo", beta=0.5),
    ]
    write_json(FIXTURES / "trl_losses.json", {
        "versions": versions(),
        "sources": {
            "kto": f"trl/trainer/kto_trainer.py KTOTrainer._compute_loss (+ _compute_kl_logps), "
                   f"called with a fake self and a table model (precompute_ref_logps=True); "
                   f"the KTO loss has no separate kto_loss method in trl {md.version('trl')}",
            "dpo": "trl/trainer/dpo_trainer.py DPOTrainer._compute_loss, called likewise "
                   "(no separate dpo_loss in this version)",
            "simpo": "trl/experimental/cpo/cpo_trainer.py CPOTrainer.cpo_loss(loss_type='simpo') "
                     "called as an unbound function; + cpo_alpha * NLL transcribed from "
                     "get_batch_loss_metrics/concatenated_forward (CrossEntropyLoss mean over "
                     "chosen tokens = -sum(chosen sums)/sum(chosen counts)); average log-probs "
                     "sum/count as get_batch_logps(average_log_prob=True)",
            "orpo": "trl/experimental/orpo/orpo_trainer.py ORPOTrainer.odds_ratio_loss called as "
                    "an unbound function (it computes in float32); loss = NLL - mean(losses) "
                    "transcribed from get_batch_loss_metrics; *_f64 fields: the same formula in "
                    "float64 with TRL's log1mexp",
        },
        "end_to_end": "logits -> log_softmax/gather per token (a fused-LM-head stand-in) -> "
                      "the TRL _compute_loss above -> autograd into the logits",
        "kto": kto, "dpo": dpo, "simpo": simpo, "orpo": orpo, "end_to_end_cases": end_to_end,
    })
    _ = (CPOTrainer, ORPOTrainer, DPOTrainer, KTOTrainer)


# ----------------------------------------------------------------------------------------------
# 3. transformers GPT-2
# ----------------------------------------------------------------------------------------------

GPT2_DIR = TRAIN_FIXTURES / "tiny_gpt2"


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-5, activation_function="gelu_new",
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # GPT-2's init (std 0.02, LayerNorm 1/0) gives near-constant logits; draw every parameter
    # at a scale where each layer visibly matters, LayerNorm gains and all biases included.
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
                    or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif "wte" in name or "wpe" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[0]))
    model.eval()
    return model


def gpt2_inputs():
    gen = torch.Generator().manual_seed(7)
    full = torch.randint(0, 50, (3, 16), generator=gen)  # n_positions tokens
    short = torch.randint(0, 50, (2, 7), generator=gen)
    return [("batch3_seq16", full), ("batch2_seq7", short), ("batch1_seq1", full[:1, :1])]


def make_transformers_fixture():
    model = tiny_gpt2()
    GPT2_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(GPT2_DIR, safe_serialization=True)
    for extra in ("generation_config.json",):
        (GPT2_DIR / extra).unlink(missing_ok=True)
    model64 = tiny_gpt2().double()
    cases = []
    for name, ids in gpt2_inputs():
        batch, seq = ids.shape
        with torch.no_grad():
            logits32 = model(input_ids=ids).logits
            logits64 = model64(input_ids=ids).logits
        # Next-token targets with -100 at each row's end and on a few random positions.
        targets = torch.full_like(ids, IGNORE)
        targets[:, :-1] = ids[:, 1:]
        if seq > 3:
            targets[0, 2] = IGNORE
        keep = targets != IGNORE
        logp = torch.log_softmax(logits64, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
        logp = logp.squeeze(-1) * keep
        case = {
            "name": name, "batch": batch, "seq": seq, "input_ids": int_list(ids),
            "targets": int_list(targets),
            "logits": f64_list(logits64), "token_logprobs": f64_list(logp),
            "max_abs_diff_hf_f32_vs_f64": float((logits32.double() - logits64).abs().max()),
        }
        if keep.any():
            with torch.no_grad():
                # HF's own loss: shifts labels inside, mean over non-ignored next tokens.
                labels = ids.clone()
                labels[0, 3] = IGNORE if seq > 3 else labels[0, 3]
                hf_loss = model64(input_ids=ids, labels=labels).loss
            hf_targets = torch.full_like(ids, IGNORE)
            hf_targets[:, :-1] = labels[:, 1:]
            if (hf_targets != IGNORE).any():
                case["hf_loss_labels"] = int_list(labels)
                case["hf_loss"] = float(hf_loss)
        if name == "batch2_seq7":
            # Parameter gradients of sum_t w_t * logp_t through HF's float64 model (autograd).
            gen = torch.Generator().manual_seed(8)
            w = (torch.rand(batch * seq, generator=gen, dtype=torch.float64) - 0.5).float()
            model64.zero_grad()
            logits = model64(input_ids=ids).logits.reshape(batch * seq, -1)
            flat_t = targets.reshape(-1)
            lp = torch.log_softmax(logits, -1).gather(-1, flat_t.clamp(min=0).unsqueeze(-1))
            objective = (lp.squeeze(-1) * (flat_t != IGNORE) * w.double()).sum()
            objective.backward()
            case["grad_weights"] = f32_list(w)
            case["param_grads"] = {
                n: [float(f"{float(v):.9g}") for v in p.grad.reshape(-1)]
                for n, p in model64.named_parameters() if p.grad is not None
            }
        cases.append(case)
    write_json(TRAIN_FIXTURES / "transformers_gpt2.json", {
        "versions": versions(),
        "source": "transformers GPT2LMHeadModel (eval, float64 copy for the reference logits), "
                  "saved with save_pretrained to halo-train/tests/fixtures/tiny_gpt2/",
        "config": json.loads((GPT2_DIR / "config.json").read_text()),
        "cases": cases,
    })


def check_reverse_checkpoint():
    """Ours -> transformers: the Rust test (ignored in CI) writes a checkpoint and its logits;
    transformers must load it and reproduce them."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(**__import__("os").environ, HALO_CONFORMANCE_OUT=tmp)
        subprocess.run(["cargo", "test", "--release", "-p", "halo-train", "--test", "conformance_transformers", "--",
                        "--ignored", "write_halo_checkpoint_for_python", "--exact"],
                       cwd=ROOT, env=env, check=True)
        meta = json.loads((Path(tmp) / "halo_logits.json").read_text())
        cfg = meta["config"]
        config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["n_ctx"],
                            n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
        state = load_file(str(Path(tmp) / "halo.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]
        assert not missing and not unexpected, (missing, unexpected)
        model.tie_weights()
        model.eval()
        ids = torch.tensor(meta["input_ids"]).view(meta["batch"], meta["seq"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.reshape(-1)
        ours = torch.tensor(meta["logits"], dtype=torch.float64)
        with torch.no_grad():
            logits64 = model.double()(input_ids=ids).logits.reshape(-1)
        print(f"  transformers f32 vs its own f64: {float((logits.double() - logits64).abs().max()):.3e};"
              f" ours vs transformers f64: {float((ours - logits64).abs().max()):.3e}")
        err = (logits.double() - ours).abs().max()
        print(f"reverse check (our checkpoint in transformers): max |logit diff| = {float(err):.3e}"
              f" (max |logit| {float(ours.abs().max()):.2f}, std {float(ours.std()):.2f})")
        print("   relative to max |logit|:", float(err / ours.abs().max()))
        assert err < 1e-4 * max(1.0, float(ours.abs().max())), err
        assert (ours - logits64).abs().max() < 1e-5 * max(1.0, float(ours.abs().max()))
        # Our save_pretrained directory (config.json + model.safetensors), loaded by transformers
        # with nothing but from_pretrained.
        pretrained = GPT2LMHeadModel.from_pretrained(str(Path(tmp) / "pretrained")).eval()
        with torch.no_grad():
            logits_pre = pretrained(input_ids=ids).logits.reshape(-1).double()
        err_pre = (logits_pre - ours).abs().max()
        print(f"reverse check (our save_pretrained dir via from_pretrained): max |logit diff| = {float(err_pre):.3e}")
        assert err_pre < 1e-4 * max(1.0, float(ours.abs().max())), err_pre


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["pytorch", "trl", "transformers"], default=None)
    parser.add_argument("--reverse-check", action="store_true",
                        help="also load a checkpoint saved by our Rust model into transformers "
                             "(runs cargo; not needed to regenerate the fixtures)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic reductions
    if args.only in (None, "pytorch"):
        make_pytorch_fixture()
    if args.only in (None, "trl"):
        make_trl_fixture()
    if args.only in (None, "transformers"):
        make_transformers_fixture()
    if args.reverse_check:
        check_reverse_checkpoint()
    total = sum(p.stat().st_size for d in (FIXTURES, TRAIN_FIXTURES) for p in d.rglob("*") if p.is_file())
    print(f"fixtures total: {total / 1024:.1f} KiB")
    assert total < 2 * 1024 * 1024, "fixtures must stay under 2 MiB"


if __name__ == "__main__":
    main()

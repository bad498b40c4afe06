"""PyTorch eager baseline for `cargo bench -p halo-train --bench train_step` (issue 13, item 1).

The same two models (transformers' GPT2LMHeadModel: 2 layers x 128 wide and 4 layers x 256 wide, 4
heads, vocab 256, context 32, dropout 0), the same batch (16 x 32 random tokens, every target
counted), the same step (mean cross-entropy, backward, clip_grad_norm_(1.0), AdamW), on the CPU with
the process's default threads. Prints the best of N steps after warm-up, as the Rust bench's
`best of` lines do, and tokens/s.

    pip install torch transformers   # CPU is enough
    python3 scripts/baselines/pytorch_train_step.py [steps]
"""

import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

BATCH, SEQ, VOCAB = 16, 32, 256


def bench(n_layer: int, n_embd: int, steps: int) -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    targets = torch.randint(0, VOCAB, (BATCH, SEQ))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    for name, fn in (("step", step), ("forward", forward)):
        for _ in range(3):
            fn()
        best = float("inf")
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        tokens = BATCH * SEQ
        print(
            f"pytorch {n_layer}x{n_embd} {name}: best of {steps}: {best * 1e3:.2f} ms "
            f"= {tokens / best:.0f} tokens/s (threads {torch.get_num_threads()})"
        )


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    bench(2, 128, n)
    bench(4, 256, n)

"""The bundled default model: a two-layer snnTorch SNN for scikit-learn's digits (8x8).

The network is written the way the snnTorch tutorials write it: a Python loop over time
inside ``forward`` that threads each layer's membrane through ``snn.Leaky`` calls and
returns the stacked output spikes and membranes.  The 64 pixel intensities (scaled to
[0, 1]) are fed as a constant current at every step, ``x[T, B, 64]``.

Train (about 20 s on 2 CPU cores) and write ``digits_snn.pt`` (a state dict, ~20 kB) and
``digits_test.npz`` (held-out ``input`` [T, B, 64] and ``target``)::

    python -m psu_export.models.digits
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
TIME_STEPS = 16


class DigitsSNN(nn.Module):
    def __init__(self, hidden: int = 64, beta: float = 0.85):
        super().__init__()
        import snntorch as snn

        self.fc1 = nn.Linear(64, hidden)
        self.lif1 = snn.Leaky(beta=beta)
        self.fc2 = nn.Linear(hidden, 10)
        self.lif2 = snn.Leaky(beta=beta)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spk_rec, mem_rec = [], []
        for step in range(x.shape[0]):
            cur1 = self.fc1(x[step])
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc2(spk1)
            spk2, mem2 = self.lif2(cur2, mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def make_net() -> DigitsSNN:
    """Factory for ``psu-export``: ``psu_export.models.digits:make_net``."""
    return DigitsSNN()


def load_digits_sequences(time_steps: int = TIME_STEPS, seed: int = 0):
    """Digits as constant-current sequences: (x_train, y_train, x_test, y_test), x as [T, B, 64]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)

    def seq(a):
        return torch.from_numpy(a).unsqueeze(0).expand(time_steps, -1, -1).contiguous()

    return seq(x_train), torch.from_numpy(y_train), seq(x_test), torch.from_numpy(y_test)


def train(epochs: int = 30, seed: int = 0) -> tuple[DigitsSNN, float]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_sequences()
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(x_train.shape[1])
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            spk, mem = net(x_train[:, idx])
            loss = loss_fn(mem.mean(0) + spk.sum(0), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        spk, _ = net(x_test)
    accuracy = float((spk.sum(0).argmax(-1) == y_test).float().mean())
    return net, accuracy


def main() -> None:
    net, accuracy = train()
    torch.save(net.state_dict(), HERE / "digits_snn.pt")
    _, _, x_test, y_test = load_digits_sequences()
    np.savez_compressed(HERE / "digits_test.npz", input=x_test[:, :128].numpy(), target=y_test[:128].numpy())
    print(f"test accuracy (spike count argmax): {accuracy:.3f}; wrote {HERE / 'digits_snn.pt'}")


if __name__ == "__main__":
    main()

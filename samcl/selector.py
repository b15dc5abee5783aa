"""Module Selector and its embedding buffer."""
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .io import load_tagged, save_tagged

log = logging.getLogger(__name__)


class ModuleSelector(nn.Module):
    """MLP from a selector embedding (N, d) to domain logits (N, K).

    Linear(d, d) -> BN -> Linear(d, d/4) -> BN -> ReLU -> Linear(d/4, d/4) -> BN -> ReLU
    -> Linear(d/4, K). K counts only domains that exist (quirk Q7); :meth:`grow`
    adds outputs for new domains and keeps the old ones' weights.
    """

    def __init__(self, dim: int, num_domains: int) -> None:
        super().__init__()
        hidden = dim // 4
        self.layer1 = nn.Linear(dim, dim)
        self.norm1 = nn.BatchNorm1d(dim)
        self.layer2 = nn.Linear(dim, hidden)
        self.norm2 = nn.BatchNorm1d(hidden)
        self.layer3 = nn.Linear(hidden, hidden)
        self.norm3 = nn.BatchNorm1d(hidden)
        self.layer4 = nn.Linear(hidden, num_domains)

    @property
    def num_domains(self) -> int:
        return self.layer4.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.layer1(x))
        x = F.relu(self.norm2(self.layer2(x)))
        x = F.relu(self.norm3(self.layer3(x)))
        return self.layer4(x)

    @torch.no_grad()
    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, K) softmax of the logits in eval mode (running BN stats)."""
        was_training = self.training
        self.eval()
        probs = F.softmax(self(embeddings), dim=1)
        self.train(was_training)
        return probs

    def route(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) index of the chosen domain: the argmax of the softmax, as the release."""
        return self.probabilities(embeddings).argmax(dim=1)

    def grow(self, num_domains: int) -> None:
        """Widen the head to ``num_domains`` outputs; existing rows are kept bit for bit."""
        old = self.layer4
        if num_domains < old.out_features:
            raise ValueError(f"cannot shrink the selector head from {old.out_features} to {num_domains}")
        if num_domains == old.out_features:
            return
        new = nn.Linear(old.in_features, num_domains).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.layer4 = new


class EmbeddingBuffer:
    """The only record of past domains: ``num_embedding`` selector embeddings per domain."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.store: Dict[str, torch.Tensor] = {}
        self.seen: Dict[str, List[int]] = {}  # dataset indices buffered so far, while a domain fills

    @property
    def domains(self) -> List[str]:
        return list(self.store)

    def missing(self, domain: str) -> int:
        have = self.store.get(domain)
        return self.capacity - (0 if have is None else have.shape[0])

    def add(self, domain: str, embeddings: torch.Tensor, indices: Optional[torch.Tensor] = None) -> None:
        """Append rows of (N, d) ``embeddings`` until the domain holds ``capacity`` (kept on the CPU).

        ``indices`` (N,) are the images' dataset indices: an image already buffered
        (a distributed sampler's padding repeat) is skipped.
        """
        emb = embeddings.detach().float().cpu()
        if indices is not None:
            seen = self.seen.setdefault(domain, [])
            keep = []
            for row, i in enumerate(indices.tolist()):
                if i not in seen and len(seen) < self.capacity:
                    seen.append(i)
                    keep.append(row)
            emb = emb[keep]
        take = emb[: max(self.missing(domain), 0)]
        if take.shape[0] == 0:
            return
        self.store[domain] = take if domain not in self.store else torch.cat([self.store[domain], take])

    def dataset(self, domain_order: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(X (M, d), y (M,)) over the stored domains, labels = position in ``domain_order``."""
        xs, ys = [], []
        for name, emb in self.store.items():
            xs.append(emb)
            ys.append(torch.full((emb.shape[0],), domain_order.index(name), dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def save_part(self, path: Path, domain: str) -> None:
        """Write one domain's embeddings (written once, when the domain is done), in the format
        ``path``'s suffix says."""
        save_tagged({"format": "samcl-embedding-buffer", "version": 1, "domain": domain,
                     "capacity": self.capacity, "embeddings": self.store[domain]}, path)

    def load_part(self, path: Path, domain: str) -> None:
        data = load_tagged(path, ("samcl-embedding-buffer",), f"embedding buffer of {domain}")
        if data["domain"] != domain:
            raise ValueError(f"{path} is not the embedding buffer of {domain} (it holds {data['domain']})")
        self.store[domain] = data["embeddings"]


def train_selector(selector: ModuleSelector, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01,
                   epochs: int = 25, batch_size: int = 24, generator: Optional[torch.Generator] = None) -> List[float]:
    """SGD with cross-entropy on the whole buffer, continuing from the current weights.

    Batches of ``batch_size`` with the last partial batch dropped; a buffer smaller
    than one batch is used as a single batch. (A batch of one sample cannot train
    BatchNorm and is skipped.) Returns the mean loss of each epoch.
    """
    device = next(selector.parameters()).device
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(selector.parameters(), lr=lr)
    selector.train()
    n = x.shape[0]
    bs = batch_size if n >= batch_size else n
    history = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        losses = []
        for start in range(0, n - bs + 1, bs):
            idx = order[start : start + bs]
            if idx.numel() < 2:
                continue
            loss = F.cross_entropy(selector(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses) if losses else float("nan"))
    selector.eval()
    return history

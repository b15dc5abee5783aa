"""Training-free ways to choose a domain's module from selector embeddings (cosine similarity).

Both have the Module Selector's interface (:meth:`probabilities`, :meth:`route`,
``num_domains``), so the module bank routes with any of them unchanged.

* :class:`NearestMeanSelector` (``--selector ncm``): the domain whose mean stored embedding is
  nearest (S-Prompts' choice, with one centre per domain instead of its k-means). It keeps the
  (K, d) means only.
* :class:`NearestNeighbourSelector` (``--selector knn``): the majority domain of the ``k``
  nearest stored embeddings, a tie going to the domain of the nearest of them. It keeps every
  stored embedding and its domain.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

SELECTORS = ("mlp", "ncm", "knn", "oracle")


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, d), (M, d) -> (N, M) cosine similarities."""
    return F.normalize(x.float(), dim=1) @ F.normalize(y.float(), dim=1).T


class NearestMeanSelector(nn.Module):
    """``means`` (K, d): each domain's mean selector embedding, in the bank's domain order."""

    kind = "ncm"

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means.detach().float().clone())

    @property
    def num_domains(self) -> int:
        return self.means.shape[0]

    @torch.no_grad()
    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, K) softmax of the cosine similarities (a score, not calibrated: its argmax is
        the nearest mean)."""
        return F.softmax(cosine(embeddings, self.means), dim=1)

    def route(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) index of the nearest mean."""
        return self.probabilities(embeddings).argmax(dim=1)

    def add(self, embeddings: torch.Tensor) -> None:
        """Append the mean of a new domain's (M, d) embeddings as output K."""
        mean = embeddings.detach().float().mean(dim=0, keepdim=True).to(self.means.device)
        self.means = torch.cat([self.means, mean])

    def state(self) -> Dict[str, torch.Tensor]:
        return {"means": self.means}


class NearestNeighbourSelector(nn.Module):
    """``bank`` (M, d) stored embeddings, ``labels`` (M,) their domain index; ``k`` neighbours vote."""

    kind = "knn"

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, num_domains: int, k: int = 5) -> None:
        super().__init__()
        if bank.shape[0] != labels.shape[0]:
            raise ValueError(f"{bank.shape[0]} embeddings but {labels.shape[0]} labels")
        self.register_buffer("bank", bank.detach().float().clone())
        self.register_buffer("labels", labels.detach().long().clone())
        self.k = int(k)
        self._num_domains = int(num_domains)

    @property
    def num_domains(self) -> int:
        return self._num_domains

    @torch.no_grad()
    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, K) vote shares of the ``k`` nearest stored embeddings (fewer if fewer are
        stored), the nearest one's vote weighing 1.5: its argmax is the majority, a tie going to the
        nearest neighbour's domain (a tie without it to the lower index)."""
        k = min(self.k, self.bank.shape[0])
        order = cosine(embeddings, self.bank).topk(k, dim=1).indices  # (N, k), nearest first
        votes = torch.zeros(embeddings.shape[0], self.num_domains, device=embeddings.device)
        weights = torch.ones(order.shape, device=embeddings.device)
        weights[:, 0] = 1.5
        votes.scatter_add_(1, self.labels[order].to(embeddings.device), weights)
        return votes / votes.sum(dim=1, keepdim=True)

    def route(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) the majority domain of the ``k`` nearest stored embeddings."""
        return self.probabilities(embeddings).argmax(dim=1)

    def state(self) -> Dict[str, torch.Tensor]:
        return {"bank": self.bank, "labels": self.labels, "k": torch.tensor(self.k),
                "num_domains": torch.tensor(self._num_domains)}


def selector_from_state(kind: str, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild an ``ncm`` or ``knn`` selector from :meth:`state`."""
    if kind == "ncm":
        return NearestMeanSelector(state["means"])
    if kind == "knn":
        return NearestNeighbourSelector(state["bank"], state["labels"], int(state["num_domains"]), int(state["k"]))
    raise ValueError(f"no training-free selector {kind!r} (known: ncm, knn)")

"""The Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta and its compute-optimal frontier under a cost model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaling.conventions import CostModel

LAW_PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_fit(cls, fit: dict) -> Law:
        """The law in a fit's result dict, ignoring its other entries."""
        return cls(**{k: fit[k] for k in LAW_PARAMS})

    def loss(self, N, D):
        with np.errstate(over="ignore", divide="ignore"):
            return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def optimal(self, C, cost: CostModel | None = None):
        """Compute-optimal (N*, D*) under C = k N^p D: setting dL/dN = 0 along the budget gives
        N* = (alpha A / (p beta B))^(1 / (alpha + p beta)) * (C / k)^(beta / (alpha + p beta)); with k = 6, p = 1 this
        is Chinchilla's allocation."""
        cost = cost or CostModel()
        k, p = cost.k, cost.p
        with np.errstate(all="ignore"):
            s = self.alpha + p * self.beta
            G = (self.alpha * self.A / (p * self.beta * self.B)) ** (1 / s)
            N = G * np.power(np.asarray(C, dtype=float) / k, self.beta / s)
            return N, cost.tokens(C, N)

    def frontier(self, C, cost: CostModel | None = None):
        N, D = self.optimal(C, cost)
        return self.loss(N, D)

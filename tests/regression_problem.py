"""A multi-output Bayesian linear regression with a known posterior (NumPy, float64).

y_n = W x_n + b + eps_n, eps_n ~ N(0, sigma^2 I_out); prior N(0, tau^2 I) on every
entry of W~ = [W | b]. Each output row of W~ has the same posterior covariance
A^-1, A = X~^T X~ / sigma^2 + I / tau^2 (X~ = [X | 1]), so in the K-FAC order

    Sigma_post = I_out ⊗ A^-1,    M_post = (A^-1 X~^T Y / sigma^2)^T,

which the Kronecker structure (and the full factor) can hold exactly. The dense
posterior is written out here in the flat order (weight row-major, then bias)
from this formula alone, independently of structcov.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

D_OUT, D_IN, N, SIGMA, TAU = 2, 3, 40, 0.5, 1.0


@dataclass(frozen=True)
class Problem:
    x: np.ndarray  # (N, D_IN)
    y: np.ndarray  # (N, D_OUT)
    mean: dict[str, np.ndarray]  # posterior mean: weight (D_OUT, D_IN), bias (D_OUT,)
    cov: np.ndarray  # (P, P) posterior covariance in the flat order
    sigma: float = SIGMA
    tau: float = TAU

    @property
    def num_params(self) -> int:
        return D_OUT * (D_IN + 1)

    def best_diagonal_kl(self) -> float:
        """min over diagonal q of KL(q || posterior).

        = 0.5 (sum log L_ii - log det L) with L = Sigma^-1 (q's variances 1 / L_ii).
        """
        precision = np.linalg.inv(self.cov)
        return 0.5 * (np.sum(np.log(np.diag(precision))) - np.linalg.slogdet(precision)[1])


def make_problem(seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D_IN))
    w_true, b_true = rng.standard_normal((D_OUT, D_IN)), rng.standard_normal(D_OUT)
    y = x @ w_true.T + b_true + SIGMA * rng.standard_normal((N, D_OUT))
    x_aug = np.concatenate([x, np.ones((N, 1))], axis=1)
    a = x_aug.T @ x_aug / SIGMA**2 + np.eye(D_IN + 1) / TAU**2
    a_inv = np.linalg.inv(a)
    m = (a_inv @ x_aug.T @ y / SIGMA**2).T  # (D_OUT, D_IN + 1)
    # Flat index of W~[o, i]: o * D_IN + i for the weight, D_OUT * D_IN + o for the bias.
    flat = [
        o * D_IN + i if i < D_IN else D_OUT * D_IN + o
        for o in range(D_OUT)
        for i in range(D_IN + 1)
    ]
    cov = np.zeros((D_OUT * (D_IN + 1),) * 2)
    for o in range(D_OUT):
        for i in range(D_IN + 1):
            for i2 in range(D_IN + 1):
                cov[flat[o * (D_IN + 1) + i], flat[o * (D_IN + 1) + i2]] = a_inv[i, i2]
    return Problem(x=x, y=y, mean={"weight": m[:, :D_IN], "bias": m[:, D_IN]}, cov=cov)

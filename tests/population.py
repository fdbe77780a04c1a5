"""A finite synthetic population with exact per-sample accuracy, for guarantee tests."""

import numpy as np

from pcee.calibration.scores import confidence
from pcee.policies.estimator import first_passing_exit


class Population:
    """A finite synthetic population with known per-sample correctness probabilities.

    Sample i has a latent class y*_i and hardness h_i; every exit's logits favour y*_i more with
    depth and less with hardness, and its label is y*_i with probability
    rho_i = 1 - noise[0] - noise[1] h_i (else uniform over the other classes). So P(exit l is right
    on i) is rho_i if exit l predicts y*_i, else (1 - rho_i)/(K - 1), and any rule's population
    accuracy is an exact mean. More label noise is a shift: the same confidences mean less accuracy.
    """

    def __init__(self, m=20000, num_exits=4, num_classes=5, seed=123, noise=(0.0, 0.2), dtype=np.float64):
        rng = np.random.default_rng(seed)
        self.k, self.num_exits = num_classes, num_exits
        self.ystar = rng.integers(0, num_classes, m)
        h = rng.uniform(0, 1, m)
        z = rng.normal(size=(m, num_exits, num_classes))
        z[np.arange(m), :, self.ystar] += np.linspace(1.0, 4.0, num_exits)[None, :] * (1.6 - h)[:, None]
        self.logits = z.astype(dtype)
        self.rho = 1 - noise[0] - noise[1] * h
        hit = self.logits.argmax(-1) == self.ystar[:, None]
        self.p_correct = np.where(hit, self.rho[:, None], ((1 - self.rho) / (num_classes - 1))[:, None])  # (m, L)
        self.scores = confidence(z[:, :-1])  # (m, L-1), max_prob
        self.flops = np.arange(1.0, num_exits + 1)

    def draw(self, n, rng):
        idx = rng.integers(0, self.ystar.size, n)
        keep = rng.random(n) < self.rho[idx]
        other = (self.ystar[idx] + rng.integers(1, self.k, n)) % self.k
        return self.logits[idx], np.where(keep, self.ystar[idx], other)

    def accuracy(self, policy, threshold):
        mv = np.stack([policy.maps_[l].predict(self.scores[:, l]) for l in range(self.num_exits - 1)], axis=1)
        exits = first_passing_exit(mv >= threshold)
        return self.p_correct[np.arange(exits.size), exits].mean(), exits

    def policy_accuracy(self, policy):
        """Exact population accuracy and relative cost of any fitted policy (decide on every member)."""
        exits = policy.decide(self.logits)
        return self.p_correct[np.arange(exits.size), exits].mean(), (self.flops[exits] / self.flops[-1]).mean()

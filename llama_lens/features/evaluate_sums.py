"""The sums a dictionary's evaluation adds up, and the metrics they give, with sae-lens 6.54.12's definitions
(`sae_lens/evals.py`: `get_sparsity_and_variance_metrics`, `get_recons_loss`, `ExplainedVarianceCalculator`).

Every metric sae-lens reports as a mean over tokens is kept here as a sum and a count, so the sums of any split
of the tokens (batches, prompts, shards on other machines) merge exactly into the metrics of the whole:

    l0                  mean over tokens of the number of features != 0
    l1                  mean over tokens of sum |acts|
    mse                 mean over tokens of ||x - x_hat||^2 (summed over d_out, as sae-lens and its training do)
    cossim              mean over tokens of cos(x, x_hat)
    l2_norm_in / _out   mean ||x||, ||x_hat||;  l2_ratio: mean ||x_hat|| / ||x|| (||x|| < 1e-4 counted as 1)
    relative_reconstruction_bias   mean ||x_hat||^2 / mean <x, x_hat>  (sae-lens averages it per batch; this
                        is its value for the tokens as one batch)
    explained_variance  1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)  (sae-lens' ExplainedVarianceCalculator)
    ce_loss_without_sae / with_sae / with_ablation    mean next-token cross entropy of the clean model, of the
                        model with the dictionary's reconstruction at its site (no error term) and with the site
                        zero-ablated
    ce_loss_score       (ce_with_ablation - ce_with_sae) / (ce_with_ablation - ce_without_sae)
    kl_div_with_sae / with_ablation   mean KL(clean || spliced), KL(clean || ablated) of the next-token
                        distributions
    kl_div_score        (kl_with_ablation - kl_with_sae) / kl_with_ablation
    feature_density     per feature, the fraction of tokens it fires on

sae-lens' `explained_variance_legacy` depends on how the tokens were cut into batches, so it is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The scalar sums, each a float64 total over the tokens it counts.
TOKEN_SUMS = ("l0", "l1", "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "x_hat_sq", "x_dot_x_hat", "x_sq")
CE_SUMS = ("ce_without_sae", "ce_with_sae", "ce_with_ablation")
KL_SUMS = ("kl_with_sae", "kl_with_ablation")


@dataclass
class EvaluationSums:
    """What the metrics need, summed over some tokens; `+` merges two (exactly: they are sums).

    Attributes:
        n_tokens: tokens the reconstruction metrics count (real, not special).
        n_ce: next-token predictions the CE losses count (from a counted token to a real one).
        n_kl: positions the KL divergences count (as n_tokens).
        sums: the float sums named in TOKEN_SUMS, CE_SUMS and KL_SUMS.
        sum_x: sum of the activations x [d_out] (float64), for the variance's mean.
        feature_counts: per feature, the tokens it fired on [d_sae] (int64).
    """

    n_tokens: int = 0
    n_ce: int = 0
    n_kl: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TOKEN_SUMS + CE_SUMS + KL_SUMS, 0.0))
    sum_x: torch.Tensor | None = None
    feature_counts: torch.Tensor | None = None

    def __add__(self, other: EvaluationSums) -> EvaluationSums:
        return EvaluationSums(
            n_tokens=self.n_tokens + other.n_tokens,
            n_ce=self.n_ce + other.n_ce,
            n_kl=self.n_kl + other.n_kl,
            sums={name: self.sums[name] + other.sums[name] for name in self.sums},
            sum_x=_add(self.sum_x, other.sum_x),
            feature_counts=_add(self.feature_counts, other.feature_counts),
        )

    def metrics(self) -> dict[str, float]:
        """The metrics (see the module docstring) under sae-lens' names; NaN where nothing was counted."""
        nan = float("nan")
        s = self.sums
        per_token = (lambda name: s[name] / self.n_tokens) if self.n_tokens else (lambda name: nan)
        out = {name: per_token(name) for name in ("l0", "l1", "mse", "cossim", "l2_norm_in", "l2_norm_out")}
        out["l2_ratio"] = per_token("l2_ratio")
        out["relative_reconstruction_bias"] = s["x_hat_sq"] / s["x_dot_x_hat"] if s["x_dot_x_hat"] else nan
        out["explained_variance"] = self._explained_variance()
        ce = {name: s[name] / self.n_ce if self.n_ce else nan for name in CE_SUMS}
        out["ce_loss_without_sae"] = ce["ce_without_sae"]
        out["ce_loss_with_sae"] = ce["ce_with_sae"]
        out["ce_loss_with_ablation"] = ce["ce_with_ablation"]
        out["ce_loss_score"] = _ratio(
            ce["ce_with_ablation"] - ce["ce_with_sae"], ce["ce_with_ablation"] - ce["ce_without_sae"]
        )
        kl = {name: s[name] / self.n_kl if self.n_kl else nan for name in KL_SUMS}
        out["kl_div_with_sae"] = kl["kl_with_sae"]
        out["kl_div_with_ablation"] = kl["kl_with_ablation"]
        out["kl_div_score"] = _ratio(kl["kl_with_ablation"] - kl["kl_with_sae"], kl["kl_with_ablation"])
        out["n_tokens"] = float(self.n_tokens)
        return out

    def feature_density(self) -> torch.Tensor:
        """Per feature, the fraction of counted tokens it fired on [d_sae] (sae-lens' feature_density)."""
        if self.feature_counts is None or not self.n_tokens:
            return torch.empty(0)
        return self.feature_counts.double() / self.n_tokens

    def _explained_variance(self) -> float:
        # sae-lens' ExplainedVarianceCalculator.compute, on the same sums.
        if not self.n_tokens or self.sum_x is None:
            return 0.0
        mean_x = self.sum_x / self.n_tokens
        total_variance = self.sums["x_sq"] / self.n_tokens - float(mean_x.pow(2).sum())
        mse = self.sums["mse"] / self.n_tokens
        if total_variance < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / total_variance

    def to_row(self) -> dict:
        """Plain values (for a Parquet row): counts, sums, sum_x as a list, the fired features as ids and counts."""
        row = {"n_tokens": self.n_tokens, "n_ce": self.n_ce, "n_kl": self.n_kl, **self.sums}
        row["sum_x"] = [] if self.sum_x is None else self.sum_x.tolist()
        counts = self.feature_counts if self.feature_counts is not None else torch.zeros(0, dtype=torch.long)
        fired = counts.nonzero().squeeze(-1)
        row["feature_ids"], row["feature_counts"] = fired.tolist(), counts[fired].tolist()
        return row

    @classmethod
    def from_row(cls, row: dict, *, d_sae: int) -> EvaluationSums:
        """The inverse of `to_row` (`d_sae` sizes the dense feature counts)."""
        counts = torch.zeros(d_sae, dtype=torch.long)
        counts[torch.as_tensor(list(row["feature_ids"]), dtype=torch.long)] = torch.as_tensor(
            list(row["feature_counts"]), dtype=torch.long
        )
        sum_x = list(row["sum_x"])
        return cls(
            n_tokens=int(row["n_tokens"]),
            n_ce=int(row["n_ce"]),
            n_kl=int(row["n_kl"]),
            sums={f: float(row[f]) for f in TOKEN_SUMS + CE_SUMS + KL_SUMS},
            sum_x=torch.tensor(sum_x, dtype=torch.float64) if sum_x else None,
            feature_counts=counts,
        )


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def merge(parts) -> EvaluationSums:
    """The sum of an iterable of EvaluationSums (an empty one gives zero sums)."""
    total = EvaluationSums()
    for part in parts:
        total = total + part
    return total

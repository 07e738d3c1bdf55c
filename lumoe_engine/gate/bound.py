"""The similarity bound of the gate's heads (a ``Gate`` mixin: ``SimilarityBound``).

Similarity bound (``similarity``, on by default): a head separates its request from the queries it was shown, but a
query about an entity it never saw can land on its positive side (on the taught embedded default: 70-90% of the
queries about entities the gate never saw fired some head without it, with plain negatives). So each expert also
keeps up to ``n_protos`` prototypes per positive group (the fitted positives that cover them best:
``cover_prototypes``; unit vectors of ``z`` projected on its top ``bound_dim`` principal directions, a basis frozen
with the standardiser), and a chosen expert is kept only if the query's cosine similarity to its nearest prototype
reaches the expert's bound ``tau_e = min(similarity, the sim_quantile quantile of its held-out positives'
similarities)`` (an expert whose queries are spread out gets a looser bound). ``route`` checks the bound only for the
top-k experts the heads chose (a gather of k * P_max prototypes per query: the cost does not grow with E); a vetoed
choice becomes -1 (the next expert is not tried). Adding an expert appends its prototypes; revoking removes them.

Letters: B queries, D feature width (``dim``), F head input width (D or 2 D), E experts, H stacked sub-heads (>= E),
k top-k, P positives (P_max: most prototypes of one expert), Q negatives, S prompt positions.

"""
from __future__ import annotations

from typing import Optional

import torch

from lumoe_engine.gate.heads import check_features, cover_prototypes, principal_directions


class SimilarityBound:
    """The similarity bound's state lives on the ``Gate`` (``_P``, ``_pcount``, ``_tau``, ``basis``); these are its
    methods (module docstring)."""

    def _basis(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The top ``bound_dim`` principal directions of the standardised ``x`` [N, D] (None: no projection, when
        bound_dim is None or >= min(N, D)), frozen with the standardiser."""
        if self.bound_dim is None or self.bound_dim >= min(x.shape[0], self.dim):
            return None
        z = (x.double().cpu() - self.mean.double().cpu()) / self.std.double().cpu()
        return principal_directions(z, self.bound_dim).to(self._W.device)

    @property
    def bound_width(self) -> int:
        """D_b: the width of the similarity bound's space (``bound_dim`` once a basis is set, else D)."""
        return self.dim if self.basis is None else self.basis.shape[1]

    def _unit_z(self, x: torch.Tensor) -> torch.Tensor:
        """Unit rows of the standardised features ``z`` (projected on ``basis`` when set): [B, D] -> [B, D_b]."""
        mean, std = self.mean, self.std
        if mean.device != x.device:
            mean, std = mean.to(x.device), std.to(x.device)
        z = (x.float() - mean) / std
        if self.basis is not None:
            z = z @ (self.basis if self.basis.device == x.device else self.basis.to(x.device))
        return torch.nn.functional.normalize(z, dim=1)

    def _fit_bound(self, pos: torch.Tensor, fit_rows: list, cal_rows: list, expert_id: str):
        """Prototypes (``cover_prototypes`` of each group's fitted positives) and the cosine bound of a new expert:
        (protos [P, D] or None, tau, sim(x) -> [n] nearest-prototype cosine). tau = min(similarity, the
        ``sim_quantile`` quantile of the held-out positives' similarities); without held-out positives (or with
        sim_quantile None), tau = similarity."""
        if self.similarity is None:
            return None, None, None
        u = self._unit_z(pos)
        protos = torch.cat([cover_prototypes(u[rows], self.n_protos) for rows in fit_rows])

        def sim(x):
            return (self._unit_z(x) @ protos.t()).amax(1)

        cal = torch.cat(cal_rows)
        tau = self.similarity
        if len(cal) and self.sim_quantile is not None:
            tau = min(tau, float(torch.quantile(sim(pos[cal]).double(), self.sim_quantile)))
        return protos, float(tau), sim

    def _append_protos(self, protos: Optional[torch.Tensor], tau: Optional[float]) -> None:
        n0 = sum(self._pcount)
        n = 0 if protos is None else len(protos)
        if n0 + n > self._P.shape[0] or self._P.shape[1] != self.bound_width:
            P = torch.zeros(max(n0 + n, 2 * self._P.shape[0], 64), self.bound_width, device=self._P.device)
            if n0:
                P[:n0] = self._P[:n0]
            self._P = P
        if n:
            self._P[n0:n0 + n] = protos.to(self._P.device, torch.float32)
        self._pcount.append(n)
        self._tau.append(-2.0 if tau is None else float(tau))
        self._bound_cache = None

    def _bounds(self, device):
        """(start [E], count [E], tau [E], P_max) of the prototypes, cached until the experts change."""
        c = self._bound_cache
        if c is None or c[0].device != torch.device(device):
            counts = torch.tensor(self._pcount, dtype=torch.long)
            start = torch.cumsum(counts, 0) - counts
            c = (start.to(device), counts.to(device), torch.tensor(self._tau, dtype=torch.float32).to(device),
                 max(self._pcount, default=0))
            self._bound_cache = c
        return c

    @property
    def prototypes(self) -> list:
        """Per expert, its unit prototypes [P_e, D] (P_e = 0: no similarity bound); views."""
        out, n = [], 0
        for c in self._pcount:
            out.append(self._P[n:n + c])
            n += c
        return out

    @property
    def sim_bounds(self) -> torch.Tensor:
        """[E] fp32 cosine bound of each expert (-2: none)."""
        return torch.tensor(self._tau, dtype=torch.float32)

    def similarity_to(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each query to each expert's nearest prototype (unit ``z``); +inf for an expert
        without prototypes. Every expert, so O(B * all prototypes): for analysis, not the routing path.
        features: [B, D]        returns [B, E] fp32"""
        x = self._text(check_features(features, self.feature_width, "features", allow_empty=True, finite=False))
        E = len(self.expert_ids)
        out = torch.full((x.shape[0], E), float("inf"), device=x.device)
        if not E or not x.shape[0] or not sum(self._pcount):
            return out
        start, counts, _, _ = self._bounds(x.device)
        n = sum(self._pcount)
        s = self._unit_z(x) @ self._P[:n].to(x.device).t()  # [B, n]
        owner = torch.repeat_interleave(torch.arange(E, device=x.device), counts).expand(x.shape[0], -1)
        best = torch.full((x.shape[0], E), float("-inf"), device=x.device).scatter_reduce_(1, owner, s, "amax")
        return torch.where(counts.unsqueeze(0) > 0, best, out)

    def _veto(self, features: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, renormalize: bool):
        """The similarity bound on the chosen experts only: a choice whose nearest prototype is under its expert's
        bound becomes -1 (weight 0); surviving weights are renormalised again with ``renormalize``.
        features: [B, D], weights / ids: [B, k]        returns weights [B, k] fp32, ids [B, k] int32"""
        start, counts, tau, pmax = self._bounds(ids.device)
        P = self._P if self._P.device == ids.device else self._P.to(ids.device)
        e = ids.long().clamp_min(0)                                   # [B, k]
        j = torch.arange(pmax, device=ids.device)
        idx = start[e].unsqueeze(-1) + j                              # [B, k, P_max]
        valid = j < counts[e].unsqueeze(-1)
        idx = torch.where(valid, idx, start[e].unsqueeze(-1)).clamp_max(max(P.shape[0] - 1, 0))
        u = self._unit_z(self._text(features).to(ids.device))         # [B, D]
        G = P.index_select(0, idx.reshape(-1)).view(*idx.shape, P.shape[1])  # [B, k, P_max, D_b]
        # a broadcast multiply-sum: bmm / einsum with one column is several times slower on CPU
        sims = (G * u[:, None, None, :]).sum(-1).masked_fill(~valid, float("-inf")).amax(-1)  # [B, k]
        keep = (ids >= 0) & ((sims >= tau[e]) | (counts[e] == 0))
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
        if renormalize and ids.shape[1] > 1:
            weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-30)
        return weights, ids


__all__ = ["SimilarityBound"]

"""The image channel (a ``Gate`` mixin: ``ImageChannel``): a query with a picture routed by the nearest stored
picture of the requests (the "lookup" gate preset; the default routes pictures by recognition: ``gate.recognition``
and ``gate.policy``).

Image channel (``image_dim > 0``): features may carry, after the D pooled columns, ``image_dim`` columns of the
query's image (``features.image_pool``: [mean, max] of layer L over the image positions, zeros for a query without
an image). Image positions precede the question in the prompt, so these columns do not move when a question is
reworded; heads and the similarity bound, which read the D pooled columns, do (measured on the taught embedded
default: the held-out phrasing family's image queries reached the right expert 0.53 of the time through the heads
and bound). With the image channel, a query *with* an image is routed by its image alone: nearest-neighbour over
every expert's image prototypes (the distinct images of its positives, per positive group) and a gate-wide
background (the distinct images of the negatives it was shown that belong to no expert); the query goes to the
owner of the nearest prototype if that is an expert's and the cosine reaches the group's bound ``tau_g`` = the
lowest similarity of one of the group's images to its nearest other image (leave one out), its distance to 1
stretched by ``image_slack`` (``1 - slack * (1 - lowest)``; at least ``image_floor``; ``image_similarity`` for a
group of one image). ``image_slack`` trades fresh pictures of a forgotten entity against look-alikes (taught
embedded default, per_task / per_entity, fresh-picture recall and never-requested false positives: slack 1 (the
default) 0.875 / 0.9 and 0 / 0; 1.5: 0.975 / 0.95 and 0.016 / 0; 2: 0.975 / 0.975 and 0.049 / 0; 3: 1.0 / 1.0 and
0.13 / 0.016). Everything in standardised, unit, projected
(``image_bound_dim`` principal directions, at most one fewer than the distinct images it is fitted on) image space,
fitted once like the feature standardiser. Queries without an image keep the heads (and the bound). Revoking an
expert removes its image prototypes.

Letters: B queries, D feature width (``dim``), F head input width (D or 2 D), E experts, H stacked sub-heads (>= E),
k top-k, P positives (P_max: most prototypes of one expert), Q negatives, S prompt positions.

"""
from __future__ import annotations

from typing import Optional

import torch

from lumoe_engine.gate.heads import check_features, cover_prototypes, principal_directions


class ImageChannel:
    """The image channel's state lives on the ``Gate`` (``img_mean``, ``_IP``, ``_igroups``, ``_BG``); these are its
    methods (module docstring)."""

    _SAME = 1.0 - 1e-4  # cosine at which two image rows are the same picture (features differ in the last bits)
    EXACT_IMAGE_PROTOS = 4096  # up to this many image prototypes the nearest one is found by brute force

    def _fit_image_standardizer(self, x: torch.Tensor) -> bool:
        """Fit the image standardiser (and projection) on image rows ``x`` [n, D_img]; False when n < 2 (left
        unset: a later request with images fits it)."""
        if len(x) < 2:
            return False
        x = self._dedupe_raw(x)
        if len(x) < 2:
            return False
        mean, std = self._standardizer(x)
        self.img_mean, self.img_std = mean.to(self._W.device), std.to(self._W.device)
        basis = None
        k = None if self.image_bound_dim is None else min(self.image_bound_dim, len(x) - 1)
        if k is not None and k < self.image_dim:  # (at most n - 1 directions carry the n images' spread)
            z = (x.double() - mean.double()) / std.double()
            basis = principal_directions(z, k).to(self._W.device)
        self.img_basis = basis
        return True

    @property
    def image_width(self) -> int:
        """D_bi: width of the image channel's space (the projection's, else D_img)."""
        return self.image_dim if self.img_basis is None else self.img_basis.shape[1]

    def _img_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Unit rows of the standardised (projected) image columns: [n, D_img] -> [n, D_bi]."""
        dev = x.device
        z = (x.float() - self.img_mean.to(dev)) / self.img_std.to(dev)
        if self.img_basis is not None:
            z = z @ self.img_basis.to(dev)
        return torch.nn.functional.normalize(z, dim=1)

    @staticmethod
    def _distinct(u: torch.Tensor, others: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Indices of the rows of unit ``u`` that are distinct pictures (cosine < 1 - 1e-4 to every earlier kept row
        and to every row of ``others``), in order."""
        n = len(u)
        if not n:
            return torch.zeros(0, dtype=torch.long)
        free = [True] * n
        if others is not None and len(others):
            free = ((u @ others.to(u.device).t()).amax(1) < ImageChannel._SAME).tolist()
        # greedy in order: a kept row covers every row that is the same picture (one matrix-vector product per kept
        # row, no n x n matrix, no re-gathering of the kept rows per candidate)
        covered = torch.zeros(n, dtype=torch.bool, device=u.device)
        keep: list[int] = []
        for i in range(n):
            if free[i] and not bool(covered[i]):
                keep.append(i)
                covered |= (u @ u[i]) >= ImageChannel._SAME
        return torch.tensor(keep, dtype=torch.long)

    def _dedupe_raw(self, x: torch.Tensor) -> torch.Tensor:
        return x[self._distinct(torch.nn.functional.normalize(x.float(), dim=1))] if len(x) else x

    def _fit_image(self, pos_full: torch.Tensor, neg_full: torch.Tensor, groups: list):
        """The image channel of a new expert: ([(prototypes [p, D_bi], tau)] per positive group, background rows to
        add [m, D_bi], background rows to drop [bool]) or None (no image channel / no standardiser / no image
        positives)."""
        if not self.image_dim or self.img_mean is None:
            return None
        has = self._image_rows(pos_full)
        out = []
        pos_units = []
        for rows in groups:
            r = rows[has[rows]]
            if not len(r):
                continue
            u = self._img_unit(pos_full[r, self.dim:])
            u = u[self._distinct(u)]
            u = cover_prototypes(u, self.n_image_protos)
            if len(u) > 1:
                S = u @ u.t()
                S.fill_diagonal_(-2.0)
                tau = max(self.image_floor, 1.0 - self.image_slack * (1.0 - float(S.amax(1).min())))
            else:
                tau = self.image_similarity
            out.append((u.contiguous(), float(tau)))
            pos_units.append(u)
        if not out:
            return None
        mine = torch.cat(pos_units)
        n_h = self._image_rows(neg_full)
        experts = self._IP[:self._n_image].cpu() if self._n_image else None  # (fitted on the CPU, kept on device)
        bg = self._BG.cpu()
        known = torch.cat([t for t in (mine, experts, bg if len(bg) else None) if t is not None])
        bg_new = torch.zeros(0, self.image_width)
        if bool(n_h.any()):
            v = self._img_unit(neg_full[n_h, self.dim:])
            bg_new = v[self._distinct(v, known)]
        drop = (bg @ mine.t()).amax(1) >= self._SAME if len(bg) else torch.zeros(0, dtype=torch.bool)
        return out, bg_new, drop

    @property
    def _n_image(self) -> int:
        return sum(p for g in self._igroups for p, _ in g)

    def _commit_image(self, image) -> None:
        """Append a new expert's image prototypes (``_fit_image``'s result; None: none) and update the background."""
        if image is None:
            self._igroups.append([])
            self._img_cache = None
            return
        groups, bg_new, drop = image
        n = self._n_image
        new = [u.to(self._IP.device) for u, _ in groups]
        self._IP = torch.cat(([self._IP[:n]] if n else []) + new).contiguous()
        self._igroups.append([(len(u), t) for u, t in groups])
        keep = self._BG[~drop.to(self._BG.device)] if len(self._BG) else \
            torch.zeros(0, self.image_width, device=self._IP.device)
        self._BG = torch.cat([keep.to(torch.float32), bg_new.to(keep.device)]).contiguous()
        self._img_cache = None

    def _image_index(self, device) -> dict:
        """The image channel's routing tables, cached until the experts change: every prototype with its owner
        expert (-1: background) and its group's bound, and per positive group its unit centroid, first row and count
        (for the two-stage search above ``EXACT_IMAGE_PROTOS``)."""
        c = self._img_cache
        if c is None or c["P"].device != torch.device(device):
            owner, tau, g_start, g_count = [], [], [], []
            n = 0
            for e, groups in enumerate(self._igroups):
                for p, t in groups:
                    owner += [e] * p
                    tau += [t] * p
                    g_start.append(n)
                    g_count.append(p)
                    n += p
            nb = len(self._BG)
            IP = self._IP[:n].to(device)
            P = torch.cat([IP, self._BG.to(device)]) if nb else IP
            start = torch.tensor(g_start, dtype=torch.long, device=device)
            count = torch.tensor(g_count, dtype=torch.long, device=device)
            grp = torch.repeat_interleave(torch.arange(len(g_count), device=device), count)
            cent = torch.zeros(len(g_count), IP.shape[1], device=device).index_add_(0, grp, IP)
            c = {"P": P, "owner": torch.tensor(owner + [-1] * nb, dtype=torch.long, device=device),
                 "tau": torch.tensor(tau + [2.0] * nb, dtype=torch.float32, device=device), "n": n,
                 "BG": self._BG.to(device), "IP": IP, "centroids": torch.nn.functional.normalize(cent, dim=1),
                 "g_start": start, "g_count": count, "p_max": max(g_count, default=0)}
            self._img_cache = c
        return c

    def _nearest_image(self, u: torch.Tensor, c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(best cosine [B], its owner [B] (-1: background), its bound [B]) of unit image rows ``u`` [B, D_bi]:
        brute force up to ``EXACT_IMAGE_PROTOS`` prototypes; above, the ``image_candidates`` positive groups with
        the nearest centroids, then their prototypes (and the whole background)."""
        if c["n"] <= self.EXACT_IMAGE_PROTOS:
            best, j = (u @ c["P"].t()).max(1)
            return best, c["owner"][j], c["tau"][j]
        m = min(self.image_candidates, len(c["g_count"]))
        g = (u @ c["centroids"].t()).topk(m, dim=1).indices                  # [B, m] candidate groups
        k = torch.arange(c["p_max"], device=u.device)
        valid = k < c["g_count"][g].unsqueeze(-1)                             # [B, m, P_max]
        idx = torch.where(valid, c["g_start"][g].unsqueeze(-1) + k, c["g_start"][g].unsqueeze(-1))
        G = c["IP"].index_select(0, idx.reshape(-1)).view(*idx.shape, -1)    # [B, m, P_max, D_bi]
        # a broadcast multiply-sum: bmm with one column is several times slower on CPU
        sims = (G * u[:, None, None, :]).sum(-1).masked_fill(~valid, float("-inf")).flatten(1)
        best, j = sims.max(1)
        row = idx.flatten(1).gather(1, j.unsqueeze(1)).squeeze(1)
        owner, tau = c["owner"][row], c["tau"][row]
        if len(c["BG"]):
            bg = (u @ c["BG"].t()).amax(1)
            lose = bg >= best
            best = torch.where(lose, bg, best)
            owner = torch.where(lose, torch.full_like(owner, -1), owner)
        return best, owner, tau

    def route_images(self, features: torch.Tensor) -> torch.Tensor:
        """The image channel's decision for each row (``features`` [B, D + D_img]): the expert owning the nearest
        image prototype when the cosine reaches its group's bound and no background image is nearer, else -1 (also
        for rows without an image, and without an image channel). returns [B] int64."""
        x = check_features(features, self.feature_width, "features", allow_empty=True, finite=False)
        out = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        if not self.image_dim or self.img_mean is None or not x.shape[0]:
            return out
        has = self._image_rows(x)
        if bool(has.any()):
            out[has] = self._image_decisions(x[has, self.dim:])
        return out

    def _image_decisions(self, img: torch.Tensor) -> torch.Tensor:
        """``route_images`` for rows known to have an image: their image columns [n, D_img] -> [n] int64."""
        c = self._image_index(img.device)
        if not c["n"]:
            return torch.full((img.shape[0],), -1, dtype=torch.long, device=img.device)
        best, e, tau = self._nearest_image(self._img_unit(img), c)
        return torch.where((e >= 0) & (best >= tau), e, torch.full_like(e, -1))

    @property
    def image_prototypes(self) -> list:
        """Per expert, its unit image prototypes [p_e, D_bi] (p_e = 0: none)."""
        out, n = [], 0
        for groups in self._igroups:
            p = sum(c for c, _ in groups)
            out.append(self._IP[n:n + p])
            n += p
        return out

    @property
    def image_background(self) -> torch.Tensor:
        """[n_bg, D_bi] the background's unit image rows (a view)."""
        return self._BG


__all__ = ["ImageChannel"]

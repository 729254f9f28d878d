r"""Camera-aware proxies (CAP, Wang et al., AAAI 2021): one centroid per (cluster, camera).

Symbols: ``f`` the L2-normalised feature of image ``x`` of camera ``c(x)`` and pseudo label ``y``;
``p_{k,c}`` the proxy of cluster ``k`` in camera ``c``, the normalised mean of ``f`` over the
images of ``k`` seen by ``c``; ``K_c`` the clusters seen by camera ``c``; ``b`` the temperature
(``CameraProxyConfig.temperature``, 0.07)::

    L_intra = -log( exp(f . p_{y,c(x)} / b) / sum_{k in K_c(x)} exp(f . p_{k,c(x)} / b) )

    L_inter = -(1/|P|) sum_{p in P} log( exp(f . p / b) / sum_{q in P u N} exp(f . q / b) )

with ``P`` the proxies of cluster ``y`` in every camera and ``N`` the ``hard_negatives`` (50)
proxies of other clusters most similar to ``f``. ``L_intra`` learns appearance where it is easy
(one camera's images of a person look alike); ``L_inter`` pulls the camera views of one cluster
together, against the proxies that look most like it. Proxies are rebuilt at every clustering
and updated after each step, ``p <- n(alpha p + (1 - alpha) f)`` with ``alpha`` the weight of
the old proxy (``CameraProxyConfig.momentum``, 0.2). Outliers contribute nothing.

The proxies are a buffer read without gradient; both terms are returned unweighted, averaged
over the images that have a cluster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reid_core.objective.losses.resizable import ResizableBuffers

__all__ = ["CameraProxyMemory"]


class CameraProxyMemory(ResizableBuffers):
    """The proxies and ``L_intra``, ``L_inter``; see the module docstring."""

    proxies: torch.Tensor  # (Q, d)
    proxy_cluster: torch.Tensor  # (Q,) cluster of each proxy
    proxy_camera: torch.Tensor  # (Q,) camera of each proxy
    lookup: torch.Tensor  # (K, C) proxy index of (cluster, camera slot), -1 where unseen
    camera_values: torch.Tensor  # (C,) the camera id of each slot

    def __init__(
        self, dim: int, temperature: float = 0.07, momentum: float = 0.2, hard_negatives: int = 50
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.momentum = momentum
        self.hard_negatives = hard_negatives
        self.register_buffer("proxies", torch.zeros((0, dim)))
        self.register_buffer("proxy_cluster", torch.zeros(0, dtype=torch.long))
        self.register_buffer("proxy_camera", torch.zeros(0, dtype=torch.long))
        self.register_buffer("lookup", torch.zeros((0, 0), dtype=torch.long))
        self.register_buffer("camera_values", torch.zeros(0, dtype=torch.long))

    @property
    def num_proxies(self) -> int:
        return self.proxies.shape[0]

    @torch.no_grad()
    def reset(self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor) -> None:
        """Proxies anew from ``features`` (N, d), pseudo ``labels`` (N,) and ``cameras`` (N,)."""
        device = self.proxies.device
        features, labels, cameras = features.to(device), labels.to(device), cameras.to(device)
        keep = labels >= 0
        self.camera_values = torch.unique(cameras)
        slot = torch.searchsorted(self.camera_values, cameras)
        num_cams = len(self.camera_values)
        num_clusters = int(labels.max()) + 1 if bool(keep.any()) else 0
        key = labels[keep] * num_cams + slot[keep]
        pairs, inverse = torch.unique(key, return_inverse=True)
        sums = torch.zeros((len(pairs), features.shape[1]), device=device)
        sums.index_add_(0, inverse, F.normalize(features[keep].float(), dim=1))
        self.proxies = F.normalize(sums, dim=1)
        self.proxy_cluster = pairs // num_cams
        self.proxy_camera = self.camera_values[pairs % num_cams]
        self.lookup = torch.full((num_clusters, num_cams), -1, dtype=torch.long, device=device)
        self.lookup[pairs // num_cams, pairs % num_cams] = torch.arange(len(pairs), device=device)

    def _proxy_of(self, labels: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        slot = torch.searchsorted(self.camera_values, cameras).clamp(
            max=len(self.camera_values) - 1
        )
        found = self.camera_values[slot] == cameras
        index = self.lookup[labels, slot]
        return torch.where(found, index, torch.full_like(index, -1))

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"intra": L_intra, "inter": L_inter}`` of a batch."""
        zero = features.float().sum() * 0.0
        keep = labels >= 0
        if self.num_proxies == 0 or not bool(keep.any()):
            return {"intra": zero, "inter": zero}
        own = self._proxy_of(labels[keep], cameras[keep])
        f = features[keep].float()
        labels, cameras = labels[keep], cameras[keep]
        has_own = own >= 0  # an image's own proxy is missing only if it joined after the reset
        f, labels, cameras, own = f[has_own], labels[has_own], cameras[has_own], own[has_own]
        if len(f) == 0:
            return {"intra": zero, "inter": zero}
        logits = f @ self.proxies.T / self.temperature  # (B, Q)
        # intra: softmax over the proxies of the image's own camera
        same_camera = self.proxy_camera[None, :] == cameras[:, None]
        intra_logits = logits.masked_fill(~same_camera, float("-inf"))
        intra = F.cross_entropy(intra_logits, own)
        # inter: every proxy of the image's cluster against the hardest other-cluster proxies
        positive = self.proxy_cluster[None, :] == labels[:, None]
        negatives = logits.detach().masked_fill(positive, float("-inf"))
        k = min(self.hard_negatives, int((~positive).sum(dim=1).min()))
        hard = torch.zeros_like(positive)
        if k > 0:
            hard.scatter_(1, negatives.topk(k, dim=1).indices, True)
        candidates = positive | hard
        log_prob = logits - torch.logsumexp(
            logits.masked_fill(~candidates, float("-inf")), dim=1, keepdim=True
        )
        inter = -(log_prob * positive).sum(dim=1) / positive.sum(dim=1)
        return {"intra": intra, "inter": inter.mean()}

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor) -> None:
        """Momentum update of the batch's proxies (every rank passes the same gathered batch)."""
        keep = labels >= 0
        if self.num_proxies == 0 or not bool(keep.any()):
            return
        index = self._proxy_of(labels[keep], cameras[keep])
        feats = F.normalize(features[keep].float(), dim=1)
        for f, q in zip(feats, index.tolist(), strict=True):
            if q >= 0:
                self.proxies[q] = F.normalize(
                    self.momentum * self.proxies[q] + (1.0 - self.momentum) * f, dim=0
                )

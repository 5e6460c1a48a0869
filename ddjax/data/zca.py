"""ZCA whitening as MTT applies it: fit on the train images, whiten, and undo for pictures.

Promises: :func:`fit_zca` reproduces kornia's ``ZCAWhitening(eps, compute_inv=True)`` (the
transform MTT and its successors use with ``--zca``) on NHWC images; :class:`ZCA` is an immutable
record whose :meth:`ZCA.apply` and :meth:`ZCA.inverse` are host-side NumPy and return float32.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ddjax.errors import check


@dataclasses.dataclass(frozen=True, eq=False)
class ZCA:
    """ZCA whitening exactly as MTT's ``kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)``.

    Fitted on the whole train set flattened to ``D = H * W * C`` features. With the unbiased
    covariance ``Sigma = X_c^T X_c / (N - 1) = U diag(S) U^T`` of the centred images ``X_c``:

        whiten   = U diag((S + eps)^(-1/2)) U^T
        unwhiten = U diag((S + eps)^(+1/2)) U^T

    and an image ``x`` maps to ``(x - mean) @ whiten``. kornia flattens in CHW order and ddjax in
    HWC order; ZCA commutes with any permutation of the features, so the whitened images are the
    same pixel for pixel.

    Attributes:
        mean: ``(D,)`` per-feature mean of the train images.
        whiten: ``(D, D)`` symmetric whitening matrix.
        unwhiten: ``(D, D)`` its inverse, used only to turn whitened images into pictures.
    """

    mean: np.ndarray
    whiten: np.ndarray
    unwhiten: np.ndarray

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Whitens images.

        Args:
            images: ``(N, ...)`` images whose trailing dimensions hold ``D`` values (NHWC).

        Returns:
            float32 array of the same shape: ``(x - mean) @ whiten`` per image.
        """
        flat = self._flatten(images)
        return ((flat - self.mean) @ self.whiten).astype(np.float32).reshape(images.shape)

    def inverse(self, images: np.ndarray) -> np.ndarray:
        """Undoes :meth:`apply`: ``x @ unwhiten + mean`` per image.

        Args:
            images: ``(N, ...)`` whitened images (NHWC).

        Returns:
            float32 array of the same shape, in the original pixel scale ([0, 1]).
        """
        flat = self._flatten(images)
        return (flat @ self.unwhiten + self.mean).astype(np.float32).reshape(images.shape)

    def _flatten(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        dim = self.mean.shape[0]
        check(
            images.ndim >= 2 and math.prod(images.shape[1:]) == dim,
            f"ZCA was fitted on images of {dim} values each, got an array of shape {images.shape}",
        )
        return images.reshape(images.shape[0], dim).astype(np.float32, copy=False)


def fit_zca(images: np.ndarray, eps: float = 0.1) -> ZCA:
    """Fits MTT's ZCA whitening (kornia ``ZCAWhitening``) on a set of images.

    Computed in float64 (the covariance of 50,000 CIFAR images loses digits in float32); the
    eigen-decomposition uses ``eigh`` on the symmetric covariance, which for a positive
    semi-definite matrix gives the same ``U, S`` as kornia's SVD.

    Args:
        images: ``(N, H, W, C)`` (or ``(N, D)``) train images, already scaled to [0, 1].
        eps: added to every eigenvalue before the inverse square root; MTT uses 0.1.

    Returns:
        The fitted :class:`ZCA` (float32 arrays).
    """
    images = np.asarray(images)
    check(images.ndim >= 2 and images.shape[0] >= 2, "fit_zca needs at least 2 images")
    check(eps >= 0, f"zca_eps must be >= 0, got {eps}")
    count = images.shape[0]
    flat = images.reshape(count, -1)
    mean = flat.mean(axis=0, dtype=np.float64)
    dim = flat.shape[1]
    covariance = np.zeros((dim, dim), np.float64)
    # Accumulate X_c^T X_c in row chunks so that no (N, D) float64 copy is ever made.
    for start in range(0, count, 4096):
        centred = flat[start : start + 4096].astype(np.float64) - mean
        covariance += centred.T @ centred
    covariance /= count - 1  # unbiased, as kornia's default
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # eigh may return tiny negative eigenvalues for a PSD matrix (rounding); SVD would give 0.
    eigenvalues = np.maximum(eigenvalues, 0.0) + eps
    whiten = (eigenvectors * eigenvalues**-0.5) @ eigenvectors.T
    unwhiten = (eigenvectors * eigenvalues**0.5) @ eigenvectors.T
    return ZCA(
        mean=mean.astype(np.float32),
        whiten=whiten.astype(np.float32),
        unwhiten=unwhiten.astype(np.float32),
    )

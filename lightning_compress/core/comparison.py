"""Does an artifact compute what its model computes? Agreement that does not flip on near-ties.

Plain top-1 agreement measures noise where the model's logits are nearly tied (a barely trained net
on random images): a one-ulp difference flips the class. :func:`parity` also counts a sample as
agreeing when the artifact's class is within ``tolerance`` of the reference's best logit, measured in
units of that sample's logit range -- so only flips that are not near-ties count against it -- and
reports the largest logit error in the same units. With labels it also reports both accuracies.

Example:
    >>> reference = torch.tensor([[2.0, 1.99, 0.0], [0.0, 1.0, 3.0]])
    >>> result = parity(reference, torch.tensor([[1.99, 2.0, 0.0], [0.0, 1.0, 3.0]]), tolerance=0.01)
    >>> result.top1_agreement, result.agreement
    (0.5, 1.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Parity:
    """An artifact's outputs against its reference model's, on the same images.

    Attributes:
        images: How many images were compared.
        top1_agreement: Fraction with the same top-1 class.
        agreement: Fraction whose artifact class is within ``tolerance`` of the reference's best logit
            (in units of the sample's logit range): top-1 agreement that does not flip on near-ties.
        max_logit_error: Largest ``|artifact - reference|`` logit, in units of the sample's logit range.
        tolerance: The tolerance used.
        reference_accuracy: Top-1 accuracy of the reference model (None without labels).
        accuracy: Top-1 accuracy of the artifact (None without labels).
    """

    images: int
    top1_agreement: float
    agreement: float
    max_logit_error: float
    tolerance: float
    reference_accuracy: float | None = None
    accuracy: float | None = None

    def to_dict(self) -> dict:
        """The fields as a dictionary (for the manifest).

        Returns:
            The dictionary.
        """
        return asdict(self)


def parity(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None = None,
           tolerance: float = 0.05) -> Parity:
    """Compare an artifact's logits with its reference model's logits on the same images.

    Args:
        reference: ``(N, classes)`` logits of the model.
        logits: ``(N, classes)`` logits of the artifact.
        labels: ``(N,)`` true classes, for accuracies.
        tolerance: Near-tie tolerance, a fraction of each sample's logit range (max - min).

    Returns:
        The comparison.

    Raises:
        ValueError: If the shapes differ or ``tolerance`` is negative.
    """
    if reference.shape != logits.shape or reference.dim() != 2:
        raise ValueError(f"reference and artifact logits must both be (N, classes), got {tuple(reference.shape)} "
                         f"and {tuple(logits.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    reference, logits = reference.double(), logits.double()
    spread = (reference.amax(1) - reference.amin(1)).clamp_min(1e-12)
    chosen = logits.argmax(1)
    best = reference.argmax(1)
    gap = (reference.amax(1) - reference.gather(1, chosen[:, None])[:, 0]) / spread
    error = ((logits - reference).abs().amax(1) / spread).nan_to_num(float("inf"))
    accuracies = (None, None)
    if labels is not None:
        accuracies = (float((best == labels).double().mean()), float((chosen == labels).double().mean()))
    return Parity(
        images=len(reference), top1_agreement=float((chosen == best).double().mean()),
        agreement=float((gap <= tolerance).double().mean()), max_logit_error=float(error.max()),
        tolerance=tolerance, reference_accuracy=accuracies[0], accuracy=accuracies[1],
    )

"""DER++ (Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS 2020): experience
replay that also keeps the network's outputs. Every stored sample carries the decoder's
low-resolution logits (1, 4G, 4G) of the step that stored it; training matches them again.

The loss of a training batch of N images (mammoth's ``derpp``, with two independent draws)::

    loss(current) + alpha * MSE(logits of replay draw 1, their stored logits)
                  + beta * loss(replay draw 2, its masks)

``loss`` is the configured segmentation loss, summed over images; MSE is taken per image over
its 4G x 4G low-resolution logits (the decoder's own, which the full-size logits are an
upsampling of) and summed over images the same way, so alpha and beta weigh per-image terms
against per-image terms as in DER++ (where every term is a batch mean). Each draw holds
min(N, buffer size) samples; with an empty buffer (the first batch) the loss is the first term.
The current batch is offered to the reservoir after its loss is computed, with the logits
that forward produced (float32, also under ``--amp bf16``). The buffer, its file per step,
resume and storage are :class:`~samcl.methods.er.ExperienceReplay`'s.
"""
import torch

from ..backbones.base import Features
from ..loading import Batch
from ..registry import register_method
from ..settings import Settings, setting
from .base import Forward
from .er import ExperienceReplay


def logit_mse(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) logits against stored ones: the mean squared difference of each image, summed."""
    return (logits.float() - stored.float()).pow(2).flatten(1).mean(1).sum()


class DERSettings(Settings):
    """DER++'s two replay terms."""

    der_alpha: float = setting(0.1, "der: weight of the MSE between replayed samples' logits and their stored logits")
    der_beta: float = setting(0.5, "der: weight of the segmentation loss of replayed samples")


@register_method("der")
class DERPlusPlus(ExperienceReplay):
    loss_terms = ("task", "der_logits", "der_labels")

    def observe(self, batch: Batch, prefix: Features, forward: Forward) -> torch.Tensor:
        cfg = self.cfg
        low, iou = self.run_forward(batch, prefix, forward, low_res=True)
        loss = self.term("task", self.segmentation_loss(low, iou, batch))
        n = len(batch.names)
        if cfg.der_alpha != 0:
            first = self.replay.sample(n, batch.images.device)
            if first is not None:
                past, _ = self.run_forward(first.batch, self.replay_prefix(first.batch), forward, low_res=True)
                loss = loss + self.term("der_logits", cfg.der_alpha * logit_mse(past, first.logits))
        if cfg.der_beta != 0:
            second = self.replay.sample(n, batch.images.device)
            if second is not None:
                past, past_iou = self.run_forward(second.batch, self.replay_prefix(second.batch), forward, low_res=True)
                loss = loss + self.term("der_labels", cfg.der_beta * self.segmentation_loss(past, past_iou,
                                                                                          second.batch))
        self.replay.add(batch, self.domain, logits=low.detach().float())
        return loss

    def segmentation_loss(self, low: torch.Tensor, iou: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The configured loss of low-resolution logits, upsampled as the full-size forward does."""
        return self.loss(self.model.backbone.upsample_logits(low), iou, batch)
